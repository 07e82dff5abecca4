"""Float64 reference of Kronecker-factored CGD, written from its definition and independent of the C core.

Each tensor is a row-major rows x cols matrix G (vectors are columns). With M2(0) = m2_init * I, its partial
traces start at m2_init * cols * I (left) and m2_init * rows * I (right):

    M1 <- beta1 M1 + (1 - beta1) G,   Pl <- beta2 Pl + (1 - beta2) G G^T,   Pr <- beta2 Pr + (1 - beta2) G^T G
    L = Pl / bc2 - F F^T,  R = Pr / bc2 - F^T F   (centered; F = M1 / bc1)   -- a side longer than
    max_factor_dim keeps only diag(L) (or diag(R))
    C = (L+ (x) R+) / tr(R+), with X+ the matrix X with its negative eigenvalues set to 0
    p <- p (1 - lr wd) - lr (eps I + C)^-a vec(F)

The last line builds the (rows*cols)^2 matrix C explicitly and takes its power through one eigendecomposition,
so it checks the factored algebra of the kernels rather than repeating it. (eps I + C)^-a is recomputed every
`refresh_every` steps and applied to the current F in between.
"""

from __future__ import annotations

import torch


def _clamped(x: torch.Tensor) -> torch.Tensor:
    lam, v = torch.linalg.eigh(x)
    return v @ torch.diag(lam.clamp_min(0.0)) @ v.T


class ReferenceKronCGD:
    def __init__(self, p0: torch.Tensor, lr: float, beta1: float, beta2: float, power: float, eps: float = 1e-8,
                 centered: bool = True, bias_correction: bool = False, m2_init: float = 1.0,
                 weight_decay: float = 0.0, refresh_every: int = 1, max_factor_dim: int = 4096) -> None:
        self.shape = p0.shape
        rows = p0.shape[0] if p0.dim() >= 2 else p0.numel()
        cols = p0.numel() // rows
        self.q = p0.detach().to(torch.float64).reshape(rows, cols).clone()
        self.lr, self.beta1, self.beta2, self.power, self.eps = lr, beta1, beta2, power, eps
        self.centered, self.bias_correction, self.weight_decay = centered, bias_correction, weight_decay
        self.refresh_every, self.max_factor_dim = refresh_every, max_factor_dim
        self.m1 = torch.zeros_like(self.q)
        self.pl = m2_init * cols * torch.eye(rows, dtype=torch.float64)
        self.pr = m2_init * rows * torch.eye(cols, dtype=torch.float64)
        self.inverse_metric: torch.Tensor | None = None
        self.t = 0

    def _factor(self, p: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
        bc2 = 1 - self.beta2**self.t if self.bias_correction else 1.0
        centered = self.centered and not (self.bias_correction and self.t == 1)  # the first step's is exactly 0
        c = p / bc2 - (gram if centered else 0.0)
        return torch.diag(c.diagonal().clamp_min(0.0)) if c.shape[0] > self.max_factor_dim else _clamped(c)

    def step(self, grad: torch.Tensor) -> torch.Tensor:
        g = grad.detach().to(torch.float64).reshape(self.q.shape)
        self.t += 1
        bc1 = 1 - self.beta1**self.t if self.bias_correction else 1.0
        self.m1 = self.beta1 * self.m1 + (1 - self.beta1) * g
        self.pl = self.beta2 * self.pl + (1 - self.beta2) * g @ g.T
        self.pr = self.beta2 * self.pr + (1 - self.beta2) * g.T @ g
        force = self.m1 / bc1
        if (self.t - 1) % self.refresh_every == 0:
            left = self._factor(self.pl, force @ force.T)
            right = self._factor(self.pr, force.T @ force)
            trace = right.trace()
            n = self.q.numel()
            c = torch.kron(left, right) / trace if trace > 0 else torch.zeros(n, n, dtype=torch.float64)
            lam, v = torch.linalg.eigh(c)
            self.inverse_metric = v @ torch.diag((self.eps + lam.clamp_min(0.0)) ** -self.power) @ v.T
        direction = (self.inverse_metric @ force.reshape(-1)).reshape(self.q.shape)
        self.q = self.q * (1 - self.lr * self.weight_decay) - self.lr * direction
        return self.q.reshape(self.shape)

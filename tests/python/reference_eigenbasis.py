"""Float64 reference of CGD in the Kronecker eigenbasis, written from SOAP's published algorithm (Vyas et al. 2024,
arXiv 2409.11321, Algorithms 3 and 4) with CGD's power, centering and start, independent of the C core.

Each tensor is a row-major rows x cols matrix G (vectors: rows = numel, cols = 1, with no full factor). A full
side keeps its factor Pl <- beta2 Pl + (1 - beta2) G G^T (Pr from G^T G) and a basis Ql (columns = vectors); a
side that is not full has the identity. With Q = Ql (x) Qr and vec() row-major:

    step 1 only:  Pl, Pr take G; Ql, Qr = eigenvectors of L, R, by descending eigenvalue
    g' = Q^T vec(G),  f' = Q^T vec(F),  V <- beta2 V + (1 - beta2) g'^2
    steps > 1:    Pl, Pr take G (after g' was formed: the basis of a step never sees its own gradient)
    c = V / bc2 - f'^2 (centered) or V / bc2, clamped at 0;  p <- p (1 - lr wd) - lr Q (f' (eps + c)^-a)
    steps t > 1 with t % refresh_every == 0, per full side:  est = diag(Q^T L Q), its order descending moves
        the columns of L Q and V's slices along that side;  Q <- the Q of QR(L Q)

L = Pl / bc2 - F F^T when centered (from the second step on with bias correction), Pl / bc2 otherwise. The
rotations use the explicit (rows cols)^2 Kronecker product, not the kernels' two-sided products.
"""

from __future__ import annotations

import torch


class ReferenceEigenbasisCGD:
    def __init__(self, p0: torch.Tensor, lr: float, beta1: float, beta2: float, power: float, eps: float,
                 centered: bool, bias_correction: bool, m2_init: float, weight_decay: float = 0.0,
                 refresh_every: int = 10, max_factor_dim: int = 4096) -> None:
        self.shape = p0.shape
        rows = p0.shape[0] if p0.dim() >= 2 else p0.numel()
        cols = p0.numel() // rows
        self.q = p0.detach().to(torch.float64).reshape(rows, cols).clone()
        self.lr, self.beta1, self.beta2, self.power, self.eps = lr, beta1, beta2, power, eps
        self.centered, self.bias_correction, self.weight_decay = centered, bias_correction, weight_decay
        self.refresh_every = refresh_every
        self.full = [p0.dim() >= 2 and n <= max_factor_dim for n in (rows, cols)]
        eye = lambda n: torch.eye(n, dtype=torch.float64)  # noqa: E731
        self.factors = [m2_init * cols * eye(rows), m2_init * rows * eye(cols)]
        self.bases = [eye(rows), eye(cols)]
        self.m1 = torch.zeros_like(self.q)
        self.v = torch.full_like(self.q, m2_init)
        self.t = 0

    def _rotation(self) -> torch.Tensor:
        return torch.kron(self.bases[0].contiguous(), self.bases[1].contiguous())

    def _add(self, g: torch.Tensor) -> None:
        grams = (g @ g.T, g.T @ g)
        for k in range(2):
            if self.full[k]:
                self.factors[k] = self.beta2 * self.factors[k] + (1 - self.beta2) * grams[k]

    def _factor(self, k: int, force: torch.Tensor, centered: bool) -> torch.Tensor:
        bc2 = 1 - self.beta2**self.t if self.bias_correction else 1.0
        gram = force @ force.T if k == 0 else force.T @ force
        return self.factors[k] / bc2 - (gram if centered else 0.0)

    def step(self, grad: torch.Tensor) -> torch.Tensor:
        g = grad.detach().to(torch.float64).reshape(self.q.shape)
        self.t += 1
        bc1 = 1 - self.beta1**self.t if self.bias_correction else 1.0
        bc2 = 1 - self.beta2**self.t if self.bias_correction else 1.0
        centered = self.centered and not (self.bias_correction and self.t == 1)
        self.m1 = self.beta1 * self.m1 + (1 - self.beta1) * g
        force = self.m1 / bc1
        if self.t == 1:
            self._add(g)
            for k in range(2):
                if self.full[k]:
                    self.bases[k] = torch.linalg.eigh(self._factor(k, force, centered)).eigenvectors.flip(1)
        rot = self._rotation()
        g_rot = (rot.T @ g.reshape(-1)).reshape(self.q.shape)
        self.v = self.beta2 * self.v + (1 - self.beta2) * g_rot**2
        if self.t > 1:
            self._add(g)
        f_rot = (rot.T @ force.reshape(-1)).reshape(self.q.shape)
        c = (self.v / bc2 - (f_rot**2 if centered else 0.0)).clamp_min(0.0)
        direction = (rot @ (f_rot * (self.eps + c) ** -self.power).reshape(-1)).reshape(self.q.shape)
        self.q = self.q * (1 - self.lr * self.weight_decay) - self.lr * direction
        if self.t > 1 and self.t % self.refresh_every == 0:
            for k in range(2):
                if not self.full[k]:
                    continue
                factor, basis = self._factor(k, force, centered), self.bases[k]
                power_iterate = factor @ basis
                order = torch.argsort((basis * power_iterate).sum(0), descending=True, stable=True)
                self.v = self.v.index_select(k, order)
                self.bases[k] = torch.linalg.qr(power_iterate[:, order]).Q
        return self.q.reshape(self.shape)

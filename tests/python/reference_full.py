"""Float64 reference of full-covariance CGD (arXiv 2504.05279, eqs 3.5, 4.4, 4.9, 5.1), written from the paper
with torch.linalg.eigh and independent of the C core. The parameters form one vector q split into `blocks`
(lists of coordinate indices); each block has its own M2 and metric:

    M1 <- beta1 M1 + (1 - beta1) g,  M2 <- beta2 M2 + (1 - beta2) g g^T          (eq 3.5)
    C  = M2 - M1 M1^T (centered, eq 4.9) or M2;  G = (eps I + C)^a             (eq 5.1)
    q  <- q - lr G^{-1} M1                                                      (eq 2.8)

with the eigenvalues of C clamped at 0, optional Adam-style bias correction, M2(0) = m2_init * I (eq 4.4), and
G^{-1} recomputed every `refresh_every` steps.
"""

from __future__ import annotations

import torch


class ReferenceFullCGD:
    def __init__(self, q0: torch.Tensor, blocks: list[list[int]], lr: float, beta1: float, beta2: float,
                 power: float, eps: float = 1e-8, centered: bool = True, bias_correction: bool = False,
                 m2_init: float = 1.0, weight_decay: float = 0.0, refresh_every: int = 1) -> None:
        self.q = q0.detach().to(torch.float64).clone()
        self.blocks = [torch.tensor(b) for b in blocks]
        self.lr, self.beta1, self.beta2, self.power, self.eps = lr, beta1, beta2, power, eps
        self.centered, self.bias_correction, self.weight_decay = centered, bias_correction, weight_decay
        self.refresh_every = refresh_every
        self.m1 = torch.zeros_like(self.q)
        self.m2 = [m2_init * torch.eye(len(b), dtype=torch.float64) for b in blocks]
        self.inverse_metric: list[torch.Tensor | None] = [None] * len(blocks)
        self.t = 0

    def step(self, grad: torch.Tensor) -> torch.Tensor:
        g = grad.detach().to(torch.float64)
        self.t += 1
        bc1 = 1 - self.beta1**self.t if self.bias_correction else 1.0
        bc2 = 1 - self.beta2**self.t if self.bias_correction else 1.0
        self.m1 = self.beta1 * self.m1 + (1 - self.beta1) * g
        force = self.m1 / bc1
        direction = torch.zeros_like(self.q)
        for k, idx in enumerate(self.blocks):
            gb = g[idx]
            self.m2[k] = self.beta2 * self.m2[k] + (1 - self.beta2) * torch.outer(gb, gb)
            if (self.t - 1) % self.refresh_every == 0:
                c = self.m2[k] / bc2
                if self.centered and not (self.bias_correction and self.t == 1):  # C = S - F F^T = 0 at t = 1
                    c = c - torch.outer(force[idx], force[idx])
                lam, v = torch.linalg.eigh(c)
                self.inverse_metric[k] = v @ torch.diag((self.eps + lam.clamp_min(0.0)) ** -self.power) @ v.T
            direction[idx] = self.inverse_metric[k] @ force[idx]
        self.q = self.q * (1 - self.lr * self.weight_decay) - self.lr * direction
        return self.q


class ReferenceWindowCGD(ReferenceFullCGD):
    """The same step with M2 truncated to the last `window` gradients, as FullCGD(solver="window") keeps it:
    M2 = beta2^t m2_init I + sum over the last `window` steps s of (1 - beta2) beta2^(t - s) g_s g_s^T, formed
    densely here from the kept gradients (one block: the full metric)."""

    def __init__(self, q0: torch.Tensor, window: int, **kwargs) -> None:
        super().__init__(q0, [list(range(q0.numel()))], **kwargs)
        self.window, self.m2_init, self.grads = window, float(self.m2[0][0, 0]), []

    def step(self, grad: torch.Tensor) -> torch.Tensor:
        g = grad.detach().to(torch.float64)
        self.t += 1
        self.grads = (self.grads + [g])[-self.window:]
        bc1 = 1 - self.beta1**self.t if self.bias_correction else 1.0
        bc2 = 1 - self.beta2**self.t if self.bias_correction else 1.0
        self.m1 = self.beta1 * self.m1 + (1 - self.beta1) * g
        force = self.m1 / bc1
        m2 = self.beta2**self.t * self.m2_init * torch.eye(g.numel(), dtype=torch.float64)
        for age, old in enumerate(reversed(self.grads)):
            m2 = m2 + (1 - self.beta2) * self.beta2**age * torch.outer(old, old)
        c = m2 / bc2
        if self.centered and not (self.bias_correction and self.t == 1):
            c = c - torch.outer(force, force)
        lam, v = torch.linalg.eigh(c)
        direction = v @ (((self.eps + lam.clamp_min(0.0)) ** -self.power) * (v.T @ force))
        self.q = self.q * (1 - self.lr * self.weight_decay) - self.lr * direction
        return self.q

"""Float64 reference of the induced-metric optimizers (the induced-metric paper, Algorithms 1 and 2, and the RMS
variant of its Appendix A), and of the ballistic rule (the optimal-control paper, Appendix B), written from the
papers and independent of the C core."""

from __future__ import annotations

import torch


class ReferenceInduced:
    """groups: dicts with "params" (indices into the parameter list) and lr, momentum, gamma, beta_rms, eps,
    weight_decay. One v and one r for all groups."""

    def __init__(self, params: list[torch.Tensor], groups: list[dict], xi: float, beta: float, embedding: str):
        self.p = [p.detach().to(torch.float64).clone() for p in params]
        self.m = [torch.zeros_like(p) for p in self.p]
        self.v2 = [torch.zeros_like(p) for p in self.p]
        self.groups, self.xi, self.beta, self.embedding = groups, xi, beta, embedding
        self.v, self.t = 0.0, 0

    def step(self, grads: list[torch.Tensor], loss: float | None = None) -> list[torch.Tensor]:
        self.t += 1
        t = self.t
        g = [x.detach().to(torch.float64) for x in grads]
        gamma_inv = {}
        s = 0.0
        for group in self.groups:
            for i in group["params"]:
                if group["gamma"] == "rms":
                    self.v2[i] = group["beta_rms"] * self.v2[i] + (1 - group["beta_rms"]) * g[i] ** 2
                    gamma_inv[i] = 1 / ((self.v2[i] / (1 - group["beta_rms"] ** t)).sqrt() + group["eps"])
                else:
                    gamma_inv[i] = torch.ones_like(g[i])
                s += float((g[i] * gamma_inv[i] * g[i]).sum())
        self.v = self.beta * self.v + (1 - self.beta) * self.xi * s
        v_hat = abs(self.v / (1 - self.beta**t))
        r = loss / (loss**2 + v_hat) if self.embedding == "log" else 1 / (1 + v_hat)
        for group in self.groups:
            mu, lr = group["momentum"], group["lr"]
            for i in group["params"]:
                self.m[i] = mu * self.m[i] + (1 - mu) * g[i]
                m_hat = self.m[i] / (1 - mu**t)
                self.p[i] = self.p[i] - lr * group["weight_decay"] * self.p[i] - lr * r * gamma_inv[i] * m_hat
        return self.p


class ReferenceBallistic:
    """s <- beta s + (1 - beta) g^2, theta <- theta - lr g / sqrt(s + eps), from s = 0."""

    def __init__(self, param: torch.Tensor, lr: float, beta: float, eps: float) -> None:
        self.p = param.detach().to(torch.float64).clone()
        self.s = torch.zeros_like(self.p)
        self.lr, self.beta, self.eps = lr, beta, eps

    def step(self, grad: torch.Tensor) -> torch.Tensor:
        g = grad.detach().to(torch.float64)
        self.s = self.beta * self.s + (1 - self.beta) * g * g
        self.p = self.p - self.lr * g / torch.sqrt(self.s + self.eps)
        return self.p

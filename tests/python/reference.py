"""Float64 reference of diagonal CGD, written from the papers' equations and independent of the C core.

Covariant Gradient Descent (arXiv 2504.05279): EMAs with timescale tau, beta = tau / (1 + tau) (eq 3.5), force
F = M1, metric G = (eps + C)^a on the diagonal (eqs 4.1, 4.2, 5.1), C = M2 or the variance M2 - M1^2 (eq 4.8),
initial condition M1 = 0, M2 = 1 (eq 4.4). Also Adam's bias correction and eps placement, torch's weight decay
forms, and AdaBelief's Algorithm 2 (variance S of g around M1, eps added to S).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Hyper:
    lr: float
    beta1: float
    beta2: float
    power: float
    eps: float = 1e-8
    moment: str = "raw"
    eps_inside: bool = True
    bias_correction: bool = True
    m2_init: float = 0.0
    weight_decay: float = 0.0
    decoupled_weight_decay: bool = True
    nesterov: bool = False
    maximize: bool = False


class ReferenceCGD:
    """Keeps float64 copies of the parameters and steps them from given gradients."""

    def __init__(self, params: list[torch.Tensor], h: Hyper) -> None:
        self.h = h
        self.params = [p.detach().to(torch.float64).clone() for p in params]
        self.m1 = [torch.zeros_like(p) for p in self.params]
        self.m2 = [torch.full_like(p, h.m2_init) for p in self.params]
        self.t = 0

    def step(self, grads: list[torch.Tensor], round_to: torch.dtype | None = None) -> None:
        """One step; `round_to` stores each new parameter in that dtype, as a low-precision model would."""
        h = self.h
        self.t += 1
        bc1 = 1 - h.beta1**self.t if h.bias_correction else 1.0
        bc2 = 1 - h.beta2**self.t if h.bias_correction else 1.0
        for i, (p, g) in enumerate(zip(self.params, grads)):
            g = g.detach().to(torch.float64)
            if h.maximize:
                g = -g
            if h.weight_decay:
                if h.decoupled_weight_decay:
                    p = p * (1 - h.lr * h.weight_decay)
                else:
                    g = g + h.weight_decay * p
            self.m1[i] = h.beta1 * self.m1[i] + (1 - h.beta1) * g
            force = h.beta1 * self.m1[i] + (1 - h.beta1) * g if h.nesterov else self.m1[i]
            force = force / bc1
            if h.moment == "belief":
                self.m2[i] = h.beta2 * self.m2[i] + (1 - h.beta2) * (g - self.m1[i]) ** 2 + h.eps
                c = self.m2[i] / bc2
            else:
                self.m2[i] = h.beta2 * self.m2[i] + (1 - h.beta2) * g * g
                c = self.m2[i] / bc2
                # With bias correction the first step's variance g^2 - g^2 is exactly 0: it takes the second
                # moment itself until a second gradient gives the variance data.
                if h.moment == "centered" and not (h.bias_correction and self.t == 1):
                    c = torch.clamp(c - (self.m1[i] / bc1) ** 2, min=0.0)
            if h.power == 0:  # G(x) = 1: SGD (eq 4.5), whatever eps
                metric = 1.0
            else:
                metric = (h.eps + c) ** h.power if h.eps_inside else c**h.power + h.eps
            new = p - h.lr * force / metric
            if round_to is not None:
                new = new.to(round_to).to(torch.float64)
            self.params[i] = new

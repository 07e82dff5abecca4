"""torch-cgd: Covariant Gradient Descent optimizers for PyTorch, with a C/CUDA core.

    import cgd
    optimizer = cgd.CGD(model.parameters(), lr=1e-3)      # instead of torch.optim.Adam(...)
    optimizer = cgd.Adam(model.parameters(), lr=1e-3)     # torch.optim.Adam, run by the CGD kernels
"""

from ._ops import BUILD_INFO
from .combined import Combined, split_parameters
from .full import FullCGD
from .induced import InducedMetric
from .muon import Muon
from ._base import NonFiniteGradientError
from ._validate import beta_to_tau, tau_to_beta
from .diagonal import CGD
from .presets import SGD, AdaBelief, Adam, AdamW, Ballistic, RMSprop

__version__ = "0.1.0"

__all__ = [
    "BUILD_INFO",
    "CGD",
    "Combined",
    "FullCGD",
    "SGD",
    "AdaBelief",
    "Adam",
    "AdamW",
    "Ballistic",
    "InducedMetric",
    "Muon",
    "NonFiniteGradientError",
    "RMSprop",
    "beta_to_tau",
    "split_parameters",
    "tau_to_beta",
]

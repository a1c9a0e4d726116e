"""fastalpha: pair-weighted contrastive losses (α-CL, Tian 2022) with fused kernels.

    import fastalpha
    loss = fastalpha.alpha_cl_loss(z1, z2, rule="direct")       # or AlphaCLLoss(...)(z1, z2)
    loss = fastalpha.alpha_cl_loss(z1, z2, **fastalpha.PAPER_LOSSES["nce"])
    loss = fastalpha.alpha_cl_loss(views, labels=y)              # V views (V, N, D) and SupCon labels
"""
from . import _checkout  # noqa: F401  (first: a checkout's kernels/ as fastalpha.kernels)
from . import ops as _ops  # registers the fastalpha::alpha_cl_fused custom op
from .dispatch import available_backends
from .distributed import alpha_cl_loss_distributed
from .functional import alpha_cl_loss, contrastive_covariance, energy, pair_weights
from .losses import AlphaCLLoss, DCLLoss, InfoNCELoss, NTXentLoss, SupConLoss
from .queue import Queue
from .rules import PAPER_LOSSES, RULES

__version__ = "0.1.0"

__all__ = [
    "alpha_cl_loss",
    "alpha_cl_loss_distributed",
    "AlphaCLLoss",
    "InfoNCELoss",
    "NTXentLoss",
    "DCLLoss",
    "SupConLoss",
    "Queue",
    "pair_weights",
    "energy",
    "contrastive_covariance",
    "available_backends",
    "PAPER_LOSSES",
    "RULES",
]

"""nn.Module wrappers of fastalpha.alpha_cl_loss, with the names users of other libraries look for."""
from __future__ import annotations

import torch

from .checks import check_flag
from .functional import alpha_cl_loss
from .rules import check_reduction, make_spec


class AlphaCLLoss(torch.nn.Module):
    """α-CL loss module: `AlphaCLLoss(rule="direct")(z1, z2)`; see fastalpha.alpha_cl_loss.

    With `gather_distributed=True` (under an initialised torch.distributed) the loss is that
    of the global batch: every rank's rows are negatives for every anchor, each rank computes
    its own anchors, and with reduction="mean" plus DDP's gradient averaging the parameter
    gradients equal those of one process seeing the whole batch (fastalpha.distributed).
    """

    def __init__(self, rule="direct", temperature=None, p=None, gamma=None, eps=None, normalize=True,
                 detach_alpha=True, reduction="mean", backend="auto", gather_distributed=False, group=None,
                 negatives="all"):
        super().__init__()
        # Fail at construction, not at the first step.
        make_spec(rule, temperature, p, gamma, eps, normalize, detach_alpha, negatives)
        check_reduction(reduction)
        self.kwargs = dict(rule=rule, temperature=temperature, p=p, gamma=gamma, eps=eps, normalize=normalize,
                           detach_alpha=detach_alpha, reduction=reduction, backend=backend, negatives=negatives)
        self.gather_distributed = check_flag("gather_distributed", gather_distributed)
        if self.gather_distributed and not torch.distributed.is_available():
            raise ValueError("gather_distributed=True needs torch.distributed, which this torch build does not have "
                             "(torch.distributed.is_available() is False)")
        self.group = group

    def forward(self, z1: torch.Tensor, z2: torch.Tensor, queue: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of two views, with an optional (K, D) queue of extra negatives."""
        if self.gather_distributed:
            from .distributed import alpha_cl_loss_distributed

            return alpha_cl_loss_distributed(z1, z2, group=self.group, queue=queue, **self.kwargs)
        return alpha_cl_loss(z1, z2, queue=queue, **self.kwargs)

    def extra_repr(self) -> str:
        shown = {k: v for k, v in self.kwargs.items() if v is not None}
        return ", ".join(f"{k}={v!r}" for k, v in shown.items()) + f", gather_distributed={self.gather_distributed}"


class InfoNCELoss(AlphaCLLoss):
    """InfoNCE / NT-Xent: loss_i = −log(e^{−d2_i/τ} / (ε e^{−d2_i/τ} + Σ_{j∈J_i} e^{−d2_ij/τ})).

    With ε = 1 and normalised rows this is SimCLR's NT-Xent (positive in the denominator);
    ε = 0 is the decoupled form (DCLLoss). d2 = 1 − cos, so −d2/τ equals cos/τ up to a constant.
    """

    def __init__(self, temperature=0.5, eps=1.0, normalize=True, reduction="mean", backend="auto",
                 gather_distributed=False, group=None, negatives="all"):
        super().__init__(rule="infonce", temperature=temperature, eps=eps, normalize=normalize, reduction=reduction,
                         backend=backend, gather_distributed=gather_distributed, group=group, negatives=negatives)


NTXentLoss = InfoNCELoss


class DCLLoss(InfoNCELoss):
    """Decoupled contrastive loss: InfoNCE without the positive in the denominator (ε = 0).

    loss_i = −log(e^{−d2_i/τ} / Σ_{j∈J_i} e^{−d2_ij/τ}) = log Σ_{j∈J_i} e^{(d2_i − d2_ij)/τ}.
    """

    def __init__(self, temperature=0.5, normalize=True, reduction="mean", backend="auto", gather_distributed=False,
                 group=None, negatives="all"):
        super().__init__(temperature=temperature, eps=0.0, normalize=normalize, reduction=reduction, backend=backend,
                         gather_distributed=gather_distributed, group=group, negatives=negatives)

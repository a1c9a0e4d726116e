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

    def forward(self, z1, z2: torch.Tensor | None = None, queue: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, queue_labels: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of two views (or V views, or one labelled view: see fastalpha.alpha_cl_loss),
        with an optional (K, D) queue, integer `labels` and the queue's `queue_labels`."""
        if self.gather_distributed:
            if labels is not None or z2 is None:
                raise ValueError("gather_distributed=True does not support labels or more than two views: "
                                 "the distributed layer gathers partner pairs (pass z1 and z2, no labels)")
            from .distributed import alpha_cl_loss_distributed

            return alpha_cl_loss_distributed(z1, z2, group=self.group, queue=queue, **self.kwargs)
        return alpha_cl_loss(z1, z2, queue=queue, labels=labels, queue_labels=queue_labels, **self.kwargs)

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


class SupConLoss(torch.nn.Module):
    r"""Supervised contrastive loss (SupCon), with pytorch-metric-learning's `SupConLoss` names.

        criterion = SupConLoss(temperature=0.1)
        loss = criterion(embeddings, labels)          # embeddings (B, D), labels (B,)

    For normalised rows, positives P_i = the other rows with label y_i and a = every other row,

        loss_i = −(1/|P_i|) Σ_{p∈P_i} log( e^{cos_ip/τ} / Σ_{a≠i} e^{cos_ia/τ} ),

    averaged over the anchors that have a positive; an anchor whose label occurs once has loss
    0 and is left out of the mean. This is fastalpha's `infonce` with ε = 1 and label-defined
    positives (docs/design.md, "Positive sets"), computed by the fused backends in O(M·D)
    memory. `embeddings` may also be a (V, N, D) tensor or a list of V views with labels of
    length N. Differences from pytorch-metric-learning: docs/migrating.md.
    """

    def __init__(self, temperature=0.1, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        make_spec("infonce", temperature, eps=1.0)
        check_reduction(reduction)
        self.temperature, self.reduction, self.backend = temperature, reduction, backend

    def forward(self, embeddings, labels: torch.Tensor, queue: torch.Tensor | None = None,
                queue_labels: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of labelled embeddings; with a (K, D) `queue` and its `queue_labels`, the
        queue's rows are positives of the anchors with their label and negatives of the others."""
        if labels is None:
            raise ValueError("SupConLoss needs labels: the positives of a row are the rows with its label")
        return alpha_cl_loss(embeddings, rule="infonce", temperature=self.temperature, eps=1.0,
                             reduction=self.reduction, backend=self.backend, labels=labels, queue=queue,
                             queue_labels=queue_labels)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature!r}, reduction={self.reduction!r}, backend={self.backend!r}"

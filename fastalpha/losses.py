"""nn.Module wrappers of fastalpha.alpha_cl_loss, with the names users of other libraries look for."""
from __future__ import annotations

import numbers

import torch

from . import dispatch
from .checks import check_flag, check_views
from .functional import alpha_cl_loss, loss_of_spec
from .queue import MemoryBank
from .rules import check_reduction, make_spec


def memory_bank_shape(size) -> tuple[int, int] | None:
    """lightly's `memory_bank_size`: 0 (no bank) or (K, D); None for no bank. A bare int K > 0
    is rejected as lightly rejects it: the rows' dimension cannot be guessed."""
    if isinstance(size, bool) or not isinstance(size, (numbers.Integral, tuple, list, torch.Size)):
        raise TypeError(f"memory_bank_size must be 0 or a (num_features, dim) tuple of ints, got {size!r}")
    shape = (int(size),) if isinstance(size, numbers.Integral) else tuple(size)
    if any(isinstance(x, bool) or not isinstance(x, numbers.Integral) for x in shape):
        raise TypeError(f"memory_bank_size must be 0 or a (num_features, dim) tuple of ints, got {size!r}")
    shape = tuple(int(x) for x in shape)
    if any(x < 0 for x in shape):
        raise ValueError(f"Illegal memory bank size {size}, all entries must be non-negative.")
    if isinstance(size, numbers.Integral) and size > 0:
        raise ValueError(f"Memory bank size 'size={size}' does not specify the feature dimension. Set it with "
                         f"'size=({size}, dim)', or pass 'size=0' to disable the memory bank.")
    if shape != (0,) and len(shape) != 2:
        raise ValueError(f"Illegal memory bank size {size}, expected a (num_features, dim) tuple, or 'size=0' to "
                         "disable the memory bank.")
    if shape == (0,) or shape[0] == 0:
        return None
    if shape[1] == 0:
        raise ValueError(f"Illegal memory bank size {size}: dim must be >= 1")
    return shape


class AlphaCLLoss(torch.nn.Module):
    """α-CL loss module: `AlphaCLLoss(rule="direct")(z1, z2)`; see fastalpha.alpha_cl_loss.

    With `gather_distributed=True` (under an initialised torch.distributed) the loss is that
    of the global batch: every rank's rows are negatives for every anchor (and, with labels or
    V views, positives of the anchors of their group on every rank), each rank computes its own
    anchors, and with reduction="mean" plus DDP's gradient averaging the parameter gradients
    equal those of one process seeing the whole batch (fastalpha.distributed).
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
            from .distributed import alpha_cl_loss_distributed

            return alpha_cl_loss_distributed(z1, z2, group=self.group, queue=queue, labels=labels,
                                             queue_labels=queue_labels, **self.kwargs)
        return alpha_cl_loss(z1, z2, queue=queue, labels=labels, queue_labels=queue_labels, **self.kwargs)

    def extra_repr(self) -> str:
        shown = {k: v for k, v in self.kwargs.items() if v is not None}
        return ", ".join(f"{k}={v!r}" for k, v in shown.items()) + f", gather_distributed={self.gather_distributed}"


class InfoNCELoss(AlphaCLLoss):
    """InfoNCE / NT-Xent: loss_i = −log(e^{−d2_i/τ} / (ε e^{−d2_i/τ} + Σ_{j∈J_i} e^{−d2_ij/τ})).

    With ε = 1 and normalised rows this is SimCLR's NT-Xent (positive in the denominator);
    ε = 0 is the decoupled form (DCLLoss). d2 = 1 − cos, so −d2/τ equals cos/τ up to a constant.

    `memory_bank_size=(K, D)` is lightly's memory bank (MoCo): `loss(out0, out1)` then takes
    the anchors from out0 only, the positive of out0[i] is out1[i], and the negatives are the
    bank's rows from before this call,

        loss = (1/N) Σ_i −log(e^{cos(out0_i, out1_i)/τ} / (e^{cos(out0_i, out1_i)/τ} + Σ_k e^{cos(out0_i, b_k)/τ})),

    after which the bank takes out1 (normalised, detached) if out0 requires grad, as lightly
    does (an evaluation call leaves it alone); with gather_distributed=True it takes every
    rank's out1, so the banks of all ranks stay equal (the loss stays this rank's, as lightly's). Gradients flow into out0 and out1. The bank
    starts empty and only its filled slots are negatives (lightly starts from random rows):
    docs/migrating.md. The anchors are the fused op's first N rows, so a call costs N anchor
    rows, not 2N.
    """

    def __init__(self, temperature=0.5, eps=1.0, normalize=True, reduction="mean", backend="auto",
                 gather_distributed=False, group=None, negatives="all", memory_bank_size=0):
        super().__init__(rule="infonce", temperature=temperature, eps=eps, normalize=normalize, reduction=reduction,
                         backend=backend, gather_distributed=gather_distributed, group=group, negatives=negatives)
        size = memory_bank_shape(memory_bank_size)
        self.memory_bank = None
        if size is not None:
            if negatives != "all":
                raise ValueError(f"memory_bank_size takes its negatives from the bank (negatives='none' is implied); "
                                 f"leave negatives='all', got negatives={negatives!r}")
            self.memory_bank = MemoryBank(*size)

    def forward(self, z1, z2: torch.Tensor | None = None, queue: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.memory_bank is None:
            return super().forward(z1, z2, queue=queue, labels=labels)
        if queue is not None or labels is not None:
            raise ValueError("a loss with a memory bank takes no queue= or labels= (its negatives are the bank's rows)")
        return self._bank_forward(z1, z2)

    def _bank_forward(self, out0, out1) -> torch.Tensor:
        from . import distributed

        update = bool(getattr(out0, "requires_grad", False))
        layout = None
        if self.gather_distributed and distributed.dist.is_available() and distributed.dist.is_initialized():
            # First, so that bad input on one rank raises on every rank (no rank left waiting).
            problem, views = distributed.local_problem(out0, out1, None, None, None, "all")
            layout = distributed.exchange_layout(views, problem, update, group=self.group)
        check_views(out0, out1, ("out0", "out1"))
        bank = self.memory_bank
        if out0.shape[1] != bank.bank.shape[1]:
            raise ValueError(f"out0/out1 must have D = {bank.bank.shape[1]} columns, the memory bank's "
                             f"(memory_bank_size={tuple(bank.bank.shape)}), got {out0.shape[1]}")
        if out0.device != bank.bank.device:
            raise ValueError(f"out0/out1 are on {out0.device} but the memory bank is on {bank.bank.device}: move the "
                             "loss with .to(device)")
        kwargs = {k: v for k, v in self.kwargs.items() if k not in ("reduction", "backend")}
        spec = make_spec(**{**kwargs, "negatives": "none"})
        backend = dispatch.resolve_backend(self.kwargs["backend"], out0.device, spec, True)
        # The negatives are the filled slots, a slice by fill level while the bank fills (a
        # host read per call until it is full; then the whole bank, no read). Ignored columns
        # would avoid the slice but need group-defined positives, which not every backend has
        # with a queue, while this partner path (negatives="none") runs on all of them.
        # A copy: the bank is overwritten below, and the op may keep its queue for backward.
        negatives = bank.rows().to(out0.dtype, copy=True)
        temperature = self.kwargs["temperature"]
        learnable = temperature if isinstance(temperature, torch.Tensor) and temperature.requires_grad else None
        loss = loss_of_spec(out0, out1, spec, self.kwargs["reduction"], backend, negatives, learnable,
                            first_view_anchors=True)
        if update:
            rows = torch.nn.functional.normalize(out1.detach(), dim=1) if spec.unit_rows else out1.detach()
            if layout is not None:
                # lightly's gather_distributed: every rank's rows (rank order, any shares) enter
                # every rank's bank, so the banks stay equal; the loss stays local, as lightly's.
                # gather_rows moves the two views of a pair layout: the rows go as both, one is kept.
                rows = distributed.gather_rows(torch.cat([rows, rows]), layout)[layout.n_global:]
            bank.enqueue(rows)
        return loss


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

    With `gather_distributed=True` (under an initialised torch.distributed) the labels are
    gathered with the rows: a row's positives are the rows with its label on every rank, and
    "mean" averages over the global batch's anchors that have a positive, so that DDP's averaged
    gradient is that of one process on the whole batch (fastalpha.distributed).
    """

    def __init__(self, temperature=0.1, reduction: str = "mean", backend: str = "auto",
                 gather_distributed: bool = False, group=None):
        super().__init__()
        make_spec("infonce", temperature, eps=1.0)
        check_reduction(reduction)
        self.temperature, self.reduction, self.backend = temperature, reduction, backend
        self.gather_distributed = check_flag("gather_distributed", gather_distributed)
        if self.gather_distributed and not torch.distributed.is_available():
            raise ValueError("gather_distributed=True needs torch.distributed, which this torch build does not have "
                             "(torch.distributed.is_available() is False)")
        self.group = group

    def forward(self, embeddings, labels: torch.Tensor, queue: torch.Tensor | None = None,
                queue_labels: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of labelled embeddings; with a (K, D) `queue` and its `queue_labels`, the
        queue's rows are positives of the anchors with their label and negatives of the others."""
        if labels is None:
            raise ValueError("SupConLoss needs labels: the positives of a row are the rows with its label")
        kwargs = dict(rule="infonce", temperature=self.temperature, eps=1.0, reduction=self.reduction,
                      backend=self.backend, labels=labels, queue=queue, queue_labels=queue_labels)
        if self.gather_distributed:
            from .distributed import alpha_cl_loss_distributed

            return alpha_cl_loss_distributed(embeddings, group=self.group, **kwargs)
        return alpha_cl_loss(embeddings, **kwargs)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature!r}, reduction={self.reduction!r}, backend={self.backend!r}, "
                f"gather_distributed={self.gather_distributed}")

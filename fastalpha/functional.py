r"""Functional API of fastalpha.

    loss = alpha_cl_loss(z1, z2, rule="direct")      # (N, D) views → scalar

For two views z1, z2 (N × D) stacked into Z (M = 2N rows, L2-normalised when
`normalize=True`), the loss of an anchor i with partner p(i) and negatives J_i is

    loss_i = Σ_{j∈J_i} α_ij (d2_i − d2_ij)        (the negative α-CL energy of row i),
    loss_i = log(ε + Σ_{j∈J_i} e^{(d2_i − d2_ij)/τ})   for rule="infonce",

with d2_ij = ||z_i − z_j||²/2 (1 − cos for normalised rows) and α given by the rule
(fastalpha.rules). J_i is every row but i and p(i) by default; `negatives` and `queue` choose
other sets (two towers, memory banks). Unset parameters
(None) take the rule's default: τ = 0.5 (5 for `square`), p = 4, γ = 2, ε = 0 (1 for `infonce`).
"""
from __future__ import annotations

import torch

from . import dispatch, positives, reference
from .checks import check_flag, check_labels, check_views, views_of
from .ops import FusedAlphaCL
from .rules import LossSpec, check_reduction, make_spec, negative_count


def alpha_cl_loss(
    z1,
    z2: torch.Tensor | None = None,
    rule: str = "direct",
    temperature: float | torch.Tensor | None = None,
    p: float | None = None,
    gamma: float | None = None,
    eps: float | None = None,
    normalize: bool = True,
    detach_alpha: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
    negatives: str = "all",
    queue: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    queue_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pair-weighted contrastive loss of the views of a batch, averaged over the anchors.

    Args:
        z1, z2: (N, D) embeddings of the two views; row k of z1 and row k of z2 are positives.
            Or z1 alone: a (V, N, D) tensor or a list of V (N, D) views (V ≥ 2; the positives
            of a row are the other views of its sample), or one (M, D) view with `labels`.
        rule: quadratic | entropy | direct | inverse | square | infonce (see fastalpha.rules).
        temperature: τ, any real scalar (numpy scalar, 0-dim tensor). A 0-dim tensor with
            requires_grad=True is learnable (CLIP's logit scale): for `infonce` on every
            backend; for the α-CL rules τ only shapes α, so it needs detach_alpha=False and
            the eager backend.
        p, gamma, eps: rule parameters (None → the rule's default).
        normalize: L2-normalise rows first (autograd flows through the normalisation).
        detach_alpha: α as stop-gradient (the paper's α-CL). False also differentiates α
            (Table 1's "backprop" with rule="entropy"); for infonce both are the same gradient.
        reduction: "mean" over the anchors (with labels or more than two views: over the
            anchors that have a positive), "sum", or "none" (vector of M losses).
        backend: auto | eager | chunked | cpp | cuda | triton (see fastalpha.available_backends()).
        negatives: the rows of Z that are negatives of anchor i: "all" (every row but i and
            p(i): SimCLR), "cross" (the other view's rows but p(i): CLIP's two towers, z1 and
            z2 may come from different encoders), "none" (only the queue: MoCo).
        queue: optional (K, D) extra columns shared by every anchor (a memory bank; see
            fastalpha.Queue). Normalised like z when normalize=True; never receives gradient.
            Its rows are negatives of every anchor, unless `queue_labels` gives them labels.
        labels: optional integer class ids, of length N (one per sample, shared by its views)
            or M (one per row): the positives of a row are every other row with its label and
            its negatives every row with another label (SupCon). An anchor whose label occurs
            once has loss 0 (docs/design.md, "Positive sets").
        queue_labels: with labels and a queue, the (K,) integer labels of the queue's rows: a
            queue row is then a positive of every anchor with its label and a negative of every
            other anchor (SupCon with a cross-batch memory).

    Returns the loss in the dtype of the views (computed in at least float32). An anchor set
    with no negatives (N = 1 without a queue, or one label for the whole batch) gives 0 with
    a zero gradient.
    """
    views, _ = views_of(z1, z2, labels)
    first = views[0]
    n, m = first.shape[0], first.shape[0] * len(views)
    if labels is not None:
        check_labels(labels, n, m, first.device)
    grouped = labels is not None or len(views) != 2
    if grouped:
        check_grouped_setup(negatives)
    check_queue(queue, first, negatives)
    check_queue_labels(queue_labels, queue, labels, first.device)
    spec = make_spec(rule, temperature, p, gamma, eps, normalize, detach_alpha, negatives)
    check_reduction(reduction)
    learnable = isinstance(temperature, torch.Tensor) and temperature.requires_grad
    if learnable and spec.rule != "infonce":
        if spec.detach_alpha:
            raise ValueError(f"a learnable temperature has no gradient for rule={spec.rule!r} with detach_alpha=True "
                             "(τ only shapes the stop-gradient α); use detach_alpha=False on the eager backend, "
                             "or rule='infonce'")
        if backend not in ("auto", "eager"):
            raise ValueError(f"a learnable temperature for rule={spec.rule!r} needs backend='eager' (the fused "
                             f"backends give its gradient for rule='infonce' only), got backend={backend!r}")
        backend = "eager"
    name = dispatch.resolve_backend(backend, first.device, spec, queue is not None, grouped)
    tau = temperature if learnable else None
    if grouped:
        groups = positives.Groups.of(row_groups(labels, n, len(views), first.device),
                                     0 if queue is None else queue.shape[0], queue_labels)
        return grouped_loss_of_spec(views, groups, spec, reduction, name, tau, queue)
    return loss_of_spec(views[0], views[1], spec, reduction, name, queue, tau)


def row_groups(labels, n: int, views: int, device) -> torch.Tensor:
    """The group ids of the V·N stacked rows: their labels, or their sample without labels."""
    return positives.label_groups(labels, n, views) if labels is not None else positives.view_groups(n, views, device)


def check_grouped_setup(negatives: str) -> None:
    """Labels and more than two views define the negatives as the rows of the other groups:
    they take negatives="all" (docs/design.md, "Positive sets")."""
    if negatives != "all":
        raise ValueError(f"labels / more than two views do not support negatives={negatives!r}: their negatives are "
                         "the rows of the other groups (negatives='all')")


def check_queue_labels(queue_labels, queue, labels, device) -> None:
    """queue_labels go with labels and a queue: a 1-D integer tensor of length K on the views' device.
    A labelled batch needs a labelled queue (an unlabelled row's positives are unknown)."""
    if queue_labels is None:
        if labels is not None and queue is not None:
            raise ValueError("labels with a queue need queue_labels= (the labels of the queue's K rows): an unlabelled "
                             "queue row is neither known to be a positive nor a negative of a labelled anchor")
        return
    if labels is None:
        raise ValueError("queue_labels= needs labels= for the batch (the queue's labels say which anchors they are "
                         "positives of)")
    if queue is None:
        raise ValueError("queue_labels= needs a queue= (the rows those labels belong to)")
    check_labels(queue_labels, queue.shape[0], queue.shape[0], device, name="queue_labels")


def grouped_loss_of_spec(views: list, groups: positives.Groups, spec: LossSpec, reduction: str, backend: str,
                         temperature: torch.Tensor | None = None, queue: torch.Tensor | None = None) -> torch.Tensor:
    """The loss with group-defined positives for validated views, their groups over [Z; queue]
    and a backend. No host synchronisation (it traces under torch.compile): an anchor set
    without a loss term gives 0 with a zero gradient inside the op."""
    queue = reference.prepare_queue(queue, spec.unit_rows)
    if backend == "eager":
        eager_spec = spec if temperature is None else spec.with_(temperature=temperature)
        return reference.grouped_alpha_cl_loss(views, groups, eager_spec, reduction, queue).to(views[0].dtype)
    z1, z2, *more = views if len(views) > 1 else (views[0], None)
    return FusedAlphaCL.apply(z1, z2, queue, temperature, spec, reduction, backend, groups, *more)


def check_queue(queue, z1: torch.Tensor, negatives: str) -> None:
    """A queue is a 2-D (K, D) float tensor on z1's device with z1's D; "none" needs one."""
    if queue is None:
        if negatives == "none":
            raise ValueError("negatives='none' takes the negatives from a queue only: pass queue=(K, D) tensor")
        return
    if not isinstance(queue, torch.Tensor):
        raise TypeError(f"queue must be a torch.Tensor or None, got {type(queue).__name__}")
    if not queue.is_floating_point():
        raise TypeError(f"queue must have a floating dtype, got {queue.dtype}")
    if queue.dim() != 2 or queue.shape[1] != z1.shape[1]:
        raise ValueError(f"queue must have shape (K, D) with D = {z1.shape[1]} like z1, got {tuple(queue.shape)}")
    if queue.device != z1.device:
        raise ValueError(f"queue must be on the device of z1 ({z1.device}), got {queue.device}")


def loss_of_spec(z1: torch.Tensor, z2: torch.Tensor, spec: LossSpec, reduction: str, backend: str, queue=None,
                 temperature: torch.Tensor | None = None) -> torch.Tensor:
    """The loss for validated inputs and a concrete backend name (the public API's last step).

    `temperature` is the learnable τ tensor, or None when τ is a constant (spec.temperature).
    """
    queue_rows = 0 if queue is None else queue.shape[0]
    if negative_count(z1.shape[0], queue_rows, spec.negatives) == 0:
        return no_negatives_loss([z1, z2], reduction)
    if backend == "eager":
        eager_spec = spec if temperature is None else spec.with_(temperature=temperature)
        return reference.alpha_cl_loss(z1, z2, eager_spec, reduction, queue).to(z1.dtype)
    queue = reference.prepare_queue(queue, spec.unit_rows)
    return FusedAlphaCL.apply(z1, z2, queue, temperature, spec, reduction, backend)


class _NoNegatives(torch.autograd.Function):
    """Zero per-anchor losses whose gradient is exactly zero (also for non-finite inputs)."""

    @staticmethod
    def forward(ctx, *views):
        ctx.shapes, ctx.dtype, ctx.device = [v.shape for v in views], views[0].dtype, views[0].device
        return views[0].new_zeros(sum(v.shape[0] for v in views))

    @staticmethod
    def backward(ctx, grad_out):
        return tuple(torch.zeros(shape, dtype=ctx.dtype, device=ctx.device) for shape in ctx.shapes)


def no_negatives_loss(views, reduction: str, z2: torch.Tensor | None = None) -> torch.Tensor:
    """Zero losses, one per anchor, attached to the graph of the views with a zero gradient.

    `views` is a list of views, or z1 with its partner view in `z2`."""
    views = list(views) if isinstance(views, (list, tuple)) else [views, z2]
    return reference.reduce_rows(_NoNegatives.apply(*views), reduction)


def pair_weights(z1, z2, rule="direct", temperature=None, p=None, gamma=None, eps=None, normalize=True,
                 negatives="all", queue=None) -> torch.Tensor:
    """Dense (M × (M + K)) pair weights α, zero outside J_i, without gradient. O(M²): for small M."""
    check_views(z1, z2)
    check_queue(queue, z1, negatives)
    spec = make_spec(rule, temperature, p, gamma, eps, normalize, negatives=negatives)
    queue_rows = 0 if queue is None else queue.shape[0]
    if negative_count(z1.shape[0], queue_rows, spec.negatives) == 0:
        return z1.new_zeros((2 * z1.shape[0], 2 * z1.shape[0] + queue_rows))
    return reference.pair_weights(z1, z2, spec, queue)


def _check_alpha(alpha, z) -> None:
    if not isinstance(alpha, torch.Tensor):
        raise TypeError(f"alpha must be a torch.Tensor, got {type(alpha).__name__}")
    if alpha.dtype != z.dtype:
        raise TypeError(f"alpha must have the dtype of the embeddings ({z.dtype}), got {alpha.dtype}")
    if alpha.device != z.device:
        raise ValueError(f"alpha must be on the device of the embeddings ({z.device}), got {alpha.device}")
    m = 2 * z.shape[0]
    if alpha.shape != (m, m):
        raise ValueError(f"alpha must have shape (M, M) = ({m}, {m}), got {tuple(alpha.shape)}")


def energy(z1, z2, alpha, normalize: bool = False) -> torch.Tensor:
    """E_α(Z) = Σ_i Σ_{j∈J_i} α_ij d2_ij − Σ_i A_i d2_i (Theorem 1), differentiable in z and α."""
    check_views(z1, z2)
    _check_alpha(alpha, z1)
    return reference.energy(z1, z2, alpha, check_flag("normalize", normalize))


def contrastive_covariance(a1, a2, alpha, b1=None, b2=None) -> torch.Tensor:
    """C_α[a, b] (d_a × d_b) of the paper, with b = a by default; E_α = ½ tr C_α[z, z]."""
    check_views(a1, a2, ("a1", "a2"))
    _check_alpha(alpha, a1)
    if (b1 is None) != (b2 is None):
        raise ValueError("b1 and b2 must be given together")
    if b1 is not None:
        check_views(b1, b2, ("b1", "b2"))
        if b1.shape[0] != a1.shape[0]:
            raise ValueError(f"b1 must have as many rows as a1 ({a1.shape[0]}), got {b1.shape[0]}")
    return reference.contrastive_covariance(a1, a2, alpha, b1, b2)

r"""α-CL over the global batch of a torch.distributed process group, with exact gradients.

Rank r of W holds N_r pairs (z1_r, z2_r). The global batch stacks the ranks in rank order,

    z1 = [z1_0; z1_1; …],   z2 = [z2_0; z2_1; …],   Z = [z1; z2]   (M = 2N rows, N = Σ_r N_r),

so the partner of row i is p(i) = (i + N) mod M exactly as in one process, every row of every
rank is a negative of every anchor, and rank r owns the anchors

    [o_r, o_r + N_r)  and  [N + o_r, N + o_r + N_r),        o_r = Σ_{s<r} N_s.

Forward: rank r normalises its own rows (autograd stays local), all-gathers Z (M × D) and runs
the fused op `fastalpha::alpha_cl_fused` on its two anchor blocks against all M columns. The op
returns the blocks' losses and ∂(Σ_{i∈block} w_i loss_i)/∂Z for all M rows (the row side, the
partner term and the column side), so memory is O(N_r·D + M·D) with the fused backends: no
M × M matrix, local or global, exists anywhere (the eager backend is dense, O(N_r·M)).

Backward: the (M × D) gradients of all ranks are summed and each row's sum is sent to the rank
that owns it (one reduce-scatter). The gradient reaching rank r's inputs is therefore

    ∂/∂z_r  Σ_s ℓ_s,        ℓ_s = the value rank s backpropagates.

Returned value. DDP and FSDP average parameter gradients over the W ranks, so scalar losses are
scaled by W: the mean over ranks of the returned values is the global loss, and DDP's averaged
gradient is the gradient of the global loss, exactly, whatever the N_r:

    "mean":  ℓ_r = (W / M) Σ_{i ∈ anchors(r)} loss_i        mean_r ℓ_r = (1/M) Σ_i loss_i
    "sum":   ℓ_r =  W      Σ_{i ∈ anchors(r)} loss_i        mean_r ℓ_r =       Σ_i loss_i
    "none":  the 2N_r losses of rank r's anchors (its z1 rows, then its z2 rows), unscaled.

Consequently the gradient on rank r's own z1_r, z2_r is W times the global-batch gradient of
those rows (for "mean"/"sum"). With "none", backpropagate W·Σ_i w_i loss_i on every rank to get
the global-batch gradient of Σ_i w_i loss_i after DDP's averaging.

Labels and V views (group-defined positives, docs/design.md "Positive sets"). Rank r holds V
views of N_r samples (a (V, N_r, D) stack or a list; or one labelled (N_r, D) view, V = 1)
and, with labels, their labels (one per sample, length N_r, or one per row, length V·N_r).
The global Z stacks view after view over the global batch, each view's rows in rank order,

    Z = [v_1 of rank 0; v_1 of rank 1; …; v_2 of rank 0; …; v_V of rank W−1]   (M = V·N),

which is the single-process stack of the concatenated batch x = [x_0; x_1; …], so the global
groups are exactly its single-process groups: g_k = k mod N without labels, and the label of
row k with labels, which travel with their rows (per-sample labels are first spread over the
views on their rank). Positives may therefore live on any rank. Rank r owns the V blocks

    [v·N + o_r, v·N + o_r + N_r),   v = 0 … V − 1,

and calls the fused op once per block (the two-view SimCLR case above is V = 2 with the
partner set; one call per block keeps the global row order, hence the groups and "none"'s
order, those of one process). The Groups of the global batch are built once per call on every
rank (identical on all), so "mean" divides by the global number of anchors with a loss term,

    "mean":  ℓ_r = (W / A) Σ_{i ∈ anchors(r)} loss_i,    A = Groups.anchor_count() of the global Z,

never by a per-rank count (whose mean over ranks is not A when labels cluster on one rank).
With labels a queue may take `queue_labels`; the queue and its labels must be the same on
every rank (they are not gathered; their length is checked).

Uneven N_r. all_gather needs equal sizes, so the transport buffer is padded to max N_r, but
the sizes are gathered first (in the header that also checks D, dtype and grad mode: no extra
collective) and the padding is dropped before any compute. The global Z is then exactly the
concatenated batch: no kernel sweeps dead columns, the groups and the "mean" count are the
single-process ones without a rule for padding, and backends whose grouped kernels take plain
group ids (no ignored columns, e.g. cpp) work unchanged.

All ranks must call this together with the same arguments and the same grad mode (it runs
collectives in forward and backward); mismatched D, dtype, grad mode, number of views,
labelled or not, or queue size raise on every rank.
Without an initialised process group it is the plain single-process loss (warned once).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import dispatch, positives, reference
from .checks import check_labels, check_views, views_of
from .functional import (alpha_cl_loss, check_grouped_setup, check_queue, check_queue_labels, no_negatives_loss,
                         row_groups)
from .ops import call_fused
from .rules import LossSpec, check_reduction, make_spec, negative_count

#: Floating dtypes, by the code that travels in the rank header.
RANK_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_warned_not_initialised = False


def alpha_cl_loss_distributed(
    z1,
    z2: torch.Tensor | None = None,
    rule: str = "direct",
    temperature: float | None = None,
    p: float | None = None,
    gamma: float | None = None,
    eps: float | None = None,
    normalize: bool = True,
    detach_alpha: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
    group=None,
    negatives: str = "all",
    queue: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    queue_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """The α-CL loss of the global batch of `group` (default: the world); see the module doc.

    Args:
        z1, z2: this rank's (N_r, D) views, N_r ≥ 1 (N_r may differ between ranks; the global
            batch needs N = Σ N_r ≥ 2). D and dtype must agree across ranks. Or z1 alone: a
            (V, N_r, D) tensor or a list of V views, or one (N_r, D) view with `labels`.
        rule, temperature, p, gamma, eps, normalize, detach_alpha, backend: as in
            fastalpha.alpha_cl_loss; `backend="auto"` resolves for this rank's device.
        reduction: "mean" / "sum" return W × this rank's share of the global mean / sum (the
            mean over ranks is the global loss); "none" returns this rank's V·N_r anchor losses
            (its rows in its own stacked order: view after view).
        group: a torch.distributed process group, or None for the default group.
        negatives, queue: as in fastalpha.alpha_cl_loss. "cross" takes the other view's rows of
            every rank; the queue must be the same on every rank and is not gathered.
        labels: this rank's integer labels, of length N_r (per sample) or V·N_r (per row);
            gathered with the rows, so a row's positives are the rows of every rank with its label.
        queue_labels: with labels and a queue, the queue's (K,) labels (the same on every rank).
    """
    spec = make_spec(rule, temperature, p, gamma, eps, normalize, detach_alpha, negatives)
    check_reduction(reduction)
    if not (dist.is_available() and dist.is_initialized()):
        _warn_not_initialised()
        return alpha_cl_loss(z1, z2, rule, temperature, p, gamma, eps, normalize, detach_alpha, reduction, backend,
                             negatives, queue, labels, queue_labels)
    if isinstance(temperature, torch.Tensor) and temperature.requires_grad:
        raise ValueError("a learnable temperature is not supported with gather_distributed=True; pass its value "
                         "(float(tau)) or compute the single-process loss")
    problem, views = local_problem(z1, z2, labels, queue, queue_labels, spec.negatives)
    grouped = labels is not None or len(views) != 2
    need_grad = torch.is_grad_enabled() and any(v.requires_grad for v in views)
    layout = exchange_layout(views, problem, need_grad, labels is not None, queue, group)
    if not grouped:
        if negative_count(layout.n_global, layout.queue_rows, spec.negatives) == 0:
            return no_negatives_loss(views, reduction)
        name = dispatch.resolve_backend(backend, views[0].device, spec, queue is not None)
        z_local = reference.stack_views(views[0], views[1], spec.unit_rows)
        queue = reference.prepare_queue(queue, spec.unit_rows)
        return GlobalBatchAlphaCL.apply(z_local, layout, spec, reduction, name, need_grad, queue)
    name = dispatch.resolve_backend(backend, views[0].device, spec, queue is not None, True)
    z_local = torch.cat(views)
    if spec.unit_rows:
        z_local = torch.nn.functional.normalize(z_local, dim=1)
    groups = global_groups(labels, queue_labels, layout, views[0].device)
    queue = reference.prepare_queue(queue, spec.unit_rows)
    return GlobalBatchAlphaCL.apply(z_local, layout, spec, reduction, name, need_grad, queue, groups)


def global_groups(labels, queue_labels, layout: "GlobalLayout", device) -> positives.Groups:
    """The Groups of the global Z (every rank builds the same ones, once per call): the
    single-process groups of the concatenated batch. Labels are gathered in the rows' layout;
    without labels the group of global row k is its sample k mod N."""
    if labels is None:
        ids = positives.view_groups(layout.n_global, layout.views, device)
    else:
        own = row_groups(labels, layout.n_local, layout.views, device).to(torch.int64)
        ids = gather_rows(own[:, None], layout)[:, 0]
    return positives.Groups.of(ids, layout.queue_rows, queue_labels)


@dataclass(frozen=True)
class GlobalLayout:
    """Where each rank's rows sit in the global Z, and in the padded all-gather buffer.

    Every rank sends a (V, n_max, D) block (its rows view after view, each view zero-padded to
    the largest N_r), so the gathered buffer is (W, V, n_max, D) and global row i of Z is the
    buffer row `padded_index[i]`.
    """

    group: object
    rank: int
    sizes: tuple
    views: int = 2
    queue_rows: int = 0

    @property
    def world(self) -> int:
        return len(self.sizes)

    @property
    def n_global(self) -> int:
        return sum(self.sizes)

    @property
    def n_local(self) -> int:
        return self.sizes[self.rank]

    @property
    def n_max(self) -> int:
        return max(self.sizes)

    @property
    def offset(self) -> int:
        return sum(self.sizes[: self.rank])

    def anchor_blocks(self) -> tuple[tuple[int, int], ...]:
        """This rank's anchor rows of Z, one [lo, hi) range per view: [v·N + o_r, v·N + o_r + N_r)."""
        lo, n = self.offset, self.n_global
        return tuple((v * n + lo, v * n + lo + self.n_local) for v in range(self.views))

    def padded_index(self, device) -> torch.Tensor:
        pieces = [torch.arange(size, device=device) + (self.views * rank + view) * self.n_max
                  for view in range(self.views) for rank, size in enumerate(self.sizes)]
        return torch.cat(pieces)


def exchange_layout(views, problem, need_grad: bool, labelled: bool = False, queue=None, group=None) -> GlobalLayout:
    """All-gather each rank's (N_r, D, dtype, grad mode, validity, V, labels or not, K) and check
    they fit together.

    Every rank takes part even when its own input is invalid, and every rank then raises, so a
    bad input on one rank gives an error everywhere instead of a hang in the next collective.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    valid = not problem
    first = views[0] if views else None
    header = torch.tensor(
        [first.shape[0] if valid else -1, first.shape[1] if valid else -1, RANK_DTYPES.index(first.dtype) if valid else -1,
         int(need_grad), int(not valid), len(views) if valid else -1, int(labelled),
         queue.shape[0] if valid and queue is not None else 0],
        dtype=torch.int64, device=_header_device(first, group),
    )
    headers = header.new_empty(world * header.numel())  # concatenated form: gloo has no stacked form
    all_gather_single(headers, header, group=group)
    sizes, dims, dtypes, grads, bad, view_counts, labelled_by_rank, queue_sizes = (
        tuple(int(v) for v in column) for column in headers.view(world, -1).cpu().T)

    if problem:
        error_type, message = problem
        raise error_type(f"{message} (rank {rank} of {world})")
    if any(bad):
        raise ValueError(f"rank(s) {[r for r in range(world) if bad[r]]} of the process group got invalid inputs "
                         f"(z1/z2, views, labels or queue); see the error raised there")
    if len(set(dims)) > 1:
        raise ValueError(f"z1/z2 must have the same number of columns D on every rank, got D = {list(dims)} by rank")
    if len(set(dtypes)) > 1:
        raise TypeError(f"z1/z2 must have the same dtype on every rank, got {[str(RANK_DTYPES[c]) for c in dtypes]} by rank")
    if len(set(grads)) > 1:
        raise ValueError(f"every rank must agree on whether the loss needs a gradient (grad mode and requires_grad), "
                         f"got {list(map(bool, grads))} by rank: backward runs a collective on all ranks")
    if len(set(view_counts)) > 1:
        raise ValueError(f"every rank must pass the same number of views V, got V = {list(view_counts)} by rank")
    if len(set(labelled_by_rank)) > 1:
        raise ValueError(f"either every rank passes labels= or none does, got labels on rank(s) "
                         f"{[r for r in range(world) if labelled_by_rank[r]]} only")
    if len(set(queue_sizes)) > 1:
        raise ValueError(f"the queue must be the same on every rank, got K = {list(queue_sizes)} rows by rank")
    return GlobalLayout(group=group, rank=rank, sizes=sizes, views=view_counts[0], queue_rows=queue_sizes[0])


def local_problem(z1, z2, labels, queue, queue_labels, negatives: str):
    """((error type, message) if this rank's inputs are invalid, else None; the views)."""
    # A rank with an empty share gets its own message: it is the likely mistake (a sampler that
    # leaves a rank without rows), not a malformed tensor.
    first = _first_view(z1)
    if first is not None and first.dim() == 2 and first.shape[0] == 0:
        return (ValueError, "z1/z2 have no rows on this rank: every rank needs N_r >= 1 pairs"), []
    try:
        if z2 is not None and labels is None:
            check_views(z1, z2)
            views = [z1, z2]
        else:
            views, _ = views_of(z1, z2, labels)
        first = views[0]
        n, m = first.shape[0], first.shape[0] * len(views)
        if labels is not None:
            check_labels(labels, n, m, first.device)
        if labels is not None or len(views) != 2:
            check_grouped_setup(negatives)
        check_queue(queue, first, negatives)
        check_queue_labels(queue_labels, queue, labels, first.device)
    except (TypeError, ValueError) as err:
        return (type(err), str(err)), []
    if first.dtype not in RANK_DTYPES:
        return (TypeError, f"z1/z2 dtype {first.dtype} is not supported across ranks; use one of {RANK_DTYPES}"), []
    return None, views


def _first_view(z1):
    """The first view of z1 if it is made of tensors ((N, D), (V, N, D) or a list), else None."""
    if isinstance(z1, torch.Tensor):
        return z1[0] if z1.dim() == 3 and z1.shape[0] > 0 else z1
    if isinstance(z1, (list, tuple)) and z1 and isinstance(z1[0], torch.Tensor):
        return z1[0]
    return None


def _header_device(first, group) -> torch.device:
    if isinstance(first, torch.Tensor):
        return first.device
    # No tensor to follow (invalid input): still take part, on a device the group can move.
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_single(output, tensor, group=None):
    # torch ≥ 2.14 renames all_gather_into_tensor (same signature); 2.11 has only the old name.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, tensor, group=group)


def _reduce_scatter_single(output, tensor, group=None):
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(output, tensor, group=group)


def gather_rows(z_local: torch.Tensor, layout: GlobalLayout) -> torch.Tensor:
    """The global Z (M × D) from every rank's stacked (V·N_r × D) rows, in the global order
    (also for the (V·N_r × 1) labels: they travel in the rows' layout)."""
    d, v = z_local.shape[1], layout.views
    send = z_local.new_zeros(v, layout.n_max, d)
    send[:, : layout.n_local] = z_local.view(v, layout.n_local, d)
    received = z_local.new_empty(layout.world * v * layout.n_max, d)
    all_gather_single(received, send.view(-1, d), group=layout.group)
    return received.index_select(0, layout.padded_index(z_local.device))


def reduce_scatter_rows(grad: torch.Tensor, layout: GlobalLayout) -> torch.Tensor:
    """Sum every rank's (M × D) `grad` and return this rank's rows (V·N_r × D), summed."""
    d, v = grad.shape[1], layout.views
    padded = grad.new_zeros(layout.world * v * layout.n_max, d)
    padded.index_copy_(0, layout.padded_index(grad.device), grad)
    mine = padded.new_empty(v * layout.n_max, d)
    _reduce_scatter_single(mine, padded, group=layout.group)
    return mine.view(v, layout.n_max, d)[:, : layout.n_local].reshape(v * layout.n_local, d)


class GlobalBatchAlphaCL(torch.autograd.Function):
    """Gather Z, compute this rank's anchors against all columns, reduce-scatter the gradient.

    `groups` (the global Groups, or None for the SimCLR partner set) says which columns are
    each anchor's positives and negatives."""

    @staticmethod
    def forward(ctx, z_local, layout: GlobalLayout, spec: LossSpec, reduction: str, backend: str, need_grad: bool,
                queue=None, groups=None):
        z = gather_rows(z_local, layout)
        grad_now = need_grad and reduction != "none"
        loss_rows, grad = _anchor_blocks(z, layout, spec, backend, grad_now, queue, groups)
        ctx.layout, ctx.spec, ctx.reduction, ctx.backend, ctx.queue = layout, spec, reduction, backend, queue
        ctx.groups = groups
        ctx.local_dtype = z_local.dtype
        if reduction == "none":
            if need_grad:
                ctx.save_for_backward(z)
            return loss_rows.to(z_local.dtype)
        # W × this rank's share, so that DDP's mean over ranks is the global loss (module doc);
        # with groups "mean" counts the anchors with a loss term over the global batch.
        if reduction == "sum":
            ctx.scale = float(layout.world)
        elif groups is None:
            ctx.scale = layout.world / (layout.views * layout.n_global)
        else:
            ctx.scale = layout.world / groups.anchor_count().clamp_min(1).to(loss_rows.dtype)
        if grad_now:
            ctx.save_for_backward(grad)
        return (loss_rows.sum() * ctx.scale).to(z_local.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():
            raise RuntimeError("fastalpha: second derivatives (create_graph=True) are not supported across ranks "
                               "(gather_distributed=True); compute them with the single-process loss, whose "
                               "create_graph backward is exact")
        (saved,) = ctx.saved_tensors
        layout = ctx.layout
        reduce_dtype = _reduce_dtype(ctx.local_dtype)
        if ctx.reduction == "none":
            z = saved
            weights = grad_out.to(reduce_dtype).split(layout.n_local)
            grad = 0
            for (lo, hi), block_weight in zip(layout.anchor_blocks(), weights):
                _, block_grad = call_fused(z, ctx.spec, ctx.backend, lo, hi, block_weight.contiguous(), True, ctx.queue,
                                           ctx.groups)
                grad = grad + block_grad[: z.shape[0]].to(reduce_dtype)
        else:
            grad = saved * (grad_out.to(reduce_dtype) * ctx.scale)
        grad_local = reduce_scatter_rows(grad.contiguous(), layout).to(ctx.local_dtype)
        return grad_local, None, None, None, None, None, None, None


def _anchor_blocks(z, layout: GlobalLayout, spec: LossSpec, backend: str, need_grad: bool, queue=None, groups=None):
    """This rank's anchor losses (V·N_r,) and ∂(Σ of them)/∂Z (M × D, or (0, D) without need_grad).

    The queue's rows of the gradient are dropped: the queue receives no gradient.
    """
    rows, grad = [], 0
    for lo, hi in layout.anchor_blocks():
        block_rows, block_grad = call_fused(z, spec, backend, lo, hi, None, need_grad, queue, groups)
        rows.append(block_rows)
        grad = grad + block_grad[: z.shape[0]].to(_reduce_dtype(z.dtype))
    return torch.cat(rows), grad


def _reduce_dtype(dtype: torch.dtype) -> torch.dtype:
    """Gradients are summed (over blocks and ranks) in at least float32: half-precision sums lose bits."""
    return torch.promote_types(dtype, torch.float32)


def _warn_not_initialised() -> None:
    global _warned_not_initialised
    if not _warned_not_initialised:
        _warned_not_initialised = True
        warnings.warn("fastalpha: gather_distributed=True but torch.distributed is not initialised; "
                      "computing the single-process loss of the local batch", RuntimeWarning, stacklevel=3)

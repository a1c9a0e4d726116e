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

All ranks must call this together with the same arguments and the same grad mode (it runs
collectives in forward and backward); mismatched D, dtype or grad mode raise on every rank.
Without an initialised process group it is the plain single-process loss (warned once).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import dispatch, reference
from .checks import check_views
from .functional import alpha_cl_loss, check_queue, no_negatives_loss
from .ops import call_fused
from .rules import LossSpec, check_reduction, make_spec, negative_count

#: Floating dtypes, by the code that travels in the rank header.
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_warned_not_initialised = False


def alpha_cl_loss_distributed(
    z1: torch.Tensor,
    z2: torch.Tensor,
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
) -> torch.Tensor:
    """The α-CL loss of the global batch of `group` (default: the world); see the module doc.

    Args:
        z1, z2: this rank's (N_r, D) views, N_r ≥ 1 (N_r may differ between ranks; the global
            batch needs N = Σ N_r ≥ 2). D and dtype must agree across ranks.
        rule, temperature, p, gamma, eps, normalize, detach_alpha, backend: as in
            fastalpha.alpha_cl_loss; `backend="auto"` resolves for this rank's device.
        reduction: "mean" / "sum" return W × this rank's share of the global mean / sum (the
            mean over ranks is the global loss); "none" returns this rank's 2N_r anchor losses.
        group: a torch.distributed process group, or None for the default group.
        negatives, queue: as in fastalpha.alpha_cl_loss. "cross" takes the other view's rows of
            every rank; the queue must be the same on every rank and is not gathered.
    """
    spec = make_spec(rule, temperature, p, gamma, eps, normalize, detach_alpha, negatives)
    check_reduction(reduction)
    if not (dist.is_available() and dist.is_initialized()):
        _warn_not_initialised()
        return alpha_cl_loss(z1, z2, rule, temperature, p, gamma, eps, normalize, detach_alpha, reduction, backend,
                             negatives, queue)
    if isinstance(temperature, torch.Tensor) and temperature.requires_grad:
        raise ValueError("a learnable temperature is not supported with gather_distributed=True; pass its value "
                         "(float(tau)) or compute the single-process loss")
    if isinstance(z1, torch.Tensor) and z1.dim() == 2:
        check_queue(queue, z1, negatives)
    need_grad = torch.is_grad_enabled() and isinstance(z1, torch.Tensor) and (z1.requires_grad or z2.requires_grad)
    layout = exchange_layout(z1, z2, need_grad, group)
    queue_rows = 0 if queue is None else queue.shape[0]
    if negative_count(layout.n_global, queue_rows, spec.negatives) == 0:
        return no_negatives_loss([z1, z2], reduction)
    name = dispatch.resolve_backend(backend, z1.device, spec, queue is not None)
    z_local = reference.stack_views(z1, z2, spec.unit_rows)
    queue = reference.prepare_queue(queue, spec.unit_rows)
    return GlobalBatchAlphaCL.apply(z_local, layout, spec, reduction, name, need_grad, queue)


@dataclass(frozen=True)
class GlobalLayout:
    """Where each rank's rows sit in the global Z, and in the padded all-gather buffer.

    Every rank sends a (2, n_max, D) block (its z1 rows, then its z2 rows, zero-padded to the
    largest N_r), so the gathered buffer is (W, 2, n_max, D) and global row i of Z is the
    buffer row `padded_index[i]`.
    """

    group: object
    rank: int
    sizes: tuple

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

    def anchor_blocks(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """This rank's anchor rows of Z: its z1 rows and its z2 rows, as [lo, hi) ranges."""
        lo, n = self.offset, self.n_global
        return (lo, lo + self.n_local), (n + lo, n + lo + self.n_local)

    def padded_index(self, device) -> torch.Tensor:
        pieces = [torch.arange(size, device=device) + (2 * rank + view) * self.n_max
                  for view in (0, 1) for rank, size in enumerate(self.sizes)]
        return torch.cat(pieces)


def exchange_layout(z1, z2, need_grad: bool, group=None) -> GlobalLayout:
    """All-gather each rank's (N_r, D, dtype, grad mode, validity) and check they fit together.

    Every rank takes part even when its own input is invalid, and every rank then raises, so a
    bad input on one rank gives an error everywhere instead of a hang in the next collective.
    """
    problem = _local_problem(z1, z2)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    valid = not problem
    header = torch.tensor(
        [z1.shape[0] if valid else -1, z1.shape[1] if valid else -1, _DTYPES.index(z1.dtype) if valid else -1,
         int(need_grad), int(not valid)],
        dtype=torch.int64, device=_header_device(z1, group),
    )
    headers = header.new_empty(world * header.numel())  # concatenated form: gloo has no stacked form
    _all_gather_single(headers, header, group=group)
    sizes, dims, dtypes, grads, bad = (tuple(int(v) for v in column) for column in headers.view(world, -1).cpu().T)

    if problem:
        error_type, message = problem
        raise error_type(f"{message} (rank {rank} of {world})")
    if any(bad):
        raise ValueError(f"rank(s) {[r for r in range(world) if bad[r]]} of the process group got invalid z1/z2; "
                         f"see the error raised there")
    if len(set(dims)) > 1:
        raise ValueError(f"z1/z2 must have the same number of columns D on every rank, got D = {list(dims)} by rank")
    if len(set(dtypes)) > 1:
        raise TypeError(f"z1/z2 must have the same dtype on every rank, got {[str(_DTYPES[c]) for c in dtypes]} by rank")
    if len(set(grads)) > 1:
        raise ValueError(f"every rank must agree on whether the loss needs a gradient (grad mode and requires_grad), "
                         f"got {list(map(bool, grads))} by rank: backward runs a collective on all ranks")
    return GlobalLayout(group=group, rank=rank, sizes=sizes)


def _local_problem(z1, z2):
    """(error type, message) if this rank's views are invalid, else None."""
    if isinstance(z1, torch.Tensor) and z1.dim() == 2 and z1.shape[0] == 0:
        return ValueError, "z1/z2 have no rows on this rank: every rank needs N_r >= 1 pairs"
    try:
        check_views(z1, z2)
    except (TypeError, ValueError) as err:
        return type(err), str(err)
    if z1.dtype not in _DTYPES:
        return TypeError, f"z1/z2 dtype {z1.dtype} is not supported across ranks; use one of {_DTYPES}"
    return None


def _header_device(z1, group) -> torch.device:
    if isinstance(z1, torch.Tensor):
        return z1.device
    # No tensor to follow (invalid input): still take part, on a device the group can move.
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather_single(output, tensor, group=None):
    # torch ≥ 2.14 renames all_gather_into_tensor (same signature); 2.11 has only the old name.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, tensor, group=group)


def _reduce_scatter_single(output, tensor, group=None):
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(output, tensor, group=group)


def gather_rows(z_local: torch.Tensor, layout: GlobalLayout) -> torch.Tensor:
    """The global Z (M × D) from every rank's stacked (2N_r × D) rows, in the global order."""
    d = z_local.shape[1]
    send = z_local.new_zeros(2, layout.n_max, d)
    send[:, : layout.n_local] = z_local.view(2, layout.n_local, d)
    received = z_local.new_empty(layout.world * 2 * layout.n_max, d)
    _all_gather_single(received, send.view(-1, d), group=layout.group)
    return received.index_select(0, layout.padded_index(z_local.device))


def reduce_scatter_rows(grad: torch.Tensor, layout: GlobalLayout) -> torch.Tensor:
    """Sum every rank's (M × D) `grad` and return this rank's rows (2N_r × D), summed."""
    d = grad.shape[1]
    padded = grad.new_zeros(layout.world * 2 * layout.n_max, d)
    padded.index_copy_(0, layout.padded_index(grad.device), grad)
    mine = padded.new_empty(2 * layout.n_max, d)
    _reduce_scatter_single(mine, padded, group=layout.group)
    return mine.view(2, layout.n_max, d)[:, : layout.n_local].reshape(2 * layout.n_local, d)


class GlobalBatchAlphaCL(torch.autograd.Function):
    """Gather Z, compute this rank's anchors against all columns, reduce-scatter the gradient."""

    @staticmethod
    def forward(ctx, z_local, layout: GlobalLayout, spec: LossSpec, reduction: str, backend: str, need_grad: bool,
                queue=None):
        z = gather_rows(z_local, layout)
        grad_now = need_grad and reduction != "none"
        loss_rows, grad = _anchor_blocks(z, layout, spec, backend, grad_now, queue)
        ctx.layout, ctx.spec, ctx.reduction, ctx.backend, ctx.queue = layout, spec, reduction, backend, queue
        ctx.local_dtype = z_local.dtype
        if reduction == "none":
            if need_grad:
                ctx.save_for_backward(z)
            return loss_rows.to(z_local.dtype)
        # W × this rank's share, so that DDP's mean over ranks is the global loss (module doc).
        ctx.scale = layout.world / (2 * layout.n_global) if reduction == "mean" else float(layout.world)
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
            weight = grad_out.to(reduce_dtype)
            n = layout.n_local
            grad = 0
            for (lo, hi), block_weight in zip(layout.anchor_blocks(), (weight[:n], weight[n:])):
                _, block_grad = call_fused(z, ctx.spec, ctx.backend, lo, hi, block_weight.contiguous(), True, ctx.queue)
                grad = grad + block_grad[: z.shape[0]].to(reduce_dtype)
        else:
            grad = saved * (grad_out.to(reduce_dtype) * ctx.scale)
        grad_local = reduce_scatter_rows(grad.contiguous(), layout).to(ctx.local_dtype)
        return grad_local, None, None, None, None, None, None


def _anchor_blocks(z, layout: GlobalLayout, spec: LossSpec, backend: str, need_grad: bool, queue=None):
    """This rank's anchor losses (2N_r,) and ∂(Σ of them)/∂Z (M × D, or (0, D) without need_grad).

    The queue's rows of the gradient are dropped: the queue receives no gradient.
    """
    rows, grads = [], []
    for lo, hi in layout.anchor_blocks():
        block_rows, block_grad = call_fused(z, spec, backend, lo, hi, None, need_grad, queue)
        rows.append(block_rows)
        grads.append(block_grad[: z.shape[0]].to(_reduce_dtype(z.dtype)))
    return torch.cat(rows), grads[0] + grads[1]


def _reduce_dtype(dtype: torch.dtype) -> torch.dtype:
    """Gradients are summed (over blocks and ranks) in at least float32: half-precision sums lose bits."""
    return torch.promote_types(dtype, torch.float32)


def _warn_not_initialised() -> None:
    global _warned_not_initialised
    if not _warned_not_initialised:
        _warned_not_initialised = True
        warnings.warn("fastalpha: gather_distributed=True but torch.distributed is not initialised; "
                      "computing the single-process loss of the local batch", RuntimeWarning, stacklevel=3)

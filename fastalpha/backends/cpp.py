r"""Backend "cpp": the fused C++ CPU kernel of csrc/alpha_cl_cpu.cpp (built on first use).

Implements the fused-op contract of fastalpha.dispatch for CPU tensors: for anchors
i ∈ [row_lo, row_hi) of the stacked, normalised Z (M × D) and an optional queue Q (K × D) it
returns loss_i and ∂(Σ_i w_i loss_i)/∂[Z; Q] ((M + K) × D) without the pair matrix: symmetric
two-pass tiles of S = [Z; Q][Z; Q]ᵀ for large batches, one pass over chunks of full rows
(S = Z_r [Z; Q]ᵀ, ωZ, ωᵀZ) otherwise, O((M + K)·D) memory plus per-thread buffers. Every
negative set ("all", "cross", "none"), with or without a queue (docs/cpp.md). With `groups`
(labels, more than two views, a labelled queue or memory; fastalpha.positives.Groups) both
algorithms take the sets from the ids of the rows and the columns of [Z; Q]: the kernel sweeps
J_i (and, for infonce with ε > 0, P_i), and the positives' uniform pull is added here from
group sums, O((M + K)·D + G·D).

float32 and float64 run natively; bfloat16/float16 are upcast to float32 (the gradient is
returned in the input dtype, the losses in float32, as the contract says).
"""
from __future__ import annotations

import torch

from .. import cpp_build, positives
from ..rules import LossSpec
from . import every_negative_set, on_device_type


def status() -> tuple[bool, str]:
    """(available, reason); compiles the library on the first call (cached afterwards)."""
    return cpp_build.status("cpu")


supports = every_negative_set
supports_groups = True
# The grouped kernel takes queue columns with ids (csrc/alpha_cl_common.h, the grouped op).
supports_grouped_queue = True

# (backend name, device type) of each compiled library.
_COMPILED = {"cpu": ("cpp", "cpu"), "cuda": ("cuda", "cuda")}


def entry_points(kind: str, status):
    """`device_status` and `alpha_cl_fused` (the dispatch contract) of the compiled backend
    `kind` ("cpu" for cpp, "cuda" for cuda), whose library-level `status` is given."""
    backend, device_type = _COMPILED[kind]

    def device_status(device: torch.device) -> tuple[bool, str]:
        return on_device_type(device, device_type, backend, status)

    def alpha_cl_fused(z: torch.Tensor, spec: LossSpec, row_lo: int, row_hi: int, row_weight, need_grad: bool,
                       queue=None, groups=None):
        """The fused-op contract (fastalpha.dispatch); with a queue the gradient has M + K rows."""
        return call_compiled(kind, z, spec, row_lo, row_hi, row_weight, need_grad, queue, groups)

    return device_status, alpha_cl_fused


device_status, alpha_cl_fused = entry_points("cpu", status)


def call_compiled(kind: str, z: torch.Tensor, spec: LossSpec, row_lo: int, row_hi: int, row_weight, need_grad: bool,
                  queue: torch.Tensor | None = None, groups=None):
    """Run the compiled `kind` ("cpu" or "cuda") kernel under the fused-op contract.

    Half types are upcast to float32 (statistics and products in float32), z's and the queue's
    alike; the gradient ([Z; Q] rows) is cast back to z's dtype; the losses stay in
    promote(z.dtype, float32). With `groups` (fastalpha.positives.Groups over [Z; Q], or the
    M rows' ids) the grouped op runs, with or without a queue.
    """
    backend, device_type = _COMPILED[kind]
    if z.device.type != device_type:
        raise ValueError(f"backend {backend!r} takes {device_type} tensors, got z on {z.device}")
    try:
        ops = cpp_build.ops(kind)
    except cpp_build.BuildError as err:
        raise RuntimeError(f"backend {backend!r} is not available: {err}") from err
    compute_dtype = torch.promote_types(z.dtype, torch.float32)
    zc = z.detach().to(compute_dtype).contiguous()
    qc = None if queue is None else queue.detach().to(device=z.device, dtype=compute_dtype).contiguous()
    weight = None if row_weight is None else row_weight.detach().to(device=z.device, dtype=compute_dtype).contiguous()
    if groups is not None:
        loss_rows, grad = _call_grouped(ops, zc, qc, spec, row_lo, row_hi, weight, need_grad, groups)
        return loss_rows, grad.to(z.dtype)
    loss_rows, grad = ops.alpha_cl_fused(
        zc, qc, row_lo, row_hi, weight, spec.rule, spec.temperature, spec.p, spec.gamma, spec.eps,
        spec.detach_alpha, spec.unit_rows, spec.negatives, need_grad,
    )
    return loss_rows, grad.to(z.dtype)


def _call_grouped(ops, z: torch.Tensor, queue, spec: LossSpec, row_lo: int, row_hi: int, weight, need_grad: bool,
                  groups):
    r"""The grouped op on z (and the queue) in its compute dtype: the kernel's pair sweep over J_i
    (and P_i for infonce with ε > 0) with d̄2_i and |J_i| from group sums, then the gradient of
    the positives' pull Σ_i pull_i d̄2_i (pull_i = w_i A_i times the gradient scale), from group
    sums as well (docs/design.md, "Positive sets").

    `groups` is a fastalpha.positives.Groups over the columns [Z; Q] (row ids, column ids with
    −1 for ignored columns, self columns), or the M rows' ids (the queue's rows then groups of
    their own). An anchor without a loss term (no positive or no negative) gets weight 0 and
    loss 0 here: the kernel returns a finite loss for one without a positive.
    """
    k = 0 if queue is None else queue.shape[0]
    groups = positives.groups_of(groups, k)
    cols = z if k == 0 else torch.cat([z, queue])
    has_loss = groups.has_loss[row_lo:row_hi]
    weight = has_loss.to(z.dtype) if weight is None else weight * has_loss
    d2_mean = positives.mean_positive_distance(cols, groups, row_lo, row_hi, spec.unit_rows, z.dtype).contiguous()
    loss_rows, grad, pull = ops.alpha_cl_fused_grouped(
        z, queue if k else None, row_lo, row_hi, weight, groups.row_ids, groups.col_ids, groups.self_col, d2_mean,
        groups.negative_count[row_lo:row_hi].contiguous(), spec.rule, spec.temperature, spec.p, spec.gamma, spec.eps,
        spec.detach_alpha, spec.unit_rows, need_grad,
    )
    loss_rows = torch.where(has_loss, loss_rows, torch.zeros_like(loss_rows))
    if need_grad:
        positives.add_positive_pull_(grad, cols, groups, pull, row_lo, spec.unit_rows)
    return loss_rows, grad

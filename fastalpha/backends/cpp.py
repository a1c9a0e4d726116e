r"""Backend "cpp": the fused C++ CPU kernel of csrc/alpha_cl_cpu.cpp (built on first use).

Implements the fused-op contract of fastalpha.dispatch for CPU tensors: for anchors
i ∈ [row_lo, row_hi) of the stacked, normalised Z (M × D) it returns loss_i and
∂(Σ_i w_i loss_i)/∂Z in one pass over chunks of full rows, three matrix products per chunk
(S = Z_r Zᵀ, ωZ, ωᵀZ) and one fused sweep per row for the rule, in O(M·D) memory per thread.

float32 and float64 run natively; bfloat16/float16 are upcast to float32 (the gradient is
returned in the input dtype, the losses in float32, as the contract says).
"""
from __future__ import annotations

import torch

from .. import cpp_build
from ..rules import LossSpec
from . import on_device_type


def status() -> tuple[bool, str]:
    """(available, reason); compiles the library on the first call (cached afterwards)."""
    return cpp_build.status("cpu")


def device_status(device: torch.device) -> tuple[bool, str]:
    return on_device_type(device, "cpu", "cpp", status)


def alpha_cl_fused(z: torch.Tensor, spec: LossSpec, row_lo: int, row_hi: int, row_weight, need_grad: bool):
    return call_compiled("cpu", z, spec, row_lo, row_hi, row_weight, need_grad)


def call_compiled(kind: str, z: torch.Tensor, spec: LossSpec, row_lo: int, row_hi: int, row_weight, need_grad: bool):
    """Run the compiled `kind` ("cpu" or "cuda") kernel under the fused-op contract.

    Half types are upcast to float32 (statistics and products in float32), the gradient is
    cast back to z's dtype; the losses stay in promote(z.dtype, float32).
    """
    backend, device_type = ("cpp", "cpu") if kind == "cpu" else ("cuda", "cuda")
    if z.device.type != device_type:
        raise ValueError(f"backend {backend!r} takes {device_type} tensors, got z on {z.device}")
    try:
        ops = cpp_build.ops(kind)
    except cpp_build.BuildError as err:
        raise RuntimeError(f"backend {backend!r} is not available: {err}") from err
    compute_dtype = torch.promote_types(z.dtype, torch.float32)
    zc = z.detach().to(compute_dtype).contiguous()
    weight = None if row_weight is None else row_weight.detach().to(device=z.device, dtype=compute_dtype).contiguous()
    loss_rows, grad = ops.alpha_cl_fused(
        zc, row_lo, row_hi, weight, spec.rule, spec.temperature, spec.p, spec.gamma, spec.eps,
        spec.detach_alpha, spec.unit_rows, spec.negatives, need_grad,
    )
    return loss_rows, grad.to(z.dtype)

r"""Fused Triton kernels of the α-CL family: the `triton` backend of `fastalpha::alpha_cl_fused`.

For Z (M × D) they compute, tile by tile and without any M × M buffer, the per-anchor losses
and the gradient ∂(Σ_i w_i loss_i)/∂Z of every rule (fastalpha.dispatch has the contract), for
every set of negatives ("all", "cross", "none") with or without a queue (K extra columns),
and with group-defined positives (labels, more than two views: `groups`):

    blocks.py        the block-size rule (keyed on D and dtype)
    launch.py        the launcher implementing the contract

The kernels themselves (the JIT-compiled row pass, column pass, sparsemax threshold, tile
helpers) are in kernels/ at the top of the checkout, imported as fastalpha.kernels; `quadratic`
needs no kernel (closed form, fastalpha/quadratic.py). The static report, the AOT compiler and
the roofline model are tooling, in bench/static/.

Kernels run on CUDA tensors, and on CPU tensors in Triton's interpreter when TRITON_INTERPRET=1
is set before this package is first imported (tests do that). float64 inputs are computed in
float64 (float64 tile products and statistics).
"""
from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401
    _IMPORT_ERROR = None
except ImportError as err:
    _IMPORT_ERROR = err
if _IMPORT_ERROR is None:
    from .launch import fused_loss_and_grad, interpreted

__all__ = ["status", "device_status", "supports", "alpha_cl_fused"]


def status() -> tuple[bool, str]:
    """(available, reason) of the Triton backend on this machine."""
    if _IMPORT_ERROR is not None:
        return False, f"triton is not importable: {_IMPORT_ERROR}"
    import triton
    if interpreted():
        return True, f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1): CPU tensors, slow, for tests"
    if torch.cuda.is_available():
        return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return False, "no CUDA device, and TRITON_INTERPRET=1 was set after fastalpha.backends.triton was imported (set it before)"
    return False, "no CUDA device and TRITON_INTERPRET is not set"


def device_status(device: torch.device) -> tuple[bool, str]:
    """(available, reason) for tensors on `device`: CUDA devices, or CPU under the interpreter."""
    ok, reason = status()
    if not ok:
        return ok, reason
    device = torch.device(device)
    if device.type == "cuda":
        if interpreted():
            return True, reason + " (CUDA tensors are copied through the interpreter)"
        return True, reason
    if device.type == "cpu":
        if interpreted():
            return True, reason
        return False, "CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before importing fastalpha"
    return False, f"the triton backend runs on CUDA devices, not {device.type}"


def supports(negatives: str, has_queue: bool) -> tuple[bool, str]:
    """Every set of negatives: "all", "cross", "none", each with or without a queue (the
    kernels' NEGATIVES constexpr and a column range [M, M + K) for the queue)."""
    return True, ""


#: Group-defined positives (labels, more than two views): the kernels' GROUPS constexpr, also
#: with queue columns (a labelled queue, V views with a queue, a cross-batch memory).
supports_groups = True
supports_grouped_queue = True


def alpha_cl_fused(z: torch.Tensor, spec, row_lo: int, row_hi: int, row_weight, need_grad: bool, queue=None,
                   groups=None):
    """The fused-op contract of fastalpha.dispatch, by the Triton kernels (grad has M + K rows with a
    queue; `groups`: a positives.Groups over [Z; queue], or M group ids of the rows, the
    positives and negatives from groups)."""
    if _IMPORT_ERROR is not None:
        raise RuntimeError(f"the triton backend is unavailable: triton is not importable: {_IMPORT_ERROR}")
    return fused_loss_and_grad(z, spec, row_lo, row_hi, row_weight, need_grad, queue=queue, groups=groups)

r"""Backend "cuda": the CUDA kernel of csrc/ (cuBLAS products + a fused row-sweep kernel).

The same chunked single pass as the cpp backend (fastalpha.backends.cpp), on CUDA tensors:
per chunk of full rows, S = Z_r Zᵀ, ωZ and ωᵀZ by cuBLAS and one kernel between them that
sweeps each row once for distances, the rule's weights (exact sparsemax threshold for
`square`), the loss and ω. float32 products honour torch's tf32 setting; bfloat16/float16
inputs are upcast to float32. Compiled on first use where nvcc and a CUDA build of torch
exist (fastalpha.cpp_build); FASTALPHA_NO_CUDA=1 turns it off.
"""
from __future__ import annotations

import torch

from .. import cpp_build
from .cpp import call_compiled
from ..rules import LossSpec
from . import on_device_type


def status() -> tuple[bool, str]:
    """(available, reason); compiles the library on the first call where a GPU is present."""
    if cpp_build.flag_set("FASTALPHA_NO_CUDA"):
        return False, "disabled by FASTALPHA_NO_CUDA=1"
    if torch.version.cuda is None:
        return False, f"this torch ({torch.__version__}) is not a CUDA build"
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible"
    return cpp_build.status("cuda")


def device_status(device: torch.device) -> tuple[bool, str]:
    return on_device_type(device, "cuda", "cuda", status)


def alpha_cl_fused(z: torch.Tensor, spec: LossSpec, row_lo: int, row_hi: int, row_weight, need_grad: bool):
    return call_compiled("cuda", z, spec, row_lo, row_hi, row_weight, need_grad)

r"""Backend "cuda": the CUDA kernel of csrc/ (cuBLAS products + a fused row-sweep kernel).

The chunked single pass of the cpp backend (fastalpha.backends.cpp), on CUDA tensors: per
chunk of full rows, S = Z_r [Z; Q]ᵀ, ω[Z; Q] and ωᵀZ_r by cuBLAS and one kernel between them
that sweeps each row once over its negatives J_i (every negative set, an optional queue Q of
K columns) for distances, the rule's weights (exact sparsemax threshold for `square`), the
loss and ω. float32 products honour torch's tf32 setting; bfloat16/float16
inputs are upcast to float32. With `groups` (labels, more than two views) the grouped sweep
takes J_i from the rows' group ids and the positive side comes from group sums, as for the
cpp backend (fastalpha.backends.cpp.call_compiled). Compiled on first use where nvcc and a
CUDA build of torch exist (fastalpha.cpp_build); FASTALPHA_NO_CUDA=1 turns it off.
"""
from __future__ import annotations

import torch

from .. import cpp_build
from .cpp import entry_points
from . import every_negative_set


def status() -> tuple[bool, str]:
    """(available, reason); compiles the library on the first call where a GPU is present."""
    if cpp_build.flag_set("FASTALPHA_NO_CUDA"):
        return False, "disabled by FASTALPHA_NO_CUDA=1"
    if torch.version.cuda is None:
        return False, f"this torch ({torch.__version__}) is not a CUDA build"
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible"
    return cpp_build.status("cuda")


supports = every_negative_set
supports_groups = True
# The grouped kernel takes queue columns with ids (csrc/alpha_cl_common.h, the grouped op).
supports_grouped_queue = True
device_status, alpha_cl_fused = entry_points("cuda", status)

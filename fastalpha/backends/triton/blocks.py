r"""The block-size rule of the Triton kernels: the one place where tile shapes are chosen.

Keyed on the feature dimension D and the compute type (input dtype, and for float32 whether
the products run in TF32 or IEEE float32), never on M, so one compiled kernel serves every
batch size. With D̂ = max(16, next power of two ≥ D):

===============  =================  ===============  ==================  =========
compute type     single-chunk if    BLOCK_M × N      else K / out chunk  num_warps
===============  =================  ===============  ==================  =========
bf16, fp16       D̂ ≤ 256            64×64 (D̂ ≤ 128)  64×64, K 64, out 128  4 (D̂ ≤ 64), else 8
                                    64×32 (D̂ = 256)
float32, TF32    D̂ ≤ 128            64×64 (D̂ ≤ 64)   64×64, K 64, out 64   8
                                    64×32 (D̂ = 128)
float32, IEEE    D̂ ≤ 64             32×32            32×32, K 32, out 128  4
float64          D̂ ≤ 64             32×32            32×32, K 32, out 32   4
===============  =================  ===============  ==================  =========

Single-chunk: the row block (D̂ features) stays in registers and each column tile is loaded
once for both products (Z_i Z_jᵀ and P Z_j), as in flash-attention. Otherwise the Gram tile is
accumulated over K-feature chunks and the output features are split over a second grid axis in
chunks of `out`, so each program keeps a BLOCK_M × out accumulator; the Gram tile is then
recomputed once per output chunk (≈ (1 + D/out) GEMMs of M²D per pass instead of 2), the price
of never materialising an M × M block.

How the values were chosen: every kernel variant compiled for sm_90 (H100/H200) with
`python -m fastalpha.backends.triton.aot_check` (no GPU needed), and these are shapes for which ptxas
reports no register spills, or a few bytes (≤ 24 B) in some IEEE-float32 and float64
variants. They were not tuned by timing on a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockConfig:
    block_m: int        # anchor rows per program (row pass, sparsemax) / per tile (column pass)
    block_n: int        # columns per tile (row pass) / per program (column pass)
    block_k: int        # feature chunk of the Gram tile when not single-chunk
    block_do: int       # output-feature chunk (== padded D when single-chunk)
    single_chunk: bool  # all features in one chunk
    num_warps: int
    num_stages: int


def padded_features(d: int) -> int:
    return max(16, 1 << (d - 1).bit_length())


def block_config(d: int, dtype: torch.dtype, precision: str = "ieee") -> BlockConfig:
    """Tile shapes for `d` features, input `dtype` and dot `precision` ("ieee" or "tf32")."""
    size = torch.empty((), dtype=dtype).element_size()
    padded = padded_features(d)
    if size == 8:
        if padded <= 64:
            return BlockConfig(32, 32, padded, padded, True, 4, 2)
        return BlockConfig(32, 32, 32, 32, False, 4, 1)
    if size == 2:
        if padded <= 256:
            return BlockConfig(64, 64 if padded <= 128 else 32, padded, padded, True, 4 if padded <= 64 else 8, 2)
        return BlockConfig(64, 64, 64, 128, False, 8, 2)
    if precision == "tf32":
        if padded <= 128:
            return BlockConfig(64, 64 if padded <= 64 else 32, padded, padded, True, 8, 2)
        return BlockConfig(64, 64, 64, 64, False, 8, 2)
    if padded <= 64:
        return BlockConfig(32, 32, padded, padded, True, 4, 2)
    return BlockConfig(32, 32, 32, 128, False, 4, 2)

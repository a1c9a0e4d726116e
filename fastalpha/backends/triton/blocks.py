r"""Tile shapes of the Triton kernels: the static table and the autotuning candidates.

Every pass has the same structure: a program *owns* a block of `block_m` rows of Z (anchor
rows in the row pass and the sparsemax pass, columns in the column pass) and *streams* over
the other side in tiles of `block_n`. Its two products per tile are

    S   = Z_owned Z_tileᵀ        (block_m × block_n, K = D)
    acc += P Z_tile              (block_m × D,       K = block_n)

so the owned block is the M dimension of both matrix products. On Hopper the warpgroup MMA
(`wgmma`, HGMMA in SASS) needs M ≥ 64 per warpgroup: with block_m = 64 every product of every
pass can use it, whereas an owned block of 32 falls back to the pre-Hopper `mma.sync` (HMMA).
The column pass therefore owns 64 columns and streams anchor rows in tiles of block_n, the
mirror image of the row pass, instead of the other way round.

Shapes depend on the feature dimension D and the compute type only (input dtype, and for
float32 whether products run in TF32 or IEEE), never on M, so one compiled kernel serves every
batch size; GPUs before Hopper run the static shape alone, with ptxas's register bound set and
fewer stages where it spilled (block_config). With D̂ = max(16, next power of two ≥ D), the
static table (used on GPUs other than Hopper, under the interpreter, with FASTALPHA_AUTOTUNE=0,
and as the first autotuning candidate):

===============  =================  ==================  =====================  =========
compute type     single-chunk if    owned × streamed    else K / out chunk     num_warps
===============  =================  ==================  =====================  =========
bf16, fp16       D̂ ≤ 256            64×64 (D̂ ≤ 64)      64×64, K 64, out 128   4 (D̂ ≤ 64), else 8
                                    64×32 (D̂ = 64, 16 ∤ D;
                                           D̂ ≥ 128)
                                    64×16 (D̂ = 256, 16 ∤ D)
float32, TF32    D̂ ≤ 128            64×64 (D̂ ≤ 64)      64×64, K 64, out 64    8
                                    64×32 (D̂ = 128;
                                           D̂ = 64, 16 ∤ D)
                                    64×16 (D̂ = 128, 16 ∤ D)
float32, IEEE    D̂ ≤ 64             32×16 (D̂ ≤ 64)      32×32, K 32, out 128   4
                                    (the first of a list:
                                     fallback_configs)
float64          D̂ ≤ 64             16×32 (D̂ ≤ 64)      32×32, K 32, out 32    8 (D̂ ≤ 64), else 4
                                    32×32 (D̂ > 64)
===============  =================  ==================  =====================  =========

Single-chunk: the owned block (D̂ features) stays in registers and each streamed tile is loaded
once for both products, as in flash-attention. Otherwise the Gram tile is accumulated over
K-feature chunks and the output features are split over a second grid axis in chunks of `out`,
so each program keeps a block_m × out accumulator; the Gram tile is then recomputed once per
output chunk (≈ (1 + D/out) GEMMs of M²D per pass instead of 2), the price of never
materialising an M × M block.

IEEE float32 and float64 have no tensor-core path (FFMA / DFMA): their tiles are small and
they are not autotuned. IEEE float32 has an ordered list of shapes instead, of which a launch
takes the first whose compiled kernel spills nothing (fallback_configs). TF32 is used only
when the caller opts in through torch.set_float32_matmul_precision("high") (or
torch.backends.cuda.matmul.allow_tf32 = True).

Every shape here, static or candidate, is compiled for sm_90 by `python -m bench.static.report`
(no GPU needed) in every kernel of the call space that the report has compiled
(docs/gpu-static-report.md says which part, section by section), which checks that the
tensor-core kernels issue warpgroup MMAs only, spill nothing and fit in shared memory. A
shape that spills is withheld from its pass here (_WITHHELD), the one place that decides
tiles; tests/test_triton_static.py checks that this file and the report agree. None has been
timed on a GPU yet.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class BlockConfig:
    block_m: int        # rows of Z a program owns (anchor rows, or columns in the column pass)
    block_n: int        # the streamed tile (columns, or anchor rows in the column pass)
    block_k: int        # feature chunk of the Gram tile when not single-chunk
    block_do: int       # output-feature chunk (== padded D when single-chunk)
    single_chunk: bool  # all features in one chunk
    num_warps: int
    num_stages: int
    max_registers: int | None = None  # ptxas's register bound per thread (maxnreg); None: its own choice

    def tile(self, kernel: str) -> dict:
        """The block constexprs of `kernel` ("row", "column" or "sparsemax") for this config.

        The column pass names its owned columns BLOCK_N and its streamed rows BLOCK_M (its
        loop variables keep the row/column meaning of the maths).
        """
        if kernel == "column":
            return {"BLOCK_N": self.block_m, "BLOCK_M": self.block_n}
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n}


def padded_features(d: int) -> int:
    return max(16, 1 << (d - 1).bit_length())


def compute_type(dtype: torch.dtype, precision: str = "ieee") -> str:
    """bf16, fp16, tf32, fp32 (IEEE) or fp64: what the tile products run in."""
    if dtype == torch.bfloat16:
        return "bf16"
    if dtype == torch.float16:
        return "fp16"
    if dtype == torch.float64:
        return "fp64"
    return "tf32" if precision == "tf32" else "fp32"


TENSOR_CORE_TYPES = ("bf16", "fp16", "tf32")


#: GPUs before Hopper (compute capability major < HOPPER) run the static shape alone, compiled
#: with ptxas's register bound at PRE_HOPPER_MAX_REGISTERS: left to itself ptxas held the TF32
#: column pass at D̂ = 128 at 128 registers and spilled 24 bytes on sm_80 (negatives="cross");
#: bound at 255 it takes 216 and spills nothing (Triton 3.8, docs/gpu-static-report.md).
HOPPER = 9
PRE_HOPPER_MAX_REGISTERS = 255

#: Pipeline stages of the static shape of grouped calls (labels, V ≥ 3 views: the GROUPS
#: constexpr), per (before Hopper?, compute type, padded D), where they differ from the table
#: below. On sm_80 the grouped TF32 row pass at D̂ = 128 (an anchor without a positive,
#: normalize=False) needed 255 registers and 8 bytes of stack at 2 stages, and runs at 253
#: without a spill at 1; on sm_90 its 2 stages spill nothing. The stage count changes no
#: arithmetic.
_GROUPED_STAGES = {(True, "tf32", 128): 1}


def block_config(d: int, dtype: torch.dtype, precision: str = "ieee", grouped: bool = False,
                 arch: int = HOPPER) -> BlockConfig:
    """The static tile shapes for `d` features, input `dtype` and dot `precision` ("ieee" or "tf32"),
    of a grouped call when `grouped` (_GROUPED_STAGES), on a GPU of compute capability major
    `arch` (HOPPER also stands for the interpreter and CPU tensors)."""
    static = _static_config(d, dtype, precision)
    before_hopper = arch < HOPPER
    if before_hopper:
        static = replace(static, max_registers=PRE_HOPPER_MAX_REGISTERS)
    stages = _GROUPED_STAGES.get((before_hopper, compute_type(dtype, precision), padded_features(d))) if grouped else None
    return static if stages is None else replace(static, num_stages=stages)


def _aligned_tensor_core_config(group: str, padded: int) -> BlockConfig:
    """The static tensor-core shape ("16-bit" or "tf32") at D̂ = `padded` where D is a multiple of 16."""
    if group == "16-bit":
        if padded <= 256:
            # 64×32 from D̂ = 128 on: with 64×64 at D̂ = 128 the β passes of `inverse` ran at 255
            # registers and spilled 8-24 bytes at D = 100 (Triton 3.8, sm_90); 64×32 runs them at
            # ≤ 187 without a spill, as TF32 does at D̂ = 128 (docs/gpu-static-report.md).
            return BlockConfig(64, 64 if padded <= 64 else 32, padded, padded, True, 4 if padded <= 64 else 8, 2)
        return BlockConfig(64, 64, 64, 128, False, 8, 2)
    if padded <= 128:
        return BlockConfig(64, 64 if padded <= 64 else 32, padded, padded, True, 8, 2)
    return BlockConfig(64, 64, 64, 64, False, 8, 2)


#: (group, D̂) whose static shape streams half the aligned tile where D is not a multiple of 16
#: (masked feature loads), and why (Triton 3.8, sm_90; the halved tiles run without a spill):
#: 16-bit at D̂ = 64 (64×32 w4: with 64×64 the β row pass of `inverse` ran at 255 registers and
#: spilled 8 bytes at D = 50; 64×32 runs the β passes of `inverse` and the general power at
#: ≤ 194) and D̂ = 256 (64×16: with 64×32 the row pass of `entropy` and `direct` ran at 255
#: registers and spilled 8-16 bytes at D = 200, with and without β; 64×16 at ≤ 254); TF32 at
#: D̂ = 64 (64×32: the β column pass of `inverse` spilled 8 bytes at D = 50 in 64×64) and
#: D̂ = 128 (64×16: the β row pass of `inverse` spilled 24-80 bytes at D = 100 in 64×32); 64×32
#: at D̂ = 64 runs the passes of `inverse`, `entropy` and the general power at ≤ 211, 64×16 at
#: D̂ = 128 those of `inverse` and the general power at ≤ 217.
_UNALIGNED_HALVED = {("16-bit", 64), ("16-bit", 256), ("tf32", 64), ("tf32", 128)}


def _static_config(d: int, dtype: torch.dtype, precision: str) -> BlockConfig:
    kind = compute_type(dtype, precision)
    padded = padded_features(d)
    if kind == "fp64":
        if padded <= 64:
            # 16 owned × 32 streamed rows, 8 warps: with the size arguments unspecialized, every
            # 32×32 shape (4 or 8 warps, 1-3 stages) left the column pass 8-32 bytes of stack
            # (Triton 3.8, sm_90: ptxas holds it at 128 registers), and 16×16 with 4 warps the row
            # pass 16; 16×32 with 8 warps runs the row pass at ≤ 179 registers and the column
            # pass at 128 without a spill. The shape changes no arithmetic.
            return BlockConfig(16, 32, padded, padded, True, 8, 2)
        return BlockConfig(32, 32, 32, 32, False, 4, 1)
    if kind in TENSOR_CORE_TYPES:
        group = "tf32" if kind == "tf32" else "16-bit"
        aligned = _aligned_tensor_core_config(group, padded)
        if d % 16 and (group, padded) in _UNALIGNED_HALVED:
            return replace(aligned, block_n=aligned.block_n // 2)
        return aligned
    owned, streamed, warps, stages = _IEEE_FLOAT32_SHAPES[padded <= 64][0]
    if padded <= 64:
        return BlockConfig(owned, streamed, padded, padded, True, warps, stages)
    return BlockConfig(owned, streamed, 32, 128, False, warps, stages)


#: IEEE float32 (FFMA products, not autotuned): the shapes the launcher tries in this order,
#: launching the first whose compiled kernel spills nothing (launch._spill_free), as
#: (owned, streamed, num_warps, num_stages), single-chunk (D̂ ≤ 64) or not; the feature chunks
#: stay those of the static shape, the first. Why a list and not one shape (Triton 3.8, sm_90):
#: in every shape tried ptxas kept one or two loop-invariant values of some kernels on the stack
#: (a store mask, row addresses: 8-56 bytes, at register counts that are occupancy steps of
#: 128-thread CTAs), up to 5 % of the kernels in the best shapes and a different few in each;
#: neither maxnreg nor ptxas's --register-usage-level or --minnctapersm removed them all
#: (docs/triton.md). The shape changes no arithmetic: only the order of the row sums' tiles.
_IEEE_FLOAT32_SHAPES = {
    True: ((32, 16, 4, 1), (16, 32, 4, 1), (16, 16, 4, 1), (32, 32, 4, 1)),
    False: ((32, 32, 4, 1), (32, 32, 8, 1), (16, 16, 4, 1), (32, 16, 4, 1), (32, 32, 4, 2)),
}


def fallback_configs(d: int, dtype: torch.dtype, precision: str = "ieee", grouped: bool = False,
                     arch: int = HOPPER) -> tuple[BlockConfig, ...]:
    """The shapes an untuned launch tries in order, the static one first: several for IEEE
    float32 (_IEEE_FLOAT32_SHAPES), else the static shape alone."""
    static = block_config(d, dtype, precision, grouped, arch)
    if compute_type(dtype, precision) != "fp32":
        return (static,)
    return tuple(replace(static, block_m=owned, block_n=streamed, num_warps=warps, num_stages=stages)
                 for owned, streamed, warps, stages in _IEEE_FLOAT32_SHAPES[static.single_chunk])


#: Autotuning alternatives to the static shape, per (compute type, padded D), as
#: (owned, streamed, num_warps, num_stages). Only single-chunk tensor-core shapes are tuned;
#: each one is in the static report with HGMMA on sm_90, no spills and its shared memory, for
#: every pass that can launch it (_WITHHELD below: one pass that cannot).
_ALTERNATIVES = {
    ("16-bit", 16): [(128, 64, 8, 2)],
    ("16-bit", 32): [(128, 64, 8, 2)],
    ("16-bit", 64): [(128, 64, 8, 2)],
    # None at D̂ = 128: the 64×64 candidate with 4 warps and 3 stages ran at 255 registers and
    # spilled (Triton 3.8, sm_90, docs/gpu-static-report.md): 40 bytes in the β row pass of
    # `inverse` at D = 128, and 8 bytes in row and column passes of entropy, direct and the
    # general power, with and without β, at D = 100 (D not divisible by 16: masked loads).
    ("16-bit", 128): [],
    ("16-bit", 256): [(64, 64, 8, 2)],
    ("tf32", 16): [(128, 32, 8, 2)],
    ("tf32", 32): [(128, 32, 8, 2)],
    ("tf32", 64): [(128, 32, 8, 2)],
    ("tf32", 128): [(64, 64, 8, 2)],
}


#: The alternatives where D is not a multiple of 16 (masked feature loads), where they differ
#: (Triton 3.8, sm_90): none for 16-bit at D̂ = 256, whose 64×64 candidate ran at 255 registers
#: and spilled 8-16 bytes at D = 200 in the row and column passes of `entropy` and `direct`
#: without β; at D̂ = 64 128×32 instead of 128×64, which spilled 16 bytes in the β row pass of
#: `inverse` at D = 50 (128×32: ≤ 198 registers in the β passes of `inverse` and the general power).
_UNALIGNED_ALTERNATIVES = {("16-bit", 64): [(128, 32, 8, 2)], ("16-bit", 256): []}


#: Alternatives withheld from one pass: (group, padded D, kernel, β pass) → shapes of
#: _ALTERNATIVES. The one decision, and why: on sm_90 (Triton 3.8, docs/gpu-static-report.md)
#: the row pass at tf32, D̂ = 128, in 64×64 tiles with 8 warps needs all 255 registers: its
#: 64×128 float32 accumulator and owned block and the 64×64 α tile do not fit beside the
#: statistics. With β (detach_alpha=False) `entropy` (k = 1) spilled 8 bytes (16 with
#: negatives="cross") to the stack; without β the general power (`direct` with p = 3, with and
#: without ε) with normalize=False and negatives="cross" spilled 16-24 bytes. The row pass keeps
#: the static 64×32 (≤ 220 registers). Likewise the column pass with β at tf32, D̂ = 128: 64×64
#: `direct` with normalize=False and row weights spilled 16 bytes at 255 registers
#: (negatives="all", with and without a queue); it keeps the static 64×32. The column pass
#: without β keeps 64×64. At 16 bits and D̂ = 256 the β passes in the 64×64 candidate ran at
#: 255 registers and spilled: the row pass 8-16 bytes (`entropy` with normalize=False, `direct`
#: with negatives="cross"), the column pass 16-24 (`inverse`); they keep the static 64×32.
_WITHHELD = {("tf32", 128, "row", True): [(64, 64, 8, 2)], ("tf32", 128, "row", False): [(64, 64, 8, 2)],
             ("tf32", 128, "column", True): [(64, 64, 8, 2)], ("16-bit", 256, "row", True): [(64, 64, 8, 2)],
             ("16-bit", 256, "column", True): [(64, 64, 8, 2)]}


def candidate_configs(d: int, dtype: torch.dtype, precision: str = "ieee", kernel: str = "row",
                      beta: bool = False, grouped: bool = False, arch: int = HOPPER) -> list[BlockConfig]:
    """The shapes autotuning may pick for these features and compute type; the static shape first.

    `kernel` ("row", "column" or "sparsemax") and `beta` (a pass with β, detach_alpha=False)
    name the pass, for the few shapes withheld from one (_WITHHELD). A single candidate (IEEE
    float32, float64, features above the single-chunk limit, GPUs before Hopper) means that case
    is not tuned.
    """
    static = block_config(d, dtype, precision, grouped, arch)
    kind = compute_type(dtype, precision)
    if kind not in TENSOR_CORE_TYPES or not static.single_chunk or arch < HOPPER:
        return [static]
    group = "tf32" if kind == "tf32" else "16-bit"
    padded = padded_features(d)
    withheld = _WITHHELD.get((group, padded, kernel, bool(beta)), ())
    alternatives = _ALTERNATIVES[(group, padded)]
    if d % 16:
        alternatives = _UNALIGNED_ALTERNATIVES.get((group, padded), alternatives)
    return [static] + [BlockConfig(owned, streamed, static.block_k, static.block_do, True, warps, stages)
                       for owned, streamed, warps, stages in alternatives
                       if (owned, streamed, warps, stages) not in withheld]


def m_bucket(m: int) -> int:
    """A coarse size class of M for the autotuning key: ⌈log₄ M⌉, at least 5 (M ≤ 1024).

    Tile choices change with how many programs fill the GPU, not with M itself, so the best
    config is reused within a factor of 4 of M instead of being re-tuned for every batch size.
    """
    return max(5, (max(m, 1) - 1).bit_length() + 1 >> 1)

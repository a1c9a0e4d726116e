r"""Launcher: the fused-op contract (fastalpha.dispatch) on top of the Triton passes.

For the anchors i in [row_lo, row_hi) with weights w_i, the gradient of Σ_i w_i loss_i is
(fastalpha.reference.closed_form_gradient)

    G = colacc − colsum ⊙ Z                                     (all M rows, column pass)
    G[rows]     += wA ⊙ (Z_rows − Z_p) − rowsum ⊙ Z_rows + rowacc    (row pass)
    G[p(rows)]  −= wA ⊙ (Z_rows − Z_p)

with wA_i = w_i Σ_j α_ij, rowsum_i = w_i Σ_j β_ij, rowacc = (w β) Z, colsum_j = Σ_i w_i β_ij,
colacc = (w β)ᵀ Z_rows (β = α unless detach_alpha=False), all divided by τ for `infonce`.
The passes per rule:

* entropy / direct / inverse / infonce, α detached: one ONLINE row pass (statistics, loss,
  row side) + one column pass. 4 GEMM-shaped products per tile pair.
* entropy / direct / inverse, detach_alpha=False: ONLINE statistics pass (lse_i and
  c_i = loss_i), FIXED row pass with β, column pass with β.
* square: Michelot threshold passes (μ_i, k_i), FIXED row pass, column pass.
* quadratic: closed form (fastalpha/quadratic.py), no pair loop.

Negative sets (spec.negatives) and a queue: the kernels' columns are the contiguous [Z; queue]
(C = M + K rows, the kernels' column count; the anchors and their partners are rows of Z,
M = 2·half), the NEGATIVES constexpr picks
the mask of kernels/tiles._negatives, QUEUE (K > 0) makes the passes stream C columns instead of M,
the column pass writes all C gradient rows, and |J_i| (the ε-terms)
is rules.negative_count(N, K, negatives). Without a queue and with negatives="all" this is the
SimCLR call, compiled as before (C = M).

Group-defined positives (`groups`: labels, more than two views, a labelled queue;
fastalpha.positives.Groups over the columns [Z; Q], negatives="all", any M ≥ 1): the kernels
run with the GROUPS constexpr, which takes the pairs from the anchors' and the columns' group
ids (J_i = the columns of other groups, an ignored column, id −1, in no set; for infonce with
ε > 0 also P_i, every column of the anchor's group but its own, with log-weight + log ε),
d2_i = d̄2_i (positives.mean_positive_distance over [Z; Q]) and per-anchor |J_i| in the
ε-term. The gradient has the pair sides above, over all M + K columns, but no partner term:
the positives' pull, wA_i spread over P_i, comes from group sums (positives.add_positive_pull_),
the queue's rows included (their column side, which a learnable temperature uses). Anchors
without a positive or a negative get weight 0 and loss 0. Memory O((M + K)·D + M + K), as
without groups: no M × K matrix.

For unit rows (spec.unit_rows, normalize=True) d2_ij = 1 − z_i·z_j, so ∂d2_ij/∂z_i = −z_j and
the terms in z_i itself drop out: G = colacc, G[rows] += rowacc − wA ⊙ Z_p, G[p(rows)] −= wA ⊙ Z_rows.

Statistics and accumulators are float32 (float64 for float64 inputs); the products run on the
tensor cores for bf16/fp16, in TF32 for float32 when torch.get_float32_matmul_precision() is
"high" or "medium", and in IEEE float32 when it is "highest" (PyTorch's default).

Tile shapes (blocks.py): on a Hopper GPU each kernel is wrapped in `triton.autotune` over the
candidates of blocks.candidate_configs, keyed on D, the dtypes, the rule's constexprs and a
coarse M bucket; on other GPUs, under the interpreter, or with FASTALPHA_AUTOTUNE=0, the
static table is used. IEEE float32, which is not tuned, compiles its shapes in the order of
blocks.fallback_configs and launches the first that spills nothing (_spill_free).
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
import triton.testing

from ... import positives
from ...kernels.column_pass import column_pass_kernel
from ...kernels.row_pass import EPS_CONSTANT, EPS_INFONCE, EPS_NONE, row_pass_kernel
from ...kernels.sparsemax import sparsemax_threshold_kernel
from ...kernels.tiles import (GROUPS_INFONCE, GROUPS_NEGATIVES, GROUPS_OFF, NEG_ALL, NEG_CROSS, NEG_NONE,
                              WEIGHT_INVERSE, WEIGHT_POWER, WEIGHT_SPARSEMAX)
from ...quadratic import grouped_quadratic_loss_and_grad, quadratic_loss_and_grad
from ...rules import LossSpec, negative_count
from .blocks import HOPPER, BlockConfig, block_config, candidate_configs, fallback_configs, m_bucket

#: `negatives=` of the spec → the kernels' NEGATIVES constexpr (tiles._negatives).
NEGATIVE_MODES = {"all": NEG_ALL, "cross": NEG_CROSS, "none": NEG_NONE}

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


#: When a list, kernel launches are appended to it instead of run (see bench/static/report.py),
#: as the launcher would issue them on a GPU of compute capability major _recorded_arch.
_recorded_launches: list | None = None
_recorded_arch: int = HOPPER

#: Launch-time tuning budget per candidate: triton.testing.do_bench warm-up and repetition
#: times in ms. With 2 candidates per kernel the first call of a new key costs 2 compiles plus
#: ≈ 2 × 7 timed launches of each pass, then the choice is cached for the process.
TUNING_WARMUP_MS, TUNING_REP_MS = 5, 20


@dataclass(frozen=True)
class Launch:
    """One kernel launch as the launcher would issue it (see recording_launches).

    `kind` is "row", "column" or "sparsemax"; `kwargs` hold the rule and shape constexprs
    except the tile (BLOCK_M/BLOCK_N, num_warps, num_stages), which comes from `config` (the
    static shape) or, when autotuned, from any of `candidates`; untuned, from the first of
    `fallbacks` (`config` first) whose compiled kernel spills nothing (_spill_free).
    """
    kernel: object
    kind: str
    grid: object
    args: tuple
    kwargs: dict
    config: BlockConfig
    candidates: tuple
    fallbacks: tuple = ()

    def launch_kwargs(self, config: BlockConfig) -> dict:
        return {**self.kwargs, **config.tile(self.kind), **_launch_options(config)}


#: GPU architectures (compute capability major) whose autotuning candidates the static report
#: proves (HGMMA, no spills): Hopper. Other GPUs run the static table.
TUNED_ARCHS = (HOPPER,)


def autotune_enabled(is_cuda: bool, capability: tuple = (9, 0)) -> bool:
    """Autotuning runs for CUDA tensors on a Hopper GPU outside the interpreter, unless
    FASTALPHA_AUTOTUNE=0."""
    return (is_cuda and not interpreted() and capability[0] in TUNED_ARCHS
            and os.environ.get("FASTALPHA_AUTOTUNE", "1") != "0")


def _grid(kind: str, extent: int, chunks: int):
    """Programs: one per owned block of rows (or columns) × one per output-feature chunk."""
    owned = "BLOCK_N" if kind == "column" else "BLOCK_M"
    return lambda meta: (triton.cdiv(extent, meta[owned]), chunks)


def _prune(kind: str):
    """early_config_prune of a tuned kernel: keep the candidates of this call's D, compute type and pass."""
    def prune(configs, named_args, **kwargs):
        z = named_args["z_ptr"]
        precision = "tf32" if kwargs.get("PRECISION") == "tf32" else "ieee"
        groups = kwargs.get("GROUPS", GROUPS_OFF)
        grouped = getattr(groups, "value", groups) != GROUPS_OFF.value
        candidates = candidate_configs(named_args["D"], z.dtype, precision, kind, bool(kwargs.get("BETA", False)), grouped)
        return [_as_triton_config(kind, cfg) for cfg in candidates]
    return prune


def _launch_options(cfg: BlockConfig) -> dict:
    """num_warps, num_stages and, where the shape bounds it, maxnreg (ptxas's register bound)."""
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    if cfg.max_registers is not None:
        options["maxnreg"] = cfg.max_registers
    return options


def _as_triton_config(kind: str, cfg: BlockConfig):
    return triton.Config(cfg.tile(kind), **_launch_options(cfg))


def _tuning_bench(fn, quantiles=None):
    return triton.testing.do_bench(fn, warmup=TUNING_WARMUP_MS, rep=TUNING_REP_MS, quantiles=quantiles)


_TUNED: dict = {}

#: Autotuning key of each kernel: the arguments whose values change the best tile (Triton adds
#: the dtypes of the tensor arguments itself).
_TUNING_KEYS = {
    "row": ["D", "m_bucket", "WEIGHT", "POWER", "EPS", "ONLINE", "BETA", "ACCUMULATE", "HAS_WEIGHT", "UNIT", "PRECISION",
            "NEGATIVES", "QUEUE", "GROUPS"],
    "column": ["D", "m_bucket", "WEIGHT", "POWER", "BETA", "HAS_WEIGHT", "UNIT", "PRECISION", "NEGATIVES", "QUEUE",
               "GROUPS"],
    "sparsemax": ["D", "m_bucket", "UNIT", "PRECISION", "NEGATIVES", "QUEUE", "GROUPS"],
}


def tuned_kernel(kind: str):
    """The `triton.autotune` wrapper of a kernel (built on first use).

    Its config list only has to be non-trivial: the pruning hook replaces it by this call's
    candidates (blocks.candidate_configs), so the union over all shapes is never timed.
    """
    if kind not in _TUNED:
        kernel = {"row": row_pass_kernel, "column": column_pass_kernel, "sparsemax": sparsemax_threshold_kernel}[kind]
        placeholders = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}), triton.Config({"BLOCK_M": 64, "BLOCK_N": 32})]
        options = dict(configs=placeholders, key=_TUNING_KEYS[kind], prune_configs_by={"early_config_prune": _prune(kind)})
        try:
            _TUNED[kind] = triton.autotune(do_bench=_tuning_bench, **options)(kernel)
        except TypeError:  # Triton without the do_bench hook: the same budget through warmup/rep
            _TUNED[kind] = triton.autotune(warmup=TUNING_WARMUP_MS, rep=TUNING_REP_MS, **options)(kernel)
    return _TUNED[kind]


def _aligned(t: torch.Tensor | None) -> torch.Tensor | None:
    """`t` at a 16-byte aligned address, copied if it is not (a view into a larger tensor).

    Triton compiles a tensor argument apart when its address is a multiple of 16 bytes
    (`tt.divisibility`); with every tensor aligned, one compiled kernel serves every call of its
    constexprs, which is what the static report proves. The copy is O(rows), against the passes'
    O(rows × columns × D).
    """
    return t if t is None or t.data_ptr() % 16 == 0 else t.clone()


def _run(launch: Launch, tune: bool) -> None:
    """The one place where kernels are launched."""
    misaligned = [i for i, a in enumerate(launch.args) if isinstance(a, torch.Tensor) and a.data_ptr() % 16]
    if misaligned:
        raise RuntimeError(f"{launch.kind} pass: tensor arguments {misaligned} are not 16-byte aligned (_aligned)")
    if _recorded_launches is not None:
        _recorded_launches.append(launch)
        return
    if tune and len(launch.candidates) > 1:
        tuned_kernel(launch.kind)[launch.grid](*launch.args, **launch.kwargs)
    else:
        launch.kernel[launch.grid](*launch.args, **launch.launch_kwargs(_spill_free(launch)))


#: (kind, shapes, constexprs, argument classes) → the shape _spill_free chose.
_SPILL_FREE: dict = {}


def _argument_class(value):
    """What Triton specializes a launch argument on: a tensor's dtype, an integer's equality to
    1 and divisibility by 16 (every tensor is 16-byte aligned: _aligned)."""
    if isinstance(value, torch.Tensor):
        return str(value.dtype)
    if isinstance(value, bool) or not isinstance(value, int):
        return type(value).__name__
    return (value == 1, value % 16 == 0)


def _spill_free(launch: Launch) -> BlockConfig:
    """The first of `launch.fallbacks` whose compiled kernel keeps nothing in local memory
    (ptxas's spills), else the first; `launch.config` where there is no choice or nothing is
    compiled (the interpreter). Each shape is compiled without running (`warmup`), once per
    specialization of the launch."""
    if len(launch.fallbacks) < 2 or interpreted():
        return launch.config
    key = (launch.kind, launch.fallbacks, tuple(sorted((k, repr(v)) for k, v in launch.kwargs.items())),
           tuple(_argument_class(a) for a in launch.args))
    if key not in _SPILL_FREE:
        def spills(config):
            compiled = launch.kernel.warmup(*launch.args, grid=launch.grid, **launch.launch_kwargs(config))
            compiled._init_handles()
            return compiled.n_spills
        _SPILL_FREE[key] = first_spill_free(launch.fallbacks, spills)
    return _SPILL_FREE[key]


def first_spill_free(shapes, spills) -> BlockConfig:
    """The first of `shapes` for which `spills(shape)` (bytes in local memory) is 0, trying them
    in order; the first shape if all spill. The launcher's rule, which the static report applies too."""
    return next((shape for shape in shapes if spills(shape) == 0), shapes[0])


@contextlib.contextmanager
def recording_launches(arch: int = HOPPER):
    """Record a Launch for every kernel launch instead of running it, with the tiles of a GPU
    of compute capability major `arch` (blocks.block_config)."""
    global _recorded_launches, _recorded_arch
    _recorded_launches, _recorded_arch = [], arch
    try:
        yield _recorded_launches
    finally:
        _recorded_launches, _recorded_arch = None, HOPPER


def _arch_of(z: torch.Tensor) -> int:
    """The compute capability major whose tiles a launch on z's device uses (blocks.HOPPER for
    the interpreter and CPU tensors, whose tiles are Hopper's static table)."""
    if _recorded_launches is not None:
        return _recorded_arch
    return torch.cuda.get_device_capability(z.device)[0] if z.is_cuda and not interpreted() else HOPPER


def interpreted() -> bool:
    """True when the kernels were decorated under TRITON_INTERPRET=1 (they run on the CPU)."""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(row_pass_kernel, InterpretedFunction)


def _split(x: float) -> tuple[float, float]:
    """x = hi + lo with hi, lo float32: Triton passes Python floats as float32."""
    hi = float(torch.tensor(x, dtype=torch.float32))
    return hi, float(torch.tensor(x - hi, dtype=torch.float32))


def dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _check(z: torch.Tensor, row_lo: int, row_hi: int, row_weight, queue=None, groups=None,
           negatives: str = "all") -> None:
    if not isinstance(z, torch.Tensor) or z.dim() != 2:
        raise ValueError(f"z must be a 2-D tensor (M, D), got {getattr(z, 'shape', type(z))}")
    if z.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the triton backend supports {SUPPORTED_DTYPES}, got z.dtype = {z.dtype}")
    m, d = z.shape
    if groups is not None:
        _check_groups(groups, z, queue, negatives)
    elif m < (2 if queue is not None else 4) or m % 2:
        raise ValueError(f"z must stack two views (M = 2N rows, N >= {1 if queue is not None else 2}), got M = {m}")
    if queue is not None and (not isinstance(queue, torch.Tensor) or queue.dim() != 2 or queue.shape[1] != d):
        raise ValueError(f"queue must be a (K, D) tensor with D = {d}, got {getattr(queue, 'shape', type(queue))}")
    if d < 1:
        raise ValueError("z needs D >= 1 features")
    if not 0 <= row_lo <= row_hi <= m:
        raise ValueError(f"need 0 <= row_lo <= row_hi <= M = {m}, got [{row_lo}, {row_hi})")
    if row_weight is not None and tuple(row_weight.shape) != (row_hi - row_lo,):
        raise ValueError(f"row_weight must have shape ({row_hi - row_lo},), got {tuple(row_weight.shape)}")


def _check_groups(groups, z: torch.Tensor, queue, negatives: str) -> None:
    """Group ids: a positives.Groups over the columns [Z; Q], or an integer tensor (M,) of the
    rows' ids (then every queue row is a negative of every anchor), on z's device, for
    negatives="all" (any M ≥ 1)."""
    m = z.shape[0]
    columns = m + (0 if queue is None else queue.shape[0])
    if isinstance(groups, positives.Groups):
        fields = (("row_ids", groups.row_ids, "M", m), ("col_ids", groups.col_ids, "M + K", columns),
                  ("self_col", groups.self_col, "M", m))
    else:
        fields = (("groups", groups, "M", m),)
    for name, ids, size, length in fields:
        if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.shape[0] != length:
            raise ValueError(f"{name} must be a 1-D tensor of {size} = {length} group ids, "
                             f"got {getattr(ids, 'shape', type(ids))}")
        if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
            raise TypeError(f"{name} must hold integer ids, got {ids.dtype}")
        if ids.device != z.device:
            raise ValueError(f"{name} must be on z's device {z.device}, got {ids.device}")
    if negatives != "all":
        raise ValueError(f"group-defined positives take negatives='all', got negatives={negatives!r}")
    if m < 1:
        raise ValueError("z needs M >= 1 rows")


def _rule_flags(params: LossSpec, count) -> dict:
    """Kernel constexprs and scalars of a rule (see kernels/tiles.py for the meaning of each); `count` = |J_i|
    (an int, or an (R,) tensor per anchor with groups)."""
    rule, eps = params.rule, params.eps
    if rule == "inverse":
        weight, k, eps_mode, log_eps = WEIGHT_INVERSE, 1.0, EPS_NONE, 0.0
    elif rule == "square":
        weight, k, eps_mode, log_eps = WEIGHT_SPARSEMAX, 1.0, EPS_NONE, 0.0
    elif rule == "infonce":
        weight, k = WEIGHT_POWER, 1.0
        eps_mode, log_eps = (EPS_INFONCE, math.log(eps)) if eps > 0 else (EPS_NONE, 0.0)
    elif rule in ("entropy", "direct"):
        weight, k = WEIGHT_POWER, params.exponent
        if isinstance(count, torch.Tensor):
            # With groups |J_i| is per anchor (all ≥ 1): log(ε|J_i|) is an (R,) tensor.
            eps_mode, log_eps = (EPS_CONSTANT, count.to(torch.float64).log() + math.log(eps)) if eps > 0 else (EPS_NONE, 0.0)
        else:
            eps_mode, log_eps = (EPS_CONSTANT, math.log(eps * count)) if eps > 0 and count > 0 else (EPS_NONE, 0.0)
    else:
        raise ValueError(f"unknown rule={rule!r}: the triton backend has pair loops for "
                         "entropy, direct, inverse, square and infonce (quadratic is in closed form)")
    power = 1 if k == 1.0 else 2 if k == 2.0 else 0
    return dict(weight=weight, k=k, power=power, eps_mode=eps_mode, log_eps=log_eps)


def fused_loss_and_grad(z: torch.Tensor, params: LossSpec, row_lo: int, row_hi: int, row_weight, need_grad: bool,
                        config: BlockConfig | None = None, queue: torch.Tensor | None = None,
                        groups: torch.Tensor | None = None):
    """The contract of fastalpha.dispatch; `config` pins the tile shapes (tests), else blocks.py decides.

    With a `queue` (K, D) the columns are the contiguous [Z; queue] (C = M + K rows): the
    kernels stream C columns, the column pass writes C gradient rows, and grad has M + K rows.
    With `groups` (M integer ids) the positives and negatives come from the groups (module
    docstring).
    """
    _check(z, row_lo, row_hi, row_weight, queue, groups, params.negatives)
    m, d = z.shape
    # The column set: Z, then the queue's rows (in z's dtype; it gets no autograd gradient here).
    z = _aligned(z.contiguous() if queue is None else torch.cat([z, queue.detach().to(z.dtype)], 0).contiguous())
    c = z.shape[0]
    half = m // 2
    rows = row_hi - row_lo
    unit = params.unit_rows
    acc_dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    z_acc = z.to(acc_dtype)
    if groups is None:
        count = negative_count(m // 2, c - m, params.negatives)
        no_negatives = count == 0
        if params.rule == "quadratic":
            loss, grad = quadratic_loss_and_grad(z_acc, row_lo, row_hi, row_weight, need_grad, unit, m, params.negatives)
            return loss, grad.to(z.dtype)
    else:
        group_set = positives.groups_of(groups, c - m)
        count = group_set.negative_count[row_lo:row_hi]
        no_negatives = not bool(group_set.negative_count.gt(0).any())
        has_positive = group_set.has_loss[row_lo:row_hi]
        # w'_i = w_i [|P_i| > 0]: an anchor without a positive has no loss term.
        if row_weight is not None or not bool(has_positive.all()):
            row_weight = has_positive.to(acc_dtype) * (1.0 if row_weight is None else row_weight.to(acc_dtype))
    if rows == 0 or no_negatives:
        # No anchor, or no anchor has a negative: an empty sum (loss 0, zero gradient).
        grad = torch.zeros_like(z) if need_grad else z.new_empty((0, d))
        return z_acc.new_zeros((rows,)), grad
    weight = None if row_weight is None else _aligned(row_weight.to(acc_dtype).contiguous())
    if groups is not None:
        d2_pos = _aligned(positives.mean_positive_distance(z_acc, group_set, row_lo, row_hi, unit, acc_dtype))
        if params.rule == "quadratic":
            loss, grad = grouped_quadratic_loss_and_grad(z_acc, group_set, d2_pos, row_lo, row_hi, weight, need_grad, unit)
            row_a = torch.ones_like(loss) if weight is None else weight           # A_i = 1
            return _grouped_result(loss, grad, row_a, has_positive, z_acc, group_set, params, row_lo, need_grad, z.dtype)

    flags = _rule_flags(params, count)
    # log_eps (a scalar) is the log of the ε-term's coefficient: log(ε|J_i|) for direct/entropy,
    # log ε for infonce; log_eps_term (per anchor) is log(ε|J_i|) where |J_i| varies (groups).
    log_eps_term = None
    if groups is None:
        group_mode = GROUPS_OFF
    elif flags["eps_mode"] == EPS_INFONCE:
        # infonce's positives join the loop with log-weight t + log ε in place of its final ε-term.
        group_mode = GROUPS_INFONCE
        flags["eps_mode"] = EPS_NONE
    else:
        group_mode = GROUPS_NEGATIVES
        if flags["eps_mode"] == EPS_CONSTANT:
            log_eps_term = _aligned(flags["log_eps"].to(acc_dtype).contiguous())
        flags["log_eps"] = 0.0
    if groups is None:
        row_ids = col_ids = self_col = None
    else:
        row_ids, col_ids, self_col = (_aligned(ids.to(torch.int32).contiguous())
                                      for ids in (group_set.row_ids, group_set.col_ids, group_set.self_col))
    negatives = NEGATIVE_MODES[params.negatives]
    precision = dot_precision(z.dtype)
    arch = _arch_of(z)
    cfg = config or block_config(d, z.dtype, precision, groups is not None, arch)
    tune = config is None and autotune_enabled(z.is_cuda, (arch,))
    empty = z_acc.new_empty((rows,))
    norms = empty if unit else (z_acc * z_acc).sum(1)     # unit rows: never read, d2 = 1 − z_i·z_j
    if groups is None:
        partners = (torch.arange(row_lo, row_hi, device=z.device) + half) % m
        dots = (z_acc[row_lo:row_hi] * z_acc[partners]).sum(1)
        d2_pos = ((1 - dots) if unit else (norms[row_lo:row_hi] + norms[partners]) / 2 - dots).clamp_min(0)
    beta = params.uses_beta

    tau, k, inv_gamma, log_eps = _split(params.temperature), _split(flags["k"]), _split(1.0 / params.gamma), _split(flags["log_eps"])
    common = dict(
        UNIT=unit, PRECISION=precision, UPCAST=interpreted() and z.dtype == torch.bfloat16,
        ACC=tl.float64 if acc_dtype == torch.float64 else tl.float32,
        BLOCK_K=cfg.block_k, SINGLE_CHUNK=cfg.single_chunk, NEGATIVES=negatives, QUEUE=c > m, GROUPS=group_mode,
    )
    bucket = m_bucket(m)
    chunks = triton.cdiv(d, cfg.block_do)
    loss, row_a, row_sum = (z_acc.new_empty((rows,)) for _ in range(3))
    row_acc = z_acc.new_empty((rows, d)) if need_grad else z_acc.new_empty((1, 1))

    def launch(kernel, kind, extent, n_chunks, args, kwargs):
        # The candidates of this pass: what the pruning hook (_prune) hands the autotuner.
        candidates = (cfg,) if config is not None else tuple(
            candidate_configs(d, z.dtype, precision, kind, kwargs.get("BETA", False), groups is not None, arch))
        fallbacks = (cfg,) if config is not None else fallback_configs(d, z.dtype, precision, groups is not None, arch)
        _run(Launch(kernel, kind, _grid(kind, extent, n_chunks), args, {**kwargs, **common}, cfg, candidates, fallbacks),
             tune)

    def row_pass(stat_a, log_norm, stat_b, online, use_beta, accumulate):
        # ONLINE writes the row statistics m_i, λ_i into stat_a, log_norm; FIXED reads them.
        launch(
            row_pass_kernel, "row", rows, chunks if accumulate else 1,
            (z, norms, d2_pos, stat_a, log_norm, stat_b, weight if weight is not None else empty,
             loss, row_a, row_sum, row_acc,
             z.stride(0), row_acc.stride(0), c, d, half, row_lo, row_hi, bucket, *tau, *k, *inv_gamma, *log_eps,
             row_ids, col_ids, self_col, log_eps_term),
            dict(WEIGHT=flags["weight"], POWER=flags["power"], EPS=flags["eps_mode"],
                 LOG_LOSS=params.rule == "infonce", ONLINE=online, BETA=use_beta, ACCUMULATE=accumulate,
                 HAS_WEIGHT=weight is not None, BLOCK_DO=cfg.block_do),
        )

    with torch.cuda.device(z.device) if z.is_cuda else contextlib.nullcontext():
        if flags["weight"] == WEIGHT_SPARSEMAX:
            mu, inv_size = z_acc.new_empty((rows,)), z_acc.new_empty((rows,))
            launch(
                sparsemax_threshold_kernel, "sparsemax", rows, 1,
                (z, norms, mu, inv_size, z.stride(0), c, d, half, row_lo, row_hi, bucket, *tau, row_ids, col_ids),
                dict(BLOCK_D=cfg.block_do if cfg.single_chunk else cfg.block_k),
            )
            stat_a, log_norm, stat_b = mu, empty, inv_size
            row_pass(stat_a, log_norm, stat_b, online=False, use_beta=beta, accumulate=need_grad)
        else:
            # m_i (the shift of t) and λ_i = lse_i − m_i, never lse_i: see kernels/tiles._pair_weights.
            stat_a, log_norm = z_acc.new_empty((rows,)), z_acc.new_empty((rows,))
            row_pass(stat_a, log_norm, empty, online=True, use_beta=False, accumulate=need_grad and not beta)
            stat_b = empty
            if beta:
                stat_b = loss.clone()          # c_i = Σ_k α_ik v_ik = loss_i
                if need_grad:
                    row_pass(stat_a, log_norm, stat_b, online=False, use_beta=True, accumulate=True)
        if not need_grad:
            if groups is not None:
                return _grouped_result(loss, None, row_a, has_positive, z_acc, group_set, params, row_lo, False, z.dtype)
            return loss, z.new_empty((0, d))

        col_sum, grad = z_acc.new_empty((c,)), z_acc.new_empty((c, d))
        launch(
            column_pass_kernel, "column", c, chunks,
            (z, norms, d2_pos, stat_a, log_norm, stat_b, weight if weight is not None else empty,
             col_sum, grad, z.stride(0), grad.stride(0), c, d, half, row_lo, row_hi, m_bucket(c), *tau, *k, *inv_gamma,
             *log_eps, row_ids, col_ids, self_col),
            dict(WEIGHT=flags["weight"], POWER=flags["power"], BETA=beta, HAS_WEIGHT=weight is not None,
                 BLOCK_DO=cfg.block_do),
        )

    if groups is not None:
        # The pair sides only: no partner term (the positives' pull is added from group sums).
        if not unit:
            grad.addcmul_(col_sum[:, None], z_acc, value=-1.0)
            grad[row_lo:row_hi] -= row_sum[:, None] * z_acc[row_lo:row_hi]
        grad[row_lo:row_hi] += row_acc
        return _grouped_result(loss, grad, row_a, has_positive, z_acc, group_set, params, row_lo, True, z.dtype)
    z_rows, z_partners = z_acc[row_lo:row_hi], z_acc[partners]
    if unit:
        # ∂d2_ij/∂z_i = −z_j: only the cross terms survive (no A_i z_i, Σ_j ω_ij z_i, Σ_i ω_ij z_j).
        grad[row_lo:row_hi] += row_acc - row_a[:, None] * z_partners
        grad.index_add_(0, partners, -row_a[:, None] * z_rows)
    else:
        diff = z_rows - z_partners
        grad.addcmul_(col_sum[:, None], z_acc, value=-1.0)
        grad[row_lo:row_hi] += row_a[:, None] * diff - row_sum[:, None] * z_rows + row_acc
        grad.index_add_(0, partners, -row_a[:, None] * diff)
    grad *= params.grad_scale
    return loss, grad.to(z.dtype)


def _grouped_result(loss, grad, row_a, has_positive, z_acc, group_set, params: LossSpec, row_lo: int, need_grad: bool,
                    dtype: torch.dtype):
    """(loss_rows, grad) with group-defined positives, from the pair sides' `grad` (C × D, accumulation dtype).

    Adds the positives' side, the uniform pull row_a_i = w'_i A_i spread over P_i
    (positives.add_positive_pull_), then scales like the SimCLR path; anchors without a
    positive have loss 0.
    """
    loss = torch.where(has_positive, loss, torch.zeros_like(loss))
    if not need_grad:
        return loss, z_acc.new_empty((0, z_acc.shape[1]), dtype=dtype)
    positives.add_positive_pull_(grad, z_acc, group_set, row_a, row_lo, params.unit_rows)
    grad *= params.grad_scale
    return loss, grad.to(dtype)

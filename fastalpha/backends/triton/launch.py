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
* quadratic: closed form (quadratic.py), no pair loop.

Statistics and accumulators are float32 (float64 for float64 inputs); the products run on the
tensor cores for bf16/fp16, in TF32 for float32 when torch.get_float32_matmul_precision() is
"high" or "medium", and in IEEE float32 when it is "highest" (PyTorch's default).
"""
from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from ...rules import LossSpec
from .blocks import BlockConfig, block_config
from .column_pass import column_pass_kernel
from .quadratic import quadratic_loss_and_grad
from .row_pass import EPS_CONSTANT, EPS_INFONCE, EPS_NONE, row_pass_kernel
from .sparsemax import sparsemax_threshold_kernel
from .tiles import WEIGHT_INVERSE, WEIGHT_POWER, WEIGHT_SPARSEMAX

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


#: When a list, kernel launches are appended to it instead of run (see aot_check.py).
_recorded_launches: list | None = None


def _run(kernel, grid, *args, **kwargs) -> None:
    """The one place where kernels are launched."""
    if _recorded_launches is not None:
        _recorded_launches.append((kernel, grid, args, kwargs))
        return
    kernel[grid](*args, **kwargs)


@contextlib.contextmanager
def recording_launches():
    """Record (kernel, grid, args, kwargs) of every launch instead of running it."""
    global _recorded_launches
    _recorded_launches = []
    try:
        yield _recorded_launches
    finally:
        _recorded_launches = None


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


def _check(z: torch.Tensor, row_lo: int, row_hi: int, row_weight) -> None:
    if not isinstance(z, torch.Tensor) or z.dim() != 2:
        raise ValueError(f"z must be a 2-D tensor (M, D), got {getattr(z, 'shape', type(z))}")
    if z.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the triton backend supports {SUPPORTED_DTYPES}, got z.dtype = {z.dtype}")
    m, d = z.shape
    if m < 4 or m % 2:
        raise ValueError(f"z must stack two views (M = 2N rows, N >= 2), got M = {m}")
    if d < 1:
        raise ValueError("z needs D >= 1 features")
    if not 0 <= row_lo <= row_hi <= m:
        raise ValueError(f"need 0 <= row_lo <= row_hi <= M = {m}, got [{row_lo}, {row_hi})")
    if row_weight is not None and tuple(row_weight.shape) != (row_hi - row_lo,):
        raise ValueError(f"row_weight must have shape ({row_hi - row_lo},), got {tuple(row_weight.shape)}")


def _rule_flags(params: LossSpec, m: int) -> dict:
    """Kernel constexprs and scalars of a rule (see tiles.py for the meaning of each)."""
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
        eps_mode, log_eps = (EPS_CONSTANT, math.log(eps * (m - 2))) if eps > 0 else (EPS_NONE, 0.0)
    else:
        raise ValueError(f"the triton backend has no pair loop for rule={rule!r}")
    power = 1 if k == 1.0 else 2 if k == 2.0 else 0
    return dict(weight=weight, k=k, power=power, eps_mode=eps_mode, log_eps=log_eps)


def fused_loss_and_grad(z: torch.Tensor, params: LossSpec, row_lo: int, row_hi: int, row_weight, need_grad: bool,
                        config: BlockConfig | None = None):
    """The contract of fastalpha.dispatch, with an optional block configuration override (tests)."""
    _check(z, row_lo, row_hi, row_weight)
    z = z.contiguous()
    m, d = z.shape
    half = m // 2
    rows = row_hi - row_lo
    acc_dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    z_acc = z.to(acc_dtype)
    if params.rule == "quadratic":
        loss, grad = quadratic_loss_and_grad(z_acc, row_lo, row_hi, row_weight, need_grad)
        return loss, grad.to(z.dtype)
    if rows == 0:
        grad = torch.zeros_like(z) if need_grad else z.new_empty((0, d))
        return z_acc.new_empty((0,)), grad

    precision = dot_precision(z.dtype)
    cfg = config or block_config(d, z.dtype, precision)
    flags = _rule_flags(params, m)
    norms = (z_acc * z_acc).sum(1)
    partners = (torch.arange(row_lo, row_hi, device=z.device) + half) % m
    d2_pos = ((norms[row_lo:row_hi] + norms[partners]) / 2 - (z_acc[row_lo:row_hi] * z_acc[partners]).sum(1)).clamp_min(0)
    weight = None if row_weight is None else row_weight.to(acc_dtype).contiguous()
    beta = params.uses_beta

    tau, k, inv_gamma, log_eps = _split(params.temperature), _split(flags["k"]), _split(1.0 / params.gamma), _split(flags["log_eps"])
    common = dict(
        PRECISION=precision, UPCAST=interpreted() and z.dtype == torch.bfloat16,
        ACC=tl.float64 if acc_dtype == torch.float64 else tl.float32,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SINGLE_CHUNK=cfg.single_chunk,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    chunks = triton.cdiv(d, cfg.block_do)
    empty = z_acc.new_empty((rows,))
    loss, lse, row_a, row_sum = (z_acc.new_empty((rows,)) for _ in range(4))
    row_acc = z_acc.new_empty((rows, d)) if need_grad else z_acc.new_empty((1, 1))

    def row_pass(stat_a, stat_b, online, use_beta, accumulate, lse_out):
        grid = (triton.cdiv(rows, cfg.block_m), chunks if accumulate else 1)
        _run(
            row_pass_kernel, grid,
            z, norms, d2_pos, stat_a, stat_b, weight if weight is not None else empty,
            loss, lse_out, row_a, row_sum, row_acc,
            z.stride(0), row_acc.stride(0), m, d, half, row_lo, row_hi, *tau, *k, *inv_gamma, *log_eps,
            WEIGHT=flags["weight"], POWER=flags["power"], EPS=flags["eps_mode"],
            LOG_LOSS=params.rule == "infonce", ONLINE=online, BETA=use_beta, ACCUMULATE=accumulate,
            HAS_WEIGHT=weight is not None, BLOCK_DO=cfg.block_do, **common,
        )

    with torch.cuda.device(z.device) if z.is_cuda else contextlib.nullcontext():
        if flags["weight"] == WEIGHT_SPARSEMAX:
            mu, inv_size = z_acc.new_empty((rows,)), z_acc.new_empty((rows,))
            _run(
                sparsemax_threshold_kernel, (triton.cdiv(rows, cfg.block_m),),
                z, norms, mu, inv_size, z.stride(0), m, d, half, row_lo, row_hi, *tau,
                BLOCK_D=cfg.block_do if cfg.single_chunk else cfg.block_k, **common,
            )
            stat_a, stat_b = mu, inv_size
            row_pass(stat_a, stat_b, online=False, use_beta=beta, accumulate=need_grad, lse_out=empty)
        elif beta:
            row_pass(empty, empty, online=True, use_beta=False, accumulate=False, lse_out=lse)
            stat_a, stat_b = lse, loss.clone()          # c_i = Σ_k α_ik v_ik = loss_i
            if need_grad:
                row_pass(stat_a, stat_b, online=False, use_beta=True, accumulate=True, lse_out=empty)
        else:
            row_pass(empty, empty, online=True, use_beta=False, accumulate=need_grad, lse_out=lse)
            stat_a, stat_b = lse, empty
        if not need_grad:
            return loss, z.new_empty((0, d))

        col_sum, grad = z_acc.new_empty((m,)), z_acc.new_empty((m, d))
        _run(
            column_pass_kernel, (triton.cdiv(m, cfg.block_n), chunks),
            z, norms, d2_pos, stat_a, stat_b, weight if weight is not None else empty,
            col_sum, grad, z.stride(0), grad.stride(0), m, d, half, row_lo, row_hi, *tau, *k, *inv_gamma,
            WEIGHT=flags["weight"], POWER=flags["power"], BETA=beta, HAS_WEIGHT=weight is not None,
            BLOCK_DO=cfg.block_do, **common,
        )

    z_rows, z_partners = z_acc[row_lo:row_hi], z_acc[partners]
    diff = z_rows - z_partners
    grad.addcmul_(col_sum[:, None], z_acc, value=-1.0)
    grad[row_lo:row_hi] += row_a[:, None] * diff - row_sum[:, None] * z_rows + row_acc
    grad.index_add_(0, partners, -row_a[:, None] * diff)
    grad *= params.grad_scale
    return loss, grad.to(z.dtype)


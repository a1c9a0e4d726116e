r"""Exact sparsemax threshold μ_i of the `square` rule by Michelot's iteration, sort-free.

For an anchor i the weights α_ij = [(μ_i − d2_ij)/τ]_+ sum to 1 over J_i when μ_i solves
f(μ) = Σ_j [μ − d2_ij]_+ = τ. With S(μ) = {j ∈ J_i : d2_ij < μ}, Michelot's iteration

    μ ← (τ + Σ_{j∈S(μ)} d2_ij) / |S(μ)|,      started at μ⁰ = min_j d2_ij + τ ≥ μ_i,

never increases μ (Σ_{S(μ)} (μ − d2) ≥ τ whenever μ ≥ μ_i) and never goes below μ_i
(S(μ) ⊇ S(μ_i)), so the support shrinks at every step until it stops changing; then
Σ_{S}(μ − d2) = τ exactly, i.e. μ = μ_i and k_i = |S|. Each step is one pass over the columns
that only counts and sums. In floating point, μ is kept non-increasing explicitly, which makes
the support monotone and the loop finite (at most C steps; a handful in practice). The
columns are [Z; queue] (C = M + K), masked by `tiles._negatives`; for the cross and none
sets only the tiles that `tiles._column_range` keeps are streamed. With GROUPS the mask is
J_i from the group ids (`tiles._group_pairs`; the group pointers are None otherwise, constexprs, so
the other calls compile as before).

One program owns BLOCK_M rows and iterates until none of its rows changed its support.
"""
import triton
import triton.language as tl

from .tiles import (SIZE_ARGUMENTS, GROUPS_OFF, NEG_ALL, _anchor_groups, _batch_rows, _column_groups, _column_range, _distances, _gram, _group_pairs, _join, _mma, _negatives,
                    _row_norms, _streamed)


@triton.jit
def _distance_tile(z_ptr, norm_ptr, col_group_ptr, z_i, n_i, g_i, rows, row_ok, j0, j_hi, stride_z, M, C, D, half,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                   SINGLE_CHUNK: tl.constexpr, UNIT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
                   NEGATIVES: tl.constexpr, GROUPS: tl.constexpr):
    """(d2, valid) for rows × the streamed tile at loop index j0 of [.., j_hi) (tiles._streamed)."""
    cols, col_ok = _streamed(j0, j_hi, C, BLOCK_N, NEGATIVES)
    if SINGLE_CHUNK:
        feats = tl.arange(0, BLOCK_D)
        z_j = tl.load(z_ptr + cols.to(tl.int64)[:, None] * stride_z + feats[None, :],
                      mask=col_ok[:, None] & (feats < D)[None, :], other=0.0)
        s = _mma(z_i, tl.trans(z_j), tl.zeros((BLOCK_M, BLOCK_N), ACC), PRECISION, UPCAST)
    else:
        s = _gram(z_ptr, stride_z, rows, row_ok, cols, col_ok, D, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, UPCAST, ACC)
    d2 = _distances(s, n_i, _row_norms(norm_ptr, cols, col_ok, UNIT, ACC), UNIT)
    if GROUPS != GROUPS_OFF:
        g_j = _column_groups(col_group_ptr, cols, col_ok)
        valid, _ = _group_pairs(cols[None, :], row_ok[:, None], col_ok[None, :], g_i[:, None], g_i[:, None],
                                g_j[None, :], GROUPS)
    else:
        valid = _negatives(rows[:, None], cols[None, :], row_ok[:, None], col_ok[None, :], half, M, NEGATIVES)
    return d2, valid


# The sizes are not specialized (tiles.SIZE_ARGUMENTS says why).
@triton.jit(do_not_specialize=SIZE_ARGUMENTS)
def sparsemax_threshold_kernel(
    z_ptr, norm_ptr, mu_ptr, inv_size_ptr,
    stride_z, C, D, half, row_lo, row_hi,
    m_bucket,  # unused here: the coarse size class of M in the autotuning key (launch.py)
    tau_hi, tau_lo,
    row_group_ptr, col_group_ptr,  # GROUPS only (else None): group ids of the M anchors and the C columns
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr, UNIT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
    NEGATIVES: tl.constexpr, QUEUE: tl.constexpr, GROUPS: tl.constexpr,
):
    M = _batch_rows(C, half, QUEUE)
    rows = row_lo + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < row_hi
    local = rows - row_lo
    tau = _join(tau_hi, tau_lo, ACC)
    n_i = _row_norms(norm_ptr, rows, row_ok, UNIT, ACC)
    if GROUPS != GROUPS_OFF:
        g_i, _ = _anchor_groups(row_group_ptr, row_group_ptr, rows, row_ok, GROUPS)
    else:
        g_i = rows        # unused: the NEGATIVES mask needs no group ids
    if SINGLE_CHUNK:
        feats = tl.arange(0, BLOCK_D)
        z_i = tl.load(z_ptr + rows.to(tl.int64)[:, None] * stride_z + feats[None, :],
                      mask=row_ok[:, None] & (feats < D)[None, :], other=0.0)
    else:
        z_i = tl.zeros((BLOCK_M, BLOCK_D), z_ptr.dtype.element_ty)   # unused: tiles loop over D

    # Only the column tiles that can hold a negative of these anchors (as in the row pass).
    if NEGATIVES == NEG_ALL:
        j_lo = 0
        j_hi = C
    else:
        j_lo, j_hi = _column_range(row_lo + tl.program_id(0) * BLOCK_M, row_hi, half, M, C, BLOCK_M, NEGATIVES)
    d2_min = tl.full((BLOCK_M,), float("inf"), ACC)
    for j0 in range(j_lo, j_hi, BLOCK_N):
        d2, valid = _distance_tile(z_ptr, norm_ptr, col_group_ptr, z_i, n_i, g_i, rows, row_ok, j0, j_hi, stride_z, M, C, D,
                                   half, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_D, SINGLE_CHUNK, UNIT, PRECISION, UPCAST, ACC,
                                   NEGATIVES, GROUPS)
        d2_min = tl.minimum(d2_min, tl.min(tl.where(valid, d2, float("inf")), 1))

    mu = tl.where(row_ok, d2_min + tau, 0.0)
    size = tl.full((BLOCK_M,), -1, tl.int32)
    changed = tl.sum(row_ok.to(tl.int32), 0)
    while changed > 0:
        count = tl.zeros((BLOCK_M,), tl.int32)
        total = tl.zeros((BLOCK_M,), ACC)
        for j0 in range(j_lo, j_hi, BLOCK_N):
            d2, valid = _distance_tile(z_ptr, norm_ptr, col_group_ptr, z_i, n_i, g_i, rows, row_ok, j0, j_hi, stride_z, M, C,
                                       D, half, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_D, SINGLE_CHUNK, UNIT, PRECISION, UPCAST,
                                       ACC, NEGATIVES, GROUPS)
            inside = valid & (d2 < mu[:, None])
            count += tl.sum(inside.to(tl.int32), 1)
            total += tl.sum(tl.where(inside, d2, 0.0), 1)
        # |S| ≥ 1 for a valid row (the minimum is inside); padding rows keep μ and count 0.
        mu = tl.where(count > 0, tl.minimum((tau + total) / tl.maximum(count, 1).to(ACC), mu), mu)
        changed = tl.sum((row_ok & (count != size)).to(tl.int32), 0)
        size = count

    tl.store(mu_ptr + local, mu, mask=row_ok)
    tl.store(inv_size_ptr + local, 1.0 / tl.maximum(size, 1).to(ACC), mask=row_ok)

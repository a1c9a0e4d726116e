r"""Column pass: the column side of the gradient, Σ_i ω_ij and (ωᵀ Z)_j with ω_ij = w_i β_ij.

One program owns BLOCK_N columns j (any of the C = M + K rows of [Z; queue]: queue columns get
their gradient rows too) and one chunk of BLOCK_DO
output features, and loops over the anchor rows i in [row_lo, row_hi) in tiles of BLOCK_M
(for NEGATIVES = cross or none only over the anchors that can count its columns,
tiles._row_range), like flash-attention's dK/dV loop: the row statistics (m_i, λ_i and c_i, or
μ_i and 1/k_i) are known from the row pass, so α_ij = e^{(t_ij − m_i) − λ_i} (or [(μ_i − d2_ij)/τ]_+)
is recomputed per tile without any rescaling, from the row pass's own d2_ij (the loop says why
it is the same bits). Tiles are computed transposed (columns × rows) so that the product
ωᵀ Z_rows is a plain `tl.dot`. Every column is written by exactly one program: no atomics,
deterministic. The owned columns are the M dimension of both products, so BLOCK_N ≥ 64 lets
them run as Hopper warpgroup MMAs (blocks.py). With UNIT (unit rows) d2 = 1 − z_i·z_j and no
norm is loaded; the launcher then ignores the column sums.

GROUPS (group-defined positives over the columns [Z; Q]): the pairs come from the group ids
(`tiles._group_pairs`: the owned columns' ids g_c loaded once, −1 for an ignored column, the
anchors' ids g_i and own columns s(i) per row tile) and `d2_pos` holds d̄2_i. For infonce
with ε > 0 (GROUPS_INFONCE) the positives are in the sums with α_ip = e^{(t_ip + log ε − m_i) − λ_i}
(their push π_ip), log ε the scalar log_eps. With GROUPS off the group pointers are None
(constexprs, not arguments), so the other calls compile as before.
"""
import triton
import triton.language as tl

from .tiles import (SIZE_ARGUMENTS, GROUPS_INFONCE, GROUPS_OFF, NEG_ALL, WEIGHT_SPARSEMAX, _anchor_groups, _batch_rows, _column_groups,
                    _distances, _gram, _group_pairs, _join, _mma, _negatives, _pair_weights, _parameters, _row_norms,
                    _row_range)


# The sizes are not specialized (tiles.SIZE_ARGUMENTS says why).
@triton.jit(do_not_specialize=SIZE_ARGUMENTS)
def column_pass_kernel(
    z_ptr, norm_ptr, d2_pos_ptr, stat_a_ptr, log_norm_ptr, stat_b_ptr, weight_ptr,
    col_sum_ptr, col_acc_ptr,
    stride_z, stride_acc, C, D, half, row_lo, row_hi,
    m_bucket,  # unused here: the coarse size class of M in the autotuning key (launch.py)
    tau_hi, tau_lo, k_hi, k_lo, inv_gamma_hi, inv_gamma_lo,
    log_eps_hi, log_eps_lo,  # GROUPS_INFONCE only: log ε, the shift of the positives' log-weights
    # GROUPS only (else None): group ids of the M anchors and of the C columns (−1: ignored), the
    # anchors' own columns.
    row_group_ptr, col_group_ptr, self_col_ptr,
    WEIGHT: tl.constexpr, POWER: tl.constexpr, BETA: tl.constexpr, HAS_WEIGHT: tl.constexpr, UNIT: tl.constexpr,
    NEGATIVES: tl.constexpr, QUEUE: tl.constexpr, GROUPS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
):
    M = _batch_rows(C, half, QUEUE)
    pid_d = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < C                     # [Z; queue]: the queue's rows get gradient rows too
    feats = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    feat_ok = feats < D

    tau, k, inv_gamma = _parameters(tau_hi, tau_lo, k_hi, k_lo, inv_gamma_hi, inv_gamma_lo, ACC)
    n_j = _row_norms(norm_ptr, cols, col_ok, UNIT, ACC)
    if GROUPS != GROUPS_OFF:
        g_j = _column_groups(col_group_ptr, cols, col_ok)
    if GROUPS == GROUPS_INFONCE:
        log_eps_positive = _join(log_eps_hi, log_eps_lo, ACC)
    if SINGLE_CHUNK:
        z_j = tl.load(z_ptr + cols.to(tl.int64)[:, None] * stride_z + feats[None, :],
                      mask=col_ok[:, None] & feat_ok[None, :], other=0.0)

    col_sum = tl.zeros((BLOCK_N,), ACC)
    acc = tl.zeros((BLOCK_N, BLOCK_DO), ACC)
    # Only the anchor tiles that can count these columns (tiles._row_range): the other view's
    # anchors for a two-tower call, none for a queue-only call's columns of Z; all for NEG_ALL.
    if NEGATIVES == NEG_ALL:
        i_lo = row_lo
        i_hi = row_hi
    else:
        i_lo, i_hi = _row_range(tl.program_id(0) * BLOCK_N, row_lo, row_hi, half, M, C, BLOCK_N, NEGATIVES)
    for i0 in range(i_lo, i_hi, BLOCK_M):
        rows = i0 + tl.arange(0, BLOCK_M)
        row_ok = rows < i_hi
        local = rows - row_lo
        z_i = tl.load(z_ptr + rows.to(tl.int64)[:, None] * stride_z + feats[None, :],
                      mask=row_ok[:, None] & feat_ok[None, :], other=0.0)
        # The row pass's d2_ij, bit for bit: each entry of the transposed tile is the same K loop
        # (one chunk of D̂, or the same BLOCK_K chunks in the same order) over the same products
        # z_ik z_jk (exact, and commutative) at the same precision, and `_distances` adds the
        # two norms commutatively. So t_ij is the value that m_i and λ_i were summed from.
        if SINGLE_CHUNK:
            s_t = _mma(z_j, tl.trans(z_i), tl.zeros((BLOCK_N, BLOCK_M), ACC), PRECISION, UPCAST)
        else:
            s_t = _gram(z_ptr, stride_z, cols, col_ok, rows, row_ok, D, BLOCK_N, BLOCK_M, BLOCK_K, PRECISION, UPCAST, ACC)
        d2_pos = tl.load(d2_pos_ptr + local, mask=row_ok, other=0.0)
        stat_a = tl.load(stat_a_ptr + local, mask=row_ok, other=0.0)
        stat_b = tl.load(stat_b_ptr + local, mask=row_ok, other=0.0)
        if WEIGHT == WEIGHT_SPARSEMAX:
            log_norm = stat_a          # unused: sparsemax has no normaliser
        else:
            log_norm = tl.load(log_norm_ptr + local, mask=row_ok, other=0.0)
        d2 = _distances(s_t, n_j, _row_norms(norm_ptr, rows, row_ok, UNIT, ACC), UNIT)
        t_shift = None
        if GROUPS != GROUPS_OFF:
            g_i, own_i = _anchor_groups(row_group_ptr, self_col_ptr, rows, row_ok, GROUPS)
            valid, same = _group_pairs(cols[:, None], row_ok[None, :], col_ok[:, None], g_i[None, :], own_i[None, :],
                                       g_j[:, None], GROUPS)
            if GROUPS == GROUPS_INFONCE:
                # α_ip = e^{(t_ip + log ε − m_i) − λ_i}: the positives' shift, added to t as the row pass adds it.
                t_shift = tl.where(same, log_eps_positive, 0.0)
        else:
            valid = _negatives(rows[None, :], cols[:, None], row_ok[None, :], col_ok[:, None], half, M, NEGATIVES)
        alpha, omega = _pair_weights(d2, valid, d2_pos[None, :], stat_a[None, :], log_norm[None, :], stat_b[None, :],
                                     tau, k, inv_gamma, WEIGHT, POWER, BETA, t_shift)
        if HAS_WEIGHT:
            omega = omega * tl.load(weight_ptr + local, mask=row_ok, other=0.0).to(ACC)[None, :]
        col_sum += tl.sum(omega, 1)
        acc = _mma(omega.to(z_ptr.dtype.element_ty), z_i, acc, PRECISION, UPCAST)

    if pid_d == 0:
        tl.store(col_sum_ptr + cols, col_sum, mask=col_ok)
    tl.store(col_acc_ptr + cols.to(tl.int64)[:, None] * stride_acc + feats[None, :], acc,
             mask=col_ok[:, None] & feat_ok[None, :])

r"""Tile-level building blocks shared by every pass (Triton `@jit` helpers).

A tile is the block of pairs (i, j) between BLOCK rows and BLOCK columns of Z. Every pass
recomputes, per tile, the squared distances from the Gram block (and the norms),

    d2_ij = max((n_i + n_j)/2 − z_i·z_j, 0),      n_i = ||z_i||²,
    d2_ij = max(1 − z_i·z_j, 0)                   for unit rows (UNIT: no norm is loaded),

masks the pairs that are not negatives (by default j = i, j = p(i) = (i + M/2) mod M, or a
row/column outside the matrix; `_negatives` has the two-tower and queue-only sets, and the
columns C = M + K of a queue; `_group_pairs` the sets of group-defined positives, from the
anchors' and the columns' group ids), and turns d2 into the rule's log-weight t = log w(d2):

    power (entropy, direct, infonce)   t = −d2^k / τ,   k = p/2 (k = 1: entropy, infonce;
                                       k = 2: direct's default p = 4; both without exp/log)
    inverse                            t = −log(d2 + τ) / γ
    sparsemax (square)                 α = [(μ_i − d2)/τ]_+  (no log-weight; μ_i from sparsemax.py)

Scalar parameters arrive as (hi, lo) float32 pairs (Triton passes Python floats as float32);
`_join` rebuilds them in the accumulation dtype so that float64 inputs keep float64 precision.
"""
import triton
import triton.language as tl

WEIGHT_POWER = tl.constexpr(0)
WEIGHT_INVERSE = tl.constexpr(1)
WEIGHT_SPARSEMAX = tl.constexpr(2)

#: Negative sets (the `negatives=` of the API); a queue adds the columns [M, C) in every mode.
NEG_ALL = tl.constexpr(0)      # every row of Z but i and p(i) (SimCLR)
NEG_CROSS = tl.constexpr(1)    # the other view's rows but p(i) (two towers)
NEG_NONE = tl.constexpr(2)     # no row of Z (queue only: MoCo)

#: Group-defined positives (fastalpha.positives: labels, more than two views, a labelled
#: queue), the `GROUPS` constexpr. Off, the pairs are the NEGATIVES set; on, they come from the
#: anchors' group ids g_i, the columns' ids g_c (−1: ignored) and the anchors' own columns s(i).
GROUPS_OFF = tl.constexpr(0)
GROUPS_NEGATIVES = tl.constexpr(1)   # J_i = {c : g_c ≥ 0, g_c ≠ g_i}
GROUPS_INFONCE = tl.constexpr(2)     # J_i and P_i = {c ≠ s(i) : g_c = g_i} (infonce with ε > 0)

#: The size arguments of every pass, compiled without Triton's integer specialization
#: (`do_not_specialize`): C = M + K columns, half = N, the anchor range [row_lo, row_hi) and
#: the autotuning bucket (unused in the kernels). Specialized, each would be compiled apart
#: when it equals 1 and when it is divisible by 16, so every pattern of the five over a batch
#: size, a queue length and a distributed rank's range would be its own kernel (about 10⁶ over
#: the static report's call space). They only bound loops and form the masks of rows and
#: columns: the tiles' address arithmetic is rows × stride_z + features, whose alignment comes
#: from stride_z and D (still specialized: divisible by 16 when D is) and the 16-byte aligned
#: pointers that the launcher guarantees. What the divisibility of a size could buy is a wider
#: load of the per-row vectors (norms, statistics, group ids: BLOCK values per program, against
#: BLOCK × D per tile). So one compiled kernel serves every size, and the static report's
#: kernels are all the kernels a call can launch (docs/triton.md).
SIZE_ARGUMENTS = ["C", "half", "row_lo", "row_hi", "m_bucket"]


@triton.jit
def _join(hi, lo, ACC: tl.constexpr):
    """A float64-exact parameter from its float32 (hi, lo) split: x = hi + lo."""
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b on the tensor cores (fp32 accumulation).

    UPCAST is set only under TRITON_INTERPRET for bfloat16 inputs: the interpreter stores
    bfloat16 as raw uint16 and its `tl.dot` multiplies the bit patterns (triton-lang/triton
    #11584, documented as unsupported). Products of bfloat16 values are exact in float32, so
    the upcast dot computes what the GPU's bf16 MMA with fp32 accumulation computes.
    """
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _gram(z_ptr, stride, offs_a, ok_a, offs_b, ok_b, D,
          BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
          PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr):
    """S = Z[offs_a] Z[offs_b]ᵀ (BLOCK_A × BLOCK_B) by a loop over chunks of BLOCK_K features."""
    s = tl.zeros((BLOCK_A, BLOCK_B), ACC)
    base_a = offs_a.to(tl.int64) * stride
    base_b = offs_b.to(tl.int64) * stride
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < D
        a = tl.load(z_ptr + base_a[:, None] + kk[None, :], mask=ok_a[:, None] & k_ok[None, :], other=0.0)
        b_t = tl.load(z_ptr + base_b[None, :] + kk[:, None], mask=ok_b[None, :] & k_ok[:, None], other=0.0)
        s = _mma(a, b_t, s, PRECISION, UPCAST)
    return s


@triton.jit
def _row_norms(norm_ptr, offs, ok, UNIT: tl.constexpr, ACC: tl.constexpr):
    """n = ||z||² of the rows `offs`; unit rows need none (a zero vector stands in)."""
    if UNIT:
        return tl.zeros(offs.shape, ACC)
    return tl.load(norm_ptr + offs, mask=ok, other=0.0)


@triton.jit
def _distances(s, n_a, n_b, UNIT: tl.constexpr):
    """d2 from a Gram tile s (n_a broadcast over its rows, n_b over its columns), clamped at 0.

    For unit rows d2 = 1 − s: a zero row (the normalised form of a zero embedding) then has
    cosine 0 with everything, and no norm enters the tile.
    """
    if UNIT:
        return tl.maximum(1.0 - s, 0.0)
    return tl.maximum((n_a[:, None] + n_b[None, :]) * 0.5 - s, 0.0)


@triton.jit
def _log1p(x):
    """log(1 + x) to full relative precision for small x (x > −1), from `log` alone.

    With u = fl(1 + x), log(u)·x/(u − 1) is exact to a few ulps (Goldberg's correction: the
    rounding of 1 + x cancels in the ratio); u = 1 means |x| is below half an ulp of 1.
    """
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _log_add_exp(a, b):
    """log(e^a + e^b) = max(a, b) + log1p(e^{−|a − b|}); either may be −inf (then the other)."""
    top = tl.maximum(a, b)
    finite = top != float("-inf")
    gap = tl.where(finite, tl.minimum(a, b) - top, 0.0)
    return tl.where(finite, top + _log1p(tl.exp(gap)), top)


@triton.jit
def _negatives(rows, cols, row_ok, col_ok, half, M, NEGATIVES: tl.constexpr):
    """Mask of the pairs (rows[:, None], cols[None, :]) with cols in J_rows (shapes broadcast).

    Columns are [Z; queue]: `col_ok` is cols < C = M + K, columns ≥ M are queue rows, which
    are negatives of every anchor. NEG_ALL: every other row of Z but p(i) (a queue column is
    never i or p(i) < M, so the test is the same with or without a queue); NEG_CROSS: the rows
    of the other view but p(i); NEG_NONE: no row of Z.
    """
    if NEGATIVES == NEG_ALL:
        partner = (rows + half) % M
        return row_ok & col_ok & (cols != rows) & (cols != partner)
    if NEGATIVES == NEG_CROSS:
        # A column j < M of the other view is p(i) exactly when |j − i| = M/2, so no partner
        # index is formed: with (i + M/2) mod M ptxas spilled 16 bytes in the tf32 column pass at
        # D = 128 on sm_80, with i ± M/2 by a select 8 bytes in the IEEE float32 one on sm_90.
        counted = ((cols < half) != (rows < half)) & (cols - rows != half) & (rows - cols != half)
        return row_ok & col_ok & (counted | (cols >= M))
    return row_ok & col_ok & (cols >= M)


@triton.jit
def _anchor_groups(row_group_ptr, self_col_ptr, rows, row_ok, GROUPS: tl.constexpr):
    """(g_i, s_i) of the anchors `rows`: their group ids and, for GROUPS_INFONCE (whose loop
    has P_i and must leave out the anchor's own column), their own columns s(i) (else g_i again,
    unused). Padding rows get −1."""
    g = tl.load(row_group_ptr + rows, mask=row_ok, other=-1)
    if GROUPS == GROUPS_INFONCE:
        own = tl.load(self_col_ptr + rows, mask=row_ok, other=-1)
    else:
        own = g
    return g, own


@triton.jit
def _column_groups(col_group_ptr, cols, col_ok):
    """Group ids of the columns `cols` of [Z; Q]: −1 for an ignored column and for padding."""
    return tl.load(col_group_ptr + cols, mask=col_ok, other=-1)


@triton.jit
def _group_pairs(cols, row_ok, col_ok, g_rows, own_rows, g_cols, GROUPS: tl.constexpr):
    """(pairs, same) of anchors × columns with group-defined sets (shapes broadcast).

    Columns are [Z; Q] with ids g_c (−1: ignored, in no set); anchors have ids g_i and own
    columns s(i) (fastalpha.positives.Groups). `pairs` is the set the loop runs over, `same`
    marks g_c = g_i. GROUPS_NEGATIVES: J_i = {c : g_c ≥ 0, g_c ≠ g_i} (the anchor's own column
    is in its group, or ignored: never in J_i). GROUPS_INFONCE: J_i and P_i = {c : g_c = g_i,
    c ≠ s(i)}: infonce with ε > 0 has its positives in the denominator, log ξ_i over
    e^{t_ic + [g_c = g_i] log ε}, so the caller shifts their log-weights by log ε.
    """
    ok = row_ok & col_ok & (g_cols >= 0)
    same = g_rows == g_cols
    if GROUPS == GROUPS_INFONCE:
        return ok & (cols != own_rows), same
    return ok & (g_rows != g_cols), same


@triton.jit
def _parameters(tau_hi, tau_lo, k_hi, k_lo, inv_gamma_hi, inv_gamma_lo, ACC: tl.constexpr):
    """(τ, k, 1/γ) in the accumulation dtype from their (hi, lo) splits (`_join`)."""
    return _join(tau_hi, tau_lo, ACC), _join(k_hi, k_lo, ACC), _join(inv_gamma_hi, inv_gamma_lo, ACC)


@triton.jit
def _batch_rows(C, half, QUEUE: tl.constexpr):
    """M, the rows of Z among the C columns [Z; queue]: 2·half with a queue, C without (so the
    call without a queue compiles as it did before queues: no extra argument, same code)."""
    if QUEUE:
        return 2 * half
    return C


@triton.jit
def _column_range(first, row_hi, half, M, C, BLOCK_M: tl.constexpr, NEGATIVES: tl.constexpr):
    """[lo, hi): the streamed columns that can hold a negative of the anchors [first, first + BLOCK_M) ∩ [.., row_hi).

    Not for NEG_ALL (every column counts: the kernels keep their plain loop over [0, C)). With
    j_v the loop's index and j = j_v − C for j_v ≥ C (`_streamed`), the ranges are

        NEG_NONE                        [M, C)           the queue only
        NEG_CROSS, anchors in view 1    [half, C)        view 2, then the queue
        NEG_CROSS, anchors in view 2    [M, C + half)    the queue, then view 1 (wrapped)
        NEG_CROSS, anchors in both      [0, C)           (the mask keeps each anchor's own view out)

    so a two-tower call streams (M/2 + K) of the C columns per anchor block instead of C, a
    queue-only call K. The row range of the distributed layer may start anywhere: the block's
    views are read from its first and last valid anchor, not from its position.
    """
    if NEGATIVES == NEG_NONE:
        return M, C
    last = tl.minimum(first + BLOCK_M, row_hi) - 1
    lo = tl.where(last < half, half, tl.where(first >= half, M, 0))
    hi = tl.where(last < half, C, tl.where(first >= half, C + half, C))
    return lo, hi


@triton.jit
def _streamed(j0, hi, C, BLOCK_N: tl.constexpr, NEGATIVES: tl.constexpr):
    """(cols, col_ok) of the streamed tile starting at loop index j0 < hi (`_column_range`).

    NEG_CROSS's view-2 anchors loop past C and wrap onto view 1 (j = j_v − C); the other sets
    never pass C, and for them this is the plain tile j0 + [0, BLOCK_N) with cols < C.
    """
    cols = j0 + tl.arange(0, BLOCK_N)
    if NEGATIVES == NEG_CROSS:
        return tl.where(cols >= C, cols - C, cols), cols < hi
    return cols, cols < C


@triton.jit
def _row_range(first, row_lo, row_hi, half, M, C, BLOCK_N: tl.constexpr, NEGATIVES: tl.constexpr):
    """[lo, hi) ⊆ [row_lo, row_hi): the anchor rows that can count the columns [first, first + BLOCK_N) ∩ [.., C).

    The column pass's mirror of `_column_range` (not for NEG_ALL): a column of view 1 is a
    negative of view-2 anchors only under NEG_CROSS, a column of view 2 of view-1 anchors only,
    a queue column of every anchor; under NEG_NONE a column of Z of none (an empty range).
    A block that straddles half or M keeps all anchors (the mask does the rest).
    """
    last = tl.minimum(first + BLOCK_N, C) - 1
    if NEGATIVES == NEG_NONE:
        return row_lo, tl.where(last < M, row_lo, row_hi)
    view_1 = last < half
    view_2 = (first >= half) & (last < M)
    lo = tl.where(view_1, tl.maximum(row_lo, half), row_lo)
    hi = tl.where(view_2, tl.minimum(row_hi, half), row_hi)
    return lo, hi


@triton.jit
def _power(d2, k, POWER: tl.constexpr):
    """d2^k for d2 ≥ 0 and k > 0 (0 at d2 = 0, without evaluating log 0). POWER = 1 or 2 when
    k is that integer (exact, no transcendental), else 0."""
    if POWER == 1:
        return d2
    if POWER == 2:
        return d2 * d2
    positive = d2 > 0
    return tl.where(positive, tl.exp(k * tl.log(tl.where(positive, d2, 1.0))), 0.0)


@triton.jit
def _log_weight(d2, tau, k, inv_gamma, WEIGHT: tl.constexpr, POWER: tl.constexpr):
    """t(d2) = log w(d2) of the log-weight rules."""
    if WEIGHT == WEIGHT_INVERSE:
        return -tl.log(d2 + tau) * inv_gamma
    return -_power(d2, k, POWER) / tau


@triton.jit
def _log_weight_slope(d2, tau, k, inv_gamma, WEIGHT: tl.constexpr, POWER: tl.constexpr):
    """t'(d2) = dt/d(d2) (used by β). For k < 1 it is infinite at d2 = 0; there the pair's
    gradient β_ij (z_i − z_j) ∝ d2^{k−1/2} tends to 0 for k > 1/2, so the slope is set to 0."""
    if WEIGHT == WEIGHT_INVERSE:
        return -inv_gamma / (d2 + tau)
    if POWER == 1:
        return tl.full(d2.shape, -1.0, d2.dtype) / tau
    if POWER == 2:
        return -2.0 * d2 / tau
    positive = d2 > 0
    return tl.where(positive, -k * tl.exp((k - 1.0) * tl.log(tl.where(positive, d2, 1.0))) / tau, 0.0)


@triton.jit
def _pair_weights(d2, valid, d2_pos, stat_a, log_norm, stat_b, tau, k, inv_gamma,
                  WEIGHT: tl.constexpr, POWER: tl.constexpr, BETA: tl.constexpr, t_shift=None):
    """(α, β) of a tile once the row statistics are known (row quantities broadcast to d2).

    Log-weight rules: stat_a = m_i, the running maximum of t over the row as the ONLINE pass
    left it, and log_norm = λ_i = lse_i − m_i, so α = e^{(t − m_i) − λ_i}. The shift and the
    normaliser are kept apart because lse_i itself, rounded to the accumulation dtype, carries
    an absolute error of half an ulp of |m_i|: with d2 ~ 10⁴ and k = 2 that is units of t, and
    e^{t − lse} would be off by e^{units}. t − m_i is exact for the pairs that matter (Sterbenz:
    t within a factor 2 of m_i) and λ_i = O(log C), so every pass that evaluates the same t
    (same tile product, `_distances`, `_log_weight`, and the same `t_shift`: GROUPS_INFONCE's
    log ε on the positives) gets the α the row pass normalised, bit for bit in its exponent.
    With BETA, stat_b = c_i = Σ_k α_ik v_ik and β = α (1 − t' (v − c)), v = d2_i − d2_ij.
    Sparsemax: stat_a = μ_i, stat_b = 1/k_i (log_norm unused), α = [(μ − d2)/τ]_+, β = 2α − 1/k_i
    on the support. Without BETA, β = α. Both are exactly 0 outside `valid`.
    """
    if WEIGHT == WEIGHT_SPARSEMAX:
        alpha = tl.where(valid, tl.maximum((stat_a - d2) / tau, 0.0), 0.0)
        if BETA:
            beta = tl.where(alpha > 0, 2.0 * alpha - stat_b, 0.0)
        else:
            beta = alpha
    else:
        t = _log_weight(d2, tau, k, inv_gamma, WEIGHT, POWER)
        if t_shift is not None:
            t += t_shift
        alpha = tl.where(valid, tl.exp(tl.where(valid, (t - stat_a) - log_norm, 0.0)), 0.0)
        if BETA:
            slope = _log_weight_slope(d2, tau, k, inv_gamma, WEIGHT, POWER)
            beta = alpha * (1.0 - slope * ((d2_pos - d2) - stat_b))
        else:
            beta = alpha
    return alpha, beta

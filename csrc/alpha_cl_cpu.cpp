// CPU kernel of fastalpha::alpha_cl_fused: per-row losses and the gradient of Σ_i w_i loss_i
// for anchors i ∈ [row_lo, row_hi) of Z (M × D), without ever holding the M × M pair matrix.
// docs/cpp.md explains both algorithms with pictures of the products; in short:
//
// Symmetric (large problems). S = Z Zᵀ is symmetric, so the work is organised over tiles
// (I, J), I ≤ J, of row blocks, each tile computed once and used for both of its orientations:
//   pass 1  S_IJ = Z_I Z_Jᵀ → d2 → row statistics of the rows of I (over the columns of J)
//           and of the rows of J (over the rows of I): running minimum distance, Σ e, Σ e d2
//           (`square`: a full-row pass instead, for Michelot's exact threshold)
//   pass 2  S_IJ again → W_IJ = ω_IJ + ω_JIᵀ (ω = w_i α_ij or w_i β_ij), then
//           G_I += W_IJ Z_J and G_J += W_IJᵀ Z_I
// That is 4·M²·D flops (2 for the S products, 2 for the gradient) instead of 6. Tiles are
// scheduled in rounds of a round-robin tournament over the blocks: the tiles of one round
// touch pairwise disjoint blocks, so threads write their blocks of G and of the statistics
// without private copies or atomics, and the order of every sum is fixed whatever the
// thread count. Memory: G and O(M) statistics, plus one tile per thread.
//
// One pass (small problems). Chunks of R full rows: S = Z_r Zᵀ (R × M), a fused sweep per
// row for the rule, ωZ and ωᵀZ; each thread has an M × (D + 1) accumulator. Fewer, larger
// products and one exponential per ordered pair, which wins where tiles would be tiny.
//
// Negative sets and queues. The columns are [Z; Q] (a queue's K rows after Z's M, never
// anchors) and J_i is at most three column ranges (negative_ranges, alpha_cl_rule.h). The one
// pass sweeps those ranges of each full row. The symmetric algorithm makes the queue blocks
// non-anchor column blocks and schedules only the tiles that hold pairs of J: "cross" drops
// the same-view tiles, "none" keeps only anchor × queue tiles; self and partner are masked
// inside a tile as for "all". Every count |J_i| is negative_count.
//
// Group-defined positives (labels, more than two views, labelled queues; the grouped op,
// GroupColumns in alpha_cl_rule.h) run either algorithm: the one pass tests each column of a
// full row (GroupedSets); the symmetric tiles mask a tile by the two column ids, the same test
// for both orientations when every anchor's column id is its row id (Symmetric<T, true>,
// symmetric_groups). For infonce with ε > 0 the positives join the sweep at d2 − τ log ε. The positive side, d̄2_i and the gradient of the uniform pull, is
// group sums in fastalpha/positives.py: the kernel returns the pull weights w_i g A_i.
//
// `choose_algorithm` holds the rule between the two. Both finish each row with
// finalize_row (alpha_cl_row_math.h, shared with the CUDA kernel).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "alpha_cl_common.h"
#include "alpha_cl_row_math.h"
#include "alpha_cl_rule.h"
#include "vec_math.h"

namespace fastalpha {
namespace {

using vecmath::Math;

// float partial sums are folded into a double every kSumBlock terms, so a row of 10^5 terms
// keeps float32's precision without giving up SIMD lanes.
constexpr int64_t kSumBlock = 1024;

// One-pass rows per chunk R ≈ kChunkElements / M, within [64, 256]: every chunk re-reads Z and
// the accumulator, so small R makes the pass memory-bound; large R makes the R × M buffers
// leave the cache (measured on 2 cores, D = 128: at M = 8192 R = 64…128 best).
constexpr int64_t kChunkElements = int64_t{1} << 20;

// Symmetric tiles are at most kTile × kTile: the S/W tile (256 KiB in float32) stays in L2,
// and the three products per tile are large enough for the BLAS to run near its peak.
constexpr int64_t kTile = 256;

// The shared shift of a tile (one exponential per pair for both orientations) is used when
// the log-weights of its rows' closest negatives differ by at most this much; beyond it the
// weights of some rows would lose digits (or underflow), and each orientation uses its own
// rows' shifts. float32: e^{−16} keeps weights far inside the normal range and the argument
// of exp within 16 · 2^{−24} of exact.
template <typename T>
constexpr double kMaxSharedSpread = sizeof(T) == 4 ? 16.0 : 200.0;

constexpr double kInfD = std::numeric_limits<double>::infinity();

inline int64_t env_int(const char* name, int64_t fallback) {
  if (const char* env = std::getenv(name)) {
    const long long value = std::atoll(env);
    if (value > 0) return static_cast<int64_t>(value);
  }
  return fallback;
}

inline int64_t partner_of(int64_t i, int64_t m) { return i < m / 2 ? i + m / 2 : i - m / 2; }

enum class Algorithm { OnePass, Symmetric };

// The symmetric algorithm does 4·M²·D flops against the one pass's 6·M²·D (M²·D against
// 2·M²·D for a forward-only call: pass 1 is the whole forward), but more elementwise work per
// pair and two barriers per round of tiles, which a busy machine makes expensive. Measured on
// 2 shared cores (float32, direct, vs the one pass): fwd+bwd at M = 8192, D = 128 1.6× faster;
// at M = 2048 and M = 1024 (D ≤ 128) slower or even; forward only 2× faster from M = 1024 at
// D = 128, 2.7× slower at D = 16. Hence: fwd+bwd from M·D ≥ 2^18 with M ≥ 2048, forward
// from M ≥ 1024, both with D ≥ 32. Only a full anchor range gains from symmetry: with a
// partial one (a rank's share of a distributed batch) most tiles have one anchor side.
// Other negative sets: symmetry pays only on pairs of Z. A queue row is a column only, so its
// pairs cost the two passes 8·M·K·D flops against the one pass's 6·M·K·D, and its blocks add
// about K/T rounds whose few tiles all share the anchor blocks: two barriers per round for
// little work. Measured (direct, D = 128, float32) on 2 shared cores the symmetric algorithm
// was 1.5-5x slower for "none" (M = 512, K = 4096 and 16384) and 2x slower for K = 2M
// (M = 2048), on one thread 1.1-1.8x faster: the rounds decide. Hence "none", and any queue
// with K ≥ M, run the one pass. "cross" keeps the rule: its tiles are the cross-view half (a
// third of the one pass's flops, 2·M²·D against 6·M²·D: the one pass computes and masks the
// same-view columns too).
// FASTALPHA_CPP_ALGORITHM=onepass|symmetric forces either (tests, measurements); both compute
// every negative set.
Algorithm choose_algorithm(int64_t m, int64_t k, int64_t dim, int64_t rows, bool need_grad, Negatives negatives) {
  if (const char* env = std::getenv("FASTALPHA_CPP_ALGORITHM")) {
    if (std::strcmp(env, "onepass") == 0) return Algorithm::OnePass;
    if (std::strcmp(env, "symmetric") == 0) return Algorithm::Symmetric;
  }
  if (negatives == Negatives::None || k >= m) return Algorithm::OnePass;
  const bool large = need_grad ? m >= 2048 && m * dim >= (int64_t{1} << 18) : m >= 1024;
  const bool mostly_anchors = 2 * rows >= m;
  return large && dim >= 32 && mostly_anchors ? Algorithm::Symmetric : Algorithm::OnePass;
}

// Tile size: kTile, smaller for small M so that a round has enough tiles to keep every
// thread busy (a round of B′ blocks has (B′ − 1)/2 tiles and a diagonal one).
inline int64_t tile_size(int64_t m) {
  return env_int("FASTALPHA_TILE", std::clamp<int64_t>(m / 16, 64, kTile));
}

// ----------------------------------------------------------------------------------------
// Per-pair weights e = e^{t(d) − t(r)} relative to a reference distance r, one type per rule
// variant so that the inner loops are specialised and vectorised. `ref(r)` turns r into the
// parameter the weight takes; `slope` is t'(d) for β.

template <typename T>
struct ConstWeight {  // quadratic: α constant
  T ref(T) const { return T(0); }
  T operator()(T, T) const { return T(1); }
  T slope(T) const { return T(0); }
};

template <typename T, int K>  // entropy/direct/infonce with k = K (1, 2) or any k (K = 0)
struct ExpWeight {
  T k, inv_tau;
  T power(T d) const {
    if constexpr (K == 1) return d;
    else if constexpr (K == 2) return d * d;
    else return Math<T>::pow(d, k);
  }
  T ref(T r) const { return power(r); }
  T operator()(T d, T rk) const { return exp_rule_weight<Math<T>>(power(d), rk, inv_tau); }
  T slope(T d) const {
    if constexpr (K == 1) return -inv_tau;
    else if constexpr (K == 2) return exp_rule_slope(d, T(2), inv_tau);
    else return exp_rule_slope(Math<T>::pow(d, k - T(1)), k, inv_tau);
  }
};

template <typename T, int G>  // inverse with γ = G (1, 2) or any γ (G = 0)
struct InverseWeight {
  T tau, inv_gamma;
  T ref(T r) const { return r + tau; }
  T operator()(T d, T base) const {
    const T x = base / (d + tau);
    if constexpr (G == 1) return x;
    else if constexpr (G == 2) return std::sqrt(x);
    else return Math<T>::pow(x, inv_gamma);
  }
  T slope(T d) const { return inverse_slope(d, tau, inv_gamma); }
};

// f(weight) with the weight type of cfg's rule (not square, which has no log-weight).
template <typename T, class F>
void with_weight(const RuleConfig& cfg, F&& f) {
  const T inv_tau = static_cast<T>(cfg.inv_tau), k = static_cast<T>(cfg.k);
  switch (cfg.rule) {
    case Rule::Quadratic:
      f(ConstWeight<T>{});
      return;
    case Rule::Inverse: {
      const T tau = static_cast<T>(cfg.temperature), inv_gamma = static_cast<T>(cfg.inv_gamma);
      if (cfg.gamma == 1.0) f(InverseWeight<T, 1>{tau, inv_gamma});
      else if (cfg.gamma == 2.0) f(InverseWeight<T, 2>{tau, inv_gamma});
      else f(InverseWeight<T, 0>{tau, inv_gamma});
      return;
    }
    default:
      if (cfg.k == 1.0) f(ExpWeight<T, 1>{k, inv_tau});
      else if (cfg.k == 2.0) f(ExpWeight<T, 2>{k, inv_tau});
      else f(ExpWeight<T, 0>{k, inv_tau});
      return;
  }
}

// body(begin, end) on the column ranges of J_i (negative_ranges): the excluded columns (self,
// partner, the same view for "cross", Z for "none") are skipped by splitting the range rather
// than by a mask in the hot loop.
template <class Body>
inline void for_negatives(const NegativeRanges& r, Body&& body) {
  body(r.begin[0], r.end[0]);
  body(r.begin[1], r.end[1]);
  body(r.begin[2], r.end[2]);
}

// The two ways a full-row sweep knows the columns of J_i and the positive side of anchor i.
// `row(i)` gives the row's column set: its ranges (for_negatives), and where kMarked, `mark`:
// the distance pass gives a column of the ranges its offset, or +inf when it is not in the
// sweep, and the later passes test `in_sweep(d)` (d ≠ inf). A test on the distance already
// loaded keeps those loops vectorised (as in the symmetric tiles); a test on the group ids
// there (`g_j != g_i ? weight(d) : 0`) left GCC's weight loop scalar, 1.8x its paired time.
// The paired set has no marks and in_sweep is the constant true, so its loops compile as
// they did before the grouped mode existed.
//
// Paired (every negative set of the SimCLR contract, queues included): J_i is its column
// ranges, the positive is the partner p(i), |J_i| is the same for every anchor.
struct PairedSets {
  Negatives negatives;
  int64_t m, c;
  double n_neg;  // negative_count

  struct Row {
    NegativeRanges ranges;
    static constexpr bool kMarked = false;
    template <typename T>
    bool in_sweep(T) const { return true; }
  };
  Row row(int64_t i) const { return {negative_ranges(negatives, i, m, c)}; }
  bool has_term(int64_t) const { return true; }
  double negative_count(int64_t) const { return n_neg; }
  // d2 of (i, p(i)) from S_ip, which the sweep leaves in place (p(i) ∉ J_i).
  template <typename T>
  double positive_distance(int64_t i, const T* row, const T* half) const {
    const int64_t p = partner_of(i, m);
    const double d2 = std::max(0.0, static_cast<double>(half[i] + half[p]) - static_cast<double>(row[p]));
    return static_cast<double>(std::max(T(0), static_cast<T>(d2)));
  }
};

// Grouped (GroupColumns): all C = M + K columns, each tested against the anchor's id; d̄2_i
// and |J_i| per anchor come from the caller. An anchor without a negative has no loss term
// (one without a positive has weight 0 from the caller: a finite loss, no gradient).
struct GroupedSets {
  GroupedLoop loop;
  const int64_t* row_ids;   // M
  const int64_t* col_ids;   // C
  const int64_t* self_col;  // M
  const int64_t* n_neg;     // per anchor, from row_lo
  const void* d2_mean;      // per anchor, T
  int64_t c, row_lo;

  struct Row {
    NegativeRanges ranges;
    GroupColumns columns;
    double positive_offset;
    static constexpr bool kMarked = true;
    // d2_ij of a column in the sweep (a positive's with its offset), else +inf.
    template <typename T>
    T mark(int64_t j, T d) const {
      const T shifted = columns.is_positive(j) ? d + static_cast<T>(positive_offset) : d;
      return columns.contains(j) ? shifted : std::numeric_limits<T>::infinity();
    }
    template <typename T>  // `!=`, not `<`: a NaN distance stays in and propagates, as in the paired sweep
    bool in_sweep(T d) const { return d != std::numeric_limits<T>::infinity(); }
  };
  Row row(int64_t i) const {
    return {{{0, c, c}, {c, c, c}}, group_columns(col_ids, row_ids, self_col, i, loop.with_positives),
            loop.positive_offset};
  }
  bool has_term(int64_t i) const { return n_neg[i - row_lo] > 0; }
  double negative_count(int64_t i) const { return static_cast<double>(n_neg[i - row_lo]); }
  template <typename T>
  double positive_distance(int64_t i, const T*, const T*) const {
    return static_cast<double>(static_cast<const T*>(d2_mean)[i - row_lo]);
  }
};

// ----------------------------------------------------------------------------------------
// Full rows: the one-pass sweep, and the statistics pass of `square` in the symmetric path.

// A row has C = M + K columns ([Z; Q]); `Sets` (PairedSets, GroupedSets) says which are in J_i.
template <typename T, class Sets>
class RowSweep {
 public:
  RowSweep(const RuleConfig& cfg, const T* half, const Sets& sets, int64_t c)
      : cfg_(cfg), half_(half), sets_(sets), c_(c) {}

  // `row` holds S_i· on entry and d2_i· on exit (over J_i; the other columns keep S). Returns
  // the row's statistics relative to its closest negative (`dmin`, and μ for square); writes
  // e_ij into `e` when it is not null (0 outside J_i).
  RowStats operator()(int64_t i, T* row, T* e, double& dmin_out, double& mu_out) const {
    const Row rng = sets_.row(i);
    const T dmin = distances(i, rng, row);
    dmin_out = dmin;
    RowStats s{};
    s.m = log_weight(cfg_, static_cast<double>(dmin));
    if (cfg_.rule == Rule::Square) {
      double mu;
      int64_t support;
      sparsemax_threshold(rng, row, dmin, mu, support);
      const T mu_t = static_cast<T>(mu), inv_tau = static_cast<T>(cfg_.inv_tau);
      weights(rng, row, e, [=](T d) { return square_alpha(d, mu_t, inv_tau); }, s.l, s.ld);
      s.support = static_cast<double>(support);
      s.m = 0;
      mu_out = mu;
    } else {
      with_weight<T>(cfg_, [&](auto weight) {
        const T r = weight.ref(dmin);
        weights(rng, row, e, [=](T d) { return weight(d, r); }, s.l, s.ld);
      });
    }
    if (e != nullptr) {
      // The gaps between the ranges ("all": the two columns i and p(i)).
      const NegativeRanges& r = rng.ranges;
      std::fill(e, e + r.begin[0], T(0));
      std::fill(e + r.end[0], e + r.begin[1], T(0));
      std::fill(e + r.end[1], e + r.begin[2], T(0));
      std::fill(e + r.end[2], e + c_, T(0));
    }
    return s;
  }

  // ω_i· = scale · β over J_i from e (in place); returns Σ_j ω_ij.
  double write_beta(int64_t i, const T* row, T* e, double scale, const RowFinal& f, double mu, double support) const {
    const Row rng = sets_.row(i);
    double total = 0;
    if (cfg_.rule == Rule::Square) {
      const T mu_t = static_cast<T>(mu), inv_tau = static_cast<T>(cfg_.inv_tau);
      const T two_scale = static_cast<T>(2 * scale), over_k = static_cast<T>(scale / support);
      total = map_row(rng, row, e, [=](T, T d) { return square_beta(d, mu_t, inv_tau, two_scale, over_k); });
    } else {
      with_weight<T>(cfg_, [&](auto weight) {
        const T s = static_cast<T>(scale * f.inv), shift = static_cast<T>(f.shift);
        total = map_row(rng, row, e, [=](T ev, T d) { return beta_log_weight(s * ev, weight.slope(d), d, shift); });
      });
    }
    return total;
  }

 private:
  using Row = typename Sets::Row;

  // d2_ij = max(0, n_i/2 + n_j/2 − S_ij) in place over the ranges (marked, see PairedSets);
  // returns the minimum over the columns in the sweep.
  T distances(int64_t i, const Row& rng, T* row) const {
    const T hi = half_[i];
    const T* h = half_;
    T dmin = std::numeric_limits<T>::infinity();
    for_negatives(rng.ranges, [&](int64_t s, int64_t e) {
      T lo = dmin;
#pragma omp simd reduction(min : lo)
      for (int64_t j = s; j < e; ++j) {
        T d = hi + h[j] - row[j];
        d = d > T(0) ? d : T(0);
        if constexpr (Row::kMarked) d = rng.mark(j, d);
        row[j] = d;
        lo = d < lo ? d : lo;
      }
      dmin = lo;
    });
    return dmin;
  }

  // e[j] = weight(d2_ij) over J_i (if e is not null), with l = Σ e and ld = Σ e d2.
  template <class Weight>
  void weights(const Row& rng, const T* row, T* e_out, Weight weight, double& l, double& ld) const {
    l = 0;
    ld = 0;
    for_negatives(rng.ranges, [&](int64_t s, int64_t e) {
      for (int64_t s0 = s; s0 < e; s0 += kSumBlock) {
        const int64_t e0 = std::min(e, s0 + kSumBlock);
        T ls = 0, lds = 0;
        if (e_out != nullptr) {
#pragma omp simd reduction(+ : ls, lds)
          for (int64_t j = s0; j < e0; ++j) {
            const T d = row[j];
            const bool in = rng.in_sweep(d);
            const T w = in ? weight(d) : T(0);
            e_out[j] = w;
            ls += w;
            lds += in ? w * d : T(0);
          }
        } else {
#pragma omp simd reduction(+ : ls, lds)
          for (int64_t j = s0; j < e0; ++j) {
            const T d = row[j];
            const bool in = rng.in_sweep(d);
            const T w = in ? weight(d) : T(0);
            ls += w;
            lds += in ? w * d : T(0);
          }
        }
        l += ls;
        ld += lds;
      }
    });
  }

  // e[j] = f(e[j], d2_ij) over J_i; returns Σ_j e[j].
  template <class F>
  double map_row(const Row& rng, const T* row, T* e_io, F f) const {
    double total = 0;
    for_negatives(rng.ranges, [&](int64_t s, int64_t e) {
      for (int64_t s0 = s; s0 < e; s0 += kSumBlock) {
        const int64_t e0 = std::min(e, s0 + kSumBlock);
        T part = 0;
#pragma omp simd reduction(+ : part)
        for (int64_t j = s0; j < e0; ++j) {
          const T w = rng.in_sweep(row[j]) ? f(e_io[j], row[j]) : T(0);
          e_io[j] = w;
          part += w;
        }
        total += part;
      }
    });
    return total;
  }

  // |{j ∈ J_i : d2_ij < mu}| and the sum of those d2_ij.
  void count_below(const Row& rng, const T* row, T mu, int64_t& count, double& sum) const {
    count = 0;
    sum = 0;
    for_negatives(rng.ranges, [&](int64_t s, int64_t e) {
      for (int64_t s0 = s; s0 < e; s0 += kSumBlock) {
        const int64_t e0 = std::min(e, s0 + kSumBlock);
        T c = 0, part = 0;  // c ≤ kSumBlock is exact in float
#pragma omp simd reduction(+ : c, part)
        for (int64_t j = s0; j < e0; ++j) {
          const bool in = row[j] < mu;  // marked columns are +inf
          c += in ? T(1) : T(0);
          part += in ? row[j] : T(0);
        }
        count += static_cast<int64_t>(c);
        sum += part;
      }
    });
  }

  // Exact sparsemax threshold μ_i (Σ_j [(μ − d2_ij)/τ]_+ = 1) by Michelot's iteration
  // μ ← (τ + Σ_{d2<μ} d2) / |{d2 < μ}| from μ_0 = min d2 + τ ≥ μ*: the support only shrinks,
  // and once an iteration leaves its size unchanged it is exactly {d2 < μ*} (ties at a
  // distance are in or out together, since the test is strict).
  void sparsemax_threshold(const Row& rng, const T* row, T dmin, double& mu, int64_t& support) const {
    // At least the closest negative is in the support even when τ is below d2's resolution.
    const T floor_mu = std::nextafter(dmin, std::numeric_limits<T>::infinity());
    T mu_t = std::max(static_cast<T>(dmin + static_cast<T>(cfg_.temperature)), floor_mu);
    double sum;
    count_below(rng, row, mu_t, support, sum);
    for (int64_t iter = 0; iter <= c_; ++iter) {
      mu_t = std::max(static_cast<T>((cfg_.temperature + sum) / static_cast<double>(support)), floor_mu);
      int64_t next_support;
      count_below(rng, row, mu_t, next_support, sum);
      const bool converged = next_support >= support;
      support = next_support;
      if (converged) break;
    }
    mu = std::max((cfg_.temperature + sum) / static_cast<double>(support), static_cast<double>(floor_mu));
  }

  const RuleConfig cfg_;
  const T* half_;
  const Sets sets_;
  const int64_t c_;
};

// G_k += u (c_k + c_{p(k)} − wsum_k) z_k − (c_k + c_{p(k)}) z_{p(k)}, with c = coef and
// u = 0 for unit rows (their d2 = 1 − z_i·z_j has no term in z_k itself): the partner terms
// of every anchor and the self terms of the pair sum (reference.closed_form_gradient). `z` is
// [Z; Q] with `ncols` rows; a queue row k ≥ M has no partner: G_k −= u wsum_k q_k.
template <typename T>
void add_self_terms(const T* z, int64_t first_row, int64_t end_row, int64_t dim, const T* wsum, T* grad);

template <typename T>
void add_partner_and_self_terms(const T* z, int64_t m, int64_t ncols, int64_t dim, bool unit_rows, const T* coef,
                                const T* wsum, T* grad) {
  if (!unit_rows && ncols > m) add_self_terms<T>(z, m, ncols, dim, wsum, grad);
  at::parallel_for(0, m, 256, [&](int64_t first, int64_t last) {
    for (int64_t k = first; k < last; ++k) {
      const int64_t p = partner_of(k, m);
      const T c = coef[k] + coef[p];
      const T self = unit_rows ? T(0) : c - wsum[k];
      const T* zk = z + k * dim;
      const T* zp = z + p * dim;
      T* g = grad + k * dim;
#pragma omp simd
      for (int64_t col = 0; col < dim; ++col) g[col] += self * zk[col] - c * zp[col];
    }
  });
}

// G_k −= wsum_k z_k for the rows k ∈ [first_row, end_row) (raw rows only): the self terms of
// the pair sum alone, for rows without a partner term (queue rows; every row of the grouped
// mode, whose positive side is added from group sums).
template <typename T>
void add_self_terms(const T* z, int64_t first_row, int64_t end_row, int64_t dim, const T* wsum, T* grad) {
  at::parallel_for(first_row, end_row, 256, [&](int64_t first, int64_t last) {
    for (int64_t k = first; k < last; ++k) {
      const T self = -wsum[k];
      const T* zk = z + k * dim;
      T* g = grad + k * dim;
#pragma omp simd
      for (int64_t col = 0; col < dim; ++col) g[col] += self * zk[col];
    }
  });
}

inline PairedSets paired_sets(const RuleConfig& cfg, int64_t m, int64_t c) {
  return {cfg.negatives, m, c, static_cast<double>(negative_count(m / 2, c - m, cfg.negatives))};
}

// n_k/2 (0.5 for unit rows): d2_ij = n_i/2 + n_j/2 − z_i·z_j.
template <typename T>
at::Tensor half_norms(const at::Tensor& z, bool unit_rows) {
  if (unit_rows) return at::full({z.size(0)}, 0.5, z.options());
  return z.square().sum(1).mul_(0.5).contiguous();
}

// ----------------------------------------------------------------------------------------
// The one-pass algorithm.

// What the one pass leaves for the assembly of the gradient: G = ω[Z; Q] (anchor rows) +
// ωᵀ[Z; Q], wsum = the row (anchors) and column sums of ω, coef_i = w_i g A_i at the anchors.
template <typename T>
struct OnePassSums {
  at::Tensor loss;
  at::Tensor grad;  // undefined without need_grad
  std::vector<T> coef, wsum;
};

// `cols` is [Z; Q] (C = M + K rows, the queue's K after the M rows of Z): every chunk row is
// an anchor of Z, every column of cols a candidate negative (`sets` picks J_i).
template <typename T, class Sets>
OnePassSums<T> one_pass_sums(const at::Tensor& cols, int64_t m, int64_t row_lo, int64_t row_hi, const T* w,
                             const RuleConfig& cfg, bool need_grad, const Sets& sets) {
  const int64_t ncols = cols.size(0), dim = cols.size(1), rows = row_hi - row_lo;
  const at::Tensor z = cols.narrow(0, 0, m);
  const auto opts = cols.options();
  const at::Tensor half = half_norms<T>(cols, cfg.unit_rows);
  at::Tensor loss = at::empty({rows}, opts);
  std::vector<T> coef(need_grad ? ncols : 0, T(0)), wsum(need_grad ? ncols : 0, T(0));
  at::Tensor omega_z = need_grad ? at::empty({rows, dim}, opts) : at::Tensor();

  const int threads = at::get_num_threads();
  int64_t chunk = env_int("FASTALPHA_CHUNK_ROWS", std::clamp<int64_t>(kChunkElements / ncols, 64, 256));
  // Every thread gets the same number of chunks of near-equal size (parallel_for splits statically).
  if (rows > 0) {
    const int64_t per_thread = (rows + threads * chunk - 1) / (threads * chunk);
    chunk = std::max<int64_t>(1, (rows + threads * per_thread - 1) / (threads * per_thread));
  }
  const int64_t n_chunks = rows == 0 ? 0 : (rows + chunk - 1) / chunk;
  // Per thread: acc = [ωᵀ[Z; Q] | C], (M + K) × (D + 1); the last column, Σ_i ω_ij, comes
  // free from a column of ones appended to the chunk's rows (times the row scales).
  std::vector<at::Tensor> acc(threads);
  std::vector<T> row_sum(need_grad ? rows : 0);

  const RowSweep<T, Sets> sweep(cfg, half.data_ptr<T>(), sets, ncols);
  T* loss_out = loss.data_ptr<T>();

  at::parallel_for(0, n_chunks, 1, [&](int64_t first, int64_t last) {
    const int tid = at::get_thread_num();
    TORCH_CHECK(tid < threads, "fastalpha: thread id ", tid, " outside the ", threads, " accumulators");
    at::Tensor sim = at::empty({chunk, ncols}, opts);
    at::Tensor omega = need_grad ? at::empty({chunk, ncols}, opts) : at::Tensor();
    at::Tensor scale = at::empty({chunk}, opts), z_aug = at::empty({chunk, dim + 1}, opts);
    if (need_grad) acc[tid] = at::zeros({ncols, dim + 1}, opts);
    for (int64_t ch = first; ch < last; ++ch) {
      const int64_t r0 = row_lo + ch * chunk, n = std::min(chunk, row_hi - r0);
      const at::Tensor z_rows = z.narrow(0, r0, n);
      at::Tensor s = sim.narrow(0, 0, n), f = scale.narrow(0, 0, n);
      at::mm_out(s, z_rows, cols.t());
      T* s_ptr = s.data_ptr<T>();
      T* o_ptr = need_grad ? omega.data_ptr<T>() : nullptr;
      T* f_ptr = f.data_ptr<T>();
      for (int64_t r = 0; r < n; ++r) {
        const int64_t i = r0 + r, out = i - row_lo;
        T* row = s_ptr + r * ncols;
        T* e = need_grad ? o_ptr + r * ncols : nullptr;
        if (!sets.has_term(i)) {  // no loss term: loss 0, ω_i· = 0
          loss_out[out] = T(0);
          if (!need_grad) continue;
          std::fill(e, e + ncols, T(0));
          row_sum[out] = T(0);
          f_ptr[r] = T(0);
          continue;
        }
        double dmin, mu = 0;
        const RowStats st = sweep(i, row, e, dmin, mu);
        const RowFinal fin = finalize_row(cfg, st, sets.positive_distance(i, row, half.data_ptr<T>()),
                                          sets.negative_count(i));
        loss_out[out] = static_cast<T>(fin.loss);
        if (!need_grad) continue;
        const double g = (w ? static_cast<double>(w[out]) : 1.0) * cfg.grad_scale;
        coef[i] = static_cast<T>(g * fin.alpha_sum);
        if (cfg.uses_beta) {
          row_sum[out] = static_cast<T>(sweep.write_beta(i, row, e, g, fin, mu, st.support));
          f_ptr[r] = T(1);
        } else {
          // ω = scale · e: the scale is folded into the products instead of a sweep over the row.
          row_sum[out] = static_cast<T>(g * fin.alpha_sum);
          f_ptr[r] = static_cast<T>(g * fin.inv);
        }
      }
      if (need_grad) {
        // ω = diag(f) E: ω[Z; Q] = f ⊙ (E [Z; Q]) and ωᵀ[Z_r | 1] = Eᵀ [f ⊙ Z_r | f].
        at::Tensor o = omega.narrow(0, 0, n);
        at::Tensor oz = omega_z.narrow(0, r0 - row_lo, n);
        at::mm_out(oz, o, cols);
        oz.mul_(f.unsqueeze(1));
        at::Tensor za = z_aug.narrow(0, 0, n);
        at::Tensor za_z = za.narrow(1, 0, dim);
        at::mul_out(za_z, z_rows, f.unsqueeze(1));
        za.select(1, dim).copy_(f);
        acc[tid].addmm_(o.t(), za);
      }
    }
  });

  if (!need_grad) return {loss, at::Tensor(), {}, {}};
  at::Tensor total;
  for (int t = 0; t < threads; ++t) {
    if (!acc[t].defined()) continue;
    if (total.defined()) total.add_(acc[t]);
    else total = acc[t];
  }
  if (!total.defined()) total = at::zeros({ncols, dim + 1}, opts);
  // G = ωᵀ[Z; Q] (+ ω[Z; Q] on the anchors), wsum = column sums (+ row sums on the anchors).
  at::Tensor grad = total.narrow(1, 0, dim).contiguous();
  const T* tp = total.data_ptr<T>();
  for (int64_t k = 0; k < ncols; ++k) wsum[k] = tp[k * (dim + 1) + dim];
  if (rows > 0) {
    grad.narrow(0, row_lo, rows).add_(omega_z);
    for (int64_t r = 0; r < rows; ++r) wsum[row_lo + r] += row_sum[r];
  }
  return {loss, grad, std::move(coef), std::move(wsum)};
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> one_pass(const at::Tensor& cols, int64_t m, int64_t row_lo, int64_t row_hi,
                                            const T* w, const RuleConfig& cfg, bool need_grad) {
  OnePassSums<T> sums = one_pass_sums<T>(cols, m, row_lo, row_hi, w, cfg, need_grad, paired_sets(cfg, m, cols.size(0)));
  if (!need_grad) return {sums.loss, at::empty({0, cols.size(1)}, cols.options())};
  add_partner_and_self_terms<T>(cols.data_ptr<T>(), m, cols.size(0), cols.size(1), cfg.unit_rows, sums.coef.data(),
                                sums.wsum.data(), sums.grad.template data_ptr<T>());
  return {sums.loss, sums.grad};
}

// ----------------------------------------------------------------------------------------
// The symmetric algorithm.

// Row blocks of [Z; Q] (C = M + K rows) of at most `tile` rows, with boundaries at row_lo,
// row_hi and M (and at N for "cross"), so that a block is all anchors or none, lies in Z or in
// the queue, and for "cross" in one view; `start` has one entry more than there are blocks.
// Queue blocks are never anchors: they are columns only, as the rows of Z outside
// [row_lo, row_hi) are. "all" without a queue gets the blocks it always had.
struct Blocks {
  std::vector<int64_t> start;
  std::vector<char> anchor;
  std::vector<char> part;  // where the block starts: 0 the first view, 1 the second, 2 the queue
  int64_t count() const { return static_cast<int64_t>(anchor.size()); }
  int64_t size(int64_t b) const { return start[b + 1] - start[b]; }
};

inline Blocks make_blocks(int64_t m, int64_t c, int64_t row_lo, int64_t row_hi, int64_t tile, Negatives negatives) {
  std::vector<int64_t> edges = {0, row_lo, row_hi, m, c};
  if (negatives == Negatives::Cross) edges.push_back(m / 2);
  std::sort(edges.begin(), edges.end());
  edges.erase(std::unique(edges.begin(), edges.end()), edges.end());
  Blocks blocks;
  blocks.start.push_back(0);
  for (size_t part = 0; part + 1 < edges.size(); ++part) {
    const int64_t lo = edges[part], hi = edges[part + 1], len = hi - lo;
    const int64_t n = (len + tile - 1) / tile;
    for (int64_t b = 1; b <= n; ++b) {
      blocks.start.push_back(lo + len * b / n);  // n near-equal blocks
      blocks.anchor.push_back(row_lo <= lo && hi <= row_hi);
      blocks.part.push_back(lo < m / 2 ? 0 : lo < m ? 1 : 2);
    }
  }
  return blocks;
}

// Whether tile (a, b) holds pairs of J: an anchor side facing a block with live columns
// (`live`: every block for the SimCLR sets, the blocks with a column id ≥ 0 for the grouped
// ones), and for "cross" blocks of different views or the queue (a same-view tile has no
// negatives), for "none" one queue block.
inline bool tile_has_negatives(const Blocks& blocks, const std::vector<char>& live, int64_t a, int64_t b,
                               Negatives negatives) {
  if (!((blocks.anchor[a] && live[b]) || (blocks.anchor[b] && live[a]))) return false;
  if (negatives == Negatives::Cross) return blocks.part[a] != blocks.part[b];
  if (negatives == Negatives::None) return (blocks.part[a] == 2) != (blocks.part[b] == 2);
  return true;
}

// The tiles (a, b), a ≤ b, that hold pairs of J, in rounds of pairwise disjoint blocks:
// a round-robin tournament over B' = B (odd) or B + 1 teams. In round r, team r plays itself
// (the diagonal tile) and teams r + s and r − s (mod B') meet for s = 1 … (B' − 1)/2; every
// pair meets exactly once, since a + b ≡ 2r (mod B') has one solution r for odd B'.
inline std::vector<std::vector<std::pair<int64_t, int64_t>>> tournament(const Blocks& blocks, const std::vector<char>& live,
                                                                        Negatives negatives) {
  const int64_t n = blocks.count(), teams = n % 2 == 1 ? n : n + 1;
  std::vector<std::vector<std::pair<int64_t, int64_t>>> rounds;
  for (int64_t r = 0; r < teams; ++r) {
    std::vector<std::pair<int64_t, int64_t>> round;
    if (r < n && tile_has_negatives(blocks, live, r, r, negatives)) round.emplace_back(r, r);
    for (int64_t s = 1; s <= (teams - 1) / 2; ++s) {
      const int64_t a = (r + s) % teams, b = (r - s + teams) % teams;
      if (a >= n || b >= n || !tile_has_negatives(blocks, live, a, b, negatives)) continue;
      round.emplace_back(std::min(a, b), std::max(a, b));
    }
    if (!round.empty()) rounds.push_back(std::move(round));
  }
  return rounds;
}

// The grouped sets as the symmetric tiles see them. The tiles need a mask that is the same
// for both orientations of a pair of anchors, which holds when every anchor's column id is
// its row id and no anchor's self column is another row of Z (`symmetric_groups`): then
// (i, j) is a negative pair iff both column ids are ≥ 0 and differ, a positive pair iff they
// are equal (i ≠ j), for both ends, and the self column of a row is the diagonal or in the
// queue. Every row of a tile is therefore keyed by its column id.
struct GroupedTiles {
  const int64_t* col_ids;   // C
  const int64_t* self_col;  // M
  const int64_t* n_neg;     // per anchor, from row_lo
  const void* d2_mean;      // per anchor, T
  bool with_positives;
  double positive_offset;
};

inline bool symmetric_groups(const int64_t* row_ids, const int64_t* col_ids, const int64_t* self_col, int64_t m,
                             int64_t row_lo, int64_t row_hi) {
  for (int64_t i = row_lo; i < row_hi; ++i) {
    const int64_t s = self_col[i];
    if (row_ids[i] != col_ids[i] || (0 <= s && s < m && s != i)) return false;
  }
  return true;
}

// Blocks with a live column (an id ≥ 0); every block for the SimCLR sets (col_ids null).
inline std::vector<char> live_blocks(const Blocks& blocks, const int64_t* col_ids) {
  std::vector<char> live(blocks.count(), 1);
  if (col_ids == nullptr) return live;
  for (int64_t b = 0; b < blocks.count(); ++b)
    live[b] = std::any_of(col_ids + blocks.start[b], col_ids + blocks.start[b + 1], [](int64_t g) { return g >= 0; });
  return live;
}

// kGrouped: the grouped sets (GroupedTiles) in place of the SimCLR contract's negative set,
// partner and partner terms; everything else is shared.
template <typename T, bool kGrouped = false>
class Symmetric {
 public:
  // `cols` is [Z; Q] (C = M + K rows); the anchors are rows [row_lo, row_hi) of its first M.
  Symmetric(const at::Tensor& cols, int64_t m, int64_t row_lo, int64_t row_hi, const T* w, const RuleConfig& cfg,
            bool need_grad, const GroupedTiles& grouped = {})
      : cols_(cols), m_(m), c_(cols.size(0)), dim_(cols.size(1)), lo_(row_lo), hi_(row_hi), w_(w), cfg_(cfg),
        need_grad_(need_grad), g_(grouped), half_t_(half_norms<T>(cols, cfg.unit_rows)), half_(half_t_.data_ptr<T>()),
        zp_(cols.data_ptr<T>()), blocks_(make_blocks(m_, c_, row_lo, row_hi, tile_size(m_), cfg.negatives)),
        live_(live_blocks(blocks_, kGrouped ? grouped.col_ids : nullptr)),
        rounds_(tournament(blocks_, live_, cfg.negatives)),
        threads_(at::get_num_threads()), scratch_(threads_) {
    // square's full-row statistics pass computes S with other products than the tiles of
    // pass 2, so a pair's d2 could differ between the passes by rounding; the grouped mode
    // runs square in the one pass instead (grouped_cpu).
    TORCH_CHECK(!(kGrouped && cfg.rule == Rule::Square), "fastalpha: the grouped symmetric tiles do not run square");
  }

  // pull_i = coef_i = w_i g A_i of the anchors (after run()).
  at::Tensor pull() const {
    at::Tensor out = at::empty({hi_ - lo_}, cols_.options());
    std::copy(coef_.begin() + lo_, coef_.begin() + hi_, out.data_ptr<T>());
    return out;
  }

  std::tuple<at::Tensor, at::Tensor> run() {
    const int64_t rows = hi_ - lo_;
    const auto opts = cols_.options();
    at::Tensor loss = at::empty({rows}, opts);
    // Row statistics, indexed by global row of [Z; Q] (only anchors are used).
    dmin_.assign(c_, std::numeric_limits<T>::infinity());
    l_.assign(c_, 0.0);
    ld_.assign(c_, 0.0);
    support_.assign(c_, 0.0);
    mu_.assign(c_, -std::numeric_limits<T>::infinity());
    if (cfg_.rule == Rule::Square) {
      square_statistics();
    } else {
      const bool global = fixed_reference();
      // With a fixed reference every row's shift is t(r0): dmin_ = r0 stands for it below.
      if (global) std::fill(dmin_.begin() + lo_, dmin_.begin() + hi_, fixed_reference_distance());
      for (const auto& round : rounds_) {
        at::parallel_for(0, static_cast<int64_t>(round.size()), 1, [&](int64_t first, int64_t last) {
          for (int64_t t = first; t < last; ++t) {
            if (global) fixed_reference_statistics_tile(round[t].first, round[t].second);
            else statistics_tile(round[t].first, round[t].second);
          }
        });
      }
    }
    // Finish the rows: losses, and the per-row parameters of pass 2.
    const double n_neg = static_cast<double>(negative_count(m_ / 2, c_ - m_, cfg_.negatives));
    coef_.assign(c_, T(0));
    scale_.assign(c_, T(0));
    shift_.assign(c_, T(0));
    T* loss_out = loss.data_ptr<T>();
    for (int64_t i = lo_; i < hi_; ++i) {
      double d2_pos, count = n_neg;
      if constexpr (kGrouped) {
        count = static_cast<double>(g_.n_neg[i - lo_]);
        if (count == 0) {  // no negative: no loss term (coef_, scale_ and shift_ stay 0)
          loss_out[i - lo_] = T(0);
          continue;
        }
        d2_pos = static_cast<double>(static_cast<const T*>(g_.d2_mean)[i - lo_]);
      } else {
        const int64_t p = partner_of(i, m_);
        double dot = 0;
        for (int64_t c = 0; c < dim_; ++c) dot += static_cast<double>(zp_[i * dim_ + c]) * zp_[p * dim_ + c];
        d2_pos = static_cast<double>(std::max(T(0), static_cast<T>(static_cast<double>(half_[i]) + half_[p] - dot)));
      }
      RowStats st{};
      st.m = cfg_.rule == Rule::Square ? 0.0 : log_weight(cfg_, static_cast<double>(dmin_[i]));
      st.l = l_[i];
      st.ld = ld_[i];
      st.support = support_[i];
      const RowFinal fin = finalize_row(cfg_, st, d2_pos, count);
      loss_out[i - lo_] = static_cast<T>(fin.loss);
      const double g = (w_ ? static_cast<double>(w_[i - lo_]) : 1.0) * cfg_.grad_scale;
      coef_[i] = static_cast<T>(g * fin.alpha_sum);
      if (cfg_.rule == Rule::Square) {
        scale_[i] = static_cast<T>(g);
        shift_[i] = static_cast<T>(g / st.support);
      } else {
        scale_[i] = static_cast<T>(g * fin.inv);
        shift_[i] = static_cast<T>(fin.shift);
      }
    }
    if (!need_grad_) return {loss, at::empty({0, dim_}, opts)};

    at::Tensor grad = at::zeros({c_, dim_}, opts);
    grad_ = grad.data_ptr<T>();
    wsum_.assign(c_, T(0));
    for (const auto& round : rounds_) {
      at::parallel_for(0, static_cast<int64_t>(round.size()), 1, [&](int64_t first, int64_t last) {
        for (int64_t t = first; t < last; ++t) gradient_tile(round[t].first, round[t].second);
      });
    }
    if constexpr (kGrouped) {
      // The pair sum's self terms on every row; the positives' pull is the caller's.
      if (!cfg_.unit_rows) add_self_terms<T>(zp_, 0, c_, dim_, wsum_.data(), grad_);
    } else {
      add_partner_and_self_terms<T>(zp_, m_, c_, dim_, cfg_.unit_rows, coef_.data(), wsum_.data(), grad_);
    }
    return {loss, grad};
  }

 private:
  struct Scratch {
    std::vector<T> tile, row_a, row_b, col_a, col_b, param;
  };

  Scratch& scratch() {
    const int tid = at::get_thread_num();
    TORCH_CHECK(tid < threads_, "fastalpha: thread id ", tid, " outside the ", threads_, " scratch buffers");
    Scratch& s = scratch_[tid];
    const int64_t tile = tile_size(m_) + 1;
    if (s.tile.empty()) {
      s.tile.resize(tile * tile);
      for (auto* v : {&s.row_a, &s.row_b, &s.col_a, &s.col_b, &s.param}) v->resize(tile);
    }
    return s;
  }

  at::Tensor tile_view(T* data, int64_t rows, int64_t cols) const {
    return at::from_blob(data, {rows, cols}, cols_.options());
  }

  // d2 of the tile rows of block a × columns of block b, in `t` (ra × cb, row-major), with
  // +inf at the pairs outside the sweep (excluded from every minimum, sum and weight): the
  // self and partner pairs, or in the grouped mode the pairs outside J ∪ P (P only for
  // infonce with ε > 0, at d2 + positive_offset) and the anchors' self columns. The other
  // exclusions are whole tiles, never scheduled (tile_has_negatives). Block a is always a
  // block of Z: queue blocks come last and never meet each other, so in a tile (a, b),
  // a ≤ b, only b can be one. Both passes take a pair's d2 from here: the same product and
  // the same arithmetic, so the same number.
  void tile_distances(int64_t a, int64_t b, T* t) const {
    const int64_t i0 = blocks_.start[a], ra = blocks_.size(a), j0 = blocks_.start[b], cb = blocks_.size(b);
    at::Tensor s = tile_view(t, ra, cb);
    at::mm_out(s, cols_.narrow(0, i0, ra), cols_.narrow(0, j0, cb).t());
    const T* hc = half_ + j0;
    constexpr T inf = std::numeric_limits<T>::infinity();
    for (int64_t r = 0; r < ra; ++r) {
      T* row = t + r * cb;
      const T hr = half_[i0 + r];
      const int64_t i = i0 + r;
      if constexpr (kGrouped) {
        // Every row keyed by its column id (symmetric_groups); an ignored row has no pairs.
        const int64_t gi = g_.col_ids[i];
        const int64_t* gc = g_.col_ids + j0;
        const T pos = g_.with_positives ? static_cast<T>(g_.positive_offset) : inf;
        if (gi < 0) {
          std::fill(row, row + cb, inf);
          continue;
        }
#pragma omp simd
        for (int64_t c = 0; c < cb; ++c) {
          T d = hr + hc[c] - row[c];
          d = d > T(0) ? d : T(0);
          row[c] = gc[c] < 0 ? inf : gc[c] != gi ? d : d + pos;
        }
        // The anchor's self column: the diagonal, or a queue row (symmetric_groups).
        const int64_t self = blocks_.anchor[a] ? g_.self_col[i] : -1;
        if (j0 <= self && self < j0 + cb) row[self - j0] = inf;
      } else {
#pragma omp simd
        for (int64_t c = 0; c < cb; ++c) {
          const T d = hr + hc[c] - row[c];
          row[c] = d > T(0) ? d : T(0);
        }
        const int64_t p = partner_of(i, m_);
        if (j0 <= i && i < j0 + cb) row[i - j0] = inf;
        if (j0 <= p && p < j0 + cb) row[p - j0] = inf;
      }
    }
  }

  // True when the log-weights of all pairs lie within kMaxSharedSpread of t(0), their largest
  // possible value: then t(0) is a valid shift for every row (no exponential leaves the
  // range), and pass 1 needs no minimum distances. d2 ≤ 2 for unit rows, and
  // d2 ≤ (√n_i + √n_j)²/2 ≤ 2 max n otherwise. True for the usual losses on unit rows
  // (direct τ = 0.5: t ∈ [−8, 0]); small τ falls back to per-row running minima.
  // The grouped sweep's positives sit at d2 + positive_offset: the range of the swept
  // distances, and with it the reference r0 = its low end, moves by the offset.
  bool fixed_reference() const {
    double dmax = 2.0;
    if (!cfg_.unit_rows) {
      double half_max = 0;
      for (int64_t k = 0; k < c_; ++k) half_max = std::max<double>(half_max, half_[k]);
      dmax = 4.0 * half_max;
    }
    const double offset = swept_offset();
    return log_weight(cfg_, fixed_reference_distance()) - log_weight(cfg_, 1.01 * dmax + 1e-6 + std::max(0.0, offset)) <=
           kMaxSharedSpread<T>;
  }

  double swept_offset() const { return kGrouped && g_.with_positives ? g_.positive_offset : 0.0; }
  T fixed_reference_distance() const { return static_cast<T>(std::min(0.0, swept_offset())); }

  // Pass 1 with the fixed reference t(r0): one sweep per tile row from S to the sums of both
  // orientations (no minima, no rescaling).
  void fixed_reference_statistics_tile(int64_t a, int64_t b) {
    Scratch& s = scratch();
    const int64_t i0 = blocks_.start[a], ra = blocks_.size(a), j0 = blocks_.start[b], cb = blocks_.size(b);
    const bool rows_on = blocks_.anchor[a], cols_on = blocks_.anchor[b] && a != b;
    T* t = s.tile.data();
    // SimCLR sets: S, with d2 formed in the sweep and the self and partner columns masked by
    // an index test (which vectorises where splitting the range did not); grouped: the masked
    // distances of tile_distances, the ones pass 2 reads.
    if constexpr (kGrouped) {
      tile_distances(a, b, t);
    } else {
      at::Tensor st = tile_view(t, ra, cb);
      at::mm_out(st, cols_.narrow(0, i0, ra), cols_.narrow(0, j0, cb).t());
    }
    constexpr T inf = std::numeric_limits<T>::infinity();
    const T* hc = half_ + j0;
    with_weight<T>(cfg_, [&](auto weight) {
      const T ref = weight.ref(fixed_reference_distance());
      T* cl = s.col_a.data();
      T* cld = s.col_b.data();
      std::fill(cl, cl + cb, T(0));
      std::fill(cld, cld + cb, T(0));
      for (int64_t r = 0; r < ra; ++r) {
        const T* row = t + r * cb;
        const T hr = half_[i0 + r];
        // The self and partner columns of row i0 + r in tile coordinates (−1: not in the tile).
        const int64_t i = i0 + r, p = kGrouped ? -1 : partner_of(i, m_);
        const int64_t cx = !kGrouped && j0 <= i && i < j0 + cb ? i - j0 : -1;
        const int64_t cy = !kGrouped && j0 <= p && p < j0 + cb ? p - j0 : -1;
        T ls = 0, lds = 0;
        if (cols_on) {
#pragma omp simd reduction(+ : ls, lds)
          for (int64_t c = 0; c < cb; ++c) {
            const T d = swept_distance(hr, hc[c], row[c]);
            const bool keep = kGrouped ? d < inf : c != cx && c != cy;
            // e d is 0 where keep is false, except at the grouped mode's d = inf (0 · inf).
            const T e = keep ? weight(d, ref) : T(0), ed = kGrouped && !keep ? T(0) : e * d;
            ls += e;
            lds += ed;
            cl[c] += e;
            cld[c] += ed;
          }
        } else {
#pragma omp simd reduction(+ : ls, lds)
          for (int64_t c = 0; c < cb; ++c) {
            const T d = swept_distance(hr, hc[c], row[c]);
            const bool keep = kGrouped ? d < inf : c != cx && c != cy;
            const T e = keep ? weight(d, ref) : T(0);
            ls += e;
            lds += kGrouped && !keep ? T(0) : e * d;
          }
        }
        if (rows_on) {
          l_[i0 + r] += ls;
          ld_[i0 + r] += lds;
        }
      }
      if (cols_on) {
        for (int64_t c = 0; c < cb; ++c) {
          l_[j0 + c] += cl[c];
          ld_[j0 + c] += cld[c];
        }
      }
    });
  }

  // Pass 1 on tile (a, b): statistics of the anchor rows of a over the columns of b and, off
  // the diagonal, of the anchor rows of b over the rows of a.
  void statistics_tile(int64_t a, int64_t b) {
    Scratch& s = scratch();
    const int64_t i0 = blocks_.start[a], ra = blocks_.size(a), j0 = blocks_.start[b], cb = blocks_.size(b);
    const bool rows_on = blocks_.anchor[a], cols_on = blocks_.anchor[b] && a != b;
    T* t = s.tile.data();
    tile_distances(a, b, t);
    constexpr T inf = std::numeric_limits<T>::infinity();
    // Minimum distances of this tile, per row and per column.
    T* cmin = s.col_a.data();
    std::fill(cmin, cmin + cb, inf);
    T* rmin = s.row_a.data();
    for (int64_t r = 0; r < ra; ++r) {
      const T* row = t + r * cb;
      T lo = inf;
#pragma omp simd reduction(min : lo)
      for (int64_t c = 0; c < cb; ++c) {
        lo = row[c] < lo ? row[c] : lo;
        cmin[c] = row[c] < cmin[c] ? row[c] : cmin[c];
      }
      rmin[r] = lo;
    }
    // New running minima; sums so far are rescaled to the new reference.
    double ref_lo = kInfD, ref_hi = -kInfD;  // over the rows and columns that take part
    auto update = [&](int64_t i, T tile_min) {
      if (!(tile_min < inf)) return;
      if (tile_min < dmin_[i]) {
        if (dmin_[i] < inf) {
          const double factor = std::exp(log_weight(cfg_, dmin_[i]) - log_weight(cfg_, tile_min));
          l_[i] *= factor;
          ld_[i] *= factor;
        }
        dmin_[i] = tile_min;
      }
      ref_lo = std::min(ref_lo, static_cast<double>(dmin_[i]));
      ref_hi = std::max(ref_hi, static_cast<double>(dmin_[i]));
    };
    if (rows_on) for (int64_t r = 0; r < ra; ++r) update(i0 + r, rmin[r]);
    if (cols_on) for (int64_t c = 0; c < cb; ++c) update(j0 + c, cmin[c]);
    if (ref_hi < ref_lo) return;  // every pair masked
    const double t_ref = log_weight(cfg_, ref_lo);
    const bool shared = t_ref - log_weight(cfg_, ref_hi) <= kMaxSharedSpread<T>;

    with_weight<T>(cfg_, [&](auto weight) {
      T* cl = s.col_a.data();  // column sums Σ_r e, Σ_r e d2 (cmin is no longer needed)
      T* cld = s.col_b.data();
      if (cols_on) {
        std::fill(cl, cl + cb, T(0));
        std::fill(cld, cld + cb, T(0));
      }
      if (shared) {
        const T ref = weight.ref(static_cast<T>(ref_lo));
        for (int64_t r = 0; r < ra; ++r) {
          const T* row = t + r * cb;
          T ls = 0, lds = 0;
          if (cols_on) {
#pragma omp simd reduction(+ : ls, lds)
            for (int64_t c = 0; c < cb; ++c) {
              const T d = row[c];
              const T e = d < inf ? weight(d, ref) : T(0);
              const T ed = d < inf ? e * d : T(0);
              ls += e;
              lds += ed;
              cl[c] += e;
              cld[c] += ed;
            }
          } else {
#pragma omp simd reduction(+ : ls, lds)
            for (int64_t c = 0; c < cb; ++c) {
              const T d = row[c];
              const T e = d < inf ? weight(d, ref) : T(0);
              ls += e;
              lds += d < inf ? e * d : T(0);
            }
          }
          if (rows_on && rmin[r] < inf) add_sums(i0 + r, ls, lds, t_ref);
        }
        if (cols_on)
          for (int64_t c = 0; c < cb; ++c)
            if (dmin_[j0 + c] < inf) add_sums(j0 + c, cl[c], cld[c], t_ref);
        return;
      }
      // Each orientation with its own rows' references: two exponentials per pair.
      if (rows_on) {
        for (int64_t r = 0; r < ra; ++r) {
          if (!(rmin[r] < inf)) continue;
          const T* row = t + r * cb;
          const T ref = weight.ref(dmin_[i0 + r]);
          T ls = 0, lds = 0;
#pragma omp simd reduction(+ : ls, lds)
          for (int64_t c = 0; c < cb; ++c) {
            const T d = row[c];
            const T e = d < inf ? weight(d, ref) : T(0);
            ls += e;
            lds += d < inf ? e * d : T(0);
          }
          l_[i0 + r] += ls;
          ld_[i0 + r] += lds;
        }
      }
      if (cols_on) {
        T* ref = s.param.data();
        for (int64_t c = 0; c < cb; ++c) ref[c] = weight.ref(dmin_[j0 + c]);
        for (int64_t r = 0; r < ra; ++r) {
          const T* row = t + r * cb;
#pragma omp simd
          for (int64_t c = 0; c < cb; ++c) {
            const T d = row[c];
            const T e = d < inf ? weight(d, ref[c]) : T(0);
            cl[c] += e;
            cld[c] += d < inf ? e * d : T(0);
          }
        }
        for (int64_t c = 0; c < cb; ++c) {
          l_[j0 + c] += cl[c];
          ld_[j0 + c] += cld[c];
        }
      }
    });
  }

  // l_i += e^{t_ref − t(dmin_i)} Σ e: sums taken relative to the tile's reference, moved to the row's.
  void add_sums(int64_t i, T ls, T lds, double t_ref) {
    const double factor = std::exp(t_ref - log_weight(cfg_, dmin_[i]));
    l_[i] += factor * ls;
    ld_[i] += factor * lds;
  }

  // Square's statistics: full rows (Michelot's iteration needs them), chunk by chunk.
  void square_statistics() {
    const int64_t rows = hi_ - lo_;
    const int64_t chunk = std::clamp<int64_t>(kChunkElements / c_, 4, 64);
    const int64_t n_chunks = (rows + chunk - 1) / chunk;
    const RowSweep<T, PairedSets> sweep(cfg_, half_, paired_sets(cfg_, m_, c_), c_);
    at::parallel_for(0, n_chunks, 1, [&](int64_t first, int64_t last) {
      at::Tensor sim = at::empty({chunk, c_}, cols_.options());
      for (int64_t c = first; c < last; ++c) {
        const int64_t r0 = lo_ + c * chunk, n = std::min(chunk, hi_ - r0);
        at::Tensor s = sim.narrow(0, 0, n);
        at::mm_out(s, cols_.narrow(0, r0, n), cols_.t());
        for (int64_t r = 0; r < n; ++r) {
          double dmin, mu;
          const RowStats st = sweep(r0 + r, s.data_ptr<T>() + r * c_, nullptr, dmin, mu);
          l_[r0 + r] = st.l;
          ld_[r0 + r] = st.ld;
          support_[r0 + r] = st.support;
          mu_[r0 + r] = static_cast<T>(mu);
          dmin_[r0 + r] = static_cast<T>(dmin);
        }
      }
    });
  }

  // Pass 2 on tile (a, b): W = ω_ab + ω_baᵀ, G_a += W Z_b and (off the diagonal) G_b += Wᵀ Z_a.
  // Rows that are not anchors have scale 0 (and μ = −inf): they add nothing to W.
  void gradient_tile(int64_t a, int64_t b) {
    Scratch& s = scratch();
    const int64_t i0 = blocks_.start[a], ra = blocks_.size(a), j0 = blocks_.start[b], cb = blocks_.size(b);
    T* t = s.tile.data();
    if constexpr (kGrouped) {
      // The masked distances of pass 1 (tile_distances), bit for bit; W = 0 where they are inf.
      tile_distances(a, b, t);
      with_weight<T>(cfg_, [&](auto weight) {
        log_rule_weights(weight, s, t, i0, ra, blocks_.anchor[a], j0, cb, blocks_.anchor[b]);
      });
    } else {
      at::Tensor st = tile_view(t, ra, cb);
      at::mm_out(st, cols_.narrow(0, i0, ra), cols_.narrow(0, j0, cb).t());
      // The weight sweeps read S and form d2 themselves; the self and partner pairs get W = 0
      // afterwards (whatever the sweep left there, inf included, is overwritten).
      if (cfg_.rule == Rule::Square) {
        square_weights(t, i0, ra, j0, cb);
      } else {
        with_weight<T>(cfg_, [&](auto weight) {
          log_rule_weights(weight, s, t, i0, ra, blocks_.anchor[a], j0, cb, blocks_.anchor[b]);
        });
      }
      for (int64_t r = 0; r < ra; ++r) {
        const int64_t i = i0 + r, p = partner_of(i, m_);
        if (j0 <= i && i < j0 + cb) t[r * cb + (i - j0)] = T(0);
        if (j0 <= p && p < j0 + cb) t[r * cb + (p - j0)] = T(0);
      }
    }
    if (!cfg_.unit_rows) {
      // Σ_j W_kj for the self terms: row sums to block a, column sums to block b.
      T* cs = s.col_a.data();
      std::fill(cs, cs + cb, T(0));
      for (int64_t r = 0; r < ra; ++r) {
        const T* row = t + r * cb;
        T part = 0;
#pragma omp simd reduction(+ : part)
        for (int64_t c = 0; c < cb; ++c) {
          part += row[c];
          cs[c] += row[c];
        }
        wsum_[i0 + r] += part;
      }
      if (a != b)
        for (int64_t c = 0; c < cb; ++c) wsum_[j0 + c] += cs[c];
    }
    const at::Tensor w = tile_view(t, ra, cb);
    at::Tensor ga = at::from_blob(grad_ + i0 * dim_, {ra, dim_}, cols_.options());
    ga.addmm_(w, cols_.narrow(0, j0, cb));
    if (a != b) {
      at::Tensor gb = at::from_blob(grad_ + j0 * dim_, {cb, dim_}, cols_.options());
      gb.addmm_(w.t(), cols_.narrow(0, i0, ra));
    }
  }

  // d2 of a tile entry as the fused sweeps read it: formed from S (SimCLR sets), or the masked
  // distance tile_distances left (grouped: +inf outside the sweep, see `masked`).
  static T swept_distance(T nr, T nc, T s) {
    if constexpr (kGrouped) {
      return s;
    } else {
      const T d = nr + nc - s;
      return d > T(0) ? d : T(0);
    }
  }
  // W of a pair from its value v: 0 outside the grouped sweep (v may be NaN there: 0 · inf).
  static T masked(T d, T v) {
    if constexpr (kGrouped) return d < std::numeric_limits<T>::infinity() ? v : T(0);
    else return v;
  }

  // W_ij = scale_i e^{t(d) − t(dmin_i)} (1 + t'(d)(d − shift_i))^{[β]} + the same with j.
  template <class Weight>
  void log_rule_weights(const Weight& weight, Scratch& s, T* t, int64_t i0, int64_t ra, bool rows_anchor, int64_t j0,
                        int64_t cb, bool cols_anchor) {
    const bool beta = cfg_.uses_beta;
    // The tile's reference: the smallest dmin among the rows and columns with a weight.
    // Over anchors (a zero row weight included): every pair of the tile that is not masked
    // has an anchor end k with d ≥ dmin_k ≥ the reference, so no weight exceeds 1.
    double ref_lo = kInfD, ref_hi = -kInfD;
    auto include = [&](int64_t k) {
      if (!(dmin_[k] < std::numeric_limits<T>::infinity())) return;
      ref_lo = std::min<double>(ref_lo, dmin_[k]);
      ref_hi = std::max<double>(ref_hi, dmin_[k]);
    };
    if (rows_anchor)
      for (int64_t r = 0; r < ra; ++r) include(i0 + r);
    if (cols_anchor)
      for (int64_t c = 0; c < cb; ++c) include(j0 + c);
    const T* hr = shift_.data() + i0;
    const T* hc = shift_.data() + j0;
    const T* nc = half_ + j0;
    if (ref_hi < ref_lo) {  // no anchor with a weight in this tile
      std::fill(t, t + ra * cb, T(0));
      return;
    }
    const double t_ref = log_weight(cfg_, ref_lo);
    if (t_ref - log_weight(cfg_, ref_hi) <= kMaxSharedSpread<T>) {
      // One exponential per pair: W = e_ref(d) (R_i g_i(d) + R_j g_j(d)), R = scale e^{t_ref − t(dmin)}.
      const T ref = weight.ref(static_cast<T>(ref_lo));
      T* rr = s.row_b.data();
      T* rc = s.col_b.data();
      auto factor = [&](int64_t k) {
        return scale_[k] == T(0) ? T(0) : static_cast<T>(scale_[k] * std::exp(t_ref - log_weight(cfg_, dmin_[k])));
      };
      for (int64_t r = 0; r < ra; ++r) rr[r] = factor(i0 + r);
      for (int64_t c = 0; c < cb; ++c) rc[c] = factor(j0 + c);
      for (int64_t r = 0; r < ra; ++r) {
        T* row = t + r * cb;
        const T ri = rr[r], hi = hr[r], nr = half_[i0 + r];
        if (beta) {
#pragma omp simd
          for (int64_t c = 0; c < cb; ++c) {
            const T d = swept_distance(nr, nc[c], row[c]);
            const T e = weight(d, ref), sl = weight.slope(d);
            row[c] = masked(d, beta_log_weight(ri * e, sl, d, hi) + beta_log_weight(rc[c] * e, sl, d, hc[c]));
          }
        } else {
#pragma omp simd
          for (int64_t c = 0; c < cb; ++c) {
            const T d = swept_distance(nr, nc[c], row[c]);
            row[c] = masked(d, weight(d, ref) * (ri + rc[c]));
          }
        }
      }
      return;
    }
    // Two exponentials per pair, each relative to its own row's closest negative.
    T* pr = s.row_b.data();
    T* pc = s.param.data();
    for (int64_t r = 0; r < ra; ++r) pr[r] = weight.ref(dmin_[i0 + r]);
    for (int64_t c = 0; c < cb; ++c) pc[c] = weight.ref(dmin_[j0 + c]);
    const T* sr = scale_.data() + i0;
    const T* sc = scale_.data() + j0;
    for (int64_t r = 0; r < ra; ++r) {
      T* row = t + r * cb;
      const T si = sr[r], pi = pr[r], hi = hr[r], nr = half_[i0 + r];
#pragma omp simd
      for (int64_t c = 0; c < cb; ++c) {
        const T d = swept_distance(nr, nc[c], row[c]);
        const T ei = si == T(0) ? T(0) : si * weight(d, pi);
        const T ej = sc[c] == T(0) ? T(0) : sc[c] * weight(d, pc[c]);
        T v;
        if (beta) {
          const T sl = weight.slope(d);
          v = beta_log_weight(ei, sl, d, hi) + beta_log_weight(ej, sl, d, hc[c]);
        } else {
          v = ei + ej;
        }
        row[c] = masked(d, v);
      }
    }
  }

  // square: W_ij = g_i [μ_i − d]_+/τ (or g_i β_ij) + the same with j; μ = −inf off the anchors.
  void square_weights(T* t, int64_t i0, int64_t ra, int64_t j0, int64_t cb) {
    const T inv_tau = static_cast<T>(cfg_.inv_tau);
    const T* mr = mu_.data() + i0;
    const T* mc = mu_.data() + j0;
    const T* sr = scale_.data() + i0;
    const T* sc = scale_.data() + j0;
    const T* qr = shift_.data() + i0;  // g / k
    const T* qc = shift_.data() + j0;
    const bool beta = cfg_.uses_beta;
    const T* nc = half_ + j0;
    for (int64_t r = 0; r < ra; ++r) {
      T* row = t + r * cb;
      const T mi = mr[r], si = sr[r], qi = qr[r], nr = half_[i0 + r];
      if (beta) {
        const T two_si = 2 * si;
#pragma omp simd
        for (int64_t c = 0; c < cb; ++c) {
          T d = nr + nc[c] - row[c];
          d = d > T(0) ? d : T(0);
          row[c] = square_beta(d, mi, inv_tau, two_si, qi) + square_beta(d, mc[c], inv_tau, T(2) * sc[c], qc[c]);
        }
      } else {
#pragma omp simd
        for (int64_t c = 0; c < cb; ++c) {
          T d = nr + nc[c] - row[c];
          d = d > T(0) ? d : T(0);
          row[c] = si * square_alpha(d, mi, inv_tau) + sc[c] * square_alpha(d, mc[c], inv_tau);
        }
      }
    }
  }

  const at::Tensor& cols_;  // [Z; Q]
  const int64_t m_, c_, dim_, lo_, hi_;
  const T* w_;
  const RuleConfig cfg_;
  const bool need_grad_;
  const GroupedTiles g_;  // kGrouped only
  const at::Tensor half_t_;
  const T* half_;
  const T* zp_;
  const Blocks blocks_;
  const std::vector<char> live_;
  const std::vector<std::vector<std::pair<int64_t, int64_t>>> rounds_;
  const int threads_;
  std::vector<Scratch> scratch_;
  // Per row (global index): running closest-negative distance and the sums relative to it;
  // square's threshold and support size; after pass 1 the parameters of pass 2.
  std::vector<T> dmin_, mu_;
  std::vector<double> l_, ld_, support_;
  std::vector<T> coef_, scale_, shift_, wsum_;
  T* grad_ = nullptr;
};

template <typename T>
std::tuple<at::Tensor, at::Tensor> fused_cpu(const at::Tensor& cols, int64_t m, int64_t row_lo, int64_t row_hi,
                                             const std::optional<at::Tensor>& row_weight, const RuleConfig& cfg,
                                             bool need_grad) {
  const at::Tensor weight = row_weight.has_value() ? row_weight->contiguous() : at::Tensor();
  const T* w = weight.defined() ? weight.data_ptr<T>() : nullptr;
  const Algorithm algorithm = choose_algorithm(m, cols.size(0) - m, cols.size(1), row_hi - row_lo, need_grad,
                                               cfg.negatives);
  if (algorithm == Algorithm::Symmetric) return Symmetric<T>(cols, m, row_lo, row_hi, w, cfg, need_grad).run();
  return one_pass<T>(cols, m, row_lo, row_hi, w, cfg, need_grad);
}

// The grouped mode (GroupColumns, FASTALPHA_DEFINE_GROUPED_OP). The size rule and
// FASTALPHA_CPP_ALGORITHM choose as for the SimCLR sets, with two exceptions that run the one
// pass, whose per-column test computes any sets: ids for which the tiles' mask would not be
// the same in both orientations (symmetric_groups; e.g. batch rows that are not columns), and
// square (see Symmetric). The gradient gets the pair sum's terms only; `pull` = w_i g A_i.
template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_cpu(const GroupedCall& call) {
  const at::Tensor& cols = call.cols;
  const int64_t m = call.m, c = cols.size(0), dim = cols.size(1), lo = call.row_lo, hi = call.row_hi;
  const T* w = call.row_weight.defined() ? call.row_weight.data_ptr<T>() : nullptr;
  const RuleConfig& cfg = call.loop.rule;
  const int64_t* row_ids = call.row_ids.data_ptr<int64_t>();
  const int64_t* col_ids = call.col_ids.data_ptr<int64_t>();
  const int64_t* self_col = call.self_col.data_ptr<int64_t>();
  const bool tiles = cfg.rule != Rule::Square && symmetric_groups(row_ids, col_ids, self_col, m, lo, hi) &&
                     choose_algorithm(m, c - m, dim, hi - lo, call.need_grad, Negatives::All) == Algorithm::Symmetric;
  if (tiles) {
    const GroupedTiles grouped{col_ids, self_col, call.negative_count.data_ptr<int64_t>(), call.d2_mean.data_ptr<T>(),
                               call.loop.with_positives, call.loop.positive_offset};
    Symmetric<T, true> kernel(cols, m, lo, hi, w, cfg, call.need_grad, grouped);
    auto [loss, grad] = kernel.run();
    if (!call.need_grad) return {loss, grad, at::empty({0}, cols.options())};
    return {loss, grad, kernel.pull()};
  }
  const GroupedSets sets{call.loop, row_ids, col_ids, self_col, call.negative_count.data_ptr<int64_t>(),
                         call.d2_mean.data_ptr<T>(), c, lo};
  OnePassSums<T> sums = one_pass_sums<T>(cols, m, lo, hi, w, cfg, call.need_grad, sets);
  if (!call.need_grad) return {sums.loss, at::empty({0, dim}, cols.options()), at::empty({0}, cols.options())};
  if (!cfg.unit_rows) add_self_terms<T>(cols.data_ptr<T>(), 0, c, dim, sums.wsum.data(), sums.grad.template data_ptr<T>());
  at::Tensor pull = at::empty({hi - lo}, cols.options());
  std::copy(sums.coef.begin() + lo, sums.coef.begin() + hi, pull.data_ptr<T>());
  return {sums.loss, sums.grad, pull};
}

FASTALPHA_DEFINE_FUSED_OP(alpha_cl_fused_cpu, c10::DeviceType::CPU, fused_cpu)
FASTALPHA_DEFINE_GROUPED_OP(alpha_cl_fused_grouped_cpu, c10::DeviceType::CPU, grouped_cpu)

}  // namespace
}  // namespace fastalpha

FASTALPHA_REGISTER_FUSED_OPS(fastalpha_cpu, CPU, alpha_cl_fused_cpu, alpha_cl_fused_grouped_cpu)

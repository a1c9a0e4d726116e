// The loss spec as every kernel sees it: one RuleConfig for the CPU and the CUDA kernels.
//
// fastalpha/rules.py validates the user's arguments once and builds a LossSpec; the backends
// pass its fields to the compiled op, and `make_rule` turns them into this struct (the one
// parse on the C++ side), with the facts the kernels branch on derived once. The struct is
// plain data, so CUDA kernels take it by value.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>

#include <c10/util/Exception.h>

// __host__ __device__ for nvcc, plain inline for g++: the row maths (alpha_cl_row_math.h)
// is compiled into both libraries from one source.
#if defined(__CUDACC__)
#define FASTALPHA_HD __host__ __device__ __forceinline__
#else
#define FASTALPHA_HD inline
#endif

namespace fastalpha {

enum class Rule : int { Quadratic, Entropy, Direct, Inverse, Square, InfoNCE };

// The negative set J_i of anchor i (docs/design.md): "all" (every row of Z but i and p(i)),
// "cross" (the other view's rows but p(i)) or "none" (no row of Z); a queue's K rows, columns
// [M, M + K) of [Z; Q], are negatives of every anchor in every mode.
enum class Negatives : int { All, Cross, None };

struct RuleConfig {
  Rule rule;
  double temperature;  // τ
  double p;            // entropy/direct: w = exp(−d2^{p/2}/τ) (entropy arrives with p = 2)
  double gamma;        // inverse: w = (d2 + τ)^{−1/γ}
  double eps;          // entropy/direct/infonce normaliser ε (0 for the other rules)
  bool detach_alpha;   // false: the pair term of the gradient uses β instead of α
  bool unit_rows;      // rows are unit vectors: d2 = 1 − z_i·z_j, no gradient terms in z_i itself
  Negatives negatives; // which rows of Z are in J_i

  // Derived once by make_rule.
  double k;            // p / 2
  double inv_tau;      // 1 / τ
  double inv_gamma;    // 1 / γ
  bool uses_beta;      // α is differentiated and depends on d2 (entropy, direct, inverse, square)
  double grad_scale;   // 1/τ for infonce (Theorem 1: its gradient is −∇E/τ), else 1
};

inline Rule parse_rule(const std::string& name) {
  if (name == "quadratic") return Rule::Quadratic;
  if (name == "entropy") return Rule::Entropy;
  if (name == "direct") return Rule::Direct;
  if (name == "inverse") return Rule::Inverse;
  if (name == "square") return Rule::Square;
  if (name == "infonce") return Rule::InfoNCE;
  TORCH_CHECK(false, "fastalpha: unknown rule '", name,
              "'; expected quadratic, entropy, direct, inverse, square or infonce");
}

inline Negatives parse_negatives(const std::string& name) {
  if (name == "all") return Negatives::All;
  if (name == "cross") return Negatives::Cross;
  if (name == "none") return Negatives::None;
  TORCH_CHECK(false, "fastalpha: unknown negatives='", name, "'; expected all, cross or none");
}

// |J_i| for N pairs and K queue rows, the same for every anchor (fastalpha.rules.negative_count).
inline int64_t negative_count(int64_t n, int64_t k, Negatives negatives) {
  const int64_t in_z = negatives == Negatives::All ? 2 * n - 2 : negatives == Negatives::Cross ? n - 1 : 0;
  return in_z + k;
}

// J_i as three ascending, disjoint column ranges [begin, end) of [Z; Q] (C = M + K columns,
// some possibly empty): kernels loop over the ranges instead of testing a mask per column.
//   all     [0, a), (a, b), (b, C)        a, b = min and max of i and p(i)
//   cross   i < N: [N, p(i)), (p(i), C)   i ≥ N: [0, p(i)), (p(i), N), [M, C)
//   none    [M, C)
struct NegativeRanges {
  int64_t begin[3];
  int64_t end[3];

  FASTALPHA_HD bool contains(int64_t j) const {
    return (begin[0] <= j && j < end[0]) || (begin[1] <= j && j < end[1]) || (begin[2] <= j && j < end[2]);
  }
};

FASTALPHA_HD NegativeRanges negative_ranges(Negatives negatives, int64_t i, int64_t m, int64_t c) {
  const int64_t n = m / 2, p = i < n ? i + n : i - n;
  if (negatives == Negatives::All) {
    const int64_t a = i < p ? i : p, b = i < p ? p : i;
    return {{0, a + 1, b + 1}, {a, b, c}};
  }
  if (negatives == Negatives::Cross) {
    if (i < n) return {{n, p + 1, c}, {p, c, c}};
    return {{0, p + 1, m}, {p, n, c}};
  }
  return {{m, c, c}, {c, c, c}};
}

// J_i and P_i with group-defined positives (docs/design.md, "Positive sets"). The columns are
// [Z; Q] (C = M + K); column c has a group id col_ids[c] (−1: an ignored column, neither a
// positive nor a negative of any anchor, e.g. an empty memory slot), anchor i an id
// row_ids[i] ≥ 0 and a self column self_col[i] (i itself in ordinary calls; −1 = none):
//
//   J_i = {c : col_ids[c] ≥ 0, col_ids[c] ≠ row_ids[i]},   P_i = {c : col_ids[c] = row_ids[i], c ≠ self_col[i]}.
//
// The kernels test membership per column, `contains(c)`.
//
// infonce with ε > 0 keeps its positives in the denominator, loss_i = log(ε η_i + ξ_i): a
// positive's term ε e^{(d̄2_i − d2_ip)/τ} is a negative's term at the distance d2_ip − τ log ε,
// so the positives join the sweep with that offset (`positive_offset`) and finalize_row sees
// ε = 0 (its log ξ_i is then log(ε η_i + ξ_i), A_i = 1). Every other rule sweeps J_i only.
struct GroupColumns {
  const int64_t* col_ids;   // C
  int64_t id;               // row_ids[i]
  int64_t self;             // self_col[i]
  bool with_positives;      // infonce with ε > 0: P_i is swept too

  FASTALPHA_HD bool is_positive(int64_t c) const { return col_ids[c] == id && c != self; }
  // id ≥ 0, so col_ids[c] == id implies a live column.
  FASTALPHA_HD bool contains(int64_t c) const {
    return col_ids[c] >= 0 && (col_ids[c] != id || (with_positives && c != self));
  }
};

// The loop configuration of the grouped mode: the rule with the ε that finalize_row applies,
// and how the positives enter the sweep (see GroupColumns). One decision for both kernels.
struct GroupedLoop {
  RuleConfig rule;          // eps = 0 when the positives carry it
  bool with_positives;
  double positive_offset;   // −τ log ε, added to a positive's d2 (0 when !with_positives)
};

// The spec's fields as the Python LossSpec holds them; `negatives` names the negative set J_i.
inline RuleConfig make_rule(const std::string& rule, double temperature, double p, double gamma, double eps,
                            bool detach_alpha, bool unit_rows, const std::string& negatives) {
  const Rule r = parse_rule(rule);
  const Negatives neg = parse_negatives(negatives);
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, "fastalpha: temperature must be finite and > 0, got ",
              temperature);
  TORCH_CHECK(std::isfinite(p) && p > 0, "fastalpha: p must be finite and > 0, got ", p);
  TORCH_CHECK(std::isfinite(gamma) && gamma > 0, "fastalpha: gamma must be finite and > 0, got ", gamma);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "fastalpha: eps must be finite and >= 0, got ", eps);
  const bool log_weight = r == Rule::Entropy || r == Rule::Direct || r == Rule::Inverse;
  // Only entropy/direct/infonce have an ε; infonce's 1/τ and its ε are part of its loss.
  const bool has_eps = r == Rule::Entropy || r == Rule::Direct || r == Rule::InfoNCE;
  RuleConfig cfg{};
  cfg.rule = r;
  cfg.temperature = temperature;
  cfg.p = r == Rule::InfoNCE ? 2.0 : p;  // infonce's logits are −d2/τ: the k = 1 weight
  cfg.gamma = gamma;
  cfg.eps = has_eps ? eps : 0.0;
  cfg.detach_alpha = detach_alpha;
  cfg.unit_rows = unit_rows;
  cfg.negatives = neg;
  cfg.k = cfg.p / 2.0;
  cfg.inv_tau = 1.0 / temperature;
  cfg.inv_gamma = 1.0 / gamma;
  cfg.uses_beta = !detach_alpha && (log_weight || r == Rule::Square);
  cfg.grad_scale = r == Rule::InfoNCE ? 1.0 / temperature : 1.0;
  return cfg;
}

inline GroupedLoop grouped_loop(const RuleConfig& cfg) {
  GroupedLoop loop{cfg, false, 0.0};
  if (cfg.rule == Rule::InfoNCE && cfg.eps > 0) {
    loop.with_positives = true;
    loop.positive_offset = -cfg.temperature * std::log(cfg.eps);
    loop.rule.eps = 0.0;
  }
  return loop;
}

FASTALPHA_HD GroupColumns group_columns(const int64_t* col_ids, const int64_t* row_ids, const int64_t* self_col,
                                        int64_t i, bool with_positives) {
  return {col_ids, row_ids[i], self_col[i], with_positives};
}

}  // namespace fastalpha

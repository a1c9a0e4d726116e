// The row maths of the α-CL loss, shared by the CPU and the CUDA kernels (host and device).
//
// Both kernels reduce each anchor row i over its negatives J_i to a few statistics relative
// to a shift m_i (so that no exponential overflows), and turn them into the row's results
// with `finalize_row`; the per-pair formulas below are what their inner loops evaluate.
//
// Rules with α = w(d2) / (Σ_k w(d2_ik) + c) and t = log w a function of d2 alone:
//
//   quadratic  t = 0                       entropy/direct  t = −d2^k / τ   (k = p/2)
//   inverse    t = −log(d2 + τ) / γ         infonce         t = −d2 / τ     (its α, Theorem 1)
//
// with e_ij = e^{t(d2_ij) − m_i}, l_i = Σ_j e_ij and ld_i = Σ_j e_ij d2_ij. For `square`,
// e_ij = [μ_i − d2_ij]_+ / τ is α itself (μ_i the exact sparsemax threshold, k_i = |support|).
#pragma once

#include <cmath>

#include "alpha_cl_rule.h"

namespace fastalpha {

// One anchor's statistics over J_i (see above); `support` only for square.
struct RowStats {
  double m;        // shift: α_ij ∝ e^{t_ij − m}
  double l;        // Σ_j e_ij
  double ld;       // Σ_j e_ij d2_ij
  double support;  // square: |{j : d2_ij < μ_i}|
};

// What a row contributes, once its statistics are complete.
struct RowFinal {
  double loss;       // loss_i
  double alpha_sum;  // A_i = Σ_j α_ij (ξ_i/(ε + ξ_i) for infonce)
  double inv;        // α_ij = inv · e_ij
  double shift;      // d2_i − c_i, c_i = Σ_j α_ij (d2_i − d2_ij): β_ij = α_ij (1 + t'_ij (d2_ij − shift))
};

// t(d) = log w(d) for every rule but square (d ≥ 0; +inf gives −inf).
FASTALPHA_HD double log_weight(const RuleConfig& c, double d) {
  switch (c.rule) {
    case Rule::Quadratic:
    case Rule::Square:
      return 0.0;
    case Rule::Inverse:
      return -::log(d + c.temperature) * c.inv_gamma;
    default:  // entropy, direct, infonce
      return -(c.k == 1.0 ? d : c.k == 2.0 ? d * d : ::pow(d, c.k)) * c.inv_tau;
  }
}

// loss_i, A_i, the normaliser and the β shift from the statistics of row i.
//   d2_pos  the positive's distance d2_i;  n_neg  |J_i| of the negative set (negative_count).
//
//   infonce:  log ξ_i = d2_i/τ + m + log l, loss = log(ε + ξ_i) formed from log ξ_i as
//             max(a, b) + log1p(e^{−|a − b|}), a = log ξ_i, b = log ε: a tiny loss (ξ_i ≪ ε)
//             keeps its relative precision (never lse + d2_i/τ, a difference of O(1/τ) terms).
//             α_ij = e^{(d2_i − d2_ij)/τ} / (ε + ξ_i) = e_ij · e^{m + d2_i/τ − loss}.
//   others:   α_ij = e_ij / (l + ε |J_i| e^{−m}),  loss = A d2_i − Σ_j α_ij d2_ij.
//   square:   e is α already (inv = 1).
FASTALPHA_HD RowFinal finalize_row(const RuleConfig& c, const RowStats& s, double d2_pos, double n_neg) {
  RowFinal f;
  if (c.rule == Rule::InfoNCE) {
    const double log_xi = d2_pos * c.inv_tau + s.m + ::log(s.l);
    if (c.eps > 0) {
      const double log_eps = ::log(c.eps);
      f.loss = fmax(log_xi, log_eps) + ::log1p(::exp(-fabs(log_xi - log_eps)));
    } else {
      f.loss = log_xi;
    }
    f.inv = ::exp(s.m + d2_pos * c.inv_tau - f.loss);
    f.alpha_sum = ::exp(log_xi - f.loss);
  } else if (c.rule == Rule::Square) {
    f.inv = 1.0;
    f.alpha_sum = s.l;
    f.loss = s.l * d2_pos - s.ld;
  } else {
    double denom = s.l;
    if (c.eps > 0) denom += c.eps * n_neg * ::exp(-s.m);
    f.inv = 1.0 / denom;
    f.alpha_sum = s.l * f.inv;
    f.loss = f.alpha_sum * d2_pos - s.ld * f.inv;
  }
  f.shift = d2_pos - f.loss;
  return f;
}

// Per-pair formulas. `M` supplies exp/pow (vectorisable polynomials on the CPU, the CUDA
// intrinsics on the device); `T` is the compute type.

// e^{t(d) − t(r)} for entropy/direct/infonce, given dk = d^k and rk = r^k of a reference
// distance r (the row's closest negative, or the closest over a tile): the difference is
// formed before the scale, so weights near the reference keep their precision.
template <class M, class T>
FASTALPHA_HD T exp_rule_weight(T dk, T rk, T inv_tau) {
  return M::exp((rk - dk) * inv_tau);
}

// e^{t(d) − t(r)} for inverse: ((r + τ) / (d + τ))^{1/γ}, given base = r + τ.
template <class M, class T>
FASTALPHA_HD T inverse_weight(T d, T tau, T base, T inv_gamma) {
  const T x = base / (d + tau);
  return inv_gamma == T(1) ? x : inv_gamma == T(0.5) ? M::sqrt(x) : M::pow(x, inv_gamma);
}

// t'(d) for entropy/direct/infonce given dk1 = d^{k−1}, and for inverse.
template <class T>
FASTALPHA_HD T exp_rule_slope(T dk1, T k, T inv_tau) {
  return -k * inv_tau * dk1;
}

template <class T>
FASTALPHA_HD T inverse_slope(T d, T tau, T inv_gamma) {
  return -inv_gamma / (d + tau);
}

// β_ij = α_ij (1 + t'(d2_ij) (d2_ij − shift_i)), the pair weight when α is differentiated.
template <class T>
FASTALPHA_HD T beta_log_weight(T alpha, T slope, T d, T shift) {
  return alpha * (T(1) + slope * (d - shift));
}

// square: α_ij = [μ_i − d2_ij]_+ / τ, support strictly d2_ij < μ_i.
template <class T>
FASTALPHA_HD T square_alpha(T d, T mu, T inv_tau) {
  return d < mu ? (mu - d) * inv_tau : T(0);
}

// square with α differentiated: β_ij = 2 α_ij − 1/k_i on the support, 0 elsewhere
// (`scale` multiplies both terms: the row weight and gradient scale).
template <class T>
FASTALPHA_HD T square_beta(T d, T mu, T inv_tau, T two_scale, T scale_over_k) {
  return d < mu ? two_scale * (mu - d) * inv_tau - scale_over_k : T(0);
}

}  // namespace fastalpha

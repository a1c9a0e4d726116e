// CPU kernel of fastalpha::alpha_cl_fused: per-row losses and the gradient of Σ_i w_i loss_i
// for anchors i ∈ [row_lo, row_hi) of Z (M × D), without ever holding the M × M pair matrix.
//
// One pass over chunks of R full rows (DESIGN.md §8 "On the CPU"). A chunk holds every
// column of its rows, so its row statistics (row max, normaliser, sparsemax threshold) are
// complete, and three matrix products per chunk are the whole of the O(M²D) work:
//
//   S    = Z_r Zᵀ             (R × M)       d2_ij = max(0, (n_i + n_j)/2 − S_ij)
//   ω    = rule(d2)           (R × M)       one fused sweep per row, in cache: powers,
//                                           exponentials, masks, sums, the loss, ω
//   ωZ   = ω Z                (R × D)       row side of the gradient
//   acc += ωᵀ [Z_r | 1]       (M × (D+1))   column side ωᵀZ and column sums C, per thread
//
// and the gradient is assembled from them (alpha_cl_common.h). Chunks are split statically
// over threads (at::parallel_for), each thread owns its accumulator, and they are added in
// thread order at the end: the result is deterministic for a given thread count. Memory:
// O(M·D) per thread plus two R × M buffers per thread. The products are ATen's (MKL in
// torch's wheels) single-threaded GEMMs on views of those buffers.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "alpha_cl_common.h"
#include "alpha_cl_rule.h"
#include "vec_math.h"

namespace fastalpha {
namespace {

using vecmath::Math;

// float partial sums are folded into a double every kSumBlock terms, so a row of 10^5 terms
// keeps float32's precision without giving up SIMD lanes.
constexpr int64_t kSumBlock = 1024;

// Rows per chunk R ≈ kChunkElements / M, within [64, 256]. Every chunk re-reads Z and the
// M × (D+1) accumulator, so small R makes the pass memory-bound; large R makes the R × M
// buffers leave the cache. Measured on 2 cores, D = 128: at M = 8192 R = 64…128 best (R = 16
// 1.5× slower); at M = 131072 R = 64 is 1.25× faster than R = 32 and larger R gains nothing.
constexpr int64_t kChunkElements = int64_t{1} << 20;

// At most `target` rows per chunk, with every thread given the same number of chunks of
// near-equal size (at::parallel_for splits the chunk range statically).
inline int64_t balanced_chunk_rows(int64_t rows, int64_t threads, int64_t target) {
  if (rows == 0) return 1;
  const int64_t per_thread = (rows + threads * target - 1) / (threads * target);
  return std::max<int64_t>(1, (rows + threads * per_thread - 1) / (threads * per_thread));
}

// body(begin, end) on the column ranges of J_i = [0, M) \ {a, b}, a < b: the self and the
// partner column are skipped by splitting the range rather than by a mask in the hot loop.
template <class Body>
inline void for_negatives(int64_t a, int64_t b, int64_t m, Body&& body) {
  body(int64_t{0}, a);
  body(a + 1, b);
  body(b + 1, m);
}

struct RowResult {
  double loss;       // loss_i
  double coef;       // w_i A_i (times 1/τ for infonce)
  double omega_sum;  // Σ_j ω_ij
  double scale;      // ω_i· = scale · (what the sweep left in omega)
};

// The fused per-row sweep. `row` holds S_i· on entry and d2_i· on exit; `omega` receives
// ω_i· / scale (zeros at i and p(i)). When ω is α times a per-row factor (every rule with
// detach_alpha=True, quadratic, infonce) that factor is not applied here but returned as
// `scale` and folded into the matrix products, which saves a sweep over the row; β rows
// are written in full (scale 1).
template <typename T>
class RowSweep {
 public:
  RowSweep(const RuleConfig& cfg, const T* half_norms, int64_t m, bool need_grad)
      : cfg_(cfg), half_(half_norms), m_(m), need_grad_(need_grad),
        inv_tau_(static_cast<T>(1.0 / cfg.temperature)), k_(cfg.p / 2.0) {}

  RowResult operator()(int64_t i, T* row, T* omega, double weight) const {
    const T inv_tau = inv_tau_;  // a local, so the vectorised loops do not reload it through `this`
    const int64_t partner = i < m_ / 2 ? i + m_ / 2 : i - m_ / 2;
    const int64_t a = std::min(i, partner), b = std::max(i, partner);
    const T d2_pos_t = std::max(T(0), half_[i] + half_[partner] - row[partner]);
    const double d2_pos = d2_pos_t;
    const T dmin = distances(i, a, b, row);

    // Unnormalised weights e_ij (e = 1 at the closest negative), their sum l and Σ e d2.
    double l = 0, ld = 0, log_scale = 0;  // log_scale: log w at the closest negative
    double mu = 0;                          // square: sparsemax threshold
    int64_t support = 0;                    // square: |{j : d2_ij < μ}|
    switch (cfg_.rule) {
      case Rule::Quadratic:
        weights(a, b, row, omega, [](T) { return T(1); }, l, ld);
        break;
      case Rule::Entropy:
      case Rule::Direct:
        log_scale = -std::pow(static_cast<double>(dmin), k_) / cfg_.temperature;
        if (k_ == 1.0) {
          weights(a, b, row, omega, [=](T d) { return Math<T>::exp((dmin - d) * inv_tau); }, l, ld);
        } else if (k_ == 2.0) {
          const T dmin2 = dmin * dmin;
          weights(a, b, row, omega, [=](T d) { return Math<T>::exp((dmin2 - d * d) * inv_tau); }, l, ld);
        } else {
          const T k = static_cast<T>(k_), dmin_k = Math<T>::pow(dmin, k);
          weights(a, b, row, omega, [=](T d) { return Math<T>::exp((dmin_k - Math<T>::pow(d, k)) * inv_tau); }, l, ld);
        }
        break;
      case Rule::Inverse: {
        // w = (d2 + τ)^{−1/γ}; relative to the closest negative: ((d2 + τ)/(dmin + τ))^{−1/γ}.
        const T tau = static_cast<T>(cfg_.temperature), base = dmin + tau;
        log_scale = -std::log(static_cast<double>(base)) / cfg_.gamma;
        if (cfg_.gamma == 1.0) {
          weights(a, b, row, omega, [=](T d) { return base / (d + tau); }, l, ld);
        } else if (cfg_.gamma == 2.0) {
          weights(a, b, row, omega, [=](T d) { return std::sqrt(base / (d + tau)); }, l, ld);
        } else {
          const T inv_gamma_w = static_cast<T>(1.0 / cfg_.gamma);
          weights(a, b, row, omega, [=](T d) { return Math<T>::pow(base / (d + tau), inv_gamma_w); }, l, ld);
        }
        break;
      }
      case Rule::InfoNCE:
        log_scale = (d2_pos - static_cast<double>(dmin)) / cfg_.temperature;
        weights(a, b, row, omega, [=](T d) { return Math<T>::exp((dmin - d) * inv_tau); }, l, ld);
        break;
      case Rule::Square: {
        sparsemax_threshold(a, b, row, dmin, mu, support);
        const T mu_t = static_cast<T>(mu);
        weights(a, b, row, omega, [=](T d) { return d < mu_t ? (mu_t - d) * inv_tau : T(0); }, l, ld);
        break;
      }
    }

    // α_ij = e_ij · inv; A_i = Σ_j α_ij; loss_i = Σ_j α_ij (d2_i − d2_ij) = d2_i A_i − inv Σ e d2.
    double inv, loss;
    if (cfg_.rule == Rule::InfoNCE) {
      // ξ_i = e^{log_scale} l; loss = log(ε + ξ_i); α = e / (l + ε e^{−log_scale}).
      const double log_xi = log_scale + std::log(l);
      if (cfg_.eps > 0) {
        const double log_eps = std::log(cfg_.eps), hi = std::max(log_xi, log_eps);
        loss = hi + std::log1p(std::exp(-std::abs(log_xi - log_eps)));
      } else {
        loss = log_xi;
      }
      inv = 1.0 / (l + cfg_.eps * std::exp(-log_scale));
    } else {
      double denom = l;
      if (cfg_.rule == Rule::Square) denom = 1.0;
      const bool has_eps = cfg_.rule == Rule::Entropy || cfg_.rule == Rule::Direct;
      if (has_eps && cfg_.eps > 0) denom += cfg_.eps * static_cast<double>(m_ - 2) * std::exp(-log_scale);
      inv = 1.0 / denom;
      loss = d2_pos * l * inv - ld * inv;
    }
    const double row_alpha = l * inv;
    if (!need_grad_) return {loss, 0.0, 0.0, 0.0};

    const double g = weight * cfg_.gradient_scale();
    omega[a] = T(0);
    omega[b] = T(0);
    if (!cfg_.uses_beta()) return {loss, g * row_alpha, g * row_alpha, g * inv};
    double omega_sum = 0;
    if (cfg_.rule == Rule::Square) {
      // β = 2α − 1/k on the support (k its size), 0 elsewhere.
      const T two_g = static_cast<T>(2 * g), g_over_k = static_cast<T>(g / support), mu_t = static_cast<T>(mu);
      omega_sum = write_omega(a, b, row, omega, [=](T e, T d) { return d < mu_t ? two_g * e - g_over_k : T(0); });
    } else {
      // β = α (1 − t'(d2) (v − c)), v = d2_i − d2_ij, c = Σ_j α_ij v_ij = loss_i.
      const T f = static_cast<T>(g * inv), shift = static_cast<T>(d2_pos - loss);
      if (cfg_.rule == Rule::Inverse) {
        const T tau = static_cast<T>(cfg_.temperature), inv_gamma = static_cast<T>(1.0 / cfg_.gamma);
        omega_sum = write_omega(a, b, row, omega,
                                [=](T e, T d) { return f * e * (T(1) + inv_gamma / (d + tau) * (shift - d)); });
      } else if (k_ == 1.0) {
        omega_sum = write_omega(a, b, row, omega, [=](T e, T d) { return f * e * (T(1) + inv_tau * (shift - d)); });
      } else if (k_ == 2.0) {
        const T two_inv_tau = 2 * inv_tau;
        omega_sum = write_omega(a, b, row, omega,
                                [=](T e, T d) { return f * e * (T(1) + two_inv_tau * d * (shift - d)); });
      } else {
        const T k = static_cast<T>(k_), k_inv_tau = static_cast<T>(k_) * inv_tau;
        omega_sum = write_omega(a, b, row, omega, [=](T e, T d) {
          return f * e * (T(1) + k_inv_tau * Math<T>::pow(d, k - T(1)) * (shift - d));
        });
      }
    }
    return {loss, g * row_alpha, omega_sum, 1.0};
  }

 private:
  // d2_ij = max(0, n_i/2 + n_j/2 − S_ij) in place over J_i; returns min_j d2_ij.
  T distances(int64_t i, int64_t a, int64_t b, T* row) const {
    const T hi = half_[i];
    const T* h = half_;
    T dmin = std::numeric_limits<T>::infinity();
    for_negatives(a, b, m_, [&](int64_t s, int64_t e) {
      T lo = dmin;
#pragma omp simd reduction(min : lo)
      for (int64_t j = s; j < e; ++j) {
        T d = hi + h[j] - row[j];
        d = d > T(0) ? d : T(0);
        row[j] = d;
        lo = d < lo ? d : lo;
      }
      dmin = lo;
    });
    return dmin;
  }

  // omega[j] = weight(d2_ij) over J_i, with l += Σ e and ld += Σ e d2.
  template <class Weight>
  void weights(int64_t a, int64_t b, const T* row, T* omega, Weight weight, double& l, double& ld) const {
    for_negatives(a, b, m_, [&](int64_t s, int64_t e) {
      for (int64_t s0 = s; s0 < e; s0 += kSumBlock) {
        const int64_t e0 = std::min(e, s0 + kSumBlock);
        T ls = 0, lds = 0;
#pragma omp simd reduction(+ : ls, lds)
        for (int64_t j = s0; j < e0; ++j) {
          const T w = weight(row[j]);
          omega[j] = w;
          ls += w;
          lds += w * row[j];
        }
        l += ls;
        ld += lds;
      }
    });
  }

  // omega[j] = f(e_ij, d2_ij) over J_i; returns Σ_j omega[j].
  template <class F>
  double write_omega(int64_t a, int64_t b, const T* row, T* omega, F f) const {
    double total = 0;
    for_negatives(a, b, m_, [&](int64_t s, int64_t e) {
      for (int64_t s0 = s; s0 < e; s0 += kSumBlock) {
        const int64_t e0 = std::min(e, s0 + kSumBlock);
        T part = 0;
#pragma omp simd reduction(+ : part)
        for (int64_t j = s0; j < e0; ++j) {
          const T w = f(omega[j], row[j]);
          omega[j] = w;
          part += w;
        }
        total += part;
      }
    });
    return total;
  }

  // |{j ∈ J_i : d2_ij < mu}| and the sum of those d2_ij.
  void count_below(int64_t a, int64_t b, const T* row, T mu, int64_t& count, double& sum) const {
    count = 0;
    sum = 0;
    for_negatives(a, b, m_, [&](int64_t s, int64_t e) {
      for (int64_t s0 = s; s0 < e; s0 += kSumBlock) {
        const int64_t e0 = std::min(e, s0 + kSumBlock);
        T c = 0, part = 0;  // c ≤ kSumBlock is exact in float
#pragma omp simd reduction(+ : c, part)
        for (int64_t j = s0; j < e0; ++j) {
          const bool in = row[j] < mu;
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
  // and once an iteration leaves its size unchanged it is exactly {d2 < μ*}.
  void sparsemax_threshold(int64_t a, int64_t b, const T* row, T dmin, double& mu, int64_t& support) const {
    // At least the closest negative is in the support even when τ is below d2's resolution.
    const T floor_mu = std::nextafter(dmin, std::numeric_limits<T>::infinity());
    T mu_t = std::max(static_cast<T>(dmin + static_cast<T>(cfg_.temperature)), floor_mu);
    double sum;
    count_below(a, b, row, mu_t, support, sum);
    for (int64_t iter = 0; iter <= m_; ++iter) {
      mu_t = std::max(static_cast<T>((cfg_.temperature + sum) / static_cast<double>(support)), floor_mu);
      int64_t next_support;
      count_below(a, b, row, mu_t, next_support, sum);
      const bool converged = next_support >= support;
      support = next_support;
      if (converged) break;
    }
    mu = std::max((cfg_.temperature + sum) / static_cast<double>(support), static_cast<double>(floor_mu));
  }

  const RuleConfig cfg_;
  const T* half_;
  const int64_t m_;
  const bool need_grad_;
  const T inv_tau_;
  const double k_;  // p / 2
};

// G_k (alpha_cl_common.h) from the summed accumulator [ωᵀZ | C] and the per-row statistics,
// one pass over the M rows written straight into the output.
template <typename T>
at::Tensor assemble_gradient_cpu(const at::Tensor& z, int64_t row_lo, int64_t row_hi, const at::Tensor& acc,
                                 const at::Tensor& coef, const at::Tensor& omega_rowsum, const at::Tensor& omega_z) {
  const int64_t m = z.size(0), dim = z.size(1);
  at::Tensor grad = at::empty({m, dim}, z.options());
  const T* zp = z.data_ptr<T>();
  const T* accp = acc.data_ptr<T>();
  const T* coefp = coef.data_ptr<T>();
  const T* rowsump = omega_rowsum.data_ptr<T>();
  const T* ozp = omega_z.data_ptr<T>();
  T* gp = grad.data_ptr<T>();
  at::parallel_for(0, m, 256, [&](int64_t first, int64_t last) {
    for (int64_t k = first; k < last; ++k) {
      const int64_t p = k < m / 2 ? k + m / 2 : k - m / 2;
      const T* zk = zp + k * dim;
      const T* zpk = zp + p * dim;
      const T* acc_k = accp + k * (dim + 1);
      T* g = gp + k * dim;
      const T colsum = acc_k[dim];
      for (int64_t c = 0; c < dim; ++c) g[c] = acc_k[c] - colsum * zk[c];
      if (row_lo <= k && k < row_hi) {  // k as an anchor
        const int64_t r = k - row_lo;
        const T a = coefp[r], rowsum = rowsump[r];
        const T* oz = ozp + r * dim;
        for (int64_t c = 0; c < dim; ++c) g[c] += a * (zk[c] - zpk[c]) - rowsum * zk[c] + oz[c];
      }
      if (row_lo <= p && p < row_hi) {  // k as the positive of anchor p(k)
        const T a = coefp[p - row_lo];
        for (int64_t c = 0; c < dim; ++c) g[c] -= a * (zpk[c] - zk[c]);
      }
    }
  });
  return grad;
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> fused_cpu(const at::Tensor& z, int64_t row_lo, int64_t row_hi,
                                             const std::optional<at::Tensor>& row_weight, const RuleConfig& cfg,
                                             bool need_grad) {
  const int64_t m = z.size(0), dim = z.size(1), rows = row_hi - row_lo;
  const auto opts = z.options();
  const at::Tensor half = z.square().sum(1).mul_(0.5).contiguous();
  const at::Tensor weight = row_weight.has_value() ? row_weight->contiguous() : at::Tensor();
  at::Tensor loss = at::empty({rows}, opts);
  at::Tensor coef = at::empty({rows}, opts), omega_rowsum = at::empty({rows}, opts);
  at::Tensor omega_z = need_grad ? at::empty({rows, dim}, opts) : at::Tensor();

  const int threads = at::get_num_threads();
  const int64_t chunk = balanced_chunk_rows(rows, threads, chunk_rows_from_env(std::clamp<int64_t>(kChunkElements / m, 64, 256)));
  const int64_t n_chunks = (rows + chunk - 1) / chunk;
  // Per thread: acc = [ωᵀZ | C], M × (D + 1). The last column is Σ_i ω_ij, which the same
  // product yields for free when Z_r is given a column of ones (times the row scales).
  std::vector<at::Tensor> acc(threads);

  const RowSweep<T> sweep(cfg, half.data_ptr<T>(), m, need_grad);
  const T* w = weight.defined() ? weight.data_ptr<T>() : nullptr;
  T* loss_out = loss.data_ptr<T>();
  T* coef_out = coef.data_ptr<T>();
  T* rowsum_out = omega_rowsum.data_ptr<T>();

  at::parallel_for(0, n_chunks, 1, [&](int64_t first, int64_t last) {
    const int tid = at::get_thread_num();
    TORCH_CHECK(tid < threads, "fastalpha: thread id ", tid, " outside the ", threads, " accumulators");
    at::Tensor sim = at::empty({chunk, m}, opts), omega = at::empty({chunk, m}, opts);
    at::Tensor scale = at::empty({chunk}, opts), z_aug = at::empty({chunk, dim + 1}, opts);
    if (need_grad) acc[tid] = at::zeros({m, dim + 1}, opts);
    for (int64_t c = first; c < last; ++c) {
      const int64_t r0 = row_lo + c * chunk, n = std::min(chunk, row_hi - r0);
      const at::Tensor z_rows = z.narrow(0, r0, n);
      at::Tensor s = sim.narrow(0, 0, n), o = omega.narrow(0, 0, n), f = scale.narrow(0, 0, n);
      at::mm_out(s, z_rows, z.t());
      T* s_ptr = s.data_ptr<T>();
      T* o_ptr = o.data_ptr<T>();
      T* f_ptr = f.data_ptr<T>();
      for (int64_t r = 0; r < n; ++r) {
        const int64_t out = r0 - row_lo + r;
        const RowResult res = sweep(r0 + r, s_ptr + r * m, o_ptr + r * m, w ? static_cast<double>(w[out]) : 1.0);
        loss_out[out] = static_cast<T>(res.loss);
        coef_out[out] = static_cast<T>(res.coef);
        rowsum_out[out] = static_cast<T>(res.omega_sum);
        f_ptr[r] = static_cast<T>(res.scale);
      }
      if (need_grad) {
        // ω = diag(f) E: ωZ = f ⊙ (E Z) and ωᵀ[Z_r | 1] = Eᵀ [f ⊙ Z_r | f].
        at::Tensor oz = omega_z.narrow(0, r0 - row_lo, n);
        at::mm_out(oz, o, z);
        oz.mul_(f.unsqueeze(1));
        at::Tensor za = z_aug.narrow(0, 0, n);
        at::Tensor za_z = za.narrow(1, 0, dim);
        at::mul_out(za_z, z_rows, f.unsqueeze(1));
        za.select(1, dim).copy_(f);
        acc[tid].addmm_(o.t(), za);
      }
    }
  });

  if (!need_grad) return {loss, at::empty({0, dim}, opts)};
  at::Tensor total;
  for (int t = 0; t < threads; ++t) {
    if (!acc[t].defined()) continue;
    if (total.defined()) {
      total.add_(acc[t]);
    } else {
      total = acc[t];
    }
  }
  if (!total.defined()) total = at::zeros({m, dim + 1}, opts);
  return {loss, assemble_gradient_cpu<T>(z, row_lo, row_hi, total, coef, omega_rowsum, omega_z)};
}

std::tuple<at::Tensor, at::Tensor> alpha_cl_fused_cpu(const at::Tensor& z_in, int64_t row_lo, int64_t row_hi,
                                                      const std::optional<at::Tensor>& row_weight, c10::string_view rule,
                                                      double temperature, double p, double gamma, double eps,
                                                      bool detach_alpha, bool need_grad) {
  check_fused_inputs(z_in, row_lo, row_hi, row_weight, c10::DeviceType::CPU);
  const RuleConfig cfg = make_rule(std::string(rule.data(), rule.size()), temperature, p, gamma, eps, detach_alpha);
  const at::Tensor z = z_in.contiguous();
  if (z.scalar_type() == at::kDouble) return fused_cpu<double>(z, row_lo, row_hi, row_weight, cfg, need_grad);
  return fused_cpu<float>(z, row_lo, row_hi, row_weight, cfg, need_grad);
}

}  // namespace
}  // namespace fastalpha

TORCH_LIBRARY(fastalpha_cpu, m) {
  m.def(
      "alpha_cl_fused(Tensor z, int row_lo, int row_hi, Tensor? row_weight, str rule, float temperature, float p, "
      "float gamma, float eps, bool detach_alpha, bool need_grad) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastalpha_cpu, CPU, m) { m.impl("alpha_cl_fused", &fastalpha::alpha_cl_fused_cpu); }

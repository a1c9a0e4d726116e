// CUDA row sweep of fastalpha::alpha_cl_fused: the epilogue between cuBLAS products.
//
// The CUDA backend runs the CPU kernel's chunked pass (alpha_cl_cpu.cpp) with cuBLAS for
// the three products per chunk (S = Z_r Zᵀ, ωZ, ωᵀZ) and this kernel for everything in
// between. One thread block owns one anchor row i of the chunk and sweeps its M columns:
//
//   1. d2_ij = max(0, n_i/2 + n_j/2 − S_ij) in place, and min_{j∈J_i} d2_ij
//   2. the rule's weights e_ij relative to the closest negative (no overflow), with
//      l = Σ e and Σ e d2; for `square` first Michelot's exact sparsemax threshold
//   3. the row's loss, A_i, and ω_ij = w_i α_ij (or w_i β_ij) written over e, with Σ_j ω_ij
//
// Reductions are warp shuffles plus a fixed-order sum over warps, in float64 for sums:
// deterministic, and accurate for rows of 10^5 terms.
#include <cmath>
#include <cstdint>

#include <cuda_runtime.h>

#include <c10/cuda/CUDAException.h>

#include "alpha_cl_cuda_kernel.h"

namespace fastalpha {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename T>
struct DeviceMath;

template <>
struct DeviceMath<float> {
  __device__ static float exp(float x) { return expf(x); }
  __device__ static float pow(float x, float k) { return powf(x, k); }
  __device__ static float sqrt(float x) { return sqrtf(x); }
  __device__ static float next_up(float x) { return nextafterf(x, INFINITY); }
};

template <>
struct DeviceMath<double> {
  __device__ static double exp(double x) { return ::exp(x); }
  __device__ static double pow(double x, double k) { return ::pow(x, k); }
  __device__ static double sqrt(double x) { return ::sqrt(x); }
  __device__ static double next_up(double x) { return nextafter(x, static_cast<double>(INFINITY)); }
};

// Sum over the block; every thread gets the same value (warps added in a fixed order).
template <typename V>
__device__ V block_sum(V v, V* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  __syncthreads();  // the previous reduction may still be reading scratch
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  V total = scratch[0];
  for (int w = 1; w < kWarps; ++w) total += scratch[w];
  return total;
}

template <typename V>
__device__ V block_min(V v, V* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) v = fmin(v, __shfl_xor_sync(0xffffffffu, v, offset));
  __syncthreads();
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  V total = scratch[0];
  for (int w = 1; w < kWarps; ++w) total = fmin(total, scratch[w]);
  return total;
}

// The rule's parameters in the form the sweep uses (see RuleConfig).
struct DeviceRule {
  Rule rule;
  double temperature, gamma, eps, k;  // k = p / 2
  bool uses_beta;
  double gradient_scale;
};

// d2^k for the entropy/direct weight, with the common exponents exact.
template <typename T>
__device__ T power_k(T d, double k) {
  if (k == 1.0) return d;
  if (k == 2.0) return d * d;
  return DeviceMath<T>::pow(d, static_cast<T>(k));
}

template <typename T>
__global__ void __launch_bounds__(kThreads) row_sweep_kernel(const DeviceRule rule, const RowSweepArgs<T> a) {
  __shared__ double scratch[kWarps];
  __shared__ T scratch_t[kWarps];
  using M = DeviceMath<T>;
  const int64_t r = blockIdx.x;
  const int64_t i = a.row0 + r, m = a.m;
  const int64_t partner = i < m / 2 ? i + m / 2 : i - m / 2;
  T* row = a.sim + r * m;
  T* omega = a.need_grad ? a.omega + r * m : nullptr;
  const T tau = static_cast<T>(rule.temperature), inv_tau = static_cast<T>(1.0 / rule.temperature);

  // 1. Distances and the closest negative.
  const T half_i = a.half[i];
  T dmin = static_cast<T>(INFINITY);
  for (int64_t j = threadIdx.x; j < m; j += kThreads) {
    T d = half_i + a.half[j] - row[j];
    d = d > T(0) ? d : T(0);
    row[j] = d;
    if (j != i && j != partner) dmin = d < dmin ? d : dmin;
  }
  dmin = block_min(dmin, scratch_t);  // its __syncthreads also publishes the d2 row
  const double d2_pos = static_cast<double>(row[partner]);

  // 2. Rule-specific setup: log_scale = log w at the closest negative; square: threshold μ.
  double log_scale = 0, mu = 0;
  double support = 0;
  T dmin_k = 0, base = 0, mu_t = 0;
  switch (rule.rule) {
    case Rule::Entropy:
    case Rule::Direct:
      dmin_k = power_k(dmin, rule.k);
      log_scale = -::pow(static_cast<double>(dmin), rule.k) / rule.temperature;
      break;
    case Rule::Inverse:
      base = dmin + tau;
      log_scale = -::log(static_cast<double>(base)) / rule.gamma;
      break;
    case Rule::InfoNCE:
      log_scale = (d2_pos - static_cast<double>(dmin)) / rule.temperature;
      break;
    case Rule::Square: {
      // Michelot: μ ← (τ + Σ_{d2<μ} d2) / |{d2 < μ}| from μ_0 = min d2 + τ ≥ μ*; the support
      // only shrinks, and an iteration that keeps its size has found it exactly.
      const T floor_mu = M::next_up(dmin);
      T threshold = fmax(dmin + tau, floor_mu);
      double sum = 0;
      for (int64_t iter = 0; iter <= m + 1; ++iter) {
        double count_part = 0, sum_part = 0;
        for (int64_t j = threadIdx.x; j < m; j += kThreads) {
          const T d = row[j];
          if (j != i && j != partner && d < threshold) {
            count_part += 1;
            sum_part += static_cast<double>(d);
          }
        }
        const double count = block_sum(count_part, scratch);
        const double total = block_sum(sum_part, scratch);
        const bool converged = iter > 0 && count >= support;
        support = count;
        sum = total;
        if (converged) break;
        threshold = fmax(static_cast<T>((rule.temperature + sum) / support), floor_mu);
      }
      mu = fmax((rule.temperature + sum) / support, static_cast<double>(floor_mu));
      mu_t = static_cast<T>(mu);
      break;
    }
    case Rule::Quadratic:
      break;
  }

  // Unnormalised weights e_ij, l = Σ e, Σ e d2.
  double l_part = 0, ld_part = 0;
  for (int64_t j = threadIdx.x; j < m; j += kThreads) {
    const T d = row[j];
    T e = T(0);
    if (j != i && j != partner) {
      switch (rule.rule) {
        case Rule::Quadratic:
          e = T(1);
          break;
        case Rule::Entropy:
        case Rule::Direct:
          e = M::exp((dmin_k - power_k(d, rule.k)) * inv_tau);
          break;
        case Rule::Inverse:
          e = rule.gamma == 1.0   ? base / (d + tau)
              : rule.gamma == 2.0 ? M::sqrt(base / (d + tau))
                                  : M::pow(base / (d + tau), static_cast<T>(1.0 / rule.gamma));
          break;
        case Rule::InfoNCE:
          e = M::exp((dmin - d) * inv_tau);
          break;
        case Rule::Square:
          e = d < mu_t ? (mu_t - d) * inv_tau : T(0);
          break;
      }
    }
    if (a.need_grad) omega[j] = e;
    l_part += static_cast<double>(e);
    ld_part += static_cast<double>(e) * static_cast<double>(d);
  }
  const double l = block_sum(l_part, scratch);
  const double ld = block_sum(ld_part, scratch);

  // 3. α = e · inv; A_i = l · inv; the loss; then ω.
  double inv, loss;
  if (rule.rule == Rule::InfoNCE) {
    const double log_xi = log_scale + ::log(l);
    if (rule.eps > 0) {
      const double log_eps = ::log(rule.eps), hi = fmax(log_xi, log_eps);
      loss = hi + log1p(::exp(-fabs(log_xi - log_eps)));
    } else {
      loss = log_xi;
    }
    inv = 1.0 / (l + rule.eps * ::exp(-log_scale));
  } else {
    double denom = rule.rule == Rule::Square ? 1.0 : l;
    const bool has_eps = rule.rule == Rule::Entropy || rule.rule == Rule::Direct;
    if (has_eps && rule.eps > 0) denom += rule.eps * static_cast<double>(m - 2) * ::exp(-log_scale);
    inv = 1.0 / denom;
    loss = d2_pos * l * inv - ld * inv;
  }
  const double weight = a.weight != nullptr ? static_cast<double>(a.weight[r]) : 1.0;
  const double g = weight * rule.gradient_scale;

  double omega_sum = 0;
  if (a.need_grad) {
    const T scale = static_cast<T>(g * inv), shift = static_cast<T>(d2_pos - loss);
    const T two_g = static_cast<T>(2 * g), g_over_k = static_cast<T>(support > 0 ? g / support : 0.0);
    const T inv_gamma = static_cast<T>(1.0 / rule.gamma), k = static_cast<T>(rule.k);
    double part = 0;
    for (int64_t j = threadIdx.x; j < m; j += kThreads) {
      T w = T(0);
      if (j != i && j != partner) {
        const T e = omega[j], d = row[j];
        if (!rule.uses_beta) {
          w = scale * e;
        } else if (rule.rule == Rule::Square) {
          w = d < mu_t ? two_g * e - g_over_k : T(0);  // β = 2α − 1/k on the support
        } else if (rule.rule == Rule::Inverse) {
          w = scale * e * (T(1) + inv_gamma / (d + tau) * (shift - d));  // β = α(1 − t'(v − c))
        } else {
          const T slope = rule.k == 1.0 ? T(1) : rule.k == 2.0 ? d : M::pow(d, k - T(1));
          w = scale * e * (T(1) + k * inv_tau * slope * (shift - d));
        }
      }
      omega[j] = w;
      part += static_cast<double>(w);
    }
    omega_sum = block_sum(part, scratch);
  }
  if (threadIdx.x == 0) {
    a.loss[r] = static_cast<T>(loss);
    a.coef[r] = static_cast<T>(g * l * inv);
    a.omega_rowsum[r] = static_cast<T>(omega_sum);
  }
}

}  // namespace

template <typename T>
void launch_row_sweep(const RuleConfig& cfg, const RowSweepArgs<T>& args, cudaStream_t stream) {
  if (args.rows == 0) return;
  const DeviceRule rule{cfg.rule, cfg.temperature, cfg.gamma, cfg.eps, cfg.p / 2.0, cfg.uses_beta(), cfg.gradient_scale()};
  row_sweep_kernel<T><<<static_cast<unsigned int>(args.rows), kThreads, 0, stream>>>(rule, args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template void launch_row_sweep<float>(const RuleConfig&, const RowSweepArgs<float>&, cudaStream_t);
template void launch_row_sweep<double>(const RuleConfig&, const RowSweepArgs<double>&, cudaStream_t);

}  // namespace cuda
}  // namespace fastalpha

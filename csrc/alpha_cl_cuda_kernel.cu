// CUDA row sweep of fastalpha::alpha_cl_fused: the epilogue between cuBLAS products.
//
// The CUDA backend runs the CPU kernel's chunked pass (alpha_cl_cpu.cpp) with cuBLAS for
// the three products per chunk (S = Z_r Zᵀ, ωZ, ωᵀZ) and this kernel for everything in
// between. One thread block owns one anchor row i of the chunk and sweeps its M + K columns
// ([Z; Q]; J_i is the mode's column ranges, negative_ranges in alpha_cl_rule.h):
//
//   1. d2_ij = max(0, n_i/2 + n_j/2 − S_ij) in place, and min_{j∈J_i} d2_ij
//   2. the rule's weights e_ij relative to the closest negative (no overflow), with
//      l = Σ e and Σ e d2; for `square` first Michelot's exact sparsemax threshold
//   3. the row's loss and A_i by finalize_row (alpha_cl_row_math.h, the CPU kernel's too),
//      and ω_ij = w_i α_ij (or w_i β_ij) written over e, with Σ_j ω_ij
//
// Reductions are warp shuffles plus a fixed-order sum over warps, in float64 for sums:
// deterministic, and accurate for rows of 10^5 terms.
//
// Which columns are in the sweep is the row type's (`PairedRow`: the negative set's ranges
// and the partner; `GroupedRow`: the group test of GroupColumns, d̄2_i from the caller, and for
// infonce with ε > 0 the positives at d2 − τ log ε), the same split as the CPU's PairedSets
// and GroupedSets, so both kernels sweep the same sets with the same shared row maths.
#include <cmath>
#include <cstdint>

#include <cuda_runtime.h>

#include <c10/cuda/CUDAException.h>

#include "alpha_cl_cuda_kernel.h"
#include "alpha_cl_row_math.h"

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
  __device__ static float log(float x) { return logf(x); }
  __device__ static float next_up(float x) { return nextafterf(x, INFINITY); }
};

template <>
struct DeviceMath<double> {
  __device__ static double exp(double x) { return ::exp(x); }
  __device__ static double pow(double x, double k) { return ::pow(x, k); }
  __device__ static double sqrt(double x) { return ::sqrt(x); }
  __device__ static double log(double x) { return ::log(x); }
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

// d^k for the entropy/direct/infonce weight, with the common exponents exact.
template <typename T>
__device__ T power_k(T d, double k) {
  if (k == 1.0) return d;
  if (k == 2.0) return d * d;
  return DeviceMath<T>::pow(d, static_cast<T>(k));
}

// Anchor i of the SimCLR contract: J_i is the negative set's ranges, the positive p(i).
struct PairedRow {
  static constexpr bool kOffsets = false;  // no `offset(j)`: the distances are the plain d2
  NegativeRanges neg;
  int64_t partner;
  double n_neg;

  template <typename T>
  __device__ static PairedRow of(const RuleConfig& cfg, const RowSweepArgs<T>& a, int64_t i) {
    return {negative_ranges(cfg.negatives, i, a.m, a.cols), i < a.m / 2 ? i + a.m / 2 : i - a.m / 2, a.n_neg};
  }
  __device__ bool has_term() const { return true; }
  __device__ bool contains(int64_t j) const { return neg.contains(j); }
  template <typename T>
  __device__ double positive_distance(const T* d2_row) const { return static_cast<double>(d2_row[partner]); }
};

// Anchor i with group-defined sets (GroupColumns); no loss term without a negative (an
// anchor without a positive has weight 0 from the caller).
template <typename T>
struct GroupedRow {
  static constexpr bool kOffsets = true;
  GroupColumns columns;
  T positive_offset;
  double d2_mean;
  double n_neg;

  __device__ static GroupedRow of(const GroupedRows<T>& g, const RowSweepArgs<T>&, int64_t i) {
    return {group_columns(g.col_ids, g.row_ids, g.self_col, i, g.with_positives), static_cast<T>(g.positive_offset),
            static_cast<double>(g.d2_mean[i - g.row_lo]), static_cast<double>(g.negative_count[i - g.row_lo])};
  }
  __device__ bool has_term() const { return n_neg > 0; }
  __device__ bool contains(int64_t j) const { return columns.contains(j); }
  __device__ T offset(int64_t j) const { return columns.is_positive(j) ? positive_offset : T(0); }
  __device__ double positive_distance(const T*) const { return d2_mean; }
};

template <typename T, class Row>
__device__ void sweep_row(const RuleConfig& cfg, const Row& set, const RowSweepArgs<T>& a) {
  __shared__ double scratch[kWarps];
  __shared__ T scratch_t[kWarps];
  using M = DeviceMath<T>;
  const int64_t r = blockIdx.x;
  const int64_t i = a.row0 + r, ncols = a.cols;
  T* row = a.sim + r * ncols;
  T* omega = a.need_grad ? a.omega + r * ncols : nullptr;
  const T tau = static_cast<T>(cfg.temperature), inv_tau = static_cast<T>(cfg.inv_tau);
  const T inv_gamma = static_cast<T>(cfg.inv_gamma);

  if (!set.has_term()) {  // the whole block leaves together: loss 0, ω_i· = 0
    if (a.need_grad)
      for (int64_t j = threadIdx.x; j < ncols; j += kThreads) omega[j] = T(0);
    if (threadIdx.x == 0) {
      a.loss[r] = T(0);
      a.coef[r] = T(0);
      a.omega_rowsum[r] = T(0);
    }
    return;
  }

  // 1. Distances (with the row type's offsets) and the closest column of the sweep.
  const T half_i = a.half[i];
  T dmin = static_cast<T>(INFINITY);
  for (int64_t j = threadIdx.x; j < ncols; j += kThreads) {
    T d = half_i + a.half[j] - row[j];
    d = d > T(0) ? d : T(0);
    if constexpr (Row::kOffsets) d += set.offset(j);
    row[j] = d;
    if (set.contains(j)) dmin = d < dmin ? d : dmin;
  }
  dmin = block_min(dmin, scratch_t);  // its __syncthreads also publishes the d2 row
  const double d2_pos = set.positive_distance(row);

  // 2. The weights e_ij = e^{t(d2_ij) − t(dmin)} (square: α from the exact threshold μ).
  double mu = 0, support = 0;
  T mu_t = 0;
  if (cfg.rule == Rule::Square) {
    // Michelot: μ ← (τ + Σ_{d2<μ} d2) / |{d2 < μ}| from μ_0 = min d2 + τ ≥ μ*; the support
    // only shrinks, and an iteration that keeps its size has found it exactly.
    const T floor_mu = M::next_up(dmin);
    T threshold = fmax(dmin + tau, floor_mu);
    double sum = 0;
    for (int64_t iter = 0; iter <= ncols + 1; ++iter) {
      double count_part = 0, sum_part = 0;
      for (int64_t j = threadIdx.x; j < ncols; j += kThreads) {
        const T d = row[j];
        if (set.contains(j) && d < threshold) {
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
      threshold = fmax(static_cast<T>((cfg.temperature + sum) / support), floor_mu);
    }
    mu = fmax((cfg.temperature + sum) / support, static_cast<double>(floor_mu));
    mu_t = static_cast<T>(mu);
  }
  const T dmin_k = power_k(dmin, cfg.k), base = dmin + tau;
  double l_part = 0, ld_part = 0;
  for (int64_t j = threadIdx.x; j < ncols; j += kThreads) {
    const T d = row[j];
    T e = T(0);
    if (set.contains(j)) {
      switch (cfg.rule) {
        case Rule::Quadratic:
          e = T(1);
          break;
        case Rule::Inverse:
          e = inverse_weight<M>(d, tau, base, inv_gamma);
          break;
        case Rule::Square:
          e = square_alpha(d, mu_t, inv_tau);
          break;
        default:  // entropy, direct, infonce
          e = exp_rule_weight<M>(power_k(d, cfg.k), dmin_k, inv_tau);
          break;
      }
    }
    if (a.need_grad) omega[j] = e;
    l_part += static_cast<double>(e);
    ld_part += static_cast<double>(e) * static_cast<double>(d);
  }
  RowStats stats{};
  stats.l = block_sum(l_part, scratch);
  stats.ld = block_sum(ld_part, scratch);
  stats.m = cfg.rule == Rule::Square ? 0.0 : log_weight(cfg, static_cast<double>(dmin));
  stats.support = support;

  // 3. The row's loss and A_i, then ω = w g α (or w g β).
  const RowFinal fin = finalize_row(cfg, stats, d2_pos, set.n_neg);
  const double weight = a.weight != nullptr ? static_cast<double>(a.weight[r]) : 1.0;
  const double g = weight * cfg.grad_scale;

  double omega_sum = 0;
  if (a.need_grad) {
    const T scale = static_cast<T>(g * fin.inv), shift = static_cast<T>(fin.shift);
    const T two_g = static_cast<T>(2 * g), g_over_k = static_cast<T>(support > 0 ? g / support : 0.0);
    const T k = static_cast<T>(cfg.k);
    double part = 0;
    for (int64_t j = threadIdx.x; j < ncols; j += kThreads) {
      T w = T(0);
      if (set.contains(j)) {
        const T e = omega[j], d = row[j];
        if (!cfg.uses_beta) {
          w = scale * e;
        } else if (cfg.rule == Rule::Square) {
          w = square_beta(d, mu_t, inv_tau, two_g, g_over_k);
        } else if (cfg.rule == Rule::Inverse) {
          w = beta_log_weight(scale * e, inverse_slope(d, tau, inv_gamma), d, shift);
        } else {
          w = beta_log_weight(scale * e, exp_rule_slope(power_k(d, cfg.k - 1.0), k, inv_tau), d, shift);
        }
      }
      omega[j] = w;
      part += static_cast<double>(w);
    }
    omega_sum = block_sum(part, scratch);
  }
  if (threadIdx.x == 0) {
    a.loss[r] = static_cast<T>(fin.loss);
    a.coef[r] = static_cast<T>(g * fin.alpha_sum);
    a.omega_rowsum[r] = static_cast<T>(omega_sum);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) row_sweep_kernel(const RuleConfig cfg, const RowSweepArgs<T> a) {
  sweep_row(cfg, PairedRow::of(cfg, a, a.row0 + blockIdx.x), a);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) grouped_row_sweep_kernel(const RuleConfig cfg, const GroupedRows<T> g,
                                                                     const RowSweepArgs<T> a) {
  sweep_row(cfg, GroupedRow<T>::of(g, a, a.row0 + blockIdx.x), a);
}

}  // namespace

template <typename T>
void launch_row_sweep(const RuleConfig& cfg, const RowSweepArgs<T>& args, cudaStream_t stream) {
  if (args.rows == 0) return;
  row_sweep_kernel<T><<<static_cast<unsigned int>(args.rows), kThreads, 0, stream>>>(cfg, args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_grouped_row_sweep(const GroupedLoop& loop, const GroupedRows<T>& rows, const RowSweepArgs<T>& args,
                              cudaStream_t stream) {
  if (args.rows == 0) return;
  grouped_row_sweep_kernel<T><<<static_cast<unsigned int>(args.rows), kThreads, 0, stream>>>(loop.rule, rows, args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template void launch_row_sweep<float>(const RuleConfig&, const RowSweepArgs<float>&, cudaStream_t);
template void launch_row_sweep<double>(const RuleConfig&, const RowSweepArgs<double>&, cudaStream_t);
template void launch_grouped_row_sweep<float>(const GroupedLoop&, const GroupedRows<float>&,
                                              const RowSweepArgs<float>&, cudaStream_t);
template void launch_grouped_row_sweep<double>(const GroupedLoop&, const GroupedRows<double>&,
                                               const RowSweepArgs<double>&, cudaStream_t);

}  // namespace cuda
}  // namespace fastalpha

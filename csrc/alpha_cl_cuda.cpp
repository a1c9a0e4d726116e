// CUDA launcher of fastalpha::alpha_cl_fused: the CPU kernel's chunked pass on the GPU.
//
// The columns are [Z; Q] (C = M + K rows: Z, then the queue's K rows, which are never
// anchors). Per chunk of R full rows (all C columns, so the row statistics are complete):
//
//   S    = Z_r [Z; Q]ᵀ       cuBLAS (at::mm; tf32 when torch allows it for float32)
//   ω    = rule(S)           row_sweep_kernel: one block per row (alpha_cl_cuda_kernel.cu),
//                            ω = 0 outside J_i (negative_ranges: the mode's mask)
//   ωZ   = ω [Z; Q]          cuBLAS, into the chunk's rows of an R_total × D buffer
//   ωᵀZ += ωᵀ Z_r            cuBLAS, one C × D accumulator (the stream orders the chunks: no atomics)
//   C   += Σ_i ω_i·          column sums
//
// Everything runs on the current stream, deterministically. Memory: two R × C buffers plus
// O(C·D); R is chosen so a buffer holds about 2^25 elements. The rule arrives as the same
// RuleConfig as on the CPU, and each row is finished by the shared finalize_row
// (alpha_cl_row_math.h).
#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "alpha_cl_common.h"
#include "alpha_cl_cuda_kernel.h"
#include "alpha_cl_rule.h"

namespace fastalpha {
namespace {

constexpr int64_t kChunkElements = int64_t{1} << 25;

template <typename T>
std::tuple<at::Tensor, at::Tensor> fused_cuda(const at::Tensor& cols, int64_t m, int64_t row_lo, int64_t row_hi,
                                              const std::optional<at::Tensor>& row_weight, const RuleConfig& cfg,
                                              bool need_grad) {
  const c10::cuda::CUDAGuard device_guard(cols.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(cols.device().index()).stream();
  const int64_t c = cols.size(0), dim = cols.size(1), rows = row_hi - row_lo;
  const at::Tensor z = cols.narrow(0, 0, m);
  const auto opts = cols.options();
  // n_j / 2; unit rows have n = 1 by construction (d2 = 1 − z_i·z_j, a zero row has cosine 0).
  const at::Tensor half = cfg.unit_rows ? at::full({c}, 0.5, opts) : cols.square().sum(1).mul_(0.5).contiguous();
  const at::Tensor weight = row_weight.has_value() ? row_weight->contiguous() : at::Tensor();
  at::Tensor loss = at::empty({rows}, opts);
  at::Tensor coef = at::empty({rows}, opts), omega_rowsum = at::empty({rows}, opts);
  at::Tensor omega_z = need_grad ? at::empty({rows, dim}, opts) : at::Tensor();
  at::Tensor omega_t_z = need_grad ? at::zeros({c, dim}, opts) : at::Tensor();
  at::Tensor colsum = need_grad ? at::zeros({c}, opts) : at::Tensor();

  const int64_t chunk = std::max<int64_t>(1, std::min(rows, chunk_rows_from_env(std::clamp<int64_t>(kChunkElements / c, 64, 8192))));
  at::Tensor sim = at::empty({chunk, c}, opts);
  at::Tensor omega = need_grad ? at::empty({chunk, c}, opts) : at::Tensor();
  const double n_neg = static_cast<double>(negative_count(m / 2, c - m, cfg.negatives));

  for (int64_t r0 = row_lo; r0 < row_hi; r0 += chunk) {
    const int64_t n = std::min(chunk, row_hi - r0), out = r0 - row_lo;
    const at::Tensor z_rows = z.narrow(0, r0, n);
    at::Tensor s = sim.narrow(0, 0, n);
    at::mm_out(s, z_rows, cols.t());
    at::Tensor o = need_grad ? omega.narrow(0, 0, n) : at::Tensor();
    cuda::RowSweepArgs<T> args{
        s.data_ptr<T>(),
        need_grad ? o.data_ptr<T>() : nullptr,
        half.data_ptr<T>(),
        weight.defined() ? weight.data_ptr<T>() + out : nullptr,
        loss.data_ptr<T>() + out,
        coef.data_ptr<T>() + out,
        omega_rowsum.data_ptr<T>() + out,
        r0,
        n,
        m,
        c,
        n_neg,
        need_grad,
    };
    cuda::launch_row_sweep<T>(cfg, args, stream);
    if (need_grad) {
      at::Tensor oz = omega_z.narrow(0, out, n);
      at::mm_out(oz, o, cols);
      omega_t_z.addmm_(o.t(), z_rows);
      colsum.add_(o.sum(0));
    }
  }
  if (!need_grad) return {loss, at::empty({0, dim}, opts)};
  return {loss, assemble_gradient(cols, m, row_lo, row_hi, omega_t_z, colsum, coef, omega_rowsum, omega_z,
                                 cfg.unit_rows)};
}

FASTALPHA_DEFINE_FUSED_OP(alpha_cl_fused_cuda, c10::DeviceType::CUDA, fused_cuda)

}  // namespace
}  // namespace fastalpha

FASTALPHA_REGISTER_FUSED_OP(fastalpha_cuda, CUDA, alpha_cl_fused_cuda)

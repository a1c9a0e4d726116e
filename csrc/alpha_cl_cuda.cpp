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
// Group-defined positives (the grouped op) run the same chunks over [Z; Q] with the grouped
// row sweep (J_i and P_i from the ids of the rows and columns, GroupColumns); the positive
// side is group sums in fastalpha/positives.py, as for the CPU kernel.
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

// What the chunked pass leaves for the gradient: per anchor loss_i, coef_i = w_i g A_i,
// Σ_j ω_ij and (ω[Z; Q])_i; per column (ωᵀ[Z; Q])_k and C_k = Σ_i ω_ik (without need_grad
// only `loss` is defined).
struct ChunkedSums {
  at::Tensor loss, coef, omega_rowsum, omega_z, omega_t_z, colsum;
};

// The chunk loop of both modes: `sweep(args, stream)` launches the mode's row sweep on a
// chunk whose other fields are filled in here.
template <typename T, class Sweep>
ChunkedSums chunked_pass(const at::Tensor& cols, int64_t m, int64_t row_lo, int64_t row_hi,
                         const std::optional<at::Tensor>& row_weight, bool unit_rows, double n_neg, bool need_grad,
                         Sweep sweep) {
  const c10::cuda::CUDAGuard device_guard(cols.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(cols.device().index()).stream();
  const int64_t c = cols.size(0), dim = cols.size(1), rows = row_hi - row_lo;
  const at::Tensor z = cols.narrow(0, 0, m);
  const auto opts = cols.options();
  // n_j / 2; unit rows have n = 1 by construction (d2 = 1 − z_i·z_j, a zero row has cosine 0).
  const at::Tensor half = unit_rows ? at::full({c}, 0.5, opts) : cols.square().sum(1).mul_(0.5).contiguous();
  const at::Tensor weight = row_weight.has_value() ? row_weight->contiguous() : at::Tensor();
  ChunkedSums out;
  out.loss = at::empty({rows}, opts);
  out.coef = at::empty({rows}, opts);
  out.omega_rowsum = at::empty({rows}, opts);
  if (need_grad) {
    out.omega_z = at::empty({rows, dim}, opts);
    out.omega_t_z = at::zeros({c, dim}, opts);
    out.colsum = at::zeros({c}, opts);
  }

  const int64_t chunk = std::max<int64_t>(1, std::min(rows, chunk_rows_from_env(std::clamp<int64_t>(kChunkElements / c, 64, 8192))));
  at::Tensor sim = at::empty({chunk, c}, opts);
  at::Tensor omega = need_grad ? at::empty({chunk, c}, opts) : at::Tensor();

  for (int64_t r0 = row_lo; r0 < row_hi; r0 += chunk) {
    const int64_t n = std::min(chunk, row_hi - r0), at_row = r0 - row_lo;
    const at::Tensor z_rows = z.narrow(0, r0, n);
    at::Tensor s = sim.narrow(0, 0, n);
    at::mm_out(s, z_rows, cols.t());
    at::Tensor o = need_grad ? omega.narrow(0, 0, n) : at::Tensor();
    cuda::RowSweepArgs<T> args{
        s.data_ptr<T>(),
        need_grad ? o.data_ptr<T>() : nullptr,
        half.data_ptr<T>(),
        weight.defined() ? weight.data_ptr<T>() + at_row : nullptr,
        out.loss.data_ptr<T>() + at_row,
        out.coef.data_ptr<T>() + at_row,
        out.omega_rowsum.data_ptr<T>() + at_row,
        r0,
        n,
        m,
        c,
        n_neg,
        need_grad,
    };
    sweep(args, stream);
    if (need_grad) {
      at::Tensor oz = out.omega_z.narrow(0, at_row, n);
      at::mm_out(oz, o, cols);
      out.omega_t_z.addmm_(o.t(), z_rows);
      out.colsum.add_(o.sum(0));
    }
  }
  return out;
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> fused_cuda(const at::Tensor& cols, int64_t m, int64_t row_lo, int64_t row_hi,
                                              const std::optional<at::Tensor>& row_weight, const RuleConfig& cfg,
                                              bool need_grad) {
  const double n_neg = static_cast<double>(negative_count(m / 2, cols.size(0) - m, cfg.negatives));
  ChunkedSums sums = chunked_pass<T>(cols, m, row_lo, row_hi, row_weight, cfg.unit_rows, n_neg, need_grad,
                                     [&](const cuda::RowSweepArgs<T>& args, cudaStream_t stream) {
                                       cuda::launch_row_sweep<T>(cfg, args, stream);
                                     });
  if (!need_grad) return {sums.loss, at::empty({0, cols.size(1)}, cols.options())};
  return {sums.loss, assemble_gradient(cols, m, row_lo, row_hi, sums.omega_t_z, sums.colsum, sums.coef,
                                      sums.omega_rowsum, sums.omega_z, cfg.unit_rows)};
}

// The grouped mode (GroupColumns, FASTALPHA_DEFINE_GROUPED_OP): the same chunked pass over
// [Z; Q] with the grouped row sweep; the gradient gets the pair sum's terms only (queue rows
// included), and `pull` = coef.
template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_cuda(const GroupedCall& call) {
  const std::optional<at::Tensor> weight =
      call.row_weight.defined() ? std::optional<at::Tensor>(call.row_weight) : std::nullopt;
  const cuda::GroupedRows<T> rows{call.row_ids.data_ptr<int64_t>(), call.col_ids.data_ptr<int64_t>(),
                                  call.self_col.data_ptr<int64_t>(), call.d2_mean.data_ptr<T>(),
                                  call.negative_count.data_ptr<int64_t>(), call.row_lo, call.loop.with_positives,
                                  call.loop.positive_offset};
  const GroupedLoop& loop = call.loop;
  ChunkedSums sums = chunked_pass<T>(call.cols, call.m, call.row_lo, call.row_hi, weight, loop.rule.unit_rows, 0.0,
                                     call.need_grad, [&](const cuda::RowSweepArgs<T>& args, cudaStream_t stream) {
                                       cuda::launch_grouped_row_sweep<T>(loop, rows, args, stream);
                                     });
  const auto opts = call.cols.options();
  if (!call.need_grad) return {sums.loss, at::empty({0, call.cols.size(1)}, opts), at::empty({0}, opts)};
  return {sums.loss,
          assemble_pair_gradient(call.cols, call.row_lo, call.row_hi, sums.omega_t_z, sums.colsum, sums.omega_rowsum,
                                 sums.omega_z, loop.rule.unit_rows),
          sums.coef};
}

FASTALPHA_DEFINE_FUSED_OP(alpha_cl_fused_cuda, c10::DeviceType::CUDA, fused_cuda)
FASTALPHA_DEFINE_GROUPED_OP(alpha_cl_fused_grouped_cuda, c10::DeviceType::CUDA, grouped_cuda)

}  // namespace
}  // namespace fastalpha

FASTALPHA_REGISTER_FUSED_OPS(fastalpha_cuda, CUDA, alpha_cl_fused_cuda, alpha_cl_fused_grouped_cuda)

// The CUDA row sweep of fastalpha::alpha_cl_fused (see alpha_cl_cuda_kernel.cu), callable
// from host code that does not go through nvcc.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "alpha_cl_rule.h"

namespace fastalpha {
namespace cuda {

// Pointers to one chunk of `rows` anchors starting at global row `row0`, all on the device;
// the columns are [Z; Q], `cols` = M + K of them:
//   sim        rows × cols   S = Z_r [Z; Q]ᵀ on entry, d2 on exit
//   omega      rows × cols   receives ω (zeros outside J_i); untouched if !need_grad
//   half       cols          n_j / 2
//   weight     rows          w_i, or nullptr for all ones
//   loss, coef, omega_rowsum   rows   outputs: loss_i, w_i A_i (× 1/τ for infonce), Σ_j ω_ij
//   n_neg      |J_i| (negative_count; the grouped sweep reads GroupedRows instead)
template <typename T>
struct RowSweepArgs {
  T* sim;
  T* omega;
  const T* half;
  const T* weight;
  T* loss;
  T* coef;
  T* omega_rowsum;
  int64_t row0;
  int64_t rows;
  int64_t m;
  int64_t cols;
  double n_neg;
  bool need_grad;
};

// The grouped sweep's inputs (GroupColumns in alpha_cl_rule.h), on the device: the ids of the
// M rows and of the M + K columns, the rows' self columns, and per anchor (indexed from
// row_lo) d̄2_i and |J_i|.
template <typename T>
struct GroupedRows {
  const int64_t* row_ids;
  const int64_t* col_ids;
  const int64_t* self_col;
  const T* d2_mean;
  const int64_t* negative_count;
  int64_t row_lo;
  bool with_positives;     // GroupedLoop
  double positive_offset;  // GroupedLoop
};

// The SimCLR contract's sweep: J_i from the negative set's ranges, the partner's d2.
template <typename T>
void launch_row_sweep(const RuleConfig& cfg, const RowSweepArgs<T>& args, cudaStream_t stream);

// The grouped sweep: J_i (and the infonce positives) from the group ids, d̄2_i from `rows`;
// `loop.rule` is the RuleConfig the rows are finished with.
template <typename T>
void launch_grouped_row_sweep(const GroupedLoop& loop, const GroupedRows<T>& rows, const RowSweepArgs<T>& args,
                              cudaStream_t stream);

}  // namespace cuda
}  // namespace fastalpha

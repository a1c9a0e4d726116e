// What the CPU and CUDA launchers share: input checks, and the assembly of the gradient from
// the per-row and per-column statistics of a chunked pass (the CUDA launcher's; the CPU
// kernel assembles in its own loops).
//
// For anchors i ∈ [row_lo, row_hi) with weights w_i, ω_ij = w_i α_ij (or w_i β_ij) and
// A_i = Σ_j α_ij, the gradient of Σ_i w_i loss_i is (reference.closed_form_gradient)
//
//   G_k = Σ_i ω_ik (z_i − z_k)                                   column side: (ωᵀZ)_k − C_k z_k
//       + [k a row]      ( w_k A_k (z_k − z_p(k)) − Σ_j ω_kj (z_k − z_j) )     row side
//       − [p(k) a row]   w_p(k) A_p(k) (z_p(k) − z_k)                          partner side
//
// so a kernel needs, per row, coef_i = w_i A_i, the row sum of ω and (ωZ)_i, and per column
// C_k = Σ_i ω_ik and (ωᵀZ)_k. All of it is O(M·D): the M × M matrix is never stored. With
// unit rows the terms in z_k itself (those with C_k, w_k A_k z_k and Σ_j ω_kj z_k) are absent.
// With a queue Q (K × D) the columns are [Z; Q] and k runs over all M + K of them; queue rows
// are never anchors or partners, so they get the column side only (what a learnable
// temperature's gradient reads; the public API discards them).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <optional>

#include <ATen/ATen.h>

#include "alpha_cl_rule.h"

namespace fastalpha {

// z (M × D, float/double, on `device`), the anchor range [row_lo, row_hi) and the row weights:
// what every op takes.
inline void check_anchor_inputs(const at::Tensor& z, int64_t row_lo, int64_t row_hi,
                                const std::optional<at::Tensor>& row_weight, c10::DeviceType device) {
  TORCH_CHECK(z.dim() == 2, "fastalpha: z must be 2-D (M, D), got ", z.dim(), " dimensions");
  TORCH_CHECK(z.device().type() == device, "fastalpha: this kernel takes ", c10::DeviceTypeName(device),
              " tensors, got z on ", z.device());
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble,
              "fastalpha: the kernel computes in float32 or float64 (upcast half types first), got ", z.scalar_type());
  const int64_t m = z.size(0);
  TORCH_CHECK(z.size(1) >= 1, "fastalpha: z needs D >= 1 columns");
  TORCH_CHECK(0 <= row_lo && row_lo <= row_hi && row_hi <= m, "fastalpha: need 0 <= row_lo <= row_hi <= M = ", m,
              ", got [", row_lo, ", ", row_hi, ")");
  if (row_weight.has_value()) {
    const at::Tensor& w = *row_weight;
    TORCH_CHECK(w.dim() == 1 && w.size(0) == row_hi - row_lo, "fastalpha: row_weight must have shape (",
                row_hi - row_lo, ",), got ", w.sizes());
    TORCH_CHECK(w.scalar_type() == z.scalar_type(), "fastalpha: row_weight must have dtype ", z.scalar_type(),
                ", got ", w.scalar_type());
    TORCH_CHECK(w.device() == z.device(), "fastalpha: row_weight must be on ", z.device(), ", got ", w.device());
  }
}

// An optional queue Q (K × D): z's width, dtype and device.
inline void check_queue(const at::Tensor& z, const std::optional<at::Tensor>& queue) {
  if (!queue.has_value()) return;
  const at::Tensor& q = *queue;
  TORCH_CHECK(q.dim() == 2 && q.size(1) == z.size(1), "fastalpha: queue must have shape (K, ", z.size(1), "), got ",
              q.sizes());
  TORCH_CHECK(q.scalar_type() == z.scalar_type(), "fastalpha: queue must have dtype ", z.scalar_type(), ", got ",
              q.scalar_type());
  TORCH_CHECK(q.device() == z.device(), "fastalpha: queue must be on ", z.device(), ", got ", q.device());
}

inline void check_fused_inputs(const at::Tensor& z, const std::optional<at::Tensor>& queue, int64_t row_lo,
                               int64_t row_hi, const std::optional<at::Tensor>& row_weight, c10::DeviceType device) {
  TORCH_CHECK(z.dim() == 2, "fastalpha: z must be 2-D (M, D), got ", z.dim(), " dimensions");
  const int64_t m = z.size(0);
  // N = 1 is legitimate with a queue; whether any anchor has a negative is the caller's count.
  TORCH_CHECK(m >= 2 && m % 2 == 0, "fastalpha: z must stack two views of N >= 1 rows (M = 2N even), got M = ", m);
  check_anchor_inputs(z, row_lo, row_hi, row_weight, device);
  check_queue(z, queue);
}

// The grouped op's inputs, one checker for the CPU and the CUDA op (GroupColumns in
// alpha_cl_rule.h): z, the row range, the weights and the queue as for the SimCLR op, then
// int64 `row_ids` and `self_col` for the M rows of Z, `col_ids` for the M + K columns, and for
// the R anchors `d2_mean` d̄2_i (z's dtype) and `negative_count` |J_i| (int64), all on z's
// device. A wrong dtype is a TypeError, a wrong shape or device a ValueError. The values are
// not read (no device sync): ids and self columns are only ever compared, never indices.
inline void check_grouped_inputs(const at::Tensor& z, const std::optional<at::Tensor>& queue, int64_t row_lo,
                                 int64_t row_hi, const std::optional<at::Tensor>& row_weight, const at::Tensor& row_ids,
                                 const at::Tensor& col_ids, const at::Tensor& self_col, const at::Tensor& d2_mean,
                                 const at::Tensor& negative_count, c10::DeviceType device) {
  check_anchor_inputs(z, row_lo, row_hi, row_weight, device);
  check_queue(z, queue);
  const int64_t m = z.size(0), k = queue.has_value() ? queue->size(0) : 0, rows = row_hi - row_lo;
  TORCH_CHECK_VALUE(m >= 1, "fastalpha: z needs M >= 1 rows");
  auto check = [&](const at::Tensor& t, const char* name, int64_t length, at::ScalarType dtype) {
    TORCH_CHECK_TYPE(t.scalar_type() == dtype, "fastalpha: ", name, " must have dtype ", dtype, ", got ",
                     t.scalar_type());
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == length, "fastalpha: ", name, " must have shape (", length,
                      ",), got ", t.sizes());
    TORCH_CHECK_VALUE(t.device() == z.device(), "fastalpha: ", name, " must be on ", z.device(), ", got ", t.device());
  };
  check(row_ids, "row_ids", m, at::kLong);
  check(col_ids, "col_ids", m + k, at::kLong);
  check(self_col, "self_col", m, at::kLong);
  check(d2_mean, "d2_mean", rows, z.scalar_type());
  check(negative_count, "negative_count", rows, at::kLong);
}

// One grouped call, checked and contiguous, as both libraries' kernels take it.
struct GroupedCall {
  at::Tensor cols;                        // [Z; Q], (M + K) × D
  int64_t m, row_lo, row_hi;
  at::Tensor row_weight;                  // (R,), undefined for all ones
  at::Tensor row_ids, col_ids, self_col;  // (M,), (M + K,), (M,)
  at::Tensor d2_mean, negative_count;     // (R,)
  GroupedLoop loop;
  bool need_grad;
};

// The columns every anchor is compared with: [Z; Q] ((M + K) × D, contiguous), or Z itself
// without a queue (no copy).
inline at::Tensor column_rows(const at::Tensor& z, const std::optional<at::Tensor>& queue) {
  if (!queue.has_value() || queue->size(0) == 0) return z.contiguous();
  return at::cat({z, *queue}, 0).contiguous();
}

// p(i) = (i + M/2) mod M for i ∈ [row_lo, row_hi), as an index tensor on z's device.
inline at::Tensor partner_rows(const at::Tensor& z, int64_t row_lo, int64_t row_hi) {
  const int64_t m = z.size(0);
  return at::arange(row_lo, row_hi, z.options().dtype(at::kLong)).add_(m / 2).remainder_(m);
}

// G ((M + K) × D) from the statistics above; `cols` is [Z; Q] (its first M rows are Z),
// `omega_t_z` is (ωᵀ[Z; Q]) and `colsum` is C, both over all M + K columns. For unit rows
// (d2 = 1 − z_i·z_j) the terms in z_k itself drop out: only the cross terms ωZ, ωᵀZ and −c z_p
// remain. Queue rows have no partner and are no anchors: they get the column side only.
// The column side Σ_i ω_ik (z_i − z_k) = (ωᵀ[Z; Q])_k − C_k z_k, in place in `omega_t_z`.
inline at::Tensor column_side(at::Tensor omega_t_z, const at::Tensor& colsum, const at::Tensor& cols, bool unit_rows) {
  return unit_rows ? omega_t_z : omega_t_z.sub_(colsum.unsqueeze(1) * cols);
}

inline at::Tensor assemble_gradient(const at::Tensor& cols, int64_t m, int64_t row_lo, int64_t row_hi,
                                    at::Tensor omega_t_z, const at::Tensor& colsum, const at::Tensor& coef,
                                    const at::Tensor& omega_rowsum, const at::Tensor& omega_z, bool unit_rows) {
  at::Tensor grad = column_side(omega_t_z, colsum, cols, unit_rows);
  if (row_hi == row_lo) return grad;
  const at::Tensor z = cols.narrow(0, 0, m);
  const at::Tensor partners = partner_rows(z, row_lo, row_hi);
  const at::Tensor rows = z.narrow(0, row_lo, row_hi - row_lo);
  const at::Tensor partner_rows_z = z.index_select(0, partners);
  const at::Tensor c = coef.unsqueeze(1);
  at::Tensor row_part = omega_z - c * partner_rows_z;
  at::Tensor partner_part = -c * rows;
  if (!unit_rows) {
    row_part.add_((coef - omega_rowsum).unsqueeze(1) * rows);
    partner_part.add_(c * partner_rows_z);
  }
  grad.narrow(0, row_lo, row_hi - row_lo).add_(row_part);
  grad.index_add_(0, partners, partner_part);
  return grad;
}

// The grouped mode's pair sum alone (no partner terms; the positives' pull is added by the
// caller from group sums): G = column side over the M + K rows of `cols` = [Z; Q], plus
// Σ_j ω_kj (z_j − z_k) on the anchor rows.
inline at::Tensor assemble_pair_gradient(const at::Tensor& cols, int64_t row_lo, int64_t row_hi, at::Tensor omega_t_z,
                                         const at::Tensor& colsum, const at::Tensor& omega_rowsum,
                                         const at::Tensor& omega_z, bool unit_rows) {
  at::Tensor grad = column_side(omega_t_z, colsum, cols, unit_rows);
  if (row_hi == row_lo) return grad;
  at::Tensor row_part =
      unit_rows ? omega_z : omega_z - omega_rowsum.unsqueeze(1) * cols.narrow(0, row_lo, row_hi - row_lo);
  grad.narrow(0, row_lo, row_hi - row_lo).add_(row_part);
  return grad;
}

// Rows per chunk from FASTALPHA_CHUNK_ROWS (for tuning), else from `fallback`.
inline int64_t chunk_rows_from_env(int64_t fallback) {
  if (const char* env = std::getenv("FASTALPHA_CHUNK_ROWS")) {
    const long long value = std::atoll(env);
    if (value > 0) return static_cast<int64_t>(value);
  }
  return fallback;
}

}  // namespace fastalpha

// The op every compiled library registers: one schema, one way of turning its plain arguments
// into a RuleConfig and checked, contiguous columns [Z; Q], then the library's float/double
// kernel, called as kernel<T>(cols, M, row_lo, row_hi, row_weight, cfg, need_grad) with the
// queue's rows as cols[M:]. Each library expands these two macros with its own entry point,
// device and namespace, so the op's signature and argument handling are written once. When no
// anchor has a negative (N = 1 without a queue, or "none" with an empty one) the losses are
// an empty sum: 0, with a zero gradient.
#define FASTALPHA_FUSED_OP_SCHEMA                                                                          \
  "alpha_cl_fused(Tensor z, Tensor? queue, int row_lo, int row_hi, Tensor? row_weight, str rule, "         \
  "float temperature, float p, float gamma, float eps, bool detach_alpha, bool unit_rows, str negatives, " \
  "bool need_grad) -> (Tensor, Tensor)"

#define FASTALPHA_DEFINE_FUSED_OP(entry, device, kernel)                                                     \
  std::tuple<at::Tensor, at::Tensor> entry(                                                                  \
      const at::Tensor& z_in, const std::optional<at::Tensor>& queue, int64_t row_lo, int64_t row_hi,        \
      const std::optional<at::Tensor>& row_weight, c10::string_view rule, double temperature, double p,      \
      double gamma, double eps, bool detach_alpha, bool unit_rows, c10::string_view negatives,               \
      bool need_grad) {                                                                                      \
    const RuleConfig cfg = make_rule(std::string(rule.data(), rule.size()), temperature, p, gamma, eps,      \
                                     detach_alpha, unit_rows, std::string(negatives.data(), negatives.size())); \
    check_fused_inputs(z_in, queue, row_lo, row_hi, row_weight, device);                                     \
    const int64_t m = z_in.size(0), k = queue.has_value() ? queue->size(0) : 0;                              \
    if (negative_count(m / 2, k, cfg.negatives) == 0)                                                        \
      return {at::zeros({row_hi - row_lo}, z_in.options()),                                                  \
              at::zeros({need_grad ? m + k : 0, z_in.size(1)}, z_in.options())};                             \
    const at::Tensor cols = column_rows(z_in, queue);                                                        \
    if (cols.scalar_type() == at::kDouble)                                                                   \
      return kernel<double>(cols, m, row_lo, row_hi, row_weight, cfg, need_grad);                            \
    return kernel<float>(cols, m, row_lo, row_hi, row_weight, cfg, need_grad);                               \
  }

// The grouped op (GroupColumns): positives and negatives of every anchor from the group ids of
// the rows and the columns, any M ≥ 1, an optional queue (its K rows are columns only). It
// returns the pair loop's part of the results: the losses (0 for an anchor without a
// negative; one without a positive gets the finite loss of the d̄2_i it is given, and the
// caller gives it weight 0 and discards that loss), the gradient ((M + K) × D, queue rows
// included) of Σ_i w_i loss_i over the pairs the sweep holds (J_i, and P_i for infonce with
// ε > 0) and `pull` = w_i g A_i per anchor (g the gradient scale, 0 without a loss term): the
// weight of d̄2_i, whose gradient the caller adds from group sums
// (fastalpha.positives.add_positive_pull_). kernel<T>(const GroupedCall&).
#define FASTALPHA_GROUPED_OP_SCHEMA                                                                         \
  "alpha_cl_fused_grouped(Tensor z, Tensor? queue, int row_lo, int row_hi, Tensor? row_weight, "            \
  "Tensor row_ids, Tensor col_ids, Tensor self_col, Tensor d2_mean, Tensor negative_count, str rule, "      \
  "float temperature, float p, float gamma, float eps, bool detach_alpha, bool unit_rows, bool need_grad) " \
  "-> (Tensor, Tensor, Tensor)"

#define FASTALPHA_DEFINE_GROUPED_OP(entry, device, kernel)                                                   \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> entry(                                                      \
      const at::Tensor& z_in, const std::optional<at::Tensor>& queue, int64_t row_lo, int64_t row_hi,        \
      const std::optional<at::Tensor>& row_weight, const at::Tensor& row_ids, const at::Tensor& col_ids,     \
      const at::Tensor& self_col, const at::Tensor& d2_mean, const at::Tensor& negative_count,               \
      c10::string_view rule, double temperature, double p, double gamma, double eps, bool detach_alpha,      \
      bool unit_rows, bool need_grad) {                                                                      \
    const RuleConfig cfg = make_rule(std::string(rule.data(), rule.size()), temperature, p, gamma, eps,      \
                                     detach_alpha, unit_rows, "all");                                        \
    check_grouped_inputs(z_in, queue, row_lo, row_hi, row_weight, row_ids, col_ids, self_col, d2_mean,       \
                         negative_count, device);                                                            \
    const GroupedCall call{column_rows(z_in, queue),                                                         \
                           z_in.size(0),                                                                     \
                           row_lo,                                                                           \
                           row_hi,                                                                           \
                           row_weight.has_value() ? row_weight->contiguous() : at::Tensor(),                 \
                           row_ids.contiguous(),                                                             \
                           col_ids.contiguous(),                                                             \
                           self_col.contiguous(),                                                            \
                           d2_mean.contiguous(),                                                             \
                           negative_count.contiguous(),                                                      \
                           grouped_loop(cfg),                                                                \
                           need_grad};                                                                       \
    if (call.cols.scalar_type() == at::kDouble) return kernel<double>(call);                                 \
    return kernel<float>(call);                                                                              \
  }

#define FASTALPHA_REGISTER_FUSED_OPS(library, dispatch_key, entry, grouped_entry)              \
  TORCH_LIBRARY(library, m) {                                                                    \
    m.def(FASTALPHA_FUSED_OP_SCHEMA);                                                            \
    m.def(FASTALPHA_GROUPED_OP_SCHEMA);                                                          \
  }                                                                                              \
  TORCH_LIBRARY_IMPL(library, dispatch_key, m) {                                                 \
    m.impl("alpha_cl_fused", &fastalpha::entry);                                                 \
    m.impl("alpha_cl_fused_grouped", &fastalpha::grouped_entry);                                 \
  }

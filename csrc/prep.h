// Layout preparation shared by the CPU and CUDA entry points: kernels walk memory linearly, so
// they take dense tensors, and a gradient in the same memory layout as its input.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>

#include <optional>

#include "common/codes.h"

namespace dlk {

// x itself when it has no gaps or overlaps (any dim order, e.g. channels_last), else a dense copy
// in x's dim order (what empty_like gives, so the fake implementations agree on strides).
inline at::Tensor dense(const at::Tensor& x) {
  return x.is_non_overlapping_and_dense() ? x : at::empty_like(x).copy_(x);
}

// t laid out exactly like the dense tensor `ref`.
inline at::Tensor same_layout(const at::Tensor& t, const at::Tensor& ref) {
  return t.strides() == ref.strides() ? t : at::empty_like(ref).copy_(t);
}

// Memory of a dense tensor seen as [outer, C, inner] around dim 1, so a channel is
// (offset / inner) % C for every dim order; C = 1 when there is no dim 1 or one slope.
struct ChannelView {
  int64_t outer, channels, inner;
};

// Empty tensors (any size 0, C included) get an empty view, so no caller divides by C * inner.
inline ChannelView channel_view(const at::Tensor& xd, int64_t num_weights) {
  const int64_t n = xd.numel();
  if (num_weights == 1 || xd.dim() < 2) return {1, 1, n};
  if (n == 0) return {0, xd.size(1), 1};
  const int64_t c = xd.size(1);
  const int64_t inner = xd.stride(1);
  return {n / (c * inner), c, inner};
}

inline void check_float_dtype(const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16,
              "dlkernels: ", name, " must be float32, float64, float16 or bfloat16, got ", s);
}

inline void check_prelu_args(const at::Tensor& x, const at::Tensor& w) {
  check_float_dtype(x, "input");
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "prelu: Type promoting not supported. Got ",
              x.scalar_type(), " and ", w.scalar_type());
  TORCH_CHECK(w.device() == x.device(), "prelu: weight is on ", w.device(), " but input is on ",
              x.device());
  TORCH_CHECK(w.dim() <= 1, "prelu: Expected `weight` to be a scalar or 1D tensor, but got: ndim = ",
              w.dim());
  const int64_t channels = x.dim() > 1 ? x.size(1) : 1;
  TORCH_CHECK(w.numel() == 1 || w.numel() == channels,
              "Mismatch of parameter numbers and input channel size. Found parameter numbers = ",
              w.numel(), " and channel size = ", channels, ".");
}

// Per-channel tensors of batch norm: mean/invstd/sums in the compute type (float64 for
// float64 input, else float32); weight/bias/slopes in the compute type or the input's dtype.
inline at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_channel_tensor(const at::Tensor& t, const at::Tensor& x, const char* name,
                                 bool allow_one = false) {
  const int64_t c = x.size(1);
  TORCH_CHECK(t.device() == x.device(), "dlkernels batch_norm: ", name, " is on ", t.device(),
              " but input is on ", x.device());
  TORCH_CHECK(t.numel() == c || (allow_one && t.numel() == 1), "dlkernels batch_norm: ", name,
              " must have ", c, " elements (one per channel), got ", t.numel());
  TORCH_CHECK(t.scalar_type() == acc_type(x) || t.scalar_type() == x.scalar_type(),
              "dlkernels batch_norm: ", name, " must be ", acc_type(x), " or ", x.scalar_type(),
              ", got ", t.scalar_type());
}

// Checks of the batch norm kernels' arguments (never a crash on bad sizes or dtypes).
inline void check_batch_norm_params(const at::Tensor& x, const std::optional<at::Tensor>& w,
                                    const std::optional<at::Tensor>& b,
                                    const std::optional<at::Tensor>& prelu_w, int64_t act) {
  check_float_dtype(x, "input");
  TORCH_CHECK(x.dim() >= 2, "dlkernels batch_norm: input must have a channel dim 1, got ", x.dim(),
              "-d input");
  if (w) check_channel_tensor(*w, x, "weight");
  if (b) check_channel_tensor(*b, x, "bias");
  TORCH_CHECK(act >= kActNone && act <= kActPrelu, "dlkernels batch_norm: unknown activation code ", act);
  TORCH_CHECK(act != kActPrelu || prelu_w.has_value(), "dlkernels batch_norm: prelu needs prelu_weight");
  if (act == kActPrelu) check_channel_tensor(*prelu_w, x, "prelu_weight", /*allow_one=*/true);
}

inline void check_batch_norm_args(const at::Tensor& x, const at::Tensor& mean,
                                  const at::Tensor& invstd, const std::optional<at::Tensor>& w,
                                  const std::optional<at::Tensor>& b,
                                  const std::optional<at::Tensor>& prelu_w, int64_t act) {
  check_batch_norm_params(x, w, b, prelu_w, act);
  check_channel_tensor(mean, x, "mean");
  check_channel_tensor(invstd, x, "invstd");
}

// A per-channel tensor (or its default when absent) as a contiguous compute-type [C] tensor.
inline at::Tensor channel_values(const std::optional<at::Tensor>& t, const at::Tensor& x,
                                 double fill) {
  const int64_t c = x.size(1);
  if (!t) return at::full({c}, fill, x.options().dtype(acc_type(x)));
  at::Tensor v = t->to(acc_type(x)).contiguous();
  return v.numel() == c ? v : v.reshape({1}).expand({c}).contiguous();
}

}  // namespace dlk

// Layout preparation shared by the CPU and CUDA entry points: kernels walk memory linearly, so
// they take dense tensors, and a gradient in the same memory layout as its input.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

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

inline ChannelView channel_view(const at::Tensor& xd, int64_t num_weights) {
  const int64_t n = xd.numel();
  if (num_weights == 1 || xd.dim() < 2) return {1, 1, n};
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

}  // namespace dlk

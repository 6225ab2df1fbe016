// Layout preparation shared by the CPU and CUDA entry points: kernels walk memory linearly, so
// they take dense tensors, and a gradient in the same memory layout as its input.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "common/codes.h"
#include "common/philox.h"

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

// ---- dropout (docs/dropout.md) ----

inline void check_dropout_p(double p) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "dlkernels dropout kernels: p must be in [0, 1), got ", p,
              " (p == 1 is handled by the caller)");
}

inline void check_per_channel(const at::Tensor& x, bool per_channel) {
  TORCH_CHECK(!per_channel || x.dim() >= 2,
              "dlkernels dropout: per-channel dropout needs an input of at least 2 dims (N, C, ...), got ",
              x.dim(), "-d input");
}

inline void check_grad_like(const at::Tensor& grad, const at::Tensor& x, const char* op) {
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(), op,
              ": grad must match input in shape and dtype, got ", grad.sizes(), " ",
              grad.scalar_type(), " and ", x.sizes(), " ", x.scalar_type());
}

// The IndexMap (common/philox.h) of the dense tensor xd: dims of size > 1 sorted by stride,
// outermost first, merged while the outer dim's weight is the inner one's times its size, then
// stored innermost first. ndim > kIndexMapMaxDims when it has more coalesced dims than that.
inline IndexMap make_index_map(const at::Tensor& xd, bool per_channel) {
  struct Dim {
    int64_t stride, size, weight;
  };
  const int64_t nd = xd.dim();
  std::vector<Dim> dims;
  int64_t row_major = 1;  // the row-major stride of dim d in xd's shape
  for (int64_t d = nd - 1; d >= 0; --d) {
    const int64_t w = per_channel ? (d == 0 ? xd.size(1) : d == 1 ? 1 : 0) : row_major;
    if (xd.size(d) != 1) dims.push_back({xd.stride(d), xd.size(d), w});
    row_major *= xd.size(d);
  }
  std::stable_sort(dims.begin(), dims.end(), [](const Dim& a, const Dim& b) { return a.stride > b.stride; });
  std::vector<Dim> merged;  // outermost first
  for (const Dim& d : dims) {
    if (!merged.empty() && merged.back().weight == d.weight * d.size) {
      merged.back().size *= d.size;
      merged.back().weight = d.weight;
    } else {
      merged.push_back(d);
    }
  }
  IndexMap map{};
  map.ndim = static_cast<int>(merged.size());
  for (int d = 0; d < map.ndim && d < kIndexMapMaxDims; ++d) {
    map.size[d] = merged[merged.size() - 1 - d].size;
    map.weight[d] = merged[merged.size() - 1 - d].weight;
  }
  return map;
}

}  // namespace dlk

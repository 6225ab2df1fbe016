// contrast_norm family: global contrast normalization, forward and backward (see
// dlkernels/reference/contrast_norm.py for the contract). Declared for each backend namespace:
// dlk::cpu (csrc/cpu/contrast_norm.cpp) and, in a CUDA build, dlk::cuda (csrc/cuda/contrast_norm*);
// bound to Python in csrc/bind/contrast_norm.cpp.
#pragma once
#include <ATen/ops/empty_like.h>

#include <string>

#include "../common/contrast_norm.h"
#include "declare.h"

#define DLK_CONTRAST_NORM_API                                                                         \
  std::tuple<at::Tensor, at::Tensor> global_contrast_norm(const at::Tensor& x, double scale, double lam, \
                                                          double eps, const std::string& style,          \
                                                          bool subtract_mean);                           \
  at::Tensor global_contrast_norm_backward(const at::Tensor& grad, const at::Tensor& x,                  \
                                           const at::Tensor& stats, bool subtract_mean);

DLK_DECLARE_API(DLK_CONTRAST_NORM_API)

// Argument handling shared by the CPU and CUDA entry points.
namespace dlk::gcn {

inline int style_code(const std::string& s) {
  if (s == "book") return kGcnBook;
  if (s == "pylearn2_std") return kGcnPylearn2Std;
  if (s == "pylearn2_l2") return kGcnPylearn2L2;
  TORCH_CHECK(false, "global_contrast_norm: unknown style '", s,
              "' (expected 'book', 'pylearn2_std' or 'pylearn2_l2')");
}

// Each example x[i] one dense block of memory (dim 0 outermost): the kernels walk it linearly.
inline bool blocked(const at::Tensor& x) {
  if (x.dim() == 0 || !x.is_non_overlapping_and_dense()) return false;
  const int64_t n = x.size(0);
  return n <= 1 || x.numel() == 0 || x.stride(0) == x.numel() / n;
}

// x itself when blocked, else a contiguous copy (what the fake implementation assumes).
inline at::Tensor prepare(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1, "global_contrast_norm: input must have a batch dim, got a 0-d tensor");
  const auto s = x.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16,
              "global_contrast_norm: input must be float32, float64, float16 or bfloat16, got ", s);
  return blocked(x) ? x : x.contiguous();
}

// grad laid out exactly like the prepared x.
inline at::Tensor like(const at::Tensor& t, const at::Tensor& ref) {
  return t.strides() == ref.strides() ? t : at::empty_like(ref).copy_(t);
}

inline void check_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& stats) {
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(),
              "global_contrast_norm_backward: grad_output must match input in shape and dtype");
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == x.size(0) && stats.size(1) == 4 &&
                  stats.scalar_type() == acc && stats.device() == x.device(),
              "global_contrast_norm_backward: stats must be [", x.size(0), ", 4] of ", acc, " on ",
              x.device());
}

}  // namespace dlk::gcn

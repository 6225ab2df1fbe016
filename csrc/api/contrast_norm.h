// contrast_norm family: global and local contrast normalization, forward and backward (see
// dlkernels/reference/contrast_norm.py for the contract). Declared for each backend namespace:
// dlk::cpu (csrc/cpu/contrast_norm.cpp) and, in a CUDA build, dlk::cuda (csrc/cuda/contrast_norm*);
// bound to Python in csrc/bind/contrast_norm.cpp.
#pragma once
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "../common/contrast_norm.h"
#include "declare.h"

#define DLK_CONTRAST_NORM_API                                                                         \
  std::tuple<at::Tensor, at::Tensor> global_contrast_norm(const at::Tensor& x, double scale, double lam, \
                                                          double eps, const std::string& style,          \
                                                          bool subtract_mean);                           \
  at::Tensor global_contrast_norm_backward(const at::Tensor& grad, const at::Tensor& x,                  \
                                           const at::Tensor& stats, bool subtract_mean);          \
  at::Tensor local_contrast_norm(const at::Tensor& x, int64_t kernel_size, double sigma, double eps,     \
                                 const std::string& divisor, bool across_channels);                     \
  at::Tensor local_contrast_norm_backward(const at::Tensor& grad, const at::Tensor& x, int64_t kernel_size, \
                                          double sigma, double eps, const std::string& divisor,            \
                                          bool across_channels);

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

// Argument handling and window weights of local contrast normalization, shared by the CPU and
// CUDA entry points (the same formulas as dlkernels/reference/contrast_norm.py).
namespace dlk::lcn {

inline int divisor_code(const std::string& d) {
  if (d == "local") return kLcnDivisorLocal;
  if (d == "lecun") return kLcnDivisorLecun;
  TORCH_CHECK(false, "local_contrast_norm: unknown divisor '", d, "' (expected 'local' or 'lecun')");
}

inline void check_args(int64_t kernel_size, double sigma, double eps) {
  TORCH_CHECK(kernel_size >= 1 && kernel_size % 2 == 1, "local_contrast_norm: kernel_size must be odd and >= 1, got ",
              kernel_size);
  TORCH_CHECK(std::isfinite(sigma) && sigma >= 0, "local_contrast_norm: sigma must be finite and >= 0, got ", sigma);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "local_contrast_norm: eps must be finite and >= 0, got ", eps);
}

// x itself when contiguous (NCHW) or channels_last (NHWC, then *nhwc = true), else a contiguous copy.
inline at::Tensor prepare(const at::Tensor& x, bool* nhwc) {
  TORCH_CHECK(x.dim() == 4, "local_contrast_norm: input must be 4-d (N, C, H, W), got ", x.dim(), "-d");
  const auto s = x.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16,
              "local_contrast_norm: input must be float32, float64, float16 or bfloat16, got ", s);
  *nhwc = false;
  if (x.is_contiguous()) return x;
  if (x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    *nhwc = true;
    return x;
  }
  return x.contiguous();
}

inline void check_backward(const at::Tensor& grad, const at::Tensor& x) {
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(),
              "local_contrast_norm_backward: grad_output must match input in shape and dtype");
}

// The 1-D window along an axis of `size`: exp(-0.5 (k / sigma)^2) for |k| <= min(r, size - 1)
// (taps further out only meet zero padding), normalized to sum 1; sigma = 0: one tap.
inline std::vector<double> window(int64_t kernel_size, double sigma, int64_t size) {
  const int64_t r = std::min<int64_t>(kernel_size / 2, std::max<int64_t>(size - 1, 0));
  std::vector<double> w(2 * r + 1);
  double total = 0;
  for (int64_t k = -r; k <= r; ++k) {
    const double q = sigma == 0 ? (k == 0 ? 0.0 : INFINITY) : double(k) / sigma;
    w[k + r] = std::exp(-0.5 * q * q);
    total += w[k + r];
  }
  for (double& v : w) v /= total;
  return w;
}

// 1 / z(i) for i in [0, size): z(i) = the window's weight inside the axis at i (the renormalization
// of the zero-padded border, Z(i, j) = zr(i) zc(j)); exactly 1 where the window is whole.
inline std::vector<double> inv_norm(const std::vector<double>& w, int64_t size) {
  const int64_t r = int64_t(w.size()) / 2;
  std::vector<double> out(size, 1.0);
  for (int64_t i = 0; i < size; ++i) {
    if (i >= r && i + r < size) continue;
    double z = 0;
    for (int64_t k = -r; k <= r; ++k)
      if (i + k >= 0 && i + k < size) z += w[k + r];
    out[i] = 1.0 / z;
  }
  return out;
}

}  // namespace dlk::lcn

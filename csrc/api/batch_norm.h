// Batch norm fused with an activation. act: see csrc/common/batch_norm.h; weight/bias/prelu_weight
// are optional (1, 0, unused). p, seed: dropout after the activation (docs/dropout.md; p == 0:
// none, else 0 < p < 1): the forward multiplies y (rounded to x's dtype) by the mask of its
// logical index, the backward passes regenerate it and take grad * mask as dL/dy.
// Declared for each backend namespace: dlk::cpu (csrc/cpu/batch_norm.cpp) and, in a CUDA build,
// dlk::cuda (csrc/cuda/batch_norm*); bound to Python in csrc/bind/batch_norm.cpp.
#pragma once
#include "declare.h"

#define DLK_BATCH_NORM_API                                                                        \
  std::tuple<at::Tensor, at::Tensor> batch_norm_stats(const at::Tensor& x);                       \
  at::Tensor batch_norm_act_forward(const at::Tensor& x, const at::Tensor& mean,                 \
                                    const at::Tensor& invstd, const std::optional<at::Tensor>& w, \
                                    const std::optional<at::Tensor>& b,                           \
                                    const std::optional<at::Tensor>& prelu_w, int64_t act,        \
                                    double slope, double p, int64_t seed);                        \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_backward_reduce(                  \
      const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean,                        \
      const at::Tensor& invstd, const std::optional<at::Tensor>& w,                               \
      const std::optional<at::Tensor>& b, const std::optional<at::Tensor>& prelu_w, int64_t act,  \
      double slope, double p, int64_t seed);                                                      \
  at::Tensor batch_norm_act_backward_elemt(                                                       \
      const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean,                        \
      const at::Tensor& invstd, const std::optional<at::Tensor>& w,                               \
      const std::optional<at::Tensor>& b, const std::optional<at::Tensor>& prelu_w,               \
      const at::Tensor& sum_dz, const at::Tensor& sum_dz_xhat, int64_t count, int64_t act,        \
      double slope, double p, int64_t seed);                                                      \
  /* eval: the forward with invstd = rsqrt(running_var + eps) taken in the compute type, as torch */ \
  at::Tensor batch_norm_act_eval(const at::Tensor& x, const at::Tensor& running_mean,             \
                                 const at::Tensor& running_var, const std::optional<at::Tensor>& w, \
                                 const std::optional<at::Tensor>& b,                              \
                                 const std::optional<at::Tensor>& prelu_w, double eps,            \
                                 int64_t act, double slope);                                      \
  /* the training forward and the backward, whole: (y, mean, invstd, var), */                     \
  /* (grad_input, sum_dz, sum_dz_xhat, grad_prelu) */                                             \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_act_train(                \
      const at::Tensor& x, const std::optional<at::Tensor>& w, const std::optional<at::Tensor>& b, \
      const std::optional<at::Tensor>& prelu_w, double eps, int64_t act, double slope, double p,  \
      int64_t seed);                                                                              \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_act_backward(             \
      const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean,                        \
      const at::Tensor& invstd, const std::optional<at::Tensor>& w,                               \
      const std::optional<at::Tensor>& b, const std::optional<at::Tensor>& prelu_w, int64_t act,  \
      double slope, bool training, double p, int64_t seed);

DLK_DECLARE_API(DLK_BATCH_NORM_API)

namespace dlk::cpu {
// running = momentum * batch + (1 - momentum) * running, in float64 as torch's CPU batch norm
// (the variance unbiased: var * count / (count - 1)), in place on contiguous float32/float64 [C]
// buffers, their version counters bumped as an in-place op would.
void batch_norm_update_stats_(const at::Tensor& running_mean, const at::Tensor& running_var, const at::Tensor& mean,
                              const at::Tensor& var, int64_t count, double momentum);
}  // namespace dlk::cpu

// Tensor-level entry points of each backend, one section per family; bindings.cpp exposes them
// as dlkernels._C.cpu.* and dlkernels._C.cuda.* with the same names.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#define DLK_ACTIVATION_API                                                                     \
  at::Tensor leaky_relu(const at::Tensor& x, double slope);                                     \
  void leaky_relu_(at::Tensor& x, double slope);                                                \
  at::Tensor leaky_relu_backward(const at::Tensor& grad, const at::Tensor& x, double slope);   \
  at::Tensor prelu(const at::Tensor& x, const at::Tensor& weight);                              \
  std::tuple<at::Tensor, at::Tensor> prelu_backward(const at::Tensor& grad, const at::Tensor& x, \
                                                    const at::Tensor& weight);

// act: see csrc/common/batch_norm.h; weight/bias/prelu_weight are optional (1, 0, unused).
#define DLK_BATCH_NORM_API                                                                        \
  std::tuple<at::Tensor, at::Tensor> batch_norm_stats(const at::Tensor& x);                       \
  at::Tensor batch_norm_act_forward(const at::Tensor& x, const at::Tensor& mean,                 \
                                    const at::Tensor& invstd, const std::optional<at::Tensor>& w, \
                                    const std::optional<at::Tensor>& b,                           \
                                    const std::optional<at::Tensor>& prelu_w, int64_t act,        \
                                    double slope);                                                \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_backward_reduce(                  \
      const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean,                        \
      const at::Tensor& invstd, const std::optional<at::Tensor>& w,                               \
      const std::optional<at::Tensor>& b, const std::optional<at::Tensor>& prelu_w, int64_t act,  \
      double slope);                                                                              \
  at::Tensor batch_norm_act_backward_elemt(                                                       \
      const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean,                        \
      const at::Tensor& invstd, const std::optional<at::Tensor>& w,                               \
      const std::optional<at::Tensor>& b, const std::optional<at::Tensor>& prelu_w,               \
      const at::Tensor& sum_dz, const at::Tensor& sum_dz_xhat, int64_t count, int64_t act,        \
      double slope);

namespace dlk::cpu {
DLK_ACTIVATION_API
DLK_BATCH_NORM_API
const char* simd_path();
}  // namespace dlk::cpu

#ifdef DLK_WITH_CUDA
namespace dlk::cuda {
DLK_ACTIVATION_API
DLK_BATCH_NORM_API
}  // namespace dlk::cuda
#endif

// Tensor-level entry points of each backend, one section per family; bindings.cpp exposes them
// as dlkernels._C.cpu.* and dlkernels._C.cuda.* with the same names.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

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
      double slope);                                                                              \
  /* the training forward and the backward, whole: (y, mean, invstd, var), */                     \
  /* (grad_input, sum_dz, sum_dz_xhat, grad_prelu) */                                             \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_act_train(                \
      const at::Tensor& x, const std::optional<at::Tensor>& w, const std::optional<at::Tensor>& b, \
      const std::optional<at::Tensor>& prelu_w, double eps, int64_t act, double slope);           \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_act_backward(             \
      const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean,                        \
      const at::Tensor& invstd, const std::optional<at::Tensor>& w,                               \
      const std::optional<at::Tensor>& b, const std::optional<at::Tensor>& prelu_w, int64_t act,  \
      double slope, bool training);

// Fused optimizer steps over lists of tensors (one group: same device, param and state dtypes).
#define DLK_OPTIM_API                                                                            \
  at::Tensor grad_norm(const std::vector<at::Tensor>& grads, double norm_type, double clip_value, \
                       const std::optional<at::Tensor>& grad_scale);                              \
  void adam_step_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& exp_avgs, \
                  const std::vector<at::Tensor>& exp_avg_sqs,                                     \
                  const std::vector<at::Tensor>& max_exp_avg_sqs,                                 \
                  const std::vector<at::Tensor>& steps, const std::vector<at::Tensor>& grads,     \
                  const std::optional<at::Tensor>& grad_scale,                                    \
                  const std::optional<at::Tensor>& clip_coef,                                     \
                  const std::optional<at::Tensor>& skip, double clip_value, double lr,            \
                  double beta1, double beta2, double eps, double weight_decay, bool amsgrad,      \
                  bool maximize, bool decoupled_weight_decay);                                    \
  void rmsprop_step_(const std::vector<at::Tensor>& params,                                       \
                     const std::vector<at::Tensor>& square_avgs,                                  \
                     const std::vector<at::Tensor>& grad_avgs,                                    \
                     const std::vector<at::Tensor>& momentum_buffers,                             \
                     const std::vector<at::Tensor>& steps, const std::vector<at::Tensor>& grads,  \
                     const std::optional<at::Tensor>& grad_scale,                                 \
                     const std::optional<at::Tensor>& clip_coef,                                  \
                     const std::optional<at::Tensor>& skip, double clip_value, double lr,         \
                     double alpha, double eps, double weight_decay, double momentum,              \
                     bool centered, bool maximize);

namespace dlk::cpu {
DLK_ACTIVATION_API
DLK_BATCH_NORM_API
DLK_OPTIM_API
}  // namespace dlk::cpu

#ifdef DLK_WITH_CUDA
namespace dlk::cuda {
DLK_ACTIVATION_API
DLK_BATCH_NORM_API
DLK_OPTIM_API
}  // namespace dlk::cuda
#endif

// Fused optimizer steps over lists of tensors (one group: same device, param and state dtypes).
// Declared for each backend namespace: dlk::cpu (csrc/cpu/optim.cpp) and, in a CUDA build,
// dlk::cuda (csrc/cuda/optim*); bound to Python in csrc/bind/optim.cpp.
#pragma once
#include "declare.h"

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

DLK_DECLARE_API(DLK_OPTIM_API)

// Activation family: leaky ReLU (functional, in place) and PReLU, forward and backward.
// Declared for each backend namespace: dlk::cpu (csrc/cpu/activation.cpp) and, in a CUDA build,
// dlk::cuda (csrc/cuda/activation*); bound to Python in csrc/bind/activation.cpp.
#pragma once
#include "declare.h"

#define DLK_ACTIVATION_API                                                                     \
  at::Tensor leaky_relu(const at::Tensor& x, double slope);                                     \
  void leaky_relu_(at::Tensor& x, double slope);                                                \
  at::Tensor leaky_relu_backward(const at::Tensor& grad, const at::Tensor& x, double slope);   \
  at::Tensor prelu(const at::Tensor& x, const at::Tensor& weight);                              \
  std::tuple<at::Tensor, at::Tensor> prelu_backward(const at::Tensor& grad, const at::Tensor& x, \
                                                    const at::Tensor& weight);

DLK_DECLARE_API(DLK_ACTIVATION_API)

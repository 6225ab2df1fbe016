// Tensor-level entry points of each backend, one section per family; bindings.cpp exposes them
// as dlkernels._C.cpu.* and dlkernels._C.cuda.* with the same names.
#pragma once
#include <ATen/core/Tensor.h>

#include <tuple>

#define DLK_ACTIVATION_API                                                                     \
  at::Tensor leaky_relu(const at::Tensor& x, double slope);                                     \
  void leaky_relu_(at::Tensor& x, double slope);                                                \
  at::Tensor leaky_relu_backward(const at::Tensor& grad, const at::Tensor& x, double slope);   \
  at::Tensor prelu(const at::Tensor& x, const at::Tensor& weight);                              \
  std::tuple<at::Tensor, at::Tensor> prelu_backward(const at::Tensor& grad, const at::Tensor& x, \
                                                    const at::Tensor& weight);

namespace dlk::cpu {
DLK_ACTIVATION_API
const char* simd_path();
}  // namespace dlk::cpu

#ifdef DLK_WITH_CUDA
namespace dlk::cuda {
DLK_ACTIVATION_API
}  // namespace dlk::cuda
#endif

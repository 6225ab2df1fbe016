// Per-element leaky ReLU / PReLU math, used by the CPU kernels and the CUDA kernels alike.
// T is the compute type (float for fp32/fp16/bf16 storage, double for fp64).
#pragma once
#include "macros.h"

namespace dlk {

// torch's definition: x > 0 ? x : x * slope (NaN propagates through the product).
template <typename T>
DLK_HD T leaky_relu_fwd(T x, T slope) {
  return x > T(0) ? x : x * slope;
}

// d/dx at x == 0 is taken as slope, as in torch.
template <typename T>
DLK_HD T leaky_relu_bwd(T grad, T x, T slope) {
  return x > T(0) ? grad : grad * slope;
}

// PReLU's slope gradient for one element: d(out)/d(slope) * grad.
template <typename T>
DLK_HD T prelu_weight_grad(T grad, T x) {
  return x > T(0) ? T(0) : x * grad;
}

}  // namespace dlk

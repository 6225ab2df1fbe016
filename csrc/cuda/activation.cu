// CUDA leaky ReLU / PReLU. The per-element math is csrc/common/activation.h, shared with the
// CPU kernels; storage may be fp16/bf16, compute is float (double for fp64).
#include "../common/activation.h"
#include "activation.cuh"
#include "common.cuh"

namespace dlk::cuda {
namespace {

template <typename T>
__global__ void leaky_fwd_kernel(const T* __restrict__ x, T* y, int64_t n, compute_t<T> slope) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    st(y, i, leaky_relu_fwd(ld(x, i), slope));
}

template <typename T>
__global__ void leaky_bwd_kernel(const T* __restrict__ g, const T* __restrict__ x,
                                 T* __restrict__ gi, int64_t n, compute_t<T> slope) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    st(gi, i, leaky_relu_bwd(ld(g, i), ld(x, i), slope));
}

template <typename T>
__global__ void prelu_fwd_kernel(const T* __restrict__ x, const T* __restrict__ w,
                                 T* __restrict__ y, int64_t n, int64_t C, int64_t inner) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    st(y, i, leaky_relu_fwd(ld(x, i), ld(w, (i / inner) % C)));
}

// Grid (split, C): block (s, c) walks every split-th slice of channel c's outer*inner positions,
// writes grad_input and one partial slope gradient. No atomics: results are deterministic.
template <typename T>
__global__ void prelu_bwd_kernel(const T* __restrict__ g, const T* __restrict__ x,
                                 const T* __restrict__ w, T* __restrict__ gi,
                                 compute_t<T>* __restrict__ partials, int64_t outer, int64_t C,
                                 int64_t inner) {
  using A = compute_t<T>;
  const int64_t c = blockIdx.y;
  const A slope = ld(w, c);
  const int64_t per_channel = outer * inner;
  A acc = 0;
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < per_channel;
       k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = (k / inner) * C * inner + c * inner + k % inner;
    const A gv = ld(g, i), xv = ld(x, i);
    st(gi, i, leaky_relu_bwd(gv, xv, slope));
    acc += prelu_weight_grad(gv, xv);
  }
  block_sum_to(acc, partials + c * gridDim.x + blockIdx.x);
}

}  // namespace

void launch_leaky_relu_fwd(DType t, const void* x, void* y, int64_t n, double slope,
                           cudaStream_t s) {
  if (n == 0) return;
  dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    leaky_fwd_kernel<T><<<elementwise_blocks(n), kElementwiseThreads, 0, s>>>(
        static_cast<const T*>(x), static_cast<T*>(y), n, compute_t<T>(slope));
  });
}

void launch_leaky_relu_bwd(DType t, const void* g, const void* x, void* gi, int64_t n,
                           double slope, cudaStream_t s) {
  if (n == 0) return;
  dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    leaky_bwd_kernel<T><<<elementwise_blocks(n), kElementwiseThreads, 0, s>>>(
        static_cast<const T*>(g), static_cast<const T*>(x), static_cast<T*>(gi), n,
        compute_t<T>(slope));
  });
}

void launch_prelu_fwd(DType t, const void* x, const void* w, void* y, int64_t outer, int64_t C,
                      int64_t inner, cudaStream_t s) {
  const int64_t n = outer * C * inner;
  if (n == 0) return;
  dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    prelu_fwd_kernel<T><<<elementwise_blocks(n), kElementwiseThreads, 0, s>>>(
        static_cast<const T*>(x), static_cast<const T*>(w), static_cast<T*>(y), n, C, inner);
  });
}

void launch_prelu_bwd(DType t, const void* g, const void* x, const void* w, void* gi,
                      void* partials, int64_t outer, int64_t C, int64_t inner, int split,
                      cudaStream_t s) {
  if (outer * C * inner == 0) return;
  dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    prelu_bwd_kernel<T><<<dim3(split, C), kElementwiseThreads, 0, s>>>(
        static_cast<const T*>(g), static_cast<const T*>(x), static_cast<const T*>(w),
        static_cast<T*>(gi), static_cast<compute_t<T>*>(partials), outer, C, inner);
  });
}

}  // namespace dlk::cuda

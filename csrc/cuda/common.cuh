// Shared by the CUDA kernels of every family: the storage dtypes a launcher takes, and (under
// nvcc) the compute type and explicit conversions of each. No torch headers.
#pragma once

namespace dlk::cuda {

enum class DType : int { f32, f64, f16, bf16 };

}  // namespace dlk::cuda

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

namespace dlk::cuda {

// fp16/bf16/fp32 storage computes in float, fp64 in double.
template <typename T> struct Compute { using type = float; };
template <> struct Compute<double> { using type = double; };
template <typename T> using compute_t = typename Compute<T>::type;

// Explicit conversions (torch's nvcc flags disable the implicit __half/__nv_bfloat16 ones): to
// and from any compute type C (float or double), and to/from each storage type's own compute type.
template <typename C> __device__ __forceinline__ C to_c(float v) { return C(v); }
template <typename C> __device__ __forceinline__ C to_c(double v) { return C(v); }
template <typename C> __device__ __forceinline__ C to_c(__half v) { return C(__half2float(v)); }
template <typename C> __device__ __forceinline__ C to_c(__nv_bfloat16 v) { return C(__bfloat162float(v)); }
template <typename T, typename C> __device__ __forceinline__ T from_c(C v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(float(v));
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(float(v));
  } else {
    return T(v);
  }
}
template <typename T> __device__ __forceinline__ compute_t<T> to_compute(T v) { return to_c<compute_t<T>>(v); }
template <typename T> __device__ __forceinline__ T from_compute(compute_t<T> v) { return from_c<T>(v); }

// Element i of storage p as the compute type, and back.
template <typename T> __device__ __forceinline__ compute_t<T> ld(const T* p, int64_t i) {
  return to_compute(p[i]);
}
template <typename T> __device__ __forceinline__ void st(T* p, int64_t i, compute_t<T> v) {
  p[i] = from_compute<T>(v);
}

// Launch shape of the elementwise grid-stride kernels (activation, dropout).
constexpr int kElementwiseThreads = 256;

inline int elementwise_blocks(int64_t n) {
  const int64_t b = (n + kElementwiseThreads - 1) / kElementwiseThreads;
  return static_cast<int>(b < 65535 * 8 ? b : 65535 * 8);  // grid-stride loops cover the rest
}

// The sum of every thread's acc in a block of kElementwiseThreads threads, written by thread 0 to
// *out (a fixed tree order: deterministic). Every thread of the block must call it.
template <typename A>
__device__ __forceinline__ void block_sum_to(A acc, A* out) {
  __shared__ A smem[kElementwiseThreads];
  smem[threadIdx.x] = acc;
  __syncthreads();
  for (int stride = kElementwiseThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) smem[threadIdx.x] += smem[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) *out = smem[0];
}

// Calls f with a value of the storage type named by t.
template <typename F>
void dispatch(DType t, F&& f) {
  switch (t) {
    case DType::f32: return f(float{});
    case DType::f64: return f(double{});
    case DType::f16: return f(__half{});
    case DType::bf16: return f(__nv_bfloat16{});
  }
}

}  // namespace dlk::cuda
#endif

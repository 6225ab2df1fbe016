// What every CUDA binding (.cpp, compiled by the host compiler with torch headers) needs:
// device/dtype checks, the current stream, and the launch error check.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>

#include "common.cuh"

namespace dlk::cuda {

inline DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::f32;
    case at::kDouble: return DType::f64;
    case at::kHalf: return DType::f16;
    case at::kBFloat16: return DType::bf16;
    default: TORCH_CHECK(false, "dlkernels cuda backend: unsupported dtype ", t.scalar_type());
  }
}

inline void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "dlkernels cuda backend: ", name, " must be a CUDA tensor, got ", t.device());
}

inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline void check_launch() {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "dlkernels cuda kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace dlk::cuda

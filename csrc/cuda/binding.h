// What every CUDA binding (.cpp, compiled by the host compiler with torch headers) needs:
// device/dtype checks, the current stream, and the launch error check.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "../prep.h"
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

// PReLU backward's per-(channel, block) partial sums of the slope gradient: enough blocks per
// channel to fill the GPU, but each with a long stretch of work. `op` names the caller's errors.
struct PreluPartials {
  int split;           // blocks per channel
  at::Tensor partials; // [C, split], zeros, in the accumulation type
};

inline PreluPartials prelu_partials(const at::Tensor& x, const ChannelView& v, const char* op) {
  TORCH_CHECK(v.channels <= 65535, "dlkernels cuda ", op, ": at most 65535 channels, got ", v.channels);
  const int64_t per_channel = v.outer * v.inner;
  const int split = static_cast<int>(
      std::clamp<int64_t>(per_channel / (256 * 16), 1, std::max<int64_t>(1, 1024 / v.channels)));
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return {split, at::zeros({v.channels, split}, x.options().dtype(acc))};
}

}  // namespace dlk::cuda

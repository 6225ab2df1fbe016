// Raw launchers of the CUDA activation kernels: pointers, sizes and a stream, no torch headers
// (they would triple the nvcc time and pull in headers this toolkit lacks).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "common.cuh"

namespace dlk::cuda {

void launch_leaky_relu_fwd(DType t, const void* x, void* y, int64_t n, double slope,
                           cudaStream_t s);
void launch_leaky_relu_bwd(DType t, const void* g, const void* x, void* gi, int64_t n,
                           double slope, cudaStream_t s);
// Memory seen as [outer, C, inner] (see prep.h); one slope per channel (C may be 1).
void launch_prelu_fwd(DType t, const void* x, const void* w, void* y, int64_t outer, int64_t C,
                      int64_t inner, cudaStream_t s);
// partials: [C, split] of float (double for f64), summed by the caller.
void launch_prelu_bwd(DType t, const void* g, const void* x, const void* w, void* gi,
                      void* partials, int64_t outer, int64_t C, int64_t inner, int split,
                      cudaStream_t s);

}  // namespace dlk::cuda

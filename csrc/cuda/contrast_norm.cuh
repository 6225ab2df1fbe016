// Raw launchers of the CUDA global contrast normalization kernels: pointers, sizes and a stream,
// no torch headers. x is (n, m) in memory (example i = the dense block [i * m, (i + 1) * m)).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "common.cuh"

namespace dlk::cuda {

// stats: [n, 4] (a, inv, w, b) of float (double for f64); part: [n, split, 3] of the same type.
void launch_gcn_forward(DType t, const void* x, void* y, void* stats, void* part, int64_t n, int64_t m,
                        int split, int style, double scale, double lam, double eps, bool subtract_mean,
                        cudaStream_t s);
// part: [n, split, 2] of the stats type.
void launch_gcn_backward(DType t, const void* g, const void* x, const void* stats, void* gi, void* part,
                         int64_t n, int64_t m, int split, bool subtract_mean, cudaStream_t s);

}  // namespace dlk::cuda

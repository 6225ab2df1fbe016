// Raw launchers of the CUDA optimizer kernels: multi-tensor kernels driven by a device-side
// table of pointers and sizes (one launch per (device, dtype) group, not one per tensor). No
// torch headers here: the binding (optim_binding.cpp) builds and uploads the table.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "common.cuh"

namespace dlk::cuda {


// Elements per block of the multi-tensor kernels: a tensor of n elements takes
// ceil(n / kOptimChunk) consecutive blocks, starting at block `first_chunk`.
constexpr int64_t kOptimChunk = 16384;

struct OptimTensor {
  void* p;         // param (updated in place); grad_norm: the gradient
  const void* g;   // gradient
  void* s0;        // Adam: exp_avg       RMSprop: square_avg
  void* s1;        // Adam: exp_avg_sq    RMSprop: grad_avg (centered) or null
  void* s2;        // Adam: max_exp_avg_sq (amsgrad) or null; RMSprop: momentum_buffer or null
  float* step;     // this tensor's step counter (float32, on the device)
  int64_t n;
  int64_t first_chunk;
};

// Scalars on the device, each may be null: GradScaler's scale, the norm clip coefficient, the
// skip flag (nonzero: leave everything, steps included, untouched).
struct DeviceScalars {
  const float* grad_scale;
  const float* clip_coef;
  const float* skip;
};

struct AdamArgs {
  double lr, beta1, beta2, eps, weight_decay, clip_value;
  int wd_mode;  // 0 none, 1 L2, 2 decoupled (csrc/common/optim.h)
  bool amsgrad, maximize;
};

struct RMSpropArgs {
  double lr, alpha, eps, weight_decay, momentum, clip_value;
  bool centered, maximize;
};

// `table` is a device array of `count` entries; `chunks` the total number of blocks.
void launch_adam(DType param, DType state, const OptimTensor* table, int count, int64_t chunks,
                 const AdamArgs& a, DeviceScalars s, cudaStream_t stream);
void launch_rmsprop(DType param, DType state, const OptimTensor* table, int count,
                    int64_t chunks, const RMSpropArgs& a, DeviceScalars s, cudaStream_t stream);

// Norm partials of one dtype group into partials[0, chunks); kind: 0 L2, 1 L1, 2 inf, 3 general.
void launch_norm_partials(DType grad, const OptimTensor* table, int count, int64_t chunks, int kind,
                          double norm_type, double clip_value, const float* grad_scale,
                          double* partials, cudaStream_t stream);
// Combines `count` partials into the norm, written as float (or double when out_double).
void launch_norm_finish(const double* partials, int64_t count, int kind, double norm_type,
                        void* out, bool out_double, cudaStream_t stream);

}  // namespace dlk::cuda

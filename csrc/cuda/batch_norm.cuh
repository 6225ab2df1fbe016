// Raw launchers of the CUDA batch norm + activation kernels: pointers, sizes and a stream, no
// torch headers (see activation.cuh).
#pragma once
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>

#include "../common/philox.h"
#include "activation.cuh"  // DType

namespace dlk::cuda {

// Memory of a dense input seen as [outer, C, inner] (prep.h's ChannelView).
struct BnShape {
  int64_t outer, channels, inner;
};

// Grid (channel blocks, split) of blocks of (bx, by) threads: thread (tx, ty) of block (cb, s)
// owns channel cb * bx + tx and walks positions s * by + ty, stepping split * by, of the
// outer * inner positions of a channel. NCHW (inner > 1): bx = 1, a block runs along a channel.
// channels_last and [N, C] (inner = 1): bx adjacent channels, so a warp reads contiguous rows.
struct BnGrid {
  int bx, by;
  int64_t cblocks;
  int split;
};

inline BnGrid bn_grid(const BnShape& s) {
  constexpr int kThreads = 256;
  int bx = 1;
  if (s.inner == 1)
    while (bx < 32 && bx < s.channels) bx *= 2;
  const int by = kThreads / bx;
  const int64_t cblocks = (s.channels + bx - 1) / bx;
  // Enough blocks to fill the GPU, each thread with a long stretch (>= 16) of positions.
  const int64_t per_channel = s.outer * s.inner;
  const int64_t split = std::clamp<int64_t>(per_channel / (by * 16), 1,
                                            std::max<int64_t>(1, 2048 / cblocks));
  return {bx, by, cblocks, static_cast<int>(split)};
}

// Per-channel arrays, [C] each, in the compute type (float; double for f64).
struct BnParams {
  const void* mean;
  const void* invstd;
  const void* weight;
  const void* bias;
  const void* prelu;  // slopes when act == 3, else unused
  int act;
  double slope;  // leaky slope (act == 2)
  // Dropout after the activation (drop.on): the mask of memory position o is the word of its
  // logical index, through `map` (o itself when the map is row-major).
  DropoutArgs drop;
  IndexMap map;
};

// partials: [3, C, split] double of (count, mean - shift, M2); shift: [C], a value of each channel.
void launch_bn_stats(DType t, const void* x, const void* shift, void* partials, BnShape s,
                     BnGrid g, cudaStream_t st);
void launch_bn_fwd(DType t, const void* x, void* y, const BnParams& p, BnShape s, BnGrid g,
                   cudaStream_t st);
// partials: [3, C, split] of (sum dz, sum dz * xhat, PReLU slope gradient).
void launch_bn_bwd_reduce(DType t, const void* grad, const void* x, const BnParams& p,
                          void* partials, BnShape s, BnGrid g, cudaStream_t st);
// a = sum_dz / count, q = sum_dz_xhat / count: [C] in the compute type.
void launch_bn_bwd_elemt(DType t, const void* grad, const void* x, const BnParams& p,
                         const void* a, const void* q, void* grad_input, BnShape s, BnGrid g,
                         cudaStream_t st);

}  // namespace dlk::cuda

// Raw launchers of the CUDA dropout kernels (docs/dropout.md): pointers, sizes, the stream's
// parameters and a CUDA stream, no torch headers. The generator and the index mapping are
// csrc/common/philox.h, shared with the CPU kernels.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "../common/codes.h"
#include "../common/philox.h"
#include "common.cuh"

namespace dlk::cuda {

// The stream of one call: key (k0, k1), threshold t = floor(p * 2^32), and the multiplier
// 1 / (1 - p) and leaky slope in float64 (each rounded once to the compute type by the kernels).
struct DropoutParams {
  uint32_t k0, k1, thr;
  double scale;
  double slope;
};

// Philox4x32-10 of n counters of four int64 words (the low 32 bits) into int64 words.
void launch_philox(const int64_t* counter, int64_t* out, int64_t n, uint32_t k0, uint32_t k1, cudaStream_t s);

// out[i] = the word of logical index i, i < n (int64 for dropout_bits, uint32 for the words of
// the per-channel (N, C) grid).
void launch_dropout_bits(int64_t* out, int64_t n, uint32_t k0, uint32_t k1, cudaStream_t s);
void launch_dropout_grid(uint32_t* out, int64_t n, uint32_t k0, uint32_t k1, cudaStream_t s);

// y = act(x) * m over the n positions of dense memory. map takes a memory position to its
// logical index (row-major map: one Philox evaluation per 4 positions; otherwise one per
// position), or, when grid is given (per-channel dropout), to its (N, C) grid index, whose word
// is grid[index]. act: kActNone, kActLeakyRelu (slope in prm) or kActPrelu (weight w, memory seen
// as [outer, C, inner], channel (o / inner) % C).
void launch_dropout_fwd(DType t, int act, const void* x, const void* w, void* y, int64_t n, int64_t C,
                        int64_t inner, const IndexMap& map, const uint32_t* grid, const DropoutParams& prm,
                        cudaStream_t s);

// d = g * m; gi = x > 0 ? d : d * slope.
void launch_leaky_relu_dropout_bwd(DType t, const void* g, const void* x, void* gi, int64_t n, const IndexMap& map,
                                   const DropoutParams& prm, cudaStream_t s);

// grad_input of PReLU-dropout and partial slope gradients: partials [C, split] of float (double
// for f64), summed by the caller (grid (split, C) as the activation family's prelu backward).
void launch_prelu_dropout_bwd(DType t, const void* g, const void* x, const void* w, void* gi, void* partials,
                              int64_t outer, int64_t C, int64_t inner, int split, const IndexMap& map,
                              const DropoutParams& prm, cudaStream_t s);

}  // namespace dlk::cuda

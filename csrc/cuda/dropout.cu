// CUDA dropout, alone and fused with leaky ReLU / PReLU, from the Philox4x32-10 stream of
// docs/dropout.md. The generator, the word of a logical index, the threshold and the multiplier
// are csrc/common/philox.h and the activation math csrc/common/activation.h, both shared with the
// CPU kernels; storage may be fp16/bf16, compute is float (double for fp64).
//
// Grid-stride loops. Where memory order is row-major order each thread evaluates Philox once for
// the four consecutive positions 4q .. 4q + 3 (quad_kernel); other dense layouts map each memory
// position to its logical index (IndexMap) and evaluate Philox per element, keeping one of its
// four words (4x the generator work); per-channel masks read the precomputed words of the
// (N, C) grid. The PReLU weight gradient is reduced per (split, channel) block into partials, as
// the activation family does (no atomics: deterministic).
#include "../common/activation.h"
#include "../common/philox.h"
#include "common.cuh"
#include "dropout.cuh"

namespace dlk::cuda {
namespace {

// ---- the loops: op(o, word) for every memory position o < n ----

// Row-major memory: thread per counter q, one Philox evaluation for positions 4q .. 4q + 3.
template <typename Op>
__global__ void quad_kernel(int64_t n, uint32_t k0, uint32_t k1, Op op) {
  const int64_t nq = (n + 3) / 4;
  for (int64_t q = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; q < nq; q += int64_t(gridDim.x) * blockDim.x) {
    uint32_t r[4];
    dropout_quad(uint64_t(q), k0, k1, r[0], r[1], r[2], r[3]);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t o = 4 * q + j;
      if (o < n) op(o, r[j]);
    }
  }
}

// Any dense layout: thread per position, its logical index from the map; its word from a whole
// Philox evaluation, or from the per-channel grid's words (GRID).
template <bool GRID, typename Op>
__global__ void element_kernel(int64_t n, IndexMap map, const uint32_t* __restrict__ grid, uint32_t k0, uint32_t k1,
                               Op op) {
  for (int64_t o = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; o < n; o += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = logical_index(map, o);
    op(o, GRID ? grid[i] : dropout_word(uint64_t(i), k0, k1));
  }
}

template <typename Op>
void launch_map(int64_t n, const IndexMap& map, const uint32_t* grid, uint32_t k0, uint32_t k1, const Op& op,
                cudaStream_t s) {
  if (n == 0) return;
  if (is_row_major(map)) {
    quad_kernel<<<elementwise_blocks((n + 3) / 4), kElementwiseThreads, 0, s>>>(n, k0, k1, op);
  } else if (grid != nullptr) {
    element_kernel<true><<<elementwise_blocks(n), kElementwiseThreads, 0, s>>>(n, map, grid, k0, k1, op);
  } else {
    element_kernel<false><<<elementwise_blocks(n), kElementwiseThreads, 0, s>>>(n, map, grid, k0, k1, op);
  }
}

// ---- per-position ops ----

template <typename OutT>
struct BitsOp {
  OutT* out;
  __device__ __forceinline__ void operator()(int64_t o, uint32_t word) const { out[o] = OutT(word); }
};

// y = act(x) * m
template <typename T, int ACT>
struct FwdOp {
  const T* x;
  const T* w;
  T* y;
  int64_t C, inner;
  uint32_t thr;
  compute_t<T> scale, slope;
  __device__ __forceinline__ void operator()(int64_t o, uint32_t word) const {
    compute_t<T> v = ld(x, o);
    if constexpr (ACT == kActLeakyRelu) {
      v = leaky_relu_fwd(v, slope);
    } else if constexpr (ACT == kActPrelu) {
      v = leaky_relu_fwd(v, ld(w, (o / inner) % C));
    }
    st(y, o, v * dropout_multiplier(word, thr, scale));
  }
};

// d = g * m; gi = x > 0 ? d : d * slope
template <typename T>
struct LeakyBwdOp {
  const T* g;
  const T* x;
  T* gi;
  uint32_t thr;
  compute_t<T> scale, slope;
  __device__ __forceinline__ void operator()(int64_t o, uint32_t word) const {
    const compute_t<T> d = ld(g, o) * dropout_multiplier(word, thr, scale);
    st(gi, o, leaky_relu_bwd(d, ld(x, o), slope));
  }
};

// ---- the rest ----

__global__ void philox_kernel(const int64_t* __restrict__ c, int64_t* __restrict__ out, int64_t n, uint32_t k0,
                              uint32_t k1) {
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < n; j += int64_t(gridDim.x) * blockDim.x) {
    uint32_t r0 = uint32_t(c[4 * j]), r1 = uint32_t(c[4 * j + 1]);
    uint32_t r2 = uint32_t(c[4 * j + 2]), r3 = uint32_t(c[4 * j + 3]);
    ::dlk::philox4x32_10(r0, r1, r2, r3, k0, k1);
    out[4 * j] = r0;
    out[4 * j + 1] = r1;
    out[4 * j + 2] = r2;
    out[4 * j + 3] = r3;
  }
}

// Grid (split, C): block (s, c) walks every split-th slice of channel c's outer * inner positions,
// writes grad_input and one partial slope gradient. Each position evaluates Philox for its own
// logical index (memory position when ROW_MAJOR, else through the map).
template <typename T, bool ROW_MAJOR>
__global__ void prelu_dropout_bwd_kernel(const T* __restrict__ g, const T* __restrict__ x, const T* __restrict__ w,
                                         T* __restrict__ gi, compute_t<T>* __restrict__ partials, int64_t outer,
                                         int64_t C, int64_t inner, IndexMap map, DropoutParams prm) {
  using A = compute_t<T>;
  const int64_t c = blockIdx.y;
  const A slope = ld(w, c);
  const A scale = A(prm.scale);
  const int64_t per_channel = outer * inner;
  A acc = 0;
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < per_channel;
       k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = (k / inner) * C * inner + c * inner + k % inner;
    const int64_t li = ROW_MAJOR ? i : logical_index(map, i);
    const A d = ld(g, i) * dropout_multiplier(dropout_word(uint64_t(li), prm.k0, prm.k1), prm.thr, scale);
    const A xv = ld(x, i);
    st(gi, i, leaky_relu_bwd(d, xv, slope));
    acc += prelu_weight_grad(d, xv);
  }
  block_sum_to(acc, partials + c * gridDim.x + blockIdx.x);
}

}  // namespace

void launch_philox(const int64_t* counter, int64_t* out, int64_t n, uint32_t k0, uint32_t k1, cudaStream_t s) {
  if (n == 0) return;
  philox_kernel<<<elementwise_blocks(n), kElementwiseThreads, 0, s>>>(counter, out, n, k0, k1);
}

void launch_dropout_bits(int64_t* out, int64_t n, uint32_t k0, uint32_t k1, cudaStream_t s) {
  if (n == 0) return;
  quad_kernel<<<elementwise_blocks((n + 3) / 4), kElementwiseThreads, 0, s>>>(n, k0, k1, BitsOp<int64_t>{out});
}

void launch_dropout_grid(uint32_t* out, int64_t n, uint32_t k0, uint32_t k1, cudaStream_t s) {
  if (n == 0) return;
  quad_kernel<<<elementwise_blocks((n + 3) / 4), kElementwiseThreads, 0, s>>>(n, k0, k1, BitsOp<uint32_t>{out});
}

void launch_dropout_fwd(DType t, int act, const void* x, const void* w, void* y, int64_t n, int64_t C,
                        int64_t inner, const IndexMap& map, const uint32_t* grid, const DropoutParams& prm,
                        cudaStream_t s) {
  if (n == 0) return;
  dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    using A = compute_t<T>;
    const auto* xp = static_cast<const T*>(x);
    const auto* wp = static_cast<const T*>(w);
    auto* yp = static_cast<T*>(y);
    const A scale = A(prm.scale), slope = A(prm.slope);
    if (act == kActLeakyRelu) {
      launch_map(n, map, grid, prm.k0, prm.k1, FwdOp<T, kActLeakyRelu>{xp, wp, yp, C, inner, prm.thr, scale, slope}, s);
    } else if (act == kActPrelu) {
      launch_map(n, map, grid, prm.k0, prm.k1, FwdOp<T, kActPrelu>{xp, wp, yp, C, inner, prm.thr, scale, slope}, s);
    } else {
      launch_map(n, map, grid, prm.k0, prm.k1, FwdOp<T, kActNone>{xp, wp, yp, C, inner, prm.thr, scale, slope}, s);
    }
  });
}

void launch_leaky_relu_dropout_bwd(DType t, const void* g, const void* x, void* gi, int64_t n, const IndexMap& map,
                                   const DropoutParams& prm, cudaStream_t s) {
  if (n == 0) return;
  dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    using A = compute_t<T>;
    const LeakyBwdOp<T> op{static_cast<const T*>(g), static_cast<const T*>(x), static_cast<T*>(gi), prm.thr,
                           A(prm.scale), A(prm.slope)};
    launch_map(n, map, nullptr, prm.k0, prm.k1, op, s);
  });
}

void launch_prelu_dropout_bwd(DType t, const void* g, const void* x, const void* w, void* gi, void* partials,
                              int64_t outer, int64_t C, int64_t inner, int split, const IndexMap& map,
                              const DropoutParams& prm, cudaStream_t s) {
  if (outer * C * inner == 0) return;
  dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    const auto* gp = static_cast<const T*>(g);
    const auto* xp = static_cast<const T*>(x);
    const auto* wp = static_cast<const T*>(w);
    auto* gip = static_cast<T*>(gi);
    auto* pp = static_cast<compute_t<T>*>(partials);
    const dim3 grid_dim(split, C);
    if (is_row_major(map)) {
      prelu_dropout_bwd_kernel<T, true><<<grid_dim, kElementwiseThreads, 0, s>>>(gp, xp, wp, gip, pp, outer, C, inner, map, prm);
    } else {
      prelu_dropout_bwd_kernel<T, false><<<grid_dim, kElementwiseThreads, 0, s>>>(gp, xp, wp, gip, pp, outer, C, inner, map, prm);
    }
  });
}

}  // namespace dlk::cuda

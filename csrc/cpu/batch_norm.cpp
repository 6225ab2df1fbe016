// Batch norm fused with an activation on the CPU. Memory is seen as [outer, C, inner]
// (prep.h), read contiguously in every layout without a layout copy, by one of three paths:
// - row path, a long inner extent (NCHW): row by row, per-channel scalars;
// - strip path, inner == 1 (channels_last, 2-D input) with C % 16 == 0: blocks of whole rows of C
//   channels, walked 16 channels at a time with their constants and sums in registers;
// - tile path, any other short inner extent: [C, inner] tiles with per-element constant vectors.
// Statistics: two passes over an L1-resident block, blocks merged with Chan's formula in double.
// Reductions use fixed pieces independent of the thread count: results are deterministic.
#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <vector>

#include "../api/batch_norm.h"
#include "../common/batch_norm.h"
#include "../prep.h"
#include "simd.h"

namespace dlk::cpu {
namespace {

constexpr int kLanes = 64;  // independent accumulators: vectorizable reductions, 4+ vector add chains
constexpr int64_t kRowMin = 64; // shorter inner extents use the tile path

// ---- SIMD loops (compute type T; ACT is a compile-time activation code) ----

// Folds the lanes pairwise (vector adds) down to 8, then adds those: a serial sum of 64 lanes
// would cost more than a short row's loop.
template <typename T>
DLK_INLINE T lane_sum(T* acc) {
  for (int w = kLanes / 2; w >= 8; w /= 2)
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  T s = 0;
  for (int j = 0; j < 8; ++j) s += acc[j];
  return s;
}

// Mean, M2 and residual of one block, two passes (the block is in L1 for the second). The
// residual r = sum(x - mean) makes it the corrected two-pass algorithm: the caller takes
// mean + r / n (in double) and M2 - r^2 / n, which removes the float rounding of the first sum
// (a mean off by an ulp is a systematic error the backward multiplies by mean(grad)).
template <typename T>
DLK_INLINE void block_moments_body(const T* x, int64_t n, T* out) {
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += x[i + j];
  for (; i < n; ++i) acc[0] += x[i];
  const T mean = lane_sum(acc) / T(n);
  T acc2[kLanes] = {}, acc3[kLanes] = {};
  for (i = 0; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      acc2[j] += (x[i + j] - mean) * (x[i + j] - mean);
      acc3[j] += x[i + j] - mean;
    }
    // the block after this one (the next row's, at a row's end): DRAM keeps streaming while
    // this pass runs from L1; a prefetch past the end of the data does not fault
    for (int j = 0; j < kLanes; j += 64 / int(sizeof(T))) __builtin_prefetch(x + n + i + j);
  }
  for (; i < n; ++i) {
    acc2[0] += (x[i] - mean) * (x[i] - mean);
    acc3[0] += x[i] - mean;
  }
  out[0] = mean;
  out[1] = lane_sum(acc2);
  out[2] = lane_sum(acc3);
}
DLK_MULTIVERSION(void, block_moments, (const float* x, int64_t n, float* out), (x, n, out), block_moments_body)
DLK_MULTIVERSION(void, block_moments, (const double* x, int64_t n, double* out), (x, n, out), block_moments_body)

// Hints the cache lines of n elements at p into the cache.
template <typename S>
DLK_INLINE void prefetch(const S* p, int64_t n) {
  for (int64_t i = 0; i < n; i += 64 / int64_t(sizeof(S))) __builtin_prefetch(p + i);
}

// The strip path walks a block column-wise (a line of each row, then the next line of each):
// from memory that runs ~30% slower than a sequential sweep here, so blocks are copied into an
// L1 buffer with one sequential sweep first, and results written back the same way.
template <typename S>
DLK_INLINE const compute_t<S>* load_block(const S* p, compute_t<S>* buf, int64_t m) {
  if constexpr (std::is_same_v<S, compute_t<S>>) {
    std::memcpy(buf, p, m * sizeof(S));
    return buf;
  } else {
    return load(p, buf, m);
  }
}
// Its L1 buffers, skewed by a few lines: buffers a multiple of 4 KiB apart would alias in the
// store-to-load check (4K aliasing) while a strip's loads run ahead of earlier rows' stores.
template <typename C>
struct StripBufs {
  static constexpr int64_t kSkew = 48;
  alignas(64) C mem[3 * (kBlock + kSkew)];
  C* operator[](int i) { return mem + i * (kBlock + kSkew); }
};

template <typename S>
DLK_INLINE void store_block(const compute_t<S>* buf, S* p, int64_t m) {
  if constexpr (std::is_same_v<S, compute_t<S>>) {
    std::memcpy(p, buf, m * sizeof(S));
  } else {
    store(buf, p, m);
  }
}

// Tile path statistics: acc[i] += x[i], then acc[i] += (x[i] - mean[i])^2.
template <typename T>
DLK_INLINE void col_sum_body(const T* x, T* acc, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += x[i];
}
DLK_MULTIVERSION(void, col_sum, (const float* x, float* acc, int64_t n), (x, acc, n), col_sum_body)
DLK_MULTIVERSION(void, col_sum, (const double* x, double* acc, int64_t n), (x, acc, n), col_sum_body)
template <typename T>
DLK_INLINE void col_sq_dev_body(const T* x, const T* mean, T* acc, T* res, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    acc[i] += (x[i] - mean[i]) * (x[i] - mean[i]);
    res[i] += x[i] - mean[i];
  }
}
DLK_MULTIVERSION(void, col_sq_dev, (const float* x, const float* m, float* acc, float* res, int64_t n), (x, m, acc, res, n), col_sq_dev_body)
DLK_MULTIVERSION(void, col_sq_dev, (const double* x, const double* m, double* acc, double* res, int64_t n), (x, m, acc, res, n), col_sq_dev_body)

// Per-channel constants, as scalars (row path) or as pointers to per-element vectors (tile path).
template <typename T>
struct RowK {
  T scale, shift, slope, mean, invstd, k1, ka, kc;
};
template <typename T>
struct VecK {
  const T *scale, *shift, *slope, *mean, *invstd, *k1, *ka, *kc;
};

// The loops below take every stream as a __restrict__ pointer: without it GCC versions each
// loop on runtime alias checks between up to 11 pointers and gives up vectorizing.
#define R __restrict__

// y = act(x * scale + shift)
template <int ACT, typename T>
DLK_INLINE void fwd_row_body(const T* R x, T* R y, int64_t n, const RowK<T>& k) {
  const T scale = k.scale, shift = k.shift, slope = k.slope;
  for (int64_t i = 0; i < n; ++i) y[i] = act_fwd(ACT, x[i] * scale + shift, slope);
}
template <int ACT, typename T>
DLK_INLINE void fwd_vec_body(const T* R x, T* R y, int64_t n, const T* R scale, const T* R shift,
                             const T* R slope) {
  for (int64_t i = 0; i < n; ++i) y[i] = act_fwd(ACT, x[i] * scale[i] + shift[i], slope[i]);
}

// Sums of dz, dz * xhat and the PReLU slope gradient over n elements, added to out[0..2].
template <int ACT, typename T>
DLK_INLINE void reduce_row_body(const T* R g, const T* R x, int64_t n, const RowK<T>& k, T* out) {
  const T scale = k.scale, shift = k.shift, slope = k.slope, mean = k.mean, invstd = k.invstd;
  T a0[kLanes] = {}, a1[kLanes] = {}, a2[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const T xv = x[i + j], gv = g[i + j];
      const T z = xv * scale + shift;
      const T dz = act_bwd(ACT, gv, z, slope);
      a0[j] += dz;
      a1[j] += dz * ((xv - mean) * invstd);
      a2[j] += prelu_weight_grad(gv, z);
    }
  for (; i < n; ++i) {
    const T z = x[i] * scale + shift;
    const T dz = act_bwd(ACT, g[i], z, slope);
    a0[0] += dz;
    a1[0] += dz * ((x[i] - mean) * invstd);
    a2[0] += prelu_weight_grad(g[i], z);
  }
  out[0] += lane_sum(a0);
  out[1] += lane_sum(a1);
  out[2] += lane_sum(a2);
}

// Per-element accumulators s0, s1, s2 (tile path).
template <int ACT, typename T>
DLK_INLINE void reduce_vec_body(const T* R g, const T* R x, int64_t n, const T* R scale, const T* R shift,
                                const T* R slope, const T* R mean, const T* R invstd, T* R s0, T* R s1,
                                T* R s2) {
  for (int64_t i = 0; i < n; ++i) {
    const T z = x[i] * scale[i] + shift[i];
    const T dz = act_bwd(ACT, g[i], z, slope[i]);
    s0[i] += dz;
    s1[i] += dz * ((x[i] - mean[i]) * invstd[i]);
    s2[i] += prelu_weight_grad(g[i], z);
  }
}

// grad_input = k1 * dz + ka * (x - mean) + kc  (the batch-statistics terms folded per channel;
// x - mean first: folding mean into kc would cancel catastrophically when |mean| >> std).
template <int ACT, typename T>
DLK_INLINE void elemt_row_body(const T* R g, const T* R x, T* R gi, int64_t n, const RowK<T>& k) {
  const T scale = k.scale, shift = k.shift, slope = k.slope, mean = k.mean, k1 = k.k1, ka = k.ka, kc = k.kc;
  for (int64_t i = 0; i < n; ++i) {
    const T dz = act_bwd(ACT, g[i], x[i] * scale + shift, slope);
    gi[i] = k1 * dz + stat_term(ka, x[i] - mean) + kc;
  }
}
template <int ACT, typename T>
DLK_INLINE void elemt_vec_body(const T* R g, const T* R x, T* R gi, int64_t n, const T* R scale,
                               const T* R shift, const T* R slope, const T* R mean, const T* R k1,
                               const T* R ka, const T* R kc) {
  for (int64_t i = 0; i < n; ++i) {
    const T dz = act_bwd(ACT, g[i], x[i] * scale[i] + shift[i], slope[i]);
    gi[i] = k1[i] * dz + stat_term(ka[i], x[i] - mean[i]) + kc[i];
  }
}

// ---- channels_last strips: kStrip channels whose constants and sums stay in registers while
// rows stream past (x[r * ld + j], j < kStrip); the tile path's per-element constant vectors
// cost ~10 L1 accesses per element, which bound it below the memory bandwidth ----
constexpr int kStrip = 16;

template <typename T>
struct StripK {
  T scale[kStrip], shift[kStrip], slope[kStrip], mean[kStrip], invstd[kStrip], k1[kStrip], ka[kStrip], kc[kStrip];
};

template <int ACT, typename T>
DLK_INLINE void fwd_strip_body(const T* R x, T* R y, int64_t rows, int64_t ld, const StripK<T>& k) {
  T sc[kStrip], sh[kStrip], sl[kStrip];
  for (int j = 0; j < kStrip; ++j) sc[j] = k.scale[j], sh[j] = k.shift[j], sl[j] = k.slope[j];
  for (int64_t r = 0; r < rows; ++r)
    for (int j = 0; j < kStrip; ++j) y[r * ld + j] = act_fwd(ACT, x[r * ld + j] * sc[j] + sh[j], sl[j]);
}

// Adds the strip's sums to s[0..3 * kStrip): dz, dz * xhat, PReLU slope gradient.
template <int ACT, typename T>
DLK_INLINE void reduce_strip_body(const T* R g, const T* R x, int64_t rows, int64_t ld, const StripK<T>& k,
                                  T* R s) {
  T sc[kStrip], sh[kStrip], sl[kStrip], mu[kStrip], is[kStrip], a0[kStrip], a1[kStrip], a2[kStrip];
  for (int j = 0; j < kStrip; ++j) {
    sc[j] = k.scale[j], sh[j] = k.shift[j], sl[j] = k.slope[j], mu[j] = k.mean[j], is[j] = k.invstd[j];
    a0[j] = s[j], a1[j] = s[kStrip + j], a2[j] = s[2 * kStrip + j];
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int j = 0; j < kStrip; ++j) {
      const T xv = x[r * ld + j], gv = g[r * ld + j];
      const T z = xv * sc[j] + sh[j];
      const T dz = act_bwd(ACT, gv, z, sl[j]);
      a0[j] += dz;
      a1[j] += dz * ((xv - mu[j]) * is[j]);
      a2[j] += prelu_weight_grad(gv, z);
    }
  for (int j = 0; j < kStrip; ++j) s[j] = a0[j], s[kStrip + j] = a1[j], s[2 * kStrip + j] = a2[j];
}

template <int ACT, typename T>
DLK_INLINE void elemt_strip_body(const T* R g, const T* R x, T* R gi, int64_t rows, int64_t ld, const StripK<T>& k) {
  T sc[kStrip], sh[kStrip], sl[kStrip], mu[kStrip], k1[kStrip], ka[kStrip], kc[kStrip];
  for (int j = 0; j < kStrip; ++j) {
    sc[j] = k.scale[j], sh[j] = k.shift[j], sl[j] = k.slope[j], mu[j] = k.mean[j];
    k1[j] = k.k1[j], ka[j] = k.ka[j], kc[j] = k.kc[j];
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int j = 0; j < kStrip; ++j) {
      const T xv = x[r * ld + j];
      gi[r * ld + j] = k1[j] * act_bwd(ACT, g[r * ld + j], xv * sc[j] + sh[j], sl[j]) + stat_term(ka[j], xv - mu[j]) + kc[j];
    }
}

// Statistics: s[j] += x (mean == nullptr), or s[j] += (x - mean[j])^2 and res[j] += x - mean[j].
template <typename T>
DLK_INLINE void moments_strip_body(const T* R x, int64_t rows, int64_t ld, const T* R mean, T* R s, T* R res) {
  T a[kStrip], b[kStrip], mu[kStrip];
  for (int j = 0; j < kStrip; ++j) a[j] = s[j], b[j] = mean ? res[j] : T(0), mu[j] = mean ? mean[j] : T(0);
  if (mean == nullptr) {
    for (int64_t r = 0; r < rows; ++r)
      for (int j = 0; j < kStrip; ++j) a[j] += x[r * ld + j];
  } else {
    for (int64_t r = 0; r < rows; ++r)
      for (int j = 0; j < kStrip; ++j) {
        a[j] += (x[r * ld + j] - mu[j]) * (x[r * ld + j] - mu[j]);
        b[j] += x[r * ld + j] - mu[j];
      }
    for (int j = 0; j < kStrip; ++j) res[j] = b[j];
  }
  for (int j = 0; j < kStrip; ++j) s[j] = a[j];
}
#undef R

// One version set per (loop, type); the activation is a switch outside the loop. PReLU runs as
// leaky ReLU with the channel's slope.
#define DLK_ACT_SWITCH(act, CALL)          \
  switch (act) {                           \
    case kActNone: CALL(kActNone); break;  \
    case kActRelu: CALL(kActRelu); break;  \
    default: CALL(kActLeakyRelu); break;   \
  }


template <typename T>
DLK_INLINE void fwd_dispatch(int act, const T* x, T* y, int64_t n, const RowK<T>& k) {
#define CALL(A) fwd_row_body<A>(x, y, n, k)
  DLK_ACT_SWITCH(act, CALL)
#undef CALL
}
DLK_MULTIVERSION(void, fwd_row, (int act, const float* x, float* y, int64_t n, const RowK<float>& k), (act, x, y, n, k), fwd_dispatch)
DLK_MULTIVERSION(void, fwd_row, (int act, const double* x, double* y, int64_t n, const RowK<double>& k), (act, x, y, n, k), fwd_dispatch)

template <typename T>
DLK_INLINE void fwd_vec_dispatch(int act, const T* x, T* y, int64_t n, const VecK<T>& k) {
#define CALL(A) fwd_vec_body<A>(x, y, n, k.scale, k.shift, k.slope)
  DLK_ACT_SWITCH(act, CALL)
#undef CALL
}
DLK_MULTIVERSION(void, fwd_vec, (int act, const float* x, float* y, int64_t n, const VecK<float>& k), (act, x, y, n, k), fwd_vec_dispatch)
DLK_MULTIVERSION(void, fwd_vec, (int act, const double* x, double* y, int64_t n, const VecK<double>& k), (act, x, y, n, k), fwd_vec_dispatch)

template <typename T>
DLK_INLINE void reduce_row_dispatch(int act, const T* g, const T* x, int64_t n, const RowK<T>& k, T* out) {
#define CALL(A) reduce_row_body<A>(g, x, n, k, out)
  DLK_ACT_SWITCH(act, CALL)
#undef CALL
}
DLK_MULTIVERSION(void, reduce_row, (int act, const float* g, const float* x, int64_t n, const RowK<float>& k, float* out), (act, g, x, n, k, out), reduce_row_dispatch)
DLK_MULTIVERSION(void, reduce_row, (int act, const double* g, const double* x, int64_t n, const RowK<double>& k, double* out), (act, g, x, n, k, out), reduce_row_dispatch)

template <typename T>
DLK_INLINE void reduce_vec_dispatch(int act, const T* g, const T* x, int64_t n, const VecK<T>& k, T* s0, T* s1, T* s2) {
#define CALL(A) reduce_vec_body<A>(g, x, n, k.scale, k.shift, k.slope, k.mean, k.invstd, s0, s1, s2)
  DLK_ACT_SWITCH(act, CALL)
#undef CALL
}
DLK_MULTIVERSION(void, reduce_vec, (int act, const float* g, const float* x, int64_t n, const VecK<float>& k, float* s0, float* s1, float* s2), (act, g, x, n, k, s0, s1, s2), reduce_vec_dispatch)
DLK_MULTIVERSION(void, reduce_vec, (int act, const double* g, const double* x, int64_t n, const VecK<double>& k, double* s0, double* s1, double* s2), (act, g, x, n, k, s0, s1, s2), reduce_vec_dispatch)

template <typename T>
DLK_INLINE void elemt_row_dispatch(int act, const T* g, const T* x, T* gi, int64_t n, const RowK<T>& k) {
#define CALL(A) elemt_row_body<A>(g, x, gi, n, k)
  DLK_ACT_SWITCH(act, CALL)
#undef CALL
}
template <typename T>
DLK_INLINE void elemt_vec_dispatch(int act, const T* g, const T* x, T* gi, int64_t n, const VecK<T>& k) {
#define CALL(A) elemt_vec_body<A>(g, x, gi, n, k.scale, k.shift, k.slope, k.mean, k.k1, k.ka, k.kc)
  DLK_ACT_SWITCH(act, CALL)
#undef CALL
}
DLK_MULTIVERSION(void, elemt_row, (int act, const float* g, const float* x, float* gi, int64_t n, const RowK<float>& k), (act, g, x, gi, n, k), elemt_row_dispatch)
DLK_MULTIVERSION(void, elemt_row, (int act, const double* g, const double* x, double* gi, int64_t n, const RowK<double>& k), (act, g, x, gi, n, k), elemt_row_dispatch)
DLK_MULTIVERSION(void, elemt_vec, (int act, const float* g, const float* x, float* gi, int64_t n, const VecK<float>& k), (act, g, x, gi, n, k), elemt_vec_dispatch)
DLK_MULTIVERSION(void, elemt_vec, (int act, const double* g, const double* x, double* gi, int64_t n, const VecK<double>& k), (act, g, x, gi, n, k), elemt_vec_dispatch)

template <typename T>
DLK_INLINE void fwd_strip_dispatch(int act, const T* x, T* y, int64_t rows, int64_t ld, const StripK<T>& k) {
#define CALL(A) fwd_strip_body<A>(x, y, rows, ld, k)
  DLK_ACT_SWITCH(act, CALL)
#undef CALL
}
template <typename T>
DLK_INLINE void reduce_strip_dispatch(int act, const T* g, const T* x, int64_t rows, int64_t ld, const StripK<T>& k,
                                      T* s) {
#define CALL(A) reduce_strip_body<A>(g, x, rows, ld, k, s)
  DLK_ACT_SWITCH(act, CALL)
#undef CALL
}
template <typename T>
DLK_INLINE void elemt_strip_dispatch(int act, const T* g, const T* x, T* gi, int64_t rows, int64_t ld,
                                     const StripK<T>& k) {
#define CALL(A) elemt_strip_body<A>(g, x, gi, rows, ld, k)
  DLK_ACT_SWITCH(act, CALL)
#undef CALL
}
DLK_MULTIVERSION(void, fwd_strip, (int act, const float* x, float* y, int64_t rows, int64_t ld, const StripK<float>& k), (act, x, y, rows, ld, k), fwd_strip_dispatch)
DLK_MULTIVERSION(void, fwd_strip, (int act, const double* x, double* y, int64_t rows, int64_t ld, const StripK<double>& k), (act, x, y, rows, ld, k), fwd_strip_dispatch)
DLK_MULTIVERSION(void, reduce_strip, (int act, const float* g, const float* x, int64_t rows, int64_t ld, const StripK<float>& k, float* s), (act, g, x, rows, ld, k, s), reduce_strip_dispatch)
DLK_MULTIVERSION(void, reduce_strip, (int act, const double* g, const double* x, int64_t rows, int64_t ld, const StripK<double>& k, double* s), (act, g, x, rows, ld, k, s), reduce_strip_dispatch)
DLK_MULTIVERSION(void, elemt_strip, (int act, const float* g, const float* x, float* gi, int64_t rows, int64_t ld, const StripK<float>& k), (act, g, x, gi, rows, ld, k), elemt_strip_dispatch)
DLK_MULTIVERSION(void, elemt_strip, (int act, const double* g, const double* x, double* gi, int64_t rows, int64_t ld, const StripK<double>& k), (act, g, x, gi, rows, ld, k), elemt_strip_dispatch)
DLK_MULTIVERSION(void, moments_strip, (const float* x, int64_t rows, int64_t ld, const float* mean, float* s, float* res), (x, rows, ld, mean, s, res), moments_strip_body)
DLK_MULTIVERSION(void, moments_strip, (const double* x, int64_t rows, int64_t ld, const double* mean, double* s, double* res), (x, rows, ld, mean, s, res), moments_strip_body)

// ---- per-channel constants (computed in double, once per call or per channel) ----

// A channel's parameters, as double vectors of length C (slope: the leaky slope, the PReLU
// slopes, or 0), rounded through the compute type as the kernels see them.
struct ChannelParams {
  std::vector<double> w, b, slope;
  bool as_float;  // the kernels compute in float (float32/16/bf16 input), else double
};

// A [C] (or 1-element, broadcast) tensor's values read in place, no tensor ops (they would cost
// more than the kernels on small inputs); rounded to float first when `as_float`.
std::vector<double> doubles(const at::Tensor& t, int64_t c, bool as_float = false) {
  const at::Tensor tc = t.contiguous();
  std::vector<double> out(c);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tc.scalar_type(), "dlkernels batch_norm", [&] {
    const scalar_t* v = tc.const_data_ptr<scalar_t>();
    const bool one = tc.numel() == 1;
    for (int64_t i = 0; i < c; ++i) {
      const double d = double(v[one ? 0 : i]);
      out[i] = as_float ? double(float(d)) : d;
    }
  });
  return out;
}
std::vector<double> doubles(const at::Tensor& t) { return doubles(t, t.numel()); }

// A parameter as the kernels see it (converted to the compute type), or `fill` where absent.
std::vector<double> param_values(const std::optional<at::Tensor>& t, const at::Tensor& x, double fill) {
  const bool as_float = acc_type(x) == at::kFloat;
  if (!t) return std::vector<double>(x.size(1), as_float ? double(float(fill)) : fill);
  return doubles(*t, x.size(1), as_float);
}

ChannelParams channel_params(const at::Tensor& x, const std::optional<at::Tensor>& w,
                             const std::optional<at::Tensor>& b, const std::optional<at::Tensor>& prelu_w,
                             int64_t act, double slope) {
  ChannelParams p{param_values(w, x, 1.0), param_values(b, x, 0.0), {}, acc_type(x) == at::kFloat};
  p.slope = act == kActPrelu ? param_values(prelu_w, x, 0.0)
                             : std::vector<double>(x.size(1), act == kActLeakyRelu ? slope : 0.0);
  return p;
}

// Constants of channel c from its mean and invstd. grad_input = k1 * dz + ka * (x - mean) + kc folds the
// batch-statistics terms of the sums (sum dz, sum dz * xhat over `count` elements), when given.
RowK<double> channel_k(const ChannelParams& p, int64_t c, double mean, double invstd,
                       const double* sum_dz = nullptr, const double* sum_dz_xhat = nullptr, double count = 1) {
  RowK<double> k{};
  k.scale = p.w[c] * invstd;
  // The shift is folded in the compute type from the scale and mean as the kernels see them
  // (rounded), as torch's CPU kernel does: x == mean then gives exactly the bias, not a rounding
  // residue of a double fold that an activation's gradient would see as positive or negative.
  if (p.as_float) {
    const float sf = float(k.scale);
    k.shift = double(float(p.b[c]) - float(mean) * sf);
  } else {
    k.shift = p.b[c] - mean * k.scale;
  }
  k.slope = p.slope[c];
  k.mean = mean;
  k.invstd = invstd;
  k.k1 = k.scale;
  if (sum_dz != nullptr) {
    const double k2 = k.scale * *sum_dz / count, k3 = k.scale * *sum_dz_xhat / count;
    k.ka = -k3 * invstd;
    k.kc = -k2;
  }
  return k;
}

using Ks = std::vector<RowK<double>>;

// Every channel's constants; sums (when given) are [C] sum dz and [C] sum dz * xhat.
Ks make_consts(const ChannelParams& p, const std::vector<double>& mean, const std::vector<double>& invstd,
               const double* sum_dz = nullptr, const double* sum_dz_xhat = nullptr, double count = 1) {
  Ks ks(mean.size());
  for (size_t c = 0; c < ks.size(); ++c)
    ks[c] = sum_dz ? channel_k(p, c, mean[c], invstd[c], sum_dz + c, sum_dz_xhat + c, count)
                   : channel_k(p, c, mean[c], invstd[c]);
  return ks;
}

template <typename C>
RowK<C> narrow(const RowK<double>& k) {
  return {C(k.scale), C(k.shift), C(k.slope), C(k.mean), C(k.invstd), C(k.k1), C(k.ka), C(k.kc)};
}

template <typename C>
std::vector<RowK<C>> narrow_all(const Ks& ks) {
  std::vector<RowK<C>> out(ks.size());
  std::transform(ks.begin(), ks.end(), out.begin(), narrow<C>);
  return out;
}

// Statistics as the kernels store them (compute type), invstd as torch.rsqrt(var + eps) would.
template <typename C>
void finish_stats(double mu, double var, double eps, C* mean, C* var_out, C* invstd) {
  *mean = C(mu);
  *var_out = C(var);
  *invstd = C(1) / std::sqrt(*var_out + C(eps));
}

bool row_path(const ChannelView& v) { return v.inner >= kRowMin; }

// Tile path unit: as many whole [C, inner] tiles (rows of `outer`) as make ~512 elements, so
// each SIMD call streams a run rather than one short row (a 64-channel row is 256 bytes), while
// the unit's constant and accumulator vectors still fit in L1 together.
constexpr int64_t kTileUnit = 512;
constexpr int64_t kPiece = 8192;  // elements per tile-path reduction piece: its passes stay in L1/L2
int64_t unit_len(const ChannelView& v) {
  const int64_t tile = v.channels * v.inner;
  return tile * std::max<int64_t>(1, std::min(v.outer, kTileUnit / tile));
}

// The constants laid out as one tile-path unit: row f of this [8, unit_len] compute-type table is
// field f of RowK for each element's channel.
template <typename C>
at::Tensor tiled(const Ks& ks, const ChannelView& v) {
  static_assert(sizeof(RowK<double>) == 8 * sizeof(double));
  const int64_t reps = unit_len(v) / (v.channels * v.inner);
  const at::Tensor t = at::from_blob(const_cast<RowK<double>*>(ks.data()), {int64_t(ks.size()), 8}, at::kDouble);
  return t.t().to(c10::CppTypeToScalarType<C>::value).repeat_interleave(v.inner, 1).repeat({1, reps}).contiguous();
}

template <typename C>
VecK<C> vec_consts(const at::Tensor& table, int64_t off) {
  const int64_t n = table.size(1);
  const C* p = table.const_data_ptr<C>() + off;
  return {p, p + n, p + 2 * n, p + 3 * n, p + 4 * n, p + 5 * n, p + 6 * n, p + 7 * n};
}

// ---- one row of `inner` elements (row path) ----

// (mean, M2) of a row: L1 blocks merged in double.
template <typename S>
void row_moments(const S* x, int64_t len, double shift, double& mu, double& m2) {
  compute_t<S> buf[kBlock], mom[3];
  double n = 0;
  mu = m2 = 0;
  for (int64_t i = 0; i < len; i += kBlock) {
    const int64_t m = std::min(kBlock, len - i);
    block_moments(load(x + i, buf, m), m, mom);
    const double r = mom[2];
    merge_moments<double>(n, mu, m2, double(m), corrected_mean(double(mom[0]) - shift, r, double(m)),
                          double(mom[1]) - r * r / double(m));
  }
}

template <typename S>
void row_forward(const S* x, S* y, int64_t len, int act, const RowK<compute_t<S>>& k) {
  compute_t<S> xb[kBlock], yb[kBlock];
  for (int64_t i = 0; i < len; i += kBlock) {
    const int64_t m = std::min(kBlock, len - i);
    fwd_row(act, load(x + i, xb, m), out_ptr(y + i, yb), m, k);
    store(yb, y + i, m);
  }
}

// Adds the row's sum dz, sum dz * xhat and PReLU slope gradient to acc[0..2].
template <typename S>
void row_reduce(const S* g, const S* x, int64_t len, int act, const RowK<compute_t<S>>& k, double* acc) {
  using C = compute_t<S>;
  C gb[kBlock], xb[kBlock];
  for (int64_t i = 0; i < len; i += kBlock) {
    const int64_t m = std::min(kBlock, len - i);
    C out[3] = {0, 0, 0};
    reduce_row(act, load(g + i, gb, m), load(x + i, xb, m), m, k, out);
    for (int q = 0; q < 3; ++q) acc[q] += out[q];
  }
}

template <typename S>
void row_elemt(const S* g, const S* x, S* gi, int64_t len, int act, const RowK<compute_t<S>>& k) {
  using C = compute_t<S>;
  C gb[kBlock], xb[kBlock], ob[kBlock];
  for (int64_t i = 0; i < len; i += kBlock) {
    const int64_t m = std::min(kBlock, len - i);
    elemt_row(act, load(g + i, gb, m), load(x + i, xb, m), out_ptr(gi + i, ob), m, k);
    store(ob, gi + i, m);
  }
}

// Calls body(unit_index, offset, length) over the layout's units of work, in parallel: rows of
// `inner` elements (row path) or runs of whole tiles (tile path; the last one may be shorter).
template <typename F>
void for_each_unit(const ChannelView& v, F&& body) {
  const int64_t total = v.outer * v.channels * v.inner;
  const int64_t len = row_path(v) ? v.inner : unit_len(v);
  const int64_t units = (total + len - 1) / len;
  at::parallel_for(0, units, std::max<int64_t>(1, kGrain / len), [&](int64_t b, int64_t e) {
    for (int64_t u = b; u < e; ++u) body(u, u * len, std::min(len, total - u * len));
  });
}

// Tile path reductions: fixed groups of units ("pieces", independent of the thread count, so
// results are deterministic), each with its own per-element accumulators of one unit's length.
struct Pieces {
  int64_t len, units, per_piece, count;
};
Pieces pieces_of(const ChannelView& v) {
  const int64_t len = unit_len(v), total = v.outer * v.channels * v.inner;
  const int64_t units = (total + len - 1) / len;
  const int64_t per_piece = std::max<int64_t>(1, kPiece / len);
  return {len, units, per_piece, (units + per_piece - 1) / per_piece};
}

// Strip path (channels_last and 2-D input with C % kStrip == 0): blocks of kBlock / C whole rows
// (one load() each), grouped for reductions into fixed pieces of kPiece / kBlock blocks
// (independent of the thread count, so sums are deterministic).
bool strip_path(const ChannelView& v) {
  return v.inner == 1 && v.channels % kStrip == 0 && v.channels <= kBlock;
}

struct StripGeo {
  int64_t rb, piece_rows, pieces;
};
StripGeo strip_geo(const ChannelView& v) {
  const int64_t rb = kBlock / v.channels, piece_rows = rb * (kPiece / kBlock);
  return {rb, piece_rows, (v.outer + piece_rows - 1) / piece_rows};
}

// An elementwise pass of the strip path, block by block in parallel: the N inputs copied into L1
// buffers (the next block prefetched), compute(inputs, out_buffer, rows) run over the strips, the
// buffer stored to `out`.
template <typename S, size_t N, typename F>
void strip_pass(const ChannelView& v, const std::array<const S*, N>& in, S* out, F&& compute) {
  static_assert(N < 3, "StripBufs holds N inputs and the output");
  using C = compute_t<S>;
  const int64_t ch = v.channels, rb = strip_geo(v).rb, blocks = (v.outer + rb - 1) / rb;
  at::parallel_for(0, blocks, std::max<int64_t>(1, kGrain / kBlock), [&](int64_t b, int64_t e) {
    StripBufs<C> buf;
    std::array<const C*, N> iv;
    for (int64_t q = b; q < e; ++q) {
      const int64_t rows = std::min(rb, v.outer - q * rb), off = q * rb * ch, m = rows * ch;
      for (size_t i = 0; i < N; ++i) iv[i] = load_block(in[i] + off, buf[i], m);
      for (size_t i = 0; i < N; ++i) prefetch(in[i] + off + m, std::min(m, v.outer * ch - off - m));
      compute(iv, buf[N], rows);
      store_block(buf[N], out + off, m);
    }
  });
}

// The constants of each strip of kStrip channels.
template <typename C>
std::vector<StripK<C>> strips(const Ks& ks) {
  std::vector<StripK<C>> out(ks.size() / kStrip);
  for (size_t c = 0; c < ks.size(); ++c) {
    const RowK<C> k = narrow<C>(ks[c]);
    StripK<C>& o = out[c / kStrip];
    const size_t j = c % kStrip;
    o.scale[j] = k.scale, o.shift[j] = k.shift, o.slope[j] = k.slope, o.mean[j] = k.mean;
    o.invstd[j] = k.invstd, o.k1[j] = k.k1, o.ka[j] = k.ka, o.kc[j] = k.kc;
  }
  return out;
}

// out[c] += the unit-laid-out vals of channel c: rows of the unit are added with SIMD first
// (vals is overwritten), then the one remaining [C, inner] tile is folded per channel.
template <typename C>
void fold_to_channels(C* vals, int64_t len, const ChannelView& v, double* out) {
  const int64_t tile = v.channels * v.inner;
  for (int64_t r = tile; r < len; r += tile) col_sum(vals + r, vals, tile);
  for (int64_t t = 0; t < tile; ++t) out[t / v.inner] += vals[t];
}

// ---- drivers over storage type S (compute type C) ----

template <typename S>
void stats_impl(const S* x, const ChannelView& v, double* mean, double* var) {
  using C = compute_t<S>;
  const int64_t channels = v.channels;
  std::vector<double> n(channels, 0.0), mu(channels, 0.0), m2(channels, 0.0);
  // Means are merged relative to a shift per channel (its first value): differences of block means
  // then round at the data's spread, not at |mean| (float64 data with |mean| / std of 1e7 lost
  // 1e5 ulps of its variance in the merge otherwise).
  std::vector<double> shift(channels);
  for (int64_t c = 0; c < channels; ++c) {
    const double s0 = double(compute_t<S>(x[c * v.inner]));
    shift[c] = s0 - s0 == 0 ? s0 : 0.0;  // a non-finite first value: no shift
  }
  if (row_path(v)) {
    const int64_t rows = v.outer * channels;
    std::vector<double> rmu(rows), rm2(rows);
    for_each_unit(v, [&](int64_t r, int64_t off, int64_t len) { row_moments(x + off, len, shift[r % channels], rmu[r], rm2[r]); });
    for (int64_t r = 0; r < rows; ++r)
      merge_moments<double>(n[r % channels], mu[r % channels], m2[r % channels], double(v.inner), rmu[r], rm2[r]);
  } else if (strip_path(v)) {
    // Per piece: channel sums, means, then squared deviations from them (the piece is in cache
    // for that second sweep, which prefetches the next piece); pieces merged as below.
    const StripGeo sg = strip_geo(v);
    const int64_t ch = channels, strips_n = ch / kStrip;
    std::vector<double> pn(sg.pieces * ch), pmu(sg.pieces * ch), pm2(sg.pieces * ch);
    at::parallel_for(0, sg.pieces, 1, [&](int64_t b, int64_t e) {
      C buf[kBlock];
      std::vector<C> acc(ch), res(ch), tmean(ch);
      for (int64_t p = b; p < e; ++p) {
        const int64_t r0 = p * sg.piece_rows, r1 = std::min(v.outer, r0 + sg.piece_rows);
        auto sweep = [&](const C* means, int64_t ahead) {
          std::fill(acc.begin(), acc.end(), C(0));
          std::fill(res.begin(), res.end(), C(0));
          for (int64_t r = r0; r < r1; r += sg.rb) {
            const int64_t rows = std::min(sg.rb, r1 - r), off = r * ch, m = rows * ch;
            // ahead: the next block in the first sweep, the next piece in the second (from cache)
            prefetch(x + off + ahead, std::min(m, v.outer * ch - off - ahead));
            const C* xv = load(x + off, buf, m);
            for (int64_t q = 0; q < strips_n; ++q)
              moments_strip(xv + q * kStrip, rows, ch, means ? means + q * kStrip : nullptr, acc.data() + q * kStrip,
                            res.data() + q * kStrip);
          }
        };
        sweep(nullptr, sg.rb * ch);
        for (int64_t c = 0; c < ch; ++c) {
          pn[p * ch + c] = double(r1 - r0);
          pmu[p * ch + c] = double(acc[c]) / double(r1 - r0);
          tmean[c] = C(pmu[p * ch + c]);
        }
        sweep(tmean.data(), (r1 - r0) * ch);
        for (int64_t c = 0; c < ch; ++c) {  // the corrected two-pass algorithm (see block_moments)
          const double r = res[c], cnt = double(r1 - r0);
          pmu[p * ch + c] = corrected_mean(double(tmean[c]) - shift[c], r, cnt);
          pm2[p * ch + c] = double(acc[c]) - r * r / cnt;
        }
      }
    });
    for (int64_t p = 0; p < sg.pieces; ++p)
      for (int64_t c = 0; c < channels; ++c)
        merge_moments<double>(n[c], mu[c], m2[c], pn[p * channels + c], pmu[p * channels + c], pm2[p * channels + c]);
  } else {
    // Per piece (a fixed group of units that fits in L2): per-element sums, folded into
    // per-channel means, then per-element squared deviations from those, folded likewise; the
    // pieces' (count, mean, M2) are merged per channel in a fixed order. Only the very last unit
    // may be short, so an element's count is its piece's number of units, less one past it.
    const Pieces pc = pieces_of(v);
    const int64_t total = v.outer * v.channels * v.inner, tile = channels * v.inner;
    std::vector<double> pn(pc.count * channels), pmu(pc.count * channels), pm2(pc.count * channels);
    at::parallel_for(0, pc.count, 1, [&](int64_t b, int64_t e) {
      C buf[kBlock];
      std::vector<C> acc(pc.len), res(pc.len), tmean(pc.len);  // tmean: channel means laid out as the unit
      std::vector<double> sum(channels), rsum(channels);
      for (int64_t p = b; p < e; ++p) {
        const int64_t u0 = p * pc.per_piece, u1 = std::min(pc.units, u0 + pc.per_piece);
        const int64_t last_len = std::min(pc.len, total - (u1 - 1) * pc.len);  // short: last unit only
        // ahead: elements to prefetch ahead of each block (the second sweep, running from cache,
        // fetches the next piece so that memory keeps streaming)
        auto sweep = [&](int64_t ahead, auto&& fn) {
          for (int64_t u = u0; u < u1; ++u)
            for (int64_t j = 0, n = std::min(pc.len, total - u * pc.len); j < n; j += kBlock) {
              const int64_t m = std::min(kBlock, n - j), off = u * pc.len + j;
              if (ahead > 0 && off + ahead < total) prefetch(x + off + ahead, std::min(m, total - off - ahead));
              fn(load(x + off, buf, m), j, m);
            }
        };
        double* n_p = pn.data() + p * channels;
        double* mu_p = pmu.data() + p * channels;
        double* m2_p = pm2.data() + p * channels;
        // Elements per channel in this piece: whole rows of `tile`, the last unit maybe shorter.
        const double rows = double((u1 - u0 - 1) * (pc.len / tile) + last_len / tile);
        std::fill(acc.begin(), acc.end(), C(0));
        std::fill(sum.begin(), sum.end(), 0.0);
        sweep(0, [&](const C* xv, int64_t j, int64_t m) { col_sum(xv, acc.data() + j, m); });
        fold_to_channels(acc.data(), pc.len, v, sum.data());
        for (int64_t c = 0; c < channels; ++c) {
          n_p[c] = rows * double(v.inner);
          mu_p[c] = sum[c] / n_p[c];
        }
        for (int64_t t = 0; t < tile; ++t) tmean[t] = C(mu_p[t / v.inner]);
        for (int64_t r = tile; r < pc.len; r += tile) std::copy_n(tmean.begin(), tile, tmean.begin() + r);
        std::fill(acc.begin(), acc.end(), C(0));
        std::fill(res.begin(), res.end(), C(0));
        sweep((u1 - u0) * pc.len, [&](const C* xv, int64_t j, int64_t m) {
          col_sq_dev(xv, tmean.data() + j, acc.data() + j, res.data() + j, m);
        });
        fold_to_channels(acc.data(), pc.len, v, m2_p);
        std::fill(rsum.begin(), rsum.end(), 0.0);
        fold_to_channels(res.data(), pc.len, v, rsum.data());
        for (int64_t c = 0; c < channels; ++c) {  // the corrected two-pass algorithm (see block_moments)
          mu_p[c] = corrected_mean(double(tmean[c * v.inner]) - shift[c], rsum[c], n_p[c]);
          m2_p[c] -= rsum[c] * rsum[c] / n_p[c];
        }
      }
    });
    for (int64_t p = 0; p < pc.count; ++p)
      for (int64_t c = 0; c < channels; ++c)
        merge_moments<double>(n[c], mu[c], m2[c], pn[p * channels + c], pmu[p * channels + c], pm2[p * channels + c]);
  }
  for (int64_t c = 0; c < channels; ++c) {
    mean[c] = mu[c] + shift[c];
    var[c] = n[c] > 0 ? m2[c] / n[c] : std::nan("");
  }
}

template <typename S>
void forward_impl(const S* x, S* y, int64_t act, const Ks& ks, const ChannelView& v) {
  using C = compute_t<S>;
  if (row_path(v)) {
    const auto rk = narrow_all<C>(ks);
    for_each_unit(v, [&](int64_t r, int64_t off, int64_t len) {
      row_forward(x + off, y + off, len, act, rk[r % v.channels]);
    });
  } else if (strip_path(v)) {
    const auto sk = strips<C>(ks);
    strip_pass<S, 1>(v, {x}, y, [&](const auto& in, C* o, int64_t rows) {
      for (size_t q = 0; q < sk.size(); ++q)
        fwd_strip(act, in[0] + q * kStrip, o + q * kStrip, rows, v.channels, sk[q]);
    });
  } else {
    const at::Tensor kt = tiled<C>(ks, v);
    for_each_unit(v, [&](int64_t, int64_t off, int64_t len) {
      C xb[kBlock], yb[kBlock];
      for (int64_t j = 0; j < len; j += kBlock) {
        const int64_t m = std::min(kBlock, len - j);
        fwd_vec(act, load(x + off + j, xb, m), out_ptr(y + off + j, yb), m, vec_consts<C>(kt, j));
        store(yb, y + off + j, m);
      }
    });
  }
}

// Fills sums[3][C] (double): sum dz, sum dz*xhat, PReLU slope gradient per channel.
template <typename S>
void reduce_impl(const S* g, const S* x, int64_t act, const Ks& ks, const ChannelView& v, double* sums) {
  using C = compute_t<S>;
  const int64_t channels = v.channels;
  std::fill_n(sums, 3 * channels, 0.0);
  if (row_path(v)) {
    const auto rk = narrow_all<C>(ks);
    const int64_t rows = v.outer * channels;
    std::vector<double> part(3 * rows, 0.0);
    for_each_unit(v, [&](int64_t r, int64_t off, int64_t len) {
      row_reduce(g + off, x + off, len, act, rk[r % channels], part.data() + 3 * r);
    });
    for (int64_t r = 0; r < rows; ++r)
      for (int q = 0; q < 3; ++q) sums[q * channels + r % channels] += part[3 * r + q];
  } else if (strip_path(v)) {
    const auto sk = strips<C>(ks);
    const StripGeo sg = strip_geo(v);
    const int64_t ch = channels;
    std::vector<double> part(3 * sg.pieces * ch, 0.0);  // [piece][3][C]
    at::parallel_for(0, sg.pieces, 1, [&](int64_t b, int64_t e) {
      StripBufs<C> buf;
      std::vector<C> acc(3 * ch);  // [strip][3][kStrip]
      for (int64_t p = b; p < e; ++p) {
        const int64_t r0 = p * sg.piece_rows, r1 = std::min(v.outer, r0 + sg.piece_rows);
        std::fill(acc.begin(), acc.end(), C(0));
        for (int64_t r = r0; r < r1; r += sg.rb) {
          const int64_t rows = std::min(sg.rb, r1 - r), off = r * ch, m = rows * ch;
          const C* gv = load_block(g + off, buf[0], m);
          const C* xv = load_block(x + off, buf[1], m);
          prefetch(g + off + m, std::min(m, v.outer * ch - off - m));
          prefetch(x + off + m, std::min(m, v.outer * ch - off - m));
          for (size_t q = 0; q < sk.size(); ++q)
            reduce_strip(act, gv + q * kStrip, xv + q * kStrip, rows, ch, sk[q], acc.data() + 3 * kStrip * q);
        }
        for (int64_t c = 0; c < ch; ++c)
          for (int k = 0; k < 3; ++k) part[(3 * p + k) * ch + c] = acc[3 * kStrip * (c / kStrip) + k * kStrip + c % kStrip];
      }
    });
    for (int64_t p = 0; p < sg.pieces; ++p)
      for (int64_t i = 0; i < 3 * ch; ++i) sums[i] += part[3 * p * ch + i];
  } else {
    const at::Tensor kt = tiled<C>(ks, v);
    const Pieces pc = pieces_of(v);
    const int64_t total = v.outer * channels * v.inner;
    std::vector<double> part(3 * pc.count * channels, 0.0);
    at::parallel_for(0, pc.count, 1, [&](int64_t b, int64_t e) {
      C gb[kBlock], xb[kBlock];
      std::vector<C> acc(3 * pc.len);
      for (int64_t p = b; p < e; ++p) {
        std::fill(acc.begin(), acc.end(), C(0));
        C* a = acc.data();
        for (int64_t u = p * pc.per_piece; u < std::min(pc.units, (p + 1) * pc.per_piece); ++u)
          for (int64_t j = 0, n = std::min(pc.len, total - u * pc.len); j < n; j += kBlock) {
            const int64_t m = std::min(kBlock, n - j), off = u * pc.len + j;
            reduce_vec(act, load(g + off, gb, m), load(x + off, xb, m), m, vec_consts<C>(kt, j), a + j,
                       a + pc.len + j, a + 2 * pc.len + j);
          }
        for (int q = 0; q < 3; ++q)
          fold_to_channels(a + q * pc.len, pc.len, v, part.data() + (3 * p + q) * channels);
      }
    });
    for (int64_t p = 0; p < pc.count; ++p)
      for (int64_t i = 0; i < 3 * channels; ++i) sums[i] += part[3 * p * channels + i];
  }
}

template <typename S>
void elemt_impl(const S* g, const S* x, S* gi, int64_t act, const Ks& ks, const ChannelView& v) {
  using C = compute_t<S>;
  if (row_path(v)) {
    const auto rk = narrow_all<C>(ks);
    for_each_unit(v, [&](int64_t r, int64_t off, int64_t len) {
      row_elemt(g + off, x + off, gi + off, len, act, rk[r % v.channels]);
    });
  } else if (strip_path(v)) {
    const auto sk = strips<C>(ks);
    strip_pass<S, 2>(v, {g, x}, gi, [&](const auto& in, C* o, int64_t rows) {
      for (size_t q = 0; q < sk.size(); ++q)
        elemt_strip(act, in[0] + q * kStrip, in[1] + q * kStrip, o + q * kStrip, rows, v.channels, sk[q]);
    });
  } else {
    const at::Tensor kt = tiled<C>(ks, v);
    for_each_unit(v, [&](int64_t, int64_t off, int64_t len) {
      C gb[kBlock], xb[kBlock], ob[kBlock];
      for (int64_t j = 0; j < len; j += kBlock) {
        const int64_t m = std::min(kBlock, len - j);
        elemt_vec(act, load(g + off + j, gb, m), load(x + off + j, xb, m), out_ptr(gi + off + j, ob), m,
                  vec_consts<C>(kt, j));
        store(ob, gi + off + j, m);
      }
    });
  }
}

// Training forward: statistics into mean/var/invstd ([C], compute type), then y; the glue
// between the two passes stays in C++.
template <typename S>
void train_impl(const S* x, S* y, int64_t act, const ChannelParams& p, double eps, const ChannelView& v,
                compute_t<S>* mean, compute_t<S>* var, compute_t<S>* invstd) {
  const int64_t channels = v.channels;
  std::vector<double> mu(channels), vr(channels), m(channels), is(channels);
  stats_impl(x, v, mu.data(), vr.data());
  for (int64_t c = 0; c < channels; ++c) {
    finish_stats(mu[c], vr[c], eps, mean + c, var + c, invstd + c);
    m[c] = mean[c];
    is[c] = invstd[c];
  }
  forward_impl(x, y, act, make_consts(p, m, is), v);
}

// Backward: sums[3][C] (as reduce_impl) and grad_input; eval mode (training false) treats the
// statistics as constants.
template <typename S>
void backward_impl(const S* g, const S* x, S* gi, int64_t act, const ChannelParams& p, const std::vector<double>& mean,
                   const std::vector<double>& invstd, bool training, const ChannelView& v, double* sums) {
  const int64_t channels = v.channels;
  const double count = double(std::max<int64_t>(1, v.outer * v.inner));
  const Ks ks = make_consts(p, mean, invstd);
  reduce_impl(g, x, act, ks, v, sums);
  elemt_impl(g, x, gi, act, training ? make_consts(p, mean, invstd, sums, sums + channels, count) : ks, v);
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "dlkernels cpu backend: ", name, " must be a CPU tensor, got ", t.device());
}

void check_grad(const at::Tensor& grad, const at::Tensor& x) {
  check_cpu(grad, "grad_output");
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(),
              "dlkernels batch_norm backward: grad_output must match input in shape and dtype");
}

#define DLK_DISPATCH_BN(x, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (x).scalar_type(), NAME, __VA_ARGS__)

}  // namespace

std::tuple<at::Tensor, at::Tensor> batch_norm_stats(const at::Tensor& x) {
  check_cpu(x, "input");
  check_float_dtype(x, "input");
  TORCH_CHECK(x.dim() >= 2, "dlkernels batch_norm: input must have a channel dim 1, got ", x.dim(), "-d input");
  const at::Tensor xd = dense(x);
  const ChannelView v = channel_view(xd, xd.size(1));
  at::Tensor mean = at::empty({xd.size(1)}, xd.options().dtype(at::kDouble));
  at::Tensor var = at::empty({xd.size(1)}, xd.options().dtype(at::kDouble));
  DLK_DISPATCH_BN(x, "batch_norm_stats", [&] {
    if (xd.numel() == 0) {  // as torch.var_mean of nothing; also no view of C == 0 channels to divide by
      mean.fill_(NAN), var.fill_(NAN);
      return;
    }
    stats_impl(xd.const_data_ptr<scalar_t>(), v, mean.mutable_data_ptr<double>(), var.mutable_data_ptr<double>());
  });
  return {mean.to(acc_type(x)), var.to(acc_type(x))};
}

at::Tensor batch_norm_act_forward(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
                                  const std::optional<at::Tensor>& w, const std::optional<at::Tensor>& b,
                                  const std::optional<at::Tensor>& prelu_w, int64_t act, double slope) {
  check_cpu(x, "input");
  check_batch_norm_args(x, mean, invstd, w, b, prelu_w, act);
  const at::Tensor xd = dense(x);
  at::Tensor y = at::empty_like(xd);
  const Ks ks = make_consts(channel_params(xd, w, b, prelu_w, act, slope), doubles(mean), doubles(invstd));
  DLK_DISPATCH_BN(x, "batch_norm_act_forward", [&] {
    if (xd.numel() == 0) return;
    forward_impl(xd.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), act, ks, channel_view(xd, xd.size(1)));
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_act_train(
    const at::Tensor& x, const std::optional<at::Tensor>& w, const std::optional<at::Tensor>& b,
    const std::optional<at::Tensor>& prelu_w, double eps, int64_t act, double slope) {
  check_cpu(x, "input");
  check_batch_norm_params(x, w, b, prelu_w, act);
  const at::Tensor xd = dense(x);
  const int64_t channels = xd.size(1);
  at::Tensor y = at::empty_like(xd);
  const auto opts = xd.options().dtype(acc_type(x));
  at::Tensor mean = at::empty({channels}, opts), var = at::empty({channels}, opts), invstd = at::empty({channels}, opts);
  const ChannelParams p = channel_params(xd, w, b, prelu_w, act, slope);
  DLK_DISPATCH_BN(x, "batch_norm_act_train", [&] {
    using C = compute_t<scalar_t>;
    if (xd.numel() == 0) {
      mean.fill_(NAN), var.fill_(NAN), invstd.fill_(NAN);
      return;
    }
    train_impl(xd.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), act, p, eps, channel_view(xd, channels),
               mean.mutable_data_ptr<C>(), var.mutable_data_ptr<C>(), invstd.mutable_data_ptr<C>());
  });
  return {y, mean, invstd, var};
}

namespace {
at::Tensor prelu_grad(const at::Tensor& per_channel, const std::optional<at::Tensor>& prelu_w, int64_t act,
                      const at::Tensor& x) {
  if (act != kActPrelu) return at::empty({0}, x.options().dtype(acc_type(x)));
  return (prelu_w->numel() == 1 ? per_channel.sum() : per_channel).to(prelu_w->scalar_type()).reshape(prelu_w->sizes());
}
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_backward_reduce(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
    const std::optional<at::Tensor>& w, const std::optional<at::Tensor>& b, const std::optional<at::Tensor>& prelu_w,
    int64_t act, double slope) {
  check_cpu(x, "input");
  check_grad(grad, x);
  check_batch_norm_args(x, mean, invstd, w, b, prelu_w, act);
  const at::Tensor xd = dense(x);
  const at::Tensor gd = same_layout(grad, xd);
  const int64_t channels = xd.size(1);
  const Ks ks = make_consts(channel_params(xd, w, b, prelu_w, act, slope), doubles(mean), doubles(invstd));
  at::Tensor sums = at::empty({3, channels}, xd.options().dtype(at::kDouble));
  DLK_DISPATCH_BN(x, "batch_norm_act_backward_reduce", [&] {
    if (xd.numel() == 0) {
      sums.zero_();
      return;
    }
    reduce_impl(gd.const_data_ptr<scalar_t>(), xd.const_data_ptr<scalar_t>(), act, ks, channel_view(xd, channels),
                sums.mutable_data_ptr<double>());
  });
  return {sums[0].to(acc_type(x)), sums[1].to(acc_type(x)), prelu_grad(sums[2], prelu_w, act, xd)};
}

at::Tensor batch_norm_act_backward_elemt(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean,
                                         const at::Tensor& invstd, const std::optional<at::Tensor>& w,
                                         const std::optional<at::Tensor>& b,
                                         const std::optional<at::Tensor>& prelu_w, const at::Tensor& sum_dz,
                                         const at::Tensor& sum_dz_xhat, int64_t count, int64_t act, double slope) {
  check_cpu(x, "input");
  check_grad(grad, x);
  check_batch_norm_args(x, mean, invstd, w, b, prelu_w, act);
  check_channel_tensor(sum_dz, x, "sum_dz");
  check_channel_tensor(sum_dz_xhat, x, "sum_dz_xhat");
  TORCH_CHECK(count > 0, "dlkernels batch_norm backward: count must be positive, got ", count);
  const at::Tensor xd = dense(x);
  const at::Tensor gd = same_layout(grad, xd);
  at::Tensor gi = at::empty_like(xd);
  const std::vector<double> s0 = doubles(sum_dz), s1 = doubles(sum_dz_xhat);
  const Ks ks = make_consts(channel_params(xd, w, b, prelu_w, act, slope), doubles(mean), doubles(invstd), s0.data(),
                            s1.data(), double(count));
  DLK_DISPATCH_BN(x, "batch_norm_act_backward_elemt", [&] {
    if (xd.numel() == 0) return;
    elemt_impl(gd.const_data_ptr<scalar_t>(), xd.const_data_ptr<scalar_t>(), gi.mutable_data_ptr<scalar_t>(), act, ks,
               channel_view(xd, xd.size(1)));
  });
  return gi;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_act_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
    const std::optional<at::Tensor>& w, const std::optional<at::Tensor>& b, const std::optional<at::Tensor>& prelu_w,
    int64_t act, double slope, bool training) {
  check_cpu(x, "input");
  check_grad(grad, x);
  check_batch_norm_args(x, mean, invstd, w, b, prelu_w, act);
  const at::Tensor xd = dense(x);
  const at::Tensor gd = same_layout(grad, xd);
  const int64_t channels = xd.size(1);
  at::Tensor gi = at::empty_like(xd);
  at::Tensor sums = at::empty({3, channels}, xd.options().dtype(at::kDouble));
  const ChannelParams p = channel_params(xd, w, b, prelu_w, act, slope);
  DLK_DISPATCH_BN(x, "batch_norm_act_backward", [&] {
    if (xd.numel() == 0) {
      sums.zero_();
      return;
    }
    backward_impl(gd.const_data_ptr<scalar_t>(), xd.const_data_ptr<scalar_t>(), gi.mutable_data_ptr<scalar_t>(), act,
                  p, doubles(mean), doubles(invstd), training, channel_view(xd, channels),
                  sums.mutable_data_ptr<double>());
  });
  return {gi, sums[0].to(acc_type(x)), sums[1].to(acc_type(x)), prelu_grad(sums[2], prelu_w, act, xd)};
}

}  // namespace dlk::cpu

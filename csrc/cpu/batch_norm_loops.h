// The batch-norm kernels' SIMD loops over one block in the compute type T (float or double),
// the activation a compile-time code ACT: plain loops that GCC vectorizes at each capability
// level (simd.h). The path files (batch_norm_{row,strip,tile}.cpp) compile the versions of the
// ones they run (DLK_MULTIVERSION), each with the activation as a switch outside the loop.
#pragma once
#include <cstdint>

#include "../common/batch_norm.h"
#include "batch_norm_impl.h"
#include "simd.h"

namespace dlk::cpu {

constexpr int kLanes = 64;  // independent accumulators: vectorizable reductions, 4+ vector add chains

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
  const T mean = lane_sum<kLanes>(acc) / T(n);
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
  out[1] = lane_sum<kLanes>(acc2);
  out[2] = lane_sum<kLanes>(acc3);
}

// Tile path statistics: acc[i] += x[i], then acc[i] += (x[i] - mean[i])^2.
template <typename T>
DLK_INLINE void col_sum_body(const T* x, T* acc, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += x[i];
}
template <typename T>
DLK_INLINE void col_sq_dev_body(const T* x, const T* mean, T* acc, T* res, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    acc[i] += (x[i] - mean[i]) * (x[i] - mean[i]);
    res[i] += x[i] - mean[i];
  }
}

// Per-channel constants as pointers to per-element vectors (tile path).
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
  out[0] += lane_sum<kLanes>(a0);
  out[1] += lane_sum<kLanes>(a1);
  out[2] += lane_sum<kLanes>(a2);
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

}  // namespace dlk::cpu

// The one set of load/store helpers of the CPU kernels: storage (float, double, fp16, bf16) seen
// in its compute type (float for fp16/bf16), converted in L1-sized blocks (simd.h's kBlock) by
// vectorized loops (simd.cpp). A loop then runs on plain float or double pointers either way.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "simd.h"

namespace dlk::cpu {

// bf16 <-> float on the raw bits: plain integer ops, so loops using them vectorize.
DLK_INLINE float bf16_bits_to_float(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, NaN kept quiet: the same rounding as c10::BFloat16.
DLK_INLINE uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return f != f ? uint16_t(0x7fc0) : uint16_t(rounded);
}

// fp16/bf16 storage is computed in float, in L1-sized blocks.
template <typename S>
using compute_t = std::conditional_t<std::is_same_v<S, double>, double, float>;

void to_float(const c10::Half* src, float* dst, int64_t n);
void to_float(const c10::BFloat16* src, float* dst, int64_t n);
void from_float(const float* src, c10::Half* dst, int64_t n);
void from_float(const float* src, c10::BFloat16* dst, int64_t n);

// The compute-type (C) view of m stored elements: the storage itself when it is of type C, else
// `buf` filled from it. Const storage gives a const view; mutable storage (an optimizer's
// parameters and state) a mutable one, written back with store().
template <typename S, typename C>
DLK_INLINE auto load(S* p, C* buf, int64_t m) {
  if constexpr (std::is_same_v<std::remove_const_t<S>, C>) {
    return p;
  } else {
    to_float(p, buf, m);
    return static_cast<std::conditional_t<std::is_const_v<S>, const C*, C*>>(buf);
  }
}

// Where a loop writes m elements bound for storage p: p itself when it is of type C, else `buf`
// (then stored with store()).
template <typename S, typename C>
DLK_INLINE C* out_ptr(S* p, C* buf) {
  if constexpr (std::is_same_v<S, C>) {
    return p;
  } else {
    return buf;
  }
}

// Writes back what load() or out_ptr() gave: a conversion where the storage is not of type C.
template <typename C, typename S>
DLK_INLINE void store(const C* buf, S* p, int64_t m) {
  if constexpr (!std::is_same_v<S, C>) from_float(buf, p, m);
}

// load() that always goes through `buf`, copying storage of type C as well: a loop that walks its
// block column-wise runs faster from an L1 copy made in one sequential sweep (store_block below
// writes such a block back).
template <typename S, typename C>
DLK_INLINE const C* load_block(const S* p, C* buf, int64_t m) {
  if constexpr (std::is_same_v<S, C>) {
    std::memcpy(buf, p, m * sizeof(S));
  } else {
    to_float(p, buf, m);
  }
  return buf;
}

// ---- streaming (non-temporal) stores, for outputs larger than the last-level cache ----
// Such an output is evicted before anyone reads it, and a plain store first reads each line for
// ownership: streaming a block computed in L1 saves that read (8% on a 51 MB leaky ReLU here).
// The loops then write to an L1 block (out_block) and store_out copies it with movntps/movntpd
// (SSE2, so one version serves every level); a task that streamed ends with stream_fence().

// True when an output of `bytes` should be streamed: at least the last-level cache's size.
bool stream_output(int64_t bytes);
void stream_copy(const float* src, float* dst, int64_t n);
void stream_copy(const double* src, double* dst, int64_t n);
void stream_fence();  // orders a task's streaming stores before the tasks join

// out_ptr(), but the L1 block `buf` whenever `nt` (streaming) is on.
template <typename S, typename C>
DLK_INLINE C* out_block(S* p, C* buf, bool nt) {
  return nt ? buf : out_ptr(p, buf);
}

// store() for out_block(): streams the block when `nt`. Only float and double storage stream
// (`nt` is never set for fp16/bf16, whose conversion writes the storage anyway).
template <typename C, typename S>
DLK_INLINE void store_out(const C* buf, S* p, int64_t m, bool nt) {
  if constexpr (std::is_same_v<S, C>) {
    if (nt) stream_copy(buf, p, m);
  } else {
    from_float(buf, p, m);
  }
}

// store() for a loop that always computes into its L1 block `buf`: a copy for storage of type C
// as well, streamed when `nt`.
template <typename C, typename S>
DLK_INLINE void store_block(const C* buf, S* p, int64_t m, bool nt = false) {
  if constexpr (std::is_same_v<S, C>) {
    if (nt) stream_copy(buf, p, m);
    else std::memcpy(p, buf, m * sizeof(S));
  } else {
    from_float(buf, p, m);
  }
}

// Whether outputs of n elements of storage S stream (float and double only).
template <typename S>
bool streams(int64_t n) {
  return std::is_same_v<S, compute_t<S>> && stream_output(n * int64_t(sizeof(S)));
}

// Hints the cache lines of n elements at p into the cache.
template <typename S>
DLK_INLINE void prefetch(const S* p, int64_t n) {
  for (int64_t i = 0; i < n; i += 64 / int64_t(sizeof(S))) __builtin_prefetch(p + i);
}

}  // namespace dlk::cpu

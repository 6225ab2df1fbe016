// CPU vectorization: the hot loops are plain C++ compiled once per ISA level (AVX-512, AVX2,
// baseline) via GCC function multiversioning; the loader picks the best clone for the CPU at
// run time, so one wheel is fast everywhere without -march=native.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DLK_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DLK_CLONES
#endif
#define DLK_INLINE inline __attribute__((always_inline))

namespace dlk::cpu {

// Elements per parallel task (amortizes the OpenMP fork) and per conversion block (L1-resident).
constexpr int64_t kGrain = 1 << 15;
constexpr int64_t kBlock = 2048;

// The ISA level whose clones run on this CPU: "avx512", "avx2" or "baseline".
const char* simd_path();

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

// Compute-type view of m stored elements: the storage itself for float/double, else `buf`.
template <typename S>
DLK_INLINE const compute_t<S>* load(const S* p, compute_t<S>* buf, int64_t m) {
  if constexpr (std::is_same_v<S, compute_t<S>>) {
    return p;
  } else {
    to_float(p, buf, m);
    return buf;
  }
}

template <typename S>
DLK_INLINE compute_t<S>* out_ptr(S* p, compute_t<S>* buf) {
  if constexpr (std::is_same_v<S, compute_t<S>>) {
    return p;
  } else {
    return buf;
  }
}

template <typename S>
DLK_INLINE void store(const compute_t<S>* buf, S* p, int64_t m) {
  if constexpr (!std::is_same_v<S, compute_t<S>>) from_float(buf, p, m);
}

}  // namespace dlk::cpu

// CPU vectorization: the hot loops are plain C++ compiled once per capability level (AVX-512,
// AVX2, default = the x86-64 baseline, SSE2) and the level is chosen at run time, as torch does
// with ATEN_CPU_CAPABILITY: the CPU's best level, or a lower one named by DLK_CPU_CAPABILITY
// (read once, when the extension loads). One wheel is fast everywhere without -march=native.
// setup.py compiles with -fno-trapping-math: without it GCC will not if-convert `x > 0 ? x :
// x * s` on AVX2 or SSE2 (the product may trap), and those loops stay scalar.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#define DLK_INLINE inline __attribute__((always_inline))

namespace dlk::cpu {

// Capability levels, lowest first (the names are DLK_CPU_CAPABILITY's values).
enum Capability : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };
Capability native_capability();  // the best level this CPU runs
Capability capability();         // the level in use
const char* capability_name(Capability c);

}  // namespace dlk::cpu

// DLK_MULTIVERSION(ret, name, (params), (args), body...) defines `ret name(params)`, which runs
// `body(args)` compiled for the level in use: name##_avx512, name##_avx2 and name##_default are
// the versions (kept out of line, so tests/test_build.py finds each one in the binary).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DLK_MULTIVERSION(ret, name, params, args, ...)                                              \
  __attribute__((target("arch=x86-64-v4"), noinline)) ret name##_avx512 params { return __VA_ARGS__ args; } \
  __attribute__((target("arch=x86-64-v3"), noinline)) ret name##_avx2 params { return __VA_ARGS__ args; }   \
  __attribute__((noinline)) ret name##_default params { return __VA_ARGS__ args; }                \
  ret name params {                                                                                \
    switch (::dlk::cpu::capability()) {                                                           \
      case ::dlk::cpu::kAvx512: return name##_avx512 args;                                        \
      case ::dlk::cpu::kAvx2: return name##_avx2 args;                                            \
      default: return name##_default args;                                                        \
    }                                                                                              \
  }
#else
#define DLK_MULTIVERSION(ret, name, params, args, ...) \
  ret name params { return __VA_ARGS__ args; }
#endif

namespace dlk::cpu {

// Elements per parallel task (amortizes the OpenMP fork) and per conversion block (L1-resident).
constexpr int64_t kGrain = 1 << 15;
constexpr int64_t kBlock = 2048;

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

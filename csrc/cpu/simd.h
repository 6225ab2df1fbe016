// CPU vectorization: the hot loops are plain C++ compiled once per capability level (AVX-512,
// AVX2, default = the x86-64 baseline, SSE2) and the level is chosen at run time, as torch does
// with ATEN_CPU_CAPABILITY: the CPU's best level, or a lower one named by DLK_CPU_CAPABILITY
// (read once, when the extension loads). One wheel is fast everywhere without -march=native.
// setup.py compiles with -fno-trapping-math: without it GCC will not if-convert `x > 0 ? x :
// x * s` on AVX2 or SSE2 (the product may trap), and those loops stay scalar.
// The loops' fp16/bf16 storage is converted to and from float by loadstore.h.
#pragma once
#include <cstdint>

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

// The sum of a reduction's Lanes independent accumulators: folded pairwise (vector adds) down to
// 8, then those 8 in order (a serial sum of 64 lanes would cost more than a short row's loop).
// A fixed order, so every SIMD level gives the same bits.
template <int Lanes, typename T>
DLK_INLINE T lane_sum(T* acc) {
  static_assert(Lanes >= 8 && (Lanes & (Lanes - 1)) == 0, "a power of two, at least 8");
  for (int w = Lanes / 2; w >= 8; w /= 2)
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  T s = 0;
  for (int j = 0; j < 8; ++j) s += acc[j];
  return s;
}

}  // namespace dlk::cpu

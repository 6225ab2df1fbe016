#include "simd.h"

#include <cstring>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace dlk::cpu {

const char* simd_path() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return "avx512";
  if (__builtin_cpu_supports("x86-64-v3")) return "avx2";
#endif
  return "baseline";
}

namespace {

#if defined(__x86_64__) && defined(__GNUC__)
bool has_f16c() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx2");
  }();
  return yes;
}

__attribute__((target("avx2,f16c"))) int64_t half_to_float_f16c(const uint16_t* s, float* d,
                                                                   int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
    _mm256_storeu_ps(d + i, _mm256_cvtph_ps(h));
  }
  return i;
}

__attribute__((target("avx2,f16c"))) int64_t float_to_half_f16c(const float* s, uint16_t* d,
                                                                   int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), h);
  }
  return i;
}
#else
bool has_f16c() { return false; }
int64_t half_to_float_f16c(const uint16_t*, float*, int64_t) { return 0; }
int64_t float_to_half_f16c(const float*, uint16_t*, int64_t) { return 0; }
#endif

}  // namespace

DLK_CLONES void to_float(const c10::BFloat16* src, float* dst, int64_t n) {
  const auto* s = reinterpret_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_bits_to_float(s[i]);
}

DLK_CLONES void from_float(const float* src, c10::BFloat16* dst, int64_t n) {
  auto* d = reinterpret_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) d[i] = float_to_bf16_bits(src[i]);
}

void to_float(const c10::Half* src, float* dst, int64_t n) {
  const auto* s = reinterpret_cast<const uint16_t*>(src);
  int64_t i = has_f16c() ? half_to_float_f16c(s, dst, n) : 0;
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

void from_float(const float* src, c10::Half* dst, int64_t n) {
  auto* d = reinterpret_cast<uint16_t*>(dst);
  int64_t i = has_f16c() ? float_to_half_f16c(src, d, n) : 0;
  for (; i < n; ++i) dst[i] = c10::Half(src[i]);
}

}  // namespace dlk::cpu

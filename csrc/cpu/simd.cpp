#include "loadstore.h"
#include "simd.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace dlk::cpu {

Capability native_capability() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return kAvx512;
  if (__builtin_cpu_supports("x86-64-v3")) return kAvx2;
#endif
  return kDefault;
}

const char* capability_name(Capability c) {
  return c == kAvx512 ? "avx512" : c == kAvx2 ? "avx2" : "default";
}

namespace {

// DLK_CPU_CAPABILITY lowers the level; a level above the CPU's, or an unknown name, is ignored
// (the Python package warns about it): running AVX-512 code on an AVX2 CPU would be SIGILL.
Capability pick_capability() {
  const Capability native = native_capability();
  const char* env = std::getenv("DLK_CPU_CAPABILITY");
  if (env == nullptr) return native;
  for (Capability c : {kDefault, kAvx2, kAvx512})
    if (std::strcmp(env, capability_name(c)) == 0) return std::min(c, native);
  return native;
}

const Capability g_capability = pick_capability();

}  // namespace

Capability capability() { return g_capability; }

namespace {

#if defined(__x86_64__) && defined(__GNUC__)
bool has_f16c() {  // every AVX2-level (x86-64-v3) CPU has F16C
  return capability() >= kAvx2;
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

DLK_INLINE void bf16_to_float_body(const uint16_t* s, float* d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) d[i] = bf16_bits_to_float(s[i]);
}
DLK_INLINE void float_to_bf16_body(const float* s, uint16_t* d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) d[i] = float_to_bf16_bits(s[i]);
}
DLK_MULTIVERSION(void, bf16_to_float, (const uint16_t* s, float* d, int64_t n), (s, d, n), bf16_to_float_body)
DLK_MULTIVERSION(void, float_to_bf16, (const float* s, uint16_t* d, int64_t n), (s, d, n), float_to_bf16_body)

}  // namespace

void to_float(const c10::BFloat16* src, float* dst, int64_t n) {
  bf16_to_float(reinterpret_cast<const uint16_t*>(src), dst, n);
}

void from_float(const float* src, c10::BFloat16* dst, int64_t n) {
  float_to_bf16(src, reinterpret_cast<uint16_t*>(dst), n);
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

#include "loadstore.h"
#include "simd.h"

#include <algorithm>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <unistd.h>
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

// ---- streaming stores (loadstore.h) ----

namespace {
// sysfs first: it gives the L3 these cores share, where glibc's sysconf may report the whole
// package's (384 MiB on the 2-core EPYC VMs here, against a 32 MiB L3).
int64_t last_level_cache_bytes() {
  if (FILE* f = std::fopen("/sys/devices/system/cpu/cpu0/cache/index3/size", "r")) {
    long kib = 0;
    const int got = std::fscanf(f, "%ldK", &kib);
    std::fclose(f);
    if (got == 1 && kib > 0) return int64_t(kib) << 10;
  }
#ifdef _SC_LEVEL3_CACHE_SIZE
  const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
  if (l3 > 0) return l3;
#endif
  return int64_t(32) << 20;  // unknown (some VMs report 0): a common server L3
}
// DLK_STREAM_BYTES overrides the threshold (read once, at load): 0 streams every float/double
// output, which is how the tests cover this path on small inputs.
int64_t stream_threshold() {
  const char* env = std::getenv("DLK_STREAM_BYTES");
  if (env != nullptr && *env != '\0') return std::strtoll(env, nullptr, 10);
  return last_level_cache_bytes();
}
const int64_t g_stream_bytes = stream_threshold();

// Whole 64-byte lines with movnt* (16 bytes at a time), the partial lines at either end with plain
// stores: a partly streamed line leaves the write-combining buffer as a partial write, which the
// memory controller must merge (rows of 196 floats ran 1.6x slower streamed that way).
template <typename T, typename Stream>
void stream_copy_impl(const T* src, T* dst, int64_t n, Stream stream) {
  constexpr int64_t kStep = 16 / int64_t(sizeof(T)), kLine = 64 / int64_t(sizeof(T));
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 63) != 0; ++i) dst[i] = src[i];
  for (; i + kLine <= n; i += kLine)
    for (int64_t j = 0; j < kLine; j += kStep) stream(src + i + j, dst + i + j);
  for (; i < n; ++i) dst[i] = src[i];
}
}  // namespace

bool stream_output(int64_t bytes) { return bytes >= g_stream_bytes; }

#if defined(__x86_64__)
void stream_copy(const float* src, float* dst, int64_t n) {
  stream_copy_impl(src, dst, n, [](const float* s, float* d) { _mm_stream_ps(d, _mm_loadu_ps(s)); });
}
void stream_copy(const double* src, double* dst, int64_t n) {
  stream_copy_impl(src, dst, n, [](const double* s, double* d) { _mm_stream_pd(d, _mm_loadu_pd(s)); });
}
void stream_fence() { _mm_sfence(); }
#else
void stream_copy(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }
void stream_copy(const double* src, double* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(double)); }
void stream_fence() {}
#endif

}  // namespace dlk::cpu

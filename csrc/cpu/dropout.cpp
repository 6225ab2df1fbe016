// Dropout (alone and fused with leaky ReLU / PReLU) on the CPU, from the Philox4x32-10 stream of
// docs/dropout.md (csrc/common/philox.h). No mask is stored: every kernel recomputes an element's
// word from the seed and the element's logical index (its row-major position in x's shape).
//
// Work goes in blocks of at most kBlock memory positions, in two steps: the words of the block
// (an L1-resident uint32 buffer), then the elementwise op reading them. Where memory order is
// row-major order (contiguous x, or a layout that coalesces to it) a block of 4k consecutive
// logical indices takes k Philox evaluations (philox_row). Other dense layouts (channels_last,
// any other dim order) walk memory and compute each element's logical index (an odometer over
// the coalesced dims, IndexMap), then one whole Philox evaluation per element keeping one of its
// four words (philox_at): 4x the generator work of the row-major path (measured on the
// development machine, one thread, AVX2: 4.9 ns per element against 0.94 for contiguous input).
// Per-channel masks compute the words of the (N, C) grid once and gather them. Non-dense inputs
// are copied first (dense()); a layout of more than kIndexMapMaxDims coalesced dims is computed on
// a contiguous copy.
//
// OpenMP across fixed chunks of kGrain positions (multiples of 4), SIMD within a block: the ops
// are plain loops compiled per capability level (DLK_MULTIVERSION, simd.h), the generator is
// written with GCC vector types, one version per level (see vec:: below for why). PReLU's weight
// gradient adds fixed pieces in a fixed order. Results are independent of the thread count and
// of the SIMD level.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../api/dropout.h"
#include "../common/activation.h"
#include "../common/philox.h"
#include "../prep.h"
#include "dropout_stream.h"
#include "loadstore.h"
#include "simd.h"
#include "output.h"

namespace dlk::cpu {
namespace {

// ---- SIMD loops: the generator ----

// The words of counters (c0 + j, c1, 0, 0), j < nq, interleaved: out[4j + w] = word w (c0 + j
// must not wrap: the caller splits there). Plain loop: the tails of the vector versions below,
// and the whole generator where those are not compiled.
DLK_INLINE void philox_row_scalar(uint32_t c0, uint32_t c1, int64_t j0, int64_t nq, uint32_t k0, uint32_t k1,
                                  uint32_t* __restrict__ out) {
  for (int64_t j = j0; j < nq; ++j) {
    uint32_t r0 = c0 + uint32_t(j), r1 = c1, r2 = 0, r3 = 0;
    ::dlk::philox4x32_10(r0, r1, r2, r3, k0, k1);
    out[4 * j] = r0;
    out[4 * j + 1] = r1;
    out[4 * j + 2] = r2;
    out[4 * j + 3] = r3;
  }
}

// The word of each logical index idx[i], i in [i0, n): a whole evaluation per element.
DLK_INLINE void philox_at_scalar(const int64_t* __restrict__ idx, uint32_t* __restrict__ out, int64_t i0, int64_t n,
                                 uint32_t k0, uint32_t k1) {
  for (int64_t i = i0; i < n; ++i) out[i] = dropout_word(uint64_t(idx[i]), k0, k1);
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// The generator with GCC vector types, one version per capability level. GCC does vectorize the
// plain loop (philox_row_scalar), but its 32x32->64 products of 32-bit lanes come out as
// widen-lo/hi multiplies wrapped in ~500 cross-lane shuffles per 8 counters: on AVX2 that loop
// ran at 2.4 ns per word on the development machine (AMD EPYC), slower than scalar code (1.8).
// Here each product is the ISA's even-lane multiply (pmuludq: the one intrinsic per level) with
// in-lane shuffles or shifts around it, the rounds of K independent vectors are interleaved to
// hide the multiply latency, and a 4x4 transpose per vector writes the words interleaved:
// 0.87 ns per word on the same machine (multiply-throughput bound). Every other operation is
// generic vector code, so one template serves the three levels.
// Vector results of the inline helpers below are never an ABI boundary; -Wpsabi's notes about
// them come at the end of the file, so the warning stays off from here on. GCC 12 also reports
// the 64-byte vector arrays of the AVX-512 version as maybe uninitialized where they are written.
#pragma GCC diagnostic ignored "-Wpsabi"
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
namespace vec {

#define DLK_VEC_TYPES(N)                                                \
  typedef uint32_t u32 __attribute__((vector_size(4 * (N))));          \
  typedef uint64_t u64 __attribute__((vector_size(4 * (N))));          \
  static constexpr int kN = (N);

// Per level: kN 32-bit lanes; mul_even = the 64-bit products of the even lanes (pmuludq);
// whether vpblendd exists (kBlend); shuffles: duplicate the odd/even lanes, take the odd lanes
// of b into a, interleave the low/high halves of two vectors, the even/odd lanes of two vectors.
struct Sse2 {
  DLK_VEC_TYPES(4)
  static constexpr bool kBlend = false;
  static DLK_INLINE u32 mul_even(const u32& a, const u32& b) { return (u32)_mm_mul_epu32((__m128i)a, (__m128i)b); }
  static DLK_INLINE u32 dup_odd(const u32& a) { return __builtin_shufflevector(a, a, 1, 1, 3, 3); }
  static DLK_INLINE u32 dup_even(const u32& a) { return __builtin_shufflevector(a, a, 0, 0, 2, 2); }
  static DLK_INLINE u32 blend_odd(const u32& a, const u32& b) { return __builtin_shufflevector(a, b, 0, 5, 2, 7); }
  static DLK_INLINE u32 zip_lo(const u32& a, const u32& b) { return __builtin_shufflevector(a, b, 0, 4, 1, 5); }
  static DLK_INLINE u32 zip_hi(const u32& a, const u32& b) { return __builtin_shufflevector(a, b, 2, 6, 3, 7); }
  static DLK_INLINE u32 evens(const u32& a, const u32& b) { return __builtin_shufflevector(a, b, 0, 2, 4, 6); }
  static DLK_INLINE u32 odds(const u32& a, const u32& b) { return __builtin_shufflevector(a, b, 1, 3, 5, 7); }
};

// mul_even carries its level's target and is plain inline: it is inlined into the versions below,
// which are compiled for that level and flattened.
struct Avx2 {
  DLK_VEC_TYPES(8)
  static constexpr bool kBlend = true;
  __attribute__((target("arch=x86-64-v3"))) static inline u32 mul_even(const u32& a, const u32& b) {
    return (u32)_mm256_mul_epu32((__m256i)a, (__m256i)b);
  }
  static DLK_INLINE u32 dup_odd(const u32& a) { return __builtin_shufflevector(a, a, 1, 1, 3, 3, 5, 5, 7, 7); }
  static DLK_INLINE u32 dup_even(const u32& a) { return __builtin_shufflevector(a, a, 0, 0, 2, 2, 4, 4, 6, 6); }
  static DLK_INLINE u32 blend_odd(const u32& a, const u32& b) { return __builtin_shufflevector(a, b, 0, 9, 2, 11, 4, 13, 6, 15); }
  static DLK_INLINE u32 zip_lo(const u32& a, const u32& b) { return __builtin_shufflevector(a, b, 0, 8, 1, 9, 2, 10, 3, 11); }
  static DLK_INLINE u32 zip_hi(const u32& a, const u32& b) { return __builtin_shufflevector(a, b, 4, 12, 5, 13, 6, 14, 7, 15); }
  static DLK_INLINE u32 evens(const u32& a, const u32& b) { return __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14); }
  static DLK_INLINE u32 odds(const u32& a, const u32& b) { return __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15); }
};

struct Avx512 {
  DLK_VEC_TYPES(16)
  static constexpr bool kBlend = true;
  __attribute__((target("arch=x86-64-v4"))) static inline u32 mul_even(const u32& a, const u32& b) {
    // maskz with all lanes: plain vpmuludq (_mm512_mul_epu32's undefined passthrough trips GCC 12's
    // -Wmaybe-uninitialized)
    return (u32)_mm512_maskz_mul_epu32(__mmask8(0xFF), (__m512i)a, (__m512i)b);
  }
  static DLK_INLINE u32 dup_odd(const u32& a) {
    return __builtin_shufflevector(a, a, 1, 1, 3, 3, 5, 5, 7, 7, 9, 9, 11, 11, 13, 13, 15, 15);
  }
  static DLK_INLINE u32 dup_even(const u32& a) {
    return __builtin_shufflevector(a, a, 0, 0, 2, 2, 4, 4, 6, 6, 8, 8, 10, 10, 12, 12, 14, 14);
  }
  static DLK_INLINE u32 blend_odd(const u32& a, const u32& b) {
    return __builtin_shufflevector(a, b, 0, 17, 2, 19, 4, 21, 6, 23, 8, 25, 10, 27, 12, 29, 14, 31);
  }
  static DLK_INLINE u32 zip_lo(const u32& a, const u32& b) {
    return __builtin_shufflevector(a, b, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  }
  static DLK_INLINE u32 zip_hi(const u32& a, const u32& b) {
    return __builtin_shufflevector(a, b, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  }
  static DLK_INLINE u32 evens(const u32& a, const u32& b) {
    return __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  }
  static DLK_INLINE u32 odds(const u32& a, const u32& b) {
    return __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  }
};
#undef DLK_VEC_TYPES

// hi:lo = a * m per 32-bit lane (philox_mulhilo of common/philox.h, lane by lane).
template <class L>
DLK_INLINE void mulhilo(const typename L::u32& a, uint32_t m, typename L::u32& hi, typename L::u32& lo) {
  using u32 = typename L::u32;
  using u64 = typename L::u64;
  const u32 mv = u32{} + m;
  if constexpr (L::kBlend) {
    const u32 pe = L::mul_even(a, mv);              // products of the even lanes, as (lo, hi) pairs
    const u32 po = L::mul_even(L::dup_odd(a), mv);  // products of the odd lanes
    lo = L::blend_odd(pe, L::dup_even(po));
    hi = L::blend_odd(L::dup_odd(pe), po);
  } else {  // SSE2 has no 32-bit blend: shifts and masks
    const u64 pe = (u64)L::mul_even(a, mv), po = (u64)L::mul_even((u32)((u64)a >> 32), mv);
    const u64 low = u64{} + 0xFFFFFFFFull;
    lo = (u32)((pe & low) | (po << 32));
    hi = (u32)((pe >> 32) | (po & ~low));
  }
}

// Philox4x32-10 of K counter vectors at once (their rounds interleaved).
template <class L, int K>
DLK_INLINE void philox(typename L::u32 (&c0)[K], typename L::u32 (&c1)[K], typename L::u32 (&c2)[K],
                       typename L::u32 (&c3)[K], uint32_t k0, uint32_t k1) {
  using u32 = typename L::u32;
#pragma GCC unroll 16
  for (int r = 0; r < kPhiloxRounds; ++r) {
    if (r > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) {
      u32 hi0, lo0, hi1, lo1;
      mulhilo<L>(c0[k], kPhiloxM0, hi0, lo0);
      mulhilo<L>(c2[k], kPhiloxM1, hi1, lo1);
      c0[k] = hi1 ^ c1[k] ^ k0;
      c1[k] = lo1;
      c2[k] = hi0 ^ c3[k] ^ k1;
      c3[k] = lo0;
    }
  }
}

template <class L>
DLK_INLINE typename L::u32 iota() {
  typename L::u32 v{};
  for (int l = 0; l < L::kN; ++l) v[l] = uint32_t(l);
  return v;
}

// philox_row_scalar for K * kN counters per step (then kN, then a scalar tail).
template <class L, int K>
DLK_INLINE int64_t row_steps(uint32_t c0, uint32_t c1, int64_t j, int64_t nq, uint32_t k0, uint32_t k1,
                             uint32_t* __restrict__ out) {
  using u32 = typename L::u32;
  constexpr int N = L::kN;
  const u32 lanes = iota<L>(), hi = u32{} + c1;
  for (; j + K * N <= nq; j += K * N) {
    u32 r0[K], r1[K], r2[K], r3[K];
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) {
      r0[k] = lanes + (c0 + uint32_t(j + k * N));
      r1[k] = hi;
      r2[k] = u32{};
      r3[k] = u32{};
    }
    philox<L, K>(r0, r1, r2, r3, k0, k1);
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) {  // transpose: out[4 (j + l) + w] = r_w[l]
      const u32 a = L::zip_lo(r0[k], r2[k]), b = L::zip_hi(r0[k], r2[k]);
      const u32 c = L::zip_lo(r1[k], r3[k]), d = L::zip_hi(r1[k], r3[k]);
      const u32 o[4] = {L::zip_lo(a, c), L::zip_hi(a, c), L::zip_lo(b, d), L::zip_hi(b, d)};
      __builtin_memcpy(out + 4 * (j + int64_t(k) * N), o, sizeof(o));
    }
  }
  return j;
}

template <class L>
DLK_INLINE void philox_row_body(uint32_t c0, uint32_t c1, int64_t nq, uint32_t k0, uint32_t k1,
                                uint32_t* __restrict__ out) {
  // Four interleaved vectors hide the multiply latency, but AVX2's 16 ymm registers cannot hold
  // 4 x 4 states and their temporaries: two there (0.92 -> 0.69 ns per word, one thread, on the
  // AMD EPYC test VM; SSE2 keeps four, its best, and AVX-512 has 32 registers)
  int64_t j = row_steps<L, (L::kN == 8 ? 2 : 4)>(c0, c1, 0, nq, k0, k1, out);
  j = row_steps<L, 1>(c0, c1, j, nq, k0, k1, out);
  philox_row_scalar(c0, c1, j, nq, k0, k1, out);
}

template <class L>
DLK_INLINE void philox_at_body(const int64_t* __restrict__ idx, uint32_t* __restrict__ out, int64_t n, uint32_t k0,
                               uint32_t k1) {
  using u32 = typename L::u32;
  using u64 = typename L::u64;
  constexpr int N = L::kN, K = 2;
  int64_t i = 0;
  for (; i + K * N <= n; i += K * N) {
    u32 q0[K], q1[K], z0[K], z1[K], j[K];
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) {
      u64 a, b;  // indices i + kN .. (two vectors of N / 2)
      __builtin_memcpy(&a, idx + i + k * N, sizeof(a));
      __builtin_memcpy(&b, idx + i + k * N + N / 2, sizeof(b));
      const u32 qa = (u32)(a >> 2), qb = (u32)(b >> 2);
      q0[k] = L::evens(qa, qb);  // q mod 2^32
      q1[k] = L::odds(qa, qb);   // q div 2^32
      j[k] = L::evens((u32)a, (u32)b) & 3u;
      z0[k] = u32{};
      z1[k] = u32{};
    }
    philox<L, K>(q0, q1, z0, z1, k0, k1);
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) {
      const u32 w = j[k] < 2u ? (j[k] == 0u ? q0[k] : q1[k]) : (j[k] == 2u ? z0[k] : z1[k]);
      __builtin_memcpy(out + i + k * N, &w, sizeof(w));
    }
  }
  philox_at_scalar(idx, out, i, n, k0, k1);
}

}  // namespace vec
#pragma GCC diagnostic pop

// The versions, named as DLK_MULTIVERSION's (tests/test_build.py checks them), and name_level
// picking one; flatten inlines the level's mul_even.
#define DLK_PHILOX_VERSIONS(name, params, args)                                                             \
  __attribute__((target("arch=x86-64-v4"), noinline, flatten)) void name##_avx512 params {                 \
    vec::name##_body<vec::Avx512> args;                                                                     \
  }                                                                                                         \
  __attribute__((target("arch=x86-64-v3"), noinline, flatten)) void name##_avx2 params {                   \
    vec::name##_body<vec::Avx2> args;                                                                       \
  }                                                                                                         \
  __attribute__((noinline, flatten)) void name##_default params { vec::name##_body<vec::Sse2> args; }       \
  void name##_level params {                                                                                \
    switch (capability()) {                                                                                 \
      case kAvx512: return name##_avx512 args;                                                              \
      case kAvx2: return name##_avx2 args;                                                                  \
      default: return name##_default args;                                                                  \
    }                                                                                                       \
  }
DLK_PHILOX_VERSIONS(philox_row, (uint32_t c0, uint32_t c1, int64_t nq, uint32_t k0, uint32_t k1, uint32_t* out),
                    (c0, c1, nq, k0, k1, out))
DLK_PHILOX_VERSIONS(philox_at, (const int64_t* idx, uint32_t* out, int64_t n, uint32_t k0, uint32_t k1),
                    (idx, out, n, k0, k1))
#undef DLK_PHILOX_VERSIONS
#else
void philox_row_level(uint32_t c0, uint32_t c1, int64_t nq, uint32_t k0, uint32_t k1, uint32_t* out) {
  philox_row_scalar(c0, c1, 0, nq, k0, k1, out);
}
void philox_at_level(const int64_t* idx, uint32_t* out, int64_t n, uint32_t k0, uint32_t k1) {
  philox_at_scalar(idx, out, 0, n, k0, k1);
}
#endif

}  // namespace

// dropout_stream.h's entry points to the generator (for the batch norm kernels too).
void philox_row(uint32_t c0, uint32_t c1, int64_t nq, uint32_t k0, uint32_t k1, uint32_t* out) {
  philox_row_level(c0, c1, nq, k0, k1, out);
}
void philox_at(const int64_t* idx, uint32_t* out, int64_t n, uint32_t k0, uint32_t k1) {
  philox_at_level(idx, out, n, k0, k1);
}

namespace {

// Philox4x32-10 of n counters of four int64 words (low 32 bits), for philox4x32_10().
DLK_INLINE void philox_counters_body(const int64_t* __restrict__ c, int64_t* __restrict__ out, int64_t n,
                                     uint32_t k0, uint32_t k1) {
  for (int64_t j = 0; j < n; ++j) {
    uint32_t r0 = uint32_t(c[4 * j]), r1 = uint32_t(c[4 * j + 1]);
    uint32_t r2 = uint32_t(c[4 * j + 2]), r3 = uint32_t(c[4 * j + 3]);
    ::dlk::philox4x32_10(r0, r1, r2, r3, k0, k1);
    out[4 * j] = int64_t(r0);
    out[4 * j + 1] = int64_t(r1);
    out[4 * j + 2] = int64_t(r2);
    out[4 * j + 3] = int64_t(r3);
  }
}
DLK_MULTIVERSION(void, philox_counters, (const int64_t* c, int64_t* out, int64_t n, uint32_t k0, uint32_t k1),
                 (c, out, n, k0, k1), philox_counters_body)

// ---- SIMD loops: the ops over one block (float and double compute; w = the block's words) ----

template <typename T>
DLK_INLINE void drop_body(const T* __restrict__ x, const uint32_t* __restrict__ w, T* __restrict__ y, int64_t n,
                          uint32_t t, T s) {
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * dropout_multiplier(w[i], t, s);
}
DLK_MULTIVERSION(void, drop, (const float* x, const uint32_t* w, float* y, int64_t n, uint32_t t, float s),
                 (x, w, y, n, t, s), drop_body)
DLK_MULTIVERSION(void, drop, (const double* x, const uint32_t* w, double* y, int64_t n, uint32_t t, double s),
                 (x, w, y, n, t, s), drop_body)

// y = leaky_relu(x, slope) * m
template <typename T>
DLK_INLINE void leaky_drop_fwd_body(const T* __restrict__ x, const uint32_t* __restrict__ w, T* __restrict__ y,
                                    int64_t n, uint32_t t, T s, T slope) {
  for (int64_t i = 0; i < n; ++i) y[i] = leaky_relu_fwd(x[i], slope) * dropout_multiplier(w[i], t, s);
}
DLK_MULTIVERSION(void, leaky_drop_fwd,
                 (const float* x, const uint32_t* w, float* y, int64_t n, uint32_t t, float s, float slope),
                 (x, w, y, n, t, s, slope), leaky_drop_fwd_body)
DLK_MULTIVERSION(void, leaky_drop_fwd,
                 (const double* x, const uint32_t* w, double* y, int64_t n, uint32_t t, double s, double slope),
                 (x, w, y, n, t, s, slope), leaky_drop_fwd_body)

// y = prelu(x) * m with one slope per element (sl)
template <typename T>
DLK_INLINE void prelu_drop_fwd_body(const T* __restrict__ x, const T* __restrict__ sl, const uint32_t* __restrict__ w,
                                    T* __restrict__ y, int64_t n, uint32_t t, T s) {
  for (int64_t i = 0; i < n; ++i) y[i] = leaky_relu_fwd(x[i], sl[i]) * dropout_multiplier(w[i], t, s);
}
DLK_MULTIVERSION(void, prelu_drop_fwd,
                 (const float* x, const float* sl, const uint32_t* w, float* y, int64_t n, uint32_t t, float s),
                 (x, sl, w, y, n, t, s), prelu_drop_fwd_body)
DLK_MULTIVERSION(void, prelu_drop_fwd,
                 (const double* x, const double* sl, const uint32_t* w, double* y, int64_t n, uint32_t t, double s),
                 (x, sl, w, y, n, t, s), prelu_drop_fwd_body)

// d = g * m; gi = x > 0 ? d : d * slope
template <typename T>
DLK_INLINE void leaky_drop_bwd_body(const T* __restrict__ g, const T* __restrict__ x, const uint32_t* __restrict__ w,
                                    T* __restrict__ gi, int64_t n, uint32_t t, T s, T slope) {
  for (int64_t i = 0; i < n; ++i) gi[i] = leaky_relu_bwd(g[i] * dropout_multiplier(w[i], t, s), x[i], slope);
}
DLK_MULTIVERSION(void, leaky_drop_bwd,
                 (const float* g, const float* x, const uint32_t* w, float* gi, int64_t n, uint32_t t, float s,
                  float slope),
                 (g, x, w, gi, n, t, s, slope), leaky_drop_bwd_body)
DLK_MULTIVERSION(void, leaky_drop_bwd,
                 (const double* g, const double* x, const uint32_t* w, double* gi, int64_t n, uint32_t t, double s,
                  double slope),
                 (g, x, w, gi, n, t, s, slope), leaky_drop_bwd_body)

// One slope for the block; returns the block's slope gradient (sum of x * d over x <= 0). 16
// independent partial sums let the compiler vectorize without reassociating one accumulator.
constexpr int kLanes = 16;
template <typename T>
DLK_INLINE T prelu_drop_bwd_row_body(const T* __restrict__ g, const T* __restrict__ x, const uint32_t* __restrict__ w,
                                     T* __restrict__ gi, int64_t n, uint32_t t, T s, T slope) {
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const T d = g[i + j] * dropout_multiplier(w[i + j], t, s);
      gi[i + j] = leaky_relu_bwd(d, x[i + j], slope);
      acc[j] += prelu_weight_grad(d, x[i + j]);
    }
  }
  for (; i < n; ++i) {
    const T d = g[i] * dropout_multiplier(w[i], t, s);
    gi[i] = leaky_relu_bwd(d, x[i], slope);
    acc[0] += prelu_weight_grad(d, x[i]);
  }
  T total = 0;
  for (int j = 0; j < kLanes; ++j) total += acc[j];
  return total;
}
DLK_MULTIVERSION(float, prelu_drop_bwd_row,
                 (const float* g, const float* x, const uint32_t* w, float* gi, int64_t n, uint32_t t, float s,
                  float slope),
                 (g, x, w, gi, n, t, s, slope), prelu_drop_bwd_row_body)
DLK_MULTIVERSION(double, prelu_drop_bwd_row,
                 (const double* g, const double* x, const uint32_t* w, double* gi, int64_t n, uint32_t t, double s,
                  double slope),
                 (g, x, w, gi, n, t, s, slope), prelu_drop_bwd_row_body)

// One slope per element (sl); slope gradients accumulate per element into acc.
// No __restrict__ here: with it GCC loads x[i] once, jump-threads the two selects on x > 0 into
// one branch with stores on both paths, and the SSE2 level (no masked stores) stays scalar; with
// possible aliasing x[i] is read twice, the selects stay apart and every level vectorizes (behind
// a runtime overlap check, as the activation family's prelu_bwd_vec).
template <typename T>
DLK_INLINE void prelu_drop_bwd_vec_body(const T* g, const T* x, const T* sl, const uint32_t* w, T* gi, T* acc,
                                        int64_t n, uint32_t t, T s) {
  for (int64_t i = 0; i < n; ++i) {
    const T d = g[i] * dropout_multiplier(w[i], t, s);
    gi[i] = leaky_relu_bwd(d, x[i], sl[i]);
    acc[i] += prelu_weight_grad(d, x[i]);
  }
}
DLK_MULTIVERSION(void, prelu_drop_bwd_vec,
                 (const float* g, const float* x, const float* sl, const uint32_t* w, float* gi, float* acc, int64_t n,
                  uint32_t t, float s),
                 (g, x, sl, w, gi, acc, n, t, s), prelu_drop_bwd_vec_body)
DLK_MULTIVERSION(void, prelu_drop_bwd_vec,
                 (const double* g, const double* x, const double* sl, const uint32_t* w, double* gi, double* acc,
                  int64_t n, uint32_t t, double s),
                 (g, x, sl, w, gi, acc, n, t, s), prelu_drop_bwd_vec_body)

}  // namespace

// ---- the words of a block (declared in dropout_stream.h) ----

// The words of logical indices [i0, i0 + m), m <= kBlock, into buf; returns where they start
// (buf + i0 mod 4). The counter's high word c1 is constant within one philox_row call, so a
// range whose low word wraps (beyond 2^34 elements) takes two.
const uint32_t* row_major_words(uint64_t i0, int64_t m, uint32_t k0, uint32_t k1, uint32_t* buf) {
  uint64_t q = i0 >> 2;
  const int64_t nq = (int64_t(i0 & 3) + m + 3) >> 2;
  for (int64_t done = 0; done < nq;) {
    const uint32_t lo = uint32_t(q);
    const int64_t cnt = std::min<int64_t>(nq - done, int64_t(uint64_t(1) << 32) - int64_t(lo));
    philox_row(lo, uint32_t(q >> 32), cnt, k0, k1, buf + 4 * done);
    done += cnt;
    q += uint64_t(cnt);
  }
  return buf + (i0 & 3);
}

// out[k] = the logical index of memory position o + k, k < m: an odometer over the map's dims
// (divisions once per block, then runs along the innermost dim).
void fill_indices(const IndexMap& map, int64_t o, int64_t m, int64_t* out) {
  if (map.ndim == 0) {
    std::fill_n(out, m, int64_t(0));
    return;
  }
  int64_t coord[kIndexMapMaxDims];
  int64_t rest = o;
  for (int d = 0; d < map.ndim - 1; ++d) {
    coord[d] = rest % map.size[d];
    rest /= map.size[d];
  }
  coord[map.ndim - 1] = rest;
  int64_t base = 0;  // the index without dim 0's term
  for (int d = 1; d < map.ndim; ++d) base += coord[d] * map.weight[d];
  const int64_t s0 = map.size[0], w0 = map.weight[0];
  for (int64_t k = 0; k < m;) {
    const int64_t run = std::min(s0 - coord[0], m - k);
    const int64_t start = base + coord[0] * w0;
    for (int64_t j = 0; j < run; ++j) out[k + j] = start + j * w0;
    k += run;
    coord[0] += run;
    if (coord[0] == s0 && k < m) {  // carry into the outer dims
      coord[0] = 0;
      for (int d = 1; d < map.ndim; ++d) {
        base += map.weight[d];
        if (++coord[d] < map.size[d] || d == map.ndim - 1) break;
        base -= coord[d] * map.weight[d];
        coord[d] = 0;
      }
    }
  }
}

namespace {

// body(o, m) over blocks of at most kBlock positions of [0, n), in parallel over fixed chunks of
// kGrain positions (multiples of 4: row-major blocks start on a Philox counter), the same blocks
// whatever the number of threads.
// nt: the body streams its stores (loadstore.h), so each task ends with a fence.
template <typename F>
void for_blocks(int64_t n, const F& body, bool nt = false) {
  const int64_t chunks = (n + kGrain - 1) / kGrain;
  at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      const int64_t end = std::min(n, (c + 1) * kGrain);
      for (int64_t o = c * kGrain; o < end; o += kBlock) body(o, std::min(kBlock, end - o));
    }
    if (nt) stream_fence();
  });
}

// The words of logical indices [0, n) (row-major), converted by put(dst_offset, words, m).
template <typename F>
void row_major_stream(int64_t n, uint32_t k0, uint32_t k1, const F& put) {
  for_blocks(n, [&](int64_t o, int64_t m) {
    alignas(64) uint32_t wbuf[kWordBuf];
    put(o, row_major_words(uint64_t(o), m, k0, k1, wbuf), m);
  });
}

}  // namespace

Stream make_stream(const at::Tensor& xd, int64_t seed, bool per_channel) {
  Stream st;
  st.k0 = seed_k0(uint64_t(seed));
  st.k1 = seed_k1(uint64_t(seed));
  st.map = make_index_map(xd, per_channel);
  if (st.too_deep()) return st;  // the caller computes on a contiguous copy
  if (is_row_major(st.map)) {
    // memory position == logical index (per channel too: each position is its own (n, c))
    st.kind = Stream::kRowMajor;
  } else if (!per_channel) {
    st.kind = Stream::kPerElement;
  } else {
    st.kind = Stream::kGrid;
    const int64_t grid = xd.size(0) * xd.size(1);
    st.grid.resize(grid);
    uint32_t* dst = st.grid.data();
    row_major_stream(grid, st.k0, st.k1,
                     [&](int64_t o, const uint32_t* w, int64_t m) { std::copy_n(w, m, dst + o); });
  }
  return st;
}

namespace {

// Slope of each memory position's channel (memory as [outer, C, inner], prep.h), in the compute
// type: runs of one slope when inner is long, else copies from the [C, inner] tile of slopes.
template <typename C>
struct Slopes {
  ChannelView v;
  std::vector<C> per_channel;  // [C]
  std::vector<C> tile;         // [C * inner] when inner < kRowMin

  template <typename S>
  Slopes(const S* w, const ChannelView& view) : v(view), per_channel(view.channels) {
    for (int64_t c = 0; c < v.channels; ++c) per_channel[c] = C(w[c]);
    if (v.inner < kRowMin) {
      tile.resize(v.channels * v.inner);
      for (int64_t c = 0; c < v.channels; ++c) std::fill_n(tile.begin() + c * v.inner, v.inner, per_channel[c]);
    }
  }

  static constexpr int64_t kRowMin = 64;

  void fill(int64_t o, int64_t m, C* out) const {
    if (!tile.empty()) {
      const int64_t size = int64_t(tile.size());
      for (int64_t k = 0, t = o % size; k < m; t = 0) {
        const int64_t run = std::min(size - t, m - k);
        std::copy_n(tile.data() + t, run, out + k);
        k += run;
      }
      return;
    }
    for (int64_t k = 0, pos = o; k < m;) {
      const int64_t row = pos / v.inner;
      const int64_t run = std::min((row + 1) * v.inner - pos, m - k);
      std::fill_n(out + k, run, per_channel[row % v.channels]);
      k += run;
      pos += run;
    }
  }
};

// ---- drivers (S: storage type; fp16/bf16 converted to float block by block) ----

template <typename S>
void drop_impl(const S* x, S* y, int64_t n, const Stream& st, uint32_t t, double p) {
  using C = compute_t<S>;
  const C s = dropout_scale<C>(p);
  const bool nt = streams<S>(n);
  for_blocks(n, [&](int64_t o, int64_t m) {
    alignas(64) uint32_t wbuf[kWordBuf];
    int64_t ibuf[kBlock];
    C xb[kBlock], yb[kBlock];
    const uint32_t* w = st.words(o, m, wbuf, ibuf);
    drop(load(x + o, xb, m), w, out_block(y + o, yb, nt), m, t, s);
    store_out(yb, y + o, m, nt);
  }, nt);
}

template <typename S>
void leaky_fwd_impl(const S* x, S* y, int64_t n, const Stream& st, uint32_t t, double p, compute_t<S> slope) {
  using C = compute_t<S>;
  const C s = dropout_scale<C>(p);
  const bool nt = streams<S>(n);
  for_blocks(n, [&](int64_t o, int64_t m) {
    alignas(64) uint32_t wbuf[kWordBuf];
    int64_t ibuf[kBlock];
    C xb[kBlock], yb[kBlock];
    const uint32_t* w = st.words(o, m, wbuf, ibuf);
    leaky_drop_fwd(load(x + o, xb, m), w, out_block(y + o, yb, nt), m, t, s, slope);
    store_out(yb, y + o, m, nt);
  }, nt);
}

template <typename S>
void prelu_fwd_impl(const S* x, const S* wt, S* y, const ChannelView& v, const Stream& st, uint32_t t, double p) {
  using C = compute_t<S>;
  if (v.channels == 1) return leaky_fwd_impl(x, y, v.outer * v.inner, st, t, p, C(wt[0]));
  const C s = dropout_scale<C>(p);
  const bool nt = streams<S>(v.outer * v.channels * v.inner);
  const Slopes<C> slopes(wt, v);
  for_blocks(v.outer * v.channels * v.inner, [&](int64_t o, int64_t m) {
    alignas(64) uint32_t wbuf[kWordBuf];
    int64_t ibuf[kBlock];
    C xb[kBlock], yb[kBlock], sl[kBlock];
    const uint32_t* w = st.words(o, m, wbuf, ibuf);
    slopes.fill(o, m, sl);
    prelu_drop_fwd(load(x + o, xb, m), sl, w, out_block(y + o, yb, nt), m, t, s);
    store_out(yb, y + o, m, nt);
  }, nt);
}

template <typename S>
void leaky_bwd_impl(const S* g, const S* x, S* gi, int64_t n, const Stream& st, uint32_t t, double p,
                    compute_t<S> slope) {
  using C = compute_t<S>;
  const C s = dropout_scale<C>(p);
  const bool nt = streams<S>(n);
  for_blocks(n, [&](int64_t o, int64_t m) {
    alignas(64) uint32_t wbuf[kWordBuf];
    int64_t ibuf[kBlock];
    C gb[kBlock], xb[kBlock], ob[kBlock];
    const uint32_t* w = st.words(o, m, wbuf, ibuf);
    leaky_drop_bwd(load(g + o, gb, m), load(x + o, xb, m), w, out_block(gi + o, ob, nt), m, t, s, slope);
    store_out(ob, gi + o, m, nt);
  }, nt);
}

// grad_input, and the slope gradient into gw (C doubles). As the activation family's
// prelu_backward: partial sums per fixed piece (rows of one channel, fixed chunks when there is
// one slope, or groups of [C, inner] tiles when inner is short), added in piece order.
template <typename S>
void prelu_bwd_impl(const S* g, const S* x, const S* wt, S* gi, double* gw, const ChannelView& v, const Stream& st,
                    uint32_t t, double p) {
  using C = compute_t<S>;
  const C s = dropout_scale<C>(p);
  const int64_t total = v.outer * v.channels * v.inner;
  std::fill_n(gw, v.channels, 0.0);
  if (v.channels == 1 || v.inner >= Slopes<C>::kRowMin) {
    const int64_t len = v.channels == 1 ? kGrain : v.inner;
    const int64_t pieces = (total + len - 1) / len;
    std::vector<double> part(pieces);
    at::parallel_for(0, pieces, std::max<int64_t>(1, kGrain / len), [&](int64_t b, int64_t e) {
      alignas(64) uint32_t wbuf[kWordBuf];
      int64_t ibuf[kBlock];
      C gb[kBlock], xb[kBlock], ob[kBlock];
      for (int64_t pc = b; pc < e; ++pc) {
        const int64_t off = pc * len, plen = std::min(len, total - off);
        const C slope = C(wt[v.channels == 1 ? 0 : pc % v.channels]);
        double sum = 0;
        for (int64_t i = 0; i < plen; i += kBlock) {
          const int64_t m = std::min(kBlock, plen - i), o = off + i;
          const uint32_t* w = st.words(o, m, wbuf, ibuf);
          sum += prelu_drop_bwd_row(load(g + o, gb, m), load(x + o, xb, m), w, out_ptr(gi + o, ob), m, t, s, slope);
          store(ob, gi + o, m);
        }
        part[pc] = sum;
      }
    });
    for (int64_t pc = 0; pc < pieces; ++pc) gw[v.channels == 1 ? 0 : pc % v.channels] += part[pc];
    return;
  }
  const Slopes<C> slopes(wt, v);
  const int64_t tile = v.channels * v.inner;
  const int64_t rows_per_piece = std::max<int64_t>(1, kGrain / tile);
  const int64_t pieces = (v.outer + rows_per_piece - 1) / rows_per_piece;
  std::vector<C> acc(pieces * tile, C(0));
  at::parallel_for(0, pieces, 1, [&](int64_t b, int64_t e) {
    alignas(64) uint32_t wbuf[kWordBuf];
    int64_t ibuf[kBlock];
    C gb[kBlock], xb[kBlock], ob[kBlock];
    for (int64_t pc = b; pc < e; ++pc) {
      const int64_t r_end = std::min(v.outer, (pc + 1) * rows_per_piece);
      for (int64_t r = pc * rows_per_piece; r < r_end; ++r) {
        for (int64_t j = 0; j < tile; j += kBlock) {
          const int64_t m = std::min(kBlock, tile - j), o = r * tile + j;
          const uint32_t* w = st.words(o, m, wbuf, ibuf);
          prelu_drop_bwd_vec(load(g + o, gb, m), load(x + o, xb, m), slopes.tile.data() + j, w, out_ptr(gi + o, ob),
                             acc.data() + pc * tile + j, m, t, s);
          store(ob, gi + o, m);
        }
      }
    }
  });
  for (int64_t pc = 0; pc < pieces; ++pc)
    for (int64_t k = 0; k < tile; ++k) gw[k / v.inner] += acc[pc * tile + k];
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "dlkernels cpu backend: ", name, " must be a CPU tensor, got ", t.device());
}

// r (computed on a contiguous copy) in the layout of the dense tensor xd.
at::Tensor in_layout_of(const at::Tensor& r, const at::Tensor& xd) {
  return r.strides() == xd.strides() ? r : at::empty_like(xd).copy_(r);
}

}  // namespace

at::Tensor philox4x32_10(const at::Tensor& counter, int64_t key0, int64_t key1) {
  check_cpu(counter, "counter");
  TORCH_CHECK(counter.scalar_type() == at::kLong, "philox4x32_10: counter must be int64, got ",
              counter.scalar_type());
  TORCH_CHECK(counter.dim() >= 1 && counter.size(-1) == 4,
              "philox4x32_10: counter must have shape [..., 4], got ", counter.sizes());
  const at::Tensor c = counter.contiguous();
  at::Tensor out = at::empty(c.sizes(), c.options());
  const int64_t n = c.numel() / 4;
  const int64_t* cp = c.const_data_ptr<int64_t>();
  int64_t* op = out.mutable_data_ptr<int64_t>();
  at::parallel_for(0, n, kGrain / 4, [&](int64_t b, int64_t e) {
    philox_counters(cp + 4 * b, op + 4 * b, e - b, uint32_t(key0), uint32_t(key1));
  });
  return out;
}

at::Tensor dropout_bits(const at::Tensor& x, int64_t seed) {
  check_cpu(x, "x");
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kLong));
  int64_t* dst = out.mutable_data_ptr<int64_t>();
  row_major_stream(out.numel(), seed_k0(uint64_t(seed)), seed_k1(uint64_t(seed)),
                   [&](int64_t o, const uint32_t* w, int64_t m) {
                     for (int64_t k = 0; k < m; ++k) dst[o + k] = int64_t(w[k]);
                   });
  return out;
}

at::Tensor dropout(const at::Tensor& x, double p, int64_t seed, bool per_channel) {
  check_cpu(x, "x");
  check_float_dtype(x, "x");
  check_dropout_p(p);
  check_per_channel(x, per_channel);
  const at::Tensor xd = dense(x);
  at::Tensor y = new_output(xd);
  if (xd.numel() == 0) return y;
  const Stream st = make_stream(xd, seed, per_channel);
  if (st.too_deep()) return in_layout_of(dlk::cpu::dropout(xd.contiguous(), p, seed, per_channel), xd);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dlk_dropout", [&] {
    drop_impl(xd.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), xd.numel(), st,
              dropout_threshold(p), p);
  });
  return y;
}

at::Tensor leaky_relu_dropout(const at::Tensor& x, double negative_slope, double p, int64_t seed) {
  check_cpu(x, "x");
  check_float_dtype(x, "x");
  check_dropout_p(p);
  const at::Tensor xd = dense(x);
  at::Tensor y = new_output(xd);
  if (xd.numel() == 0) return y;
  const Stream st = make_stream(xd, seed, false);
  if (st.too_deep()) return in_layout_of(leaky_relu_dropout(xd.contiguous(), negative_slope, p, seed), xd);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dlk_leaky_relu_dropout", [&] {
    leaky_fwd_impl(xd.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), xd.numel(), st,
                   dropout_threshold(p), p, compute_t<scalar_t>(negative_slope));
  });
  return y;
}

at::Tensor leaky_relu_dropout_backward(const at::Tensor& grad, const at::Tensor& x, double negative_slope, double p,
                                       int64_t seed) {
  check_cpu(x, "x");
  check_cpu(grad, "grad");
  check_float_dtype(x, "x");
  check_grad_like(grad, x, "leaky_relu_dropout_backward");
  check_dropout_p(p);
  const at::Tensor xd = dense(x);
  const at::Tensor gd = same_layout(grad, xd);
  at::Tensor gi = new_output(xd);
  if (xd.numel() == 0) return gi;
  const Stream st = make_stream(xd, seed, false);
  if (st.too_deep())
    return in_layout_of(leaky_relu_dropout_backward(gd.contiguous(), xd.contiguous(), negative_slope, p, seed), xd);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dlk_leaky_relu_dropout_bwd", [&] {
    leaky_bwd_impl(gd.const_data_ptr<scalar_t>(), xd.const_data_ptr<scalar_t>(), gi.mutable_data_ptr<scalar_t>(),
                   xd.numel(), st, dropout_threshold(p), p, compute_t<scalar_t>(negative_slope));
  });
  return gi;
}

at::Tensor prelu_dropout(const at::Tensor& x, const at::Tensor& weight, double p, int64_t seed) {
  check_cpu(x, "x");
  check_prelu_args(x, weight);
  check_dropout_p(p);
  const at::Tensor xd = dense(x);
  const at::Tensor w = weight.contiguous();
  at::Tensor y = new_output(xd);
  if (xd.numel() == 0) return y;
  const Stream st = make_stream(xd, seed, false);
  if (st.too_deep()) return in_layout_of(prelu_dropout(xd.contiguous(), weight, p, seed), xd);
  const ChannelView v = channel_view(xd, w.numel());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dlk_prelu_dropout", [&] {
    prelu_fwd_impl(xd.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), v,
                   st, dropout_threshold(p), p);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> prelu_dropout_backward(const at::Tensor& grad, const at::Tensor& x,
                                                          const at::Tensor& weight, double p, int64_t seed) {
  check_cpu(x, "x");
  check_cpu(grad, "grad");
  check_prelu_args(x, weight);
  check_grad_like(grad, x, "prelu_dropout_backward");
  check_dropout_p(p);
  const at::Tensor xd = dense(x);
  const at::Tensor gd = same_layout(grad, xd);
  const at::Tensor w = weight.contiguous();
  at::Tensor gi = new_output(xd);
  const ChannelView v = channel_view(xd, w.numel());
  at::Tensor gw = at::zeros({v.channels}, weight.options().dtype(at::kDouble));
  if (xd.numel() > 0) {
    const Stream st = make_stream(xd, seed, false);
    if (st.too_deep()) {
      auto [gi_c, gw_c] = prelu_dropout_backward(gd.contiguous(), xd.contiguous(), weight, p, seed);
      return {in_layout_of(gi_c, xd), gw_c};
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dlk_prelu_dropout_bwd", [&] {
      prelu_bwd_impl(gd.const_data_ptr<scalar_t>(), xd.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                     gi.mutable_data_ptr<scalar_t>(), gw.mutable_data_ptr<double>(), v, st, dropout_threshold(p), p);
    });
  }
  return {gi, gw.to(weight.scalar_type()).reshape(weight.sizes())};
}

}  // namespace dlk::cpu

// The dropout stream of docs/dropout.md, shared by the CPU kernels (g++) and the CUDA kernels
// (nvcc): Philox4x32-10, the (seed, logical index) -> 32-bit word mapping, the threshold and the
// multiplier, and the map from a memory position of a dense tensor to its logical index.
//
// Everything is branch-free straight-line integer code (fixed 10 rounds, fully unrolled, selects
// instead of branches), so GCC vectorizes a loop over counters (the 32x32->64 products become
// vpmuludq) and nvcc keeps it in registers.
#pragma once
#include <cstdint>

#include "macros.h"

#if defined(__CUDACC__)
#define DLK_PHILOX_INLINE DLK_HD
#define DLK_PHILOX_UNROLL _Pragma("unroll")
#elif defined(__GNUC__) && !defined(__clang__)
// always_inline: the hot loops vectorize only when the whole generator is inlined into them.
#define DLK_PHILOX_INLINE inline __attribute__((always_inline))
#define DLK_PHILOX_UNROLL _Pragma("GCC unroll 16")
#else
#define DLK_PHILOX_INLINE inline
#define DLK_PHILOX_UNROLL
#endif

namespace dlk {

// ---- Philox4x32-10 (Salmon et al., SC 2011; Random123's philox4x32_10) ----

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;  // multiplier of counter word 0
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;  // multiplier of counter word 2
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // key bump of k0 (golden ratio)
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // key bump of k1 (sqrt(3) - 1)
constexpr int kPhiloxRounds = 10;

// hi:lo = a * b, the 64-bit product of two 32-bit words.
DLK_PHILOX_INLINE void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  hi = __umulhi(a, b);
  lo = a * b;
#else
  const uint64_t prod = uint64_t(a) * uint64_t(b);
  hi = uint32_t(prod >> 32);
  lo = uint32_t(prod);
#endif
}

// One round: c = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0).
DLK_PHILOX_INLINE void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3,
                                    uint32_t k0, uint32_t k1) {
  uint32_t hi0, lo0, hi1, lo1;
  philox_mulhilo(kPhiloxM0, c0, hi0, lo0);
  philox_mulhilo(kPhiloxM1, c2, hi1, lo1);
  c0 = hi1 ^ c1 ^ k0;
  c1 = lo1;
  c2 = hi0 ^ c3 ^ k1;
  c3 = lo0;
}

// Philox4x32-10 in place: the counter (c0, c1, c2, c3) becomes the four output words. Ten
// rounds, the key bumped (mod 2^32) between rounds.
DLK_PHILOX_INLINE void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3,
                                     uint32_t k0, uint32_t k1) {
  philox_round(c0, c1, c2, c3, k0, k1);
  DLK_PHILOX_UNROLL
  for (int r = 1; r < kPhiloxRounds; ++r) {
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
    philox_round(c0, c1, c2, c3, k0, k1);
  }
}

// ---- (seed, logical index) -> word ----

// The key of a seed (a uint64, or the two's-complement bit pattern of an int64).
DLK_PHILOX_INLINE uint32_t seed_k0(uint64_t seed) { return uint32_t(seed); }
DLK_PHILOX_INLINE uint32_t seed_k1(uint64_t seed) { return uint32_t(seed >> 32); }

// The four words of counter (q mod 2^32, q div 2^32, 0, 0): the words of logical indices
// 4q .. 4q + 3. (c2 and c3 are 0: reserved for other streams.)
DLK_PHILOX_INLINE void dropout_quad(uint64_t q, uint32_t k0, uint32_t k1, uint32_t& r0,
                                    uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  r0 = uint32_t(q);
  r1 = uint32_t(q >> 32);
  r2 = 0;
  r3 = 0;
  philox4x32_10(r0, r1, r2, r3, k0, k1);
}

// Word j (0..3) of a quad, by selects (vectorizable blends, no branches).
DLK_PHILOX_INLINE uint32_t select_word(uint32_t j, uint32_t r0, uint32_t r1, uint32_t r2,
                                       uint32_t r3) {
  const uint32_t lo = j == 0 ? r0 : r1;
  const uint32_t hi = j == 2 ? r2 : r3;
  return j < 2 ? lo : hi;
}

// The word of logical index i: word i mod 4 of counter i div 4 (a whole Philox evaluation for
// one word: use dropout_quad where four consecutive indices are wanted).
DLK_PHILOX_INLINE uint32_t dropout_word(uint64_t i, uint32_t k0, uint32_t k1) {
  uint32_t r0, r1, r2, r3;
  dropout_quad(i >> 2, k0, k1, r0, r1, r2, r3);
  return select_word(uint32_t(i) & 3u, r0, r1, r2, r3);
}

// ---- word -> multiplier ----

// t = floor(p * 2^32), exact in float64, for 0 <= p < 1 (callers check p): an element is dropped
// when its word is below t. p < 1 gives t <= 2^32 - 1, so t fits 32 bits.
DLK_PHILOX_INLINE uint32_t dropout_threshold(double p) {
  return uint32_t(p * 4294967296.0);  // truncation is floor for p >= 0
}

// 1 / (1 - p), computed in float64 and rounded once to the compute type T.
template <typename T>
DLK_PHILOX_INLINE T dropout_scale(double p) {
  return T(1.0 / (1.0 - p));
}

// m = scale when kept (word >= t), 0 when dropped; the output is x * m (so a dropped inf or
// NaN gives NaN, as in torch).
template <typename T>
DLK_PHILOX_INLINE T dropout_multiplier(uint32_t word, uint32_t t, T scale) {
  return word >= t ? scale : T(0);
}

// One call's dropout applied after a fused op (batch norm + activation): the key, the threshold
// and 1 / (1 - p) in float64 (each kernel rounds it once to its compute type, as
// dropout_scale). `on` is false for p == 0 (eval, or no dropout asked for): no mask at all.
struct DropoutArgs {
  bool on;
  uint32_t k0, k1, thr;
  double scale;
};

// The arguments of dropout probability p (0 <= p < 1; callers check) under a seed (a uint64, or
// the two's-complement bit pattern of an int64).
DLK_PHILOX_INLINE DropoutArgs dropout_args(double p, uint64_t seed) {
  return {p > 0.0, seed_k0(seed), seed_k1(seed), dropout_threshold(p), 1.0 / (1.0 - p)};
}

// ---- memory position -> logical index ----

// A dense tensor's dims sorted by stride and coalesced, innermost first: the element at memory
// position o (offset from the data pointer) has coordinates k_d along these dims (o's digits in
// the mixed radix of `size`) and logical index sum k_d * weight_d, where weight_d is the dim's
// row-major stride in the tensor's shape (or, per channel, C for dim 0, 1 for dim 1 and 0 for
// the rest: index n * C + c). ndim == 0 (one element) or ndim == 1 with weight 1 means memory
// order is row-major order. More than kIndexMapMaxDims coalesced dims: callers use a
// contiguous copy instead.
constexpr int kIndexMapMaxDims = 8;

struct IndexMap {
  int ndim;
  int64_t size[kIndexMapMaxDims];
  int64_t weight[kIndexMapMaxDims];
};

DLK_PHILOX_INLINE bool is_row_major(const IndexMap& map) {
  return map.ndim == 0 || (map.ndim == 1 && map.weight[0] == 1);
}

// The logical index of memory position o (divisions per dim: the per-element paths use it). In
// unsigned arithmetic (every value is >= 0): nvcc inlines the unsigned 64-bit division, where
// the signed one is a call whose stack frame spilled registers in the batch-norm kernels.
DLK_PHILOX_INLINE int64_t logical_index(const IndexMap& map, int64_t pos) {
  uint64_t i = 0, o = uint64_t(pos);
  for (int d = 0; d < map.ndim - 1; ++d) {
    const uint64_t size = uint64_t(map.size[d]), q = o / size;
    i += (o - q * size) * uint64_t(map.weight[d]);
    o = q;
  }
  return map.ndim > 0 ? int64_t(i + o * uint64_t(map.weight[map.ndim - 1])) : 0;
}

}  // namespace dlk

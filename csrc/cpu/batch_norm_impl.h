// What the CPU batch-norm files share. Memory is seen as [outer, C, inner] (prep.h), read
// contiguously in every layout without a layout copy, by one of three paths:
// - row path (batch_norm_row.cpp), a long inner extent (NCHW): row by row, per-channel scalars;
// - strip path (batch_norm_strip.cpp), inner == 1 (channels_last, 2-D input) with C % 16 == 0:
//   blocks of whole rows of C channels, walked 16 channels at a time with their constants and
//   sums in registers;
// - tile path (batch_norm_tile.cpp), any other short inner extent: [C, inner] tiles with
//   per-element constant vectors.
// Each path runs the four passes (statistics, normalize+activate, backward reduce, backward
// elementwise) on constants computed per channel in double (batch_norm_consts.cpp); the tensor
// entry points (batch_norm.cpp) pick the path. Statistics: two passes over an L1-resident block,
// blocks merged with Chan's formula in double. Reductions use fixed pieces independent of the
// thread count: results are deterministic.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <vector>

#include "../common/batch_norm.h"
#include "../prep.h"
#include "dropout_stream.h"
#include "loadstore.h"
#include "simd.h"

namespace dlk::cpu {

constexpr int64_t kRowMin = 64;   // shorter inner extents use the tile or strip path
constexpr int kStrip = 16;        // channels of one strip (strip path)
constexpr int64_t kPiece = 8192;  // elements per reduction piece (strip and tile paths): L1/L2-resident

// ---- per-channel constants (computed in double, once per call or per channel) ----

// A channel's constants, as the row path takes them (the other paths lay them out from these).
template <typename T>
struct RowK {
  T scale, shift, slope, mean, invstd, k1, ka, kc;
};
using Ks = std::vector<RowK<double>>;

// A channel's parameters, as double vectors of length C (slope: the leaky slope, the PReLU
// slopes, or 0), rounded through the compute type as the kernels see them.
struct ChannelParams {
  std::vector<double> w, b, slope;
  bool as_float;  // the kernels compute in float (float32/16/bf16 input), else double
};

// A [C] (or 1-element, broadcast) tensor's values read in place, no tensor ops (they would cost
// more than the kernels on small inputs); rounded to float first when `as_float`.
std::vector<double> doubles(const at::Tensor& t, int64_t c, bool as_float = false);
std::vector<double> doubles(const at::Tensor& t);

ChannelParams channel_params(const at::Tensor& x, const std::optional<at::Tensor>& w,
                             const std::optional<at::Tensor>& b, const std::optional<at::Tensor>& prelu_w,
                             int64_t act, double slope);

// Every channel's constants; sums (when given) are [C] sum dz and [C] sum dz * xhat over `count`
// elements, folded into grad_input = k1 * dz + ka * (x - mean) + kc.
Ks make_consts(const ChannelParams& p, const std::vector<double>& mean, const std::vector<double>& invstd,
               const double* sum_dz = nullptr, const double* sum_dz_xhat = nullptr, double count = 1);

template <typename C>
RowK<C> narrow(const RowK<double>& k) {
  return {C(k.scale), C(k.shift), C(k.slope), C(k.mean), C(k.invstd), C(k.k1), C(k.ka), C(k.kc)};
}

template <typename C>
std::vector<RowK<C>> narrow_all(const Ks& ks) {
  std::vector<RowK<C>> out(ks.size());
  std::transform(ks.begin(), ks.end(), out.begin(), narrow<C>);
  return out;
}

// ---- the paths ----

// (count, mean, M2) per channel, or per (piece, channel) for a path's partial results.
struct Moments {
  std::vector<double> n, mu, m2;
  explicit Moments(size_t size) : n(size, 0.0), mu(size, 0.0), m2(size, 0.0) {}
  void merge(size_t i, double nb, double mb, double m2b) { merge_moments<double>(n[i], mu[i], m2[i], nb, mb, m2b); }
  // Merges partials laid out [pieces][C] into this [C], in a fixed order (deterministic).
  void merge_pieces(const Moments& part) {
    for (size_t i = 0; i < part.n.size(); ++i) merge(i % n.size(), part.n[i], part.mu[i], part.m2[i]);
  }
};

// Dropout after the activation (docs/dropout.md), for one call: the mask of memory position o
// is the stream's word of o's logical index against args.thr. The passes take a pointer to it,
// nullptr when there is no dropout (then they run exactly the loops they run without it).
struct BnDropout {
  DropoutArgs args;
  Stream stream;
};

// One path's passes over storage type S (compute type compute_t<S>); d: dropout or nullptr.
// stats: merges the per-channel (count, mean, M2) of x - shift[c] into `m`;
// forward: y = act(x * scale + shift), then y * m (y rounded to S first, as dropout reads it);
// reduce: adds sum dz, sum dz * xhat and the PReLU slope gradient into sums[3][C];
// elemt: grad_input = k1 * dz + ka * (x - mean) + kc;
// with dz = act'(z) * grad, or act'(z) * (grad * m) under dropout (the mask regenerated).
template <typename S>
struct PathOps {
  void (*stats)(const S* x, const ChannelView& v, const double* shift, Moments& m);
  void (*forward)(const S* x, S* y, int64_t act, const Ks& ks, const ChannelView& v, const BnDropout* d);
  void (*reduce)(const S* g, const S* x, int64_t act, const Ks& ks, const ChannelView& v, double* sums,
                 const BnDropout* d);
  void (*elemt)(const S* g, const S* x, S* gi, int64_t act, const Ks& ks, const ChannelView& v,
                const BnDropout* d);
};

// Defined in batch_norm_{row,strip,tile}.cpp (DLK_BN_PATH_OPS) for the four storage types.
template <typename S> PathOps<S> row_path_ops();
template <typename S> PathOps<S> strip_path_ops();
template <typename S> PathOps<S> tile_path_ops();
// OPS<S>() of a path file, from its (file-local) stats, forward, reduce and elemt templates.
#define DLK_BN_PATH_OPS(OPS)                                                                      \
  template <typename S>                                                                           \
  PathOps<S> OPS() {                                                                              \
    return {stats<S>, forward<S>, reduce<S>, elemt<S>};                                           \
  }                                                                                               \
  template PathOps<float> OPS<float>();                                                           \
  template PathOps<double> OPS<double>();                                                         \
  template PathOps<c10::Half> OPS<c10::Half>();                                                   \
  template PathOps<c10::BFloat16> OPS<c10::BFloat16>();

// The path that walks this view's memory.
template <typename S>
PathOps<S> path_ops(const ChannelView& v) {
  if (v.inner >= kRowMin) return row_path_ops<S>();
  if (v.inner == 1 && v.channels % kStrip == 0 && v.channels <= kBlock) return strip_path_ops<S>();
  return tile_path_ops<S>();
}

// Calls body(unit_index, offset, length) over units of `len` elements in parallel (the last one
// may be shorter): rows of `inner` elements (row path) or runs of whole tiles (tile path).
// nt: the body streams its stores (loadstore.h), so each task ends with a fence (once per task:
// a fence per short row would wait for the write-combining buffers every few hundred bytes).
template <typename F>
void for_each_unit(const ChannelView& v, int64_t len, F&& body, bool nt = false) {
  const int64_t total = v.outer * v.channels * v.inner;
  const int64_t units = (total + len - 1) / len;
  at::parallel_for(0, units, std::max<int64_t>(1, kGrain / len), [&](int64_t b, int64_t e) {
    for (int64_t u = b; u < e; ++u) body(u, u * len, std::min(len, total - u * len));
    if (nt) stream_fence();
  });
}

// ---- dropout on an L1 block (batch_norm_drop.cpp) ----

// The block's multipliers applied: v[i] *= m(w[i]) (in place), out[i] = g[i] * m(w[i]).
#pragma GCC visibility push(hidden)
void mask_scale(float* v, const uint32_t* w, int64_t n, uint32_t t, float s);
void mask_scale(double* v, const uint32_t* w, int64_t n, uint32_t t, double s);
void mask_mul(const float* g, const uint32_t* w, float* out, int64_t n, uint32_t t, float s);
void mask_mul(const double* g, const uint32_t* w, double* out, int64_t n, uint32_t t, double s);
#pragma GCC visibility pop

// The per-thread buffers of a block's words (and the logical indices they are computed from).
struct WordBufs {
  alignas(64) uint32_t w[kWordBuf];
  int64_t idx[kBlock];
};

// The words of memory positions [o, o + m), m <= kBlock.
inline const uint32_t* block_words(const BnDropout& d, int64_t o, int64_t m, WordBufs& b) {
  return d.stream.words(o, m, b.w, b.idx);
}

// grad * m of m positions from o, in the compute type, in gb (kBlock): the backward's dz input.
template <typename S, typename C>
const C* dropped_grad(const BnDropout& d, const S* g, int64_t o, int64_t m, C* gb, WordBufs& b) {
  const uint32_t* w = block_words(d, o, m, b);
  const C s = C(d.args.scale);  // 1 / (1 - p) rounded once, as dropout_scale<C>
  if constexpr (std::is_same_v<S, C>) {
    mask_mul(g + o, w, gb, m, d.args.thr, s);
  } else {
    to_float(g + o, gb, m);
    mask_scale(gb, w, m, d.args.thr, s);
  }
  return gb;
}

// The forward's last step on a block yb (compute type) bound for y[o, o + m): rounded to S (the
// value batch_norm_act stores, which dropout would read), multiplied by m, stored.
template <typename S, typename C>
void store_dropped(const BnDropout& d, C* yb, S* y, int64_t o, int64_t m, WordBufs& b) {
  const uint32_t* w = block_words(d, o, m, b);
  const C s = C(d.args.scale);
  if constexpr (std::is_same_v<S, C>) {
    mask_mul(yb, w, y + o, m, d.args.thr, s);
  } else {  // the round trip through S, then the product rounded to S again
    from_float(yb, y + o, m);
    to_float(y + o, yb, m);
    mask_scale(yb, w, m, d.args.thr, s);
    from_float(yb, y + o, m);
  }
}

// sums[3][C] += partial sums laid out [pieces][3][C], piece by piece (deterministic).
inline void add_pieces(const std::vector<double>& part, int64_t channels, double* sums) {
  for (size_t i = 0; i < part.size(); ++i) sums[i % (3 * channels)] += part[i];
}

}  // namespace dlk::cpu

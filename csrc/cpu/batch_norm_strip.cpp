// Batch norm's strip path: inner == 1 (channels_last, 2-D input) with C % kStrip == 0. Blocks of
// kBlock / C whole rows of C channels (one load each; the elementwise and backward passes copy
// them into L1 buffers) are walked kStrip channels at a time, a strip's constants and sums in
// registers; reductions group the blocks into fixed pieces of kPiece / kBlock blocks (independent
// of the thread count, so sums are deterministic).
#include <algorithm>
#include <array>
#include <vector>

#include "batch_norm_impl.h"
#include "batch_norm_loops.h"
#include "loadstore.h"

namespace dlk::cpu {
namespace {

template <typename T>
DLK_INLINE void fwd_strip_dispatch(int act, const T* x, T* y, int64_t rows, int64_t ld, const StripK<T>& k) {
#define CALL(A) fwd_strip_body<A>(x, y, rows, ld, k)
  DLK_ACT_SWITCH(act, CALL)
#undef CALL
}
template <typename T>
DLK_INLINE void reduce_strip_dispatch(int act, const T* g, const T* x, int64_t rows, int64_t ld, const StripK<T>& k,
                                      T* s) {
#define CALL(A) reduce_strip_body<A>(g, x, rows, ld, k, s)
  DLK_ACT_SWITCH(act, CALL)
#undef CALL
}
template <typename T>
DLK_INLINE void elemt_strip_dispatch(int act, const T* g, const T* x, T* gi, int64_t rows, int64_t ld,
                                     const StripK<T>& k) {
#define CALL(A) elemt_strip_body<A>(g, x, gi, rows, ld, k)
  DLK_ACT_SWITCH(act, CALL)
#undef CALL
}
DLK_MULTIVERSION(void, fwd_strip, (int act, const float* x, float* y, int64_t rows, int64_t ld, const StripK<float>& k), (act, x, y, rows, ld, k), fwd_strip_dispatch)
DLK_MULTIVERSION(void, fwd_strip, (int act, const double* x, double* y, int64_t rows, int64_t ld, const StripK<double>& k), (act, x, y, rows, ld, k), fwd_strip_dispatch)
DLK_MULTIVERSION(void, reduce_strip, (int act, const float* g, const float* x, int64_t rows, int64_t ld, const StripK<float>& k, float* s), (act, g, x, rows, ld, k, s), reduce_strip_dispatch)
DLK_MULTIVERSION(void, reduce_strip, (int act, const double* g, const double* x, int64_t rows, int64_t ld, const StripK<double>& k, double* s), (act, g, x, rows, ld, k, s), reduce_strip_dispatch)
DLK_MULTIVERSION(void, elemt_strip, (int act, const float* g, const float* x, float* gi, int64_t rows, int64_t ld, const StripK<float>& k), (act, g, x, gi, rows, ld, k), elemt_strip_dispatch)
DLK_MULTIVERSION(void, elemt_strip, (int act, const double* g, const double* x, double* gi, int64_t rows, int64_t ld, const StripK<double>& k), (act, g, x, gi, rows, ld, k), elemt_strip_dispatch)
DLK_MULTIVERSION(void, moments_strip, (const float* x, int64_t rows, int64_t ld, const float* mean, float* s, float* res), (x, rows, ld, mean, s, res), moments_strip_body)
DLK_MULTIVERSION(void, moments_strip, (const double* x, int64_t rows, int64_t ld, const double* mean, double* s, double* res), (x, rows, ld, mean, s, res), moments_strip_body)

// Its L1 buffers, skewed by a few lines: buffers a multiple of 4 KiB apart would alias in the
// store-to-load check (4K aliasing) while a strip's loads run ahead of earlier rows' stores.
template <typename C>
struct StripBufs {
  static constexpr int64_t kSkew = 48;
  alignas(64) C mem[3 * (kBlock + kSkew)];
  C* operator[](int i) { return mem + i * (kBlock + kSkew); }
};

struct StripGeo {
  int64_t rb, piece_rows, pieces;
};
StripGeo strip_geo(const ChannelView& v) {
  const int64_t rb = kBlock / v.channels, piece_rows = rb * (kPiece / kBlock);
  return {rb, piece_rows, (v.outer + piece_rows - 1) / piece_rows};
}

// An elementwise pass of the strip path, block by block in parallel: the N inputs copied into L1
// buffers (the next block prefetched), compute(inputs, out_buffer, rows) run over the strips, the
// buffer stored to `out`. Under dropout (d) the forward's output block is multiplied by its
// mask before the store (drop_out), or the backward's first input, grad, before the strips.
template <typename S, size_t N, typename F>
void strip_pass(const ChannelView& v, const std::array<const S*, N>& in, S* out, const BnDropout* d, F&& compute) {
  static_assert(N < 3, "StripBufs holds N inputs and the output");
  using C = compute_t<S>;
  constexpr bool drop_out = N == 1;  // the forward: y * m; the backward: (grad * m) in
  const int64_t ch = v.channels, rb = strip_geo(v).rb, blocks = (v.outer + rb - 1) / rb;
  const bool nt = !(d != nullptr && drop_out) && streams<S>(v.outer * ch);
  at::parallel_for(0, blocks, std::max<int64_t>(1, kGrain / kBlock), [&](int64_t b, int64_t e) {
    StripBufs<C> buf;
    std::array<const C*, N> iv;
    WordBufs wb;
    for (int64_t q = b; q < e; ++q) {
      const int64_t rows = std::min(rb, v.outer - q * rb), off = q * rb * ch, m = rows * ch;
      for (size_t i = 0; i < N; ++i) iv[i] = load_block(in[i] + off, buf[i], m);
      for (size_t i = 0; i < N; ++i) prefetch(in[i] + off + m, std::min(m, v.outer * ch - off - m));
      if (d != nullptr && !drop_out)  // the grad block is buf[0], a private copy: scaled in place
        mask_scale(buf[0], block_words(*d, off, m, wb), m, d->args.thr, C(d->args.scale));
      compute(iv, buf[N], rows);
      if (d != nullptr && drop_out)
        store_dropped(*d, buf[N], out, off, m, wb);
      else
        store_block(buf[N], out + off, m, nt);
    }
    if (nt) stream_fence();
  });
}

// The constants of each strip of kStrip channels.
template <typename C>
std::vector<StripK<C>> strips(const Ks& ks) {
  std::vector<StripK<C>> out(ks.size() / kStrip);
  for (size_t c = 0; c < ks.size(); ++c) {
    const RowK<C> k = narrow<C>(ks[c]);
    StripK<C>& o = out[c / kStrip];
    const size_t j = c % kStrip;
    o.scale[j] = k.scale, o.shift[j] = k.shift, o.slope[j] = k.slope, o.mean[j] = k.mean;
    o.invstd[j] = k.invstd, o.k1[j] = k.k1, o.ka[j] = k.ka, o.kc[j] = k.kc;
  }
  return out;
}

// ---- the passes ----

template <typename S>
void stats(const S* x, const ChannelView& v, const double* shift, Moments& m) {
  using C = compute_t<S>;
  // Per piece: channel sums, means, then squared deviations from them (the piece is in cache
  // for that second sweep, which prefetches the next piece); pieces merged in order.
  const StripGeo sg = strip_geo(v);
  const int64_t ch = v.channels, strips_n = ch / kStrip;
  Moments part(sg.pieces * ch);
  at::parallel_for(0, sg.pieces, 1, [&](int64_t b, int64_t e) {
    C buf[kBlock];
    std::vector<C> acc(ch), res(ch), tmean(ch);
    for (int64_t p = b; p < e; ++p) {
      const int64_t r0 = p * sg.piece_rows, r1 = std::min(v.outer, r0 + sg.piece_rows);
      auto sweep = [&](const C* means, int64_t ahead) {
        std::fill(acc.begin(), acc.end(), C(0));
        std::fill(res.begin(), res.end(), C(0));
        for (int64_t r = r0; r < r1; r += sg.rb) {
          const int64_t rows = std::min(sg.rb, r1 - r), off = r * ch, m = rows * ch;
          // ahead: the next block in the first sweep, the next piece in the second (from cache)
          prefetch(x + off + ahead, std::min(m, v.outer * ch - off - ahead));
          const C* xv = load(x + off, buf, m);
          for (int64_t q = 0; q < strips_n; ++q)
            moments_strip(xv + q * kStrip, rows, ch, means ? means + q * kStrip : nullptr, acc.data() + q * kStrip,
                          res.data() + q * kStrip);
        }
      };
      sweep(nullptr, sg.rb * ch);
      for (int64_t c = 0; c < ch; ++c) {
        part.n[p * ch + c] = double(r1 - r0);
        part.mu[p * ch + c] = double(acc[c]) / double(r1 - r0);
        tmean[c] = C(part.mu[p * ch + c]);
      }
      sweep(tmean.data(), (r1 - r0) * ch);
      for (int64_t c = 0; c < ch; ++c) {  // the corrected two-pass algorithm (see block_moments)
        const double r = res[c], cnt = double(r1 - r0);
        part.mu[p * ch + c] = corrected_mean(double(tmean[c]) - shift[c], r, cnt);
        part.m2[p * ch + c] = double(acc[c]) - r * r / cnt;
      }
    }
  });
  m.merge_pieces(part);
}

template <typename S>
void forward(const S* x, S* y, int64_t act, const Ks& ks, const ChannelView& v, const BnDropout* d) {
  using C = compute_t<S>;
  const auto sk = strips<C>(ks);
  strip_pass<S, 1>(v, {x}, y, d, [&](const auto& in, C* o, int64_t rows) {
    for (size_t q = 0; q < sk.size(); ++q)
      fwd_strip(act, in[0] + q * kStrip, o + q * kStrip, rows, v.channels, sk[q]);
  });
}

template <typename S>
void reduce(const S* g, const S* x, int64_t act, const Ks& ks, const ChannelView& v, double* sums,
            const BnDropout* d) {
  using C = compute_t<S>;
  const auto sk = strips<C>(ks);
  const StripGeo sg = strip_geo(v);
  const int64_t ch = v.channels;
  std::vector<double> part(3 * sg.pieces * ch, 0.0);  // [piece][3][C]
  at::parallel_for(0, sg.pieces, 1, [&](int64_t b, int64_t e) {
    StripBufs<C> buf;
    WordBufs wb;
    std::vector<C> acc(3 * ch);  // [strip][3][kStrip]
    for (int64_t p = b; p < e; ++p) {
      const int64_t r0 = p * sg.piece_rows, r1 = std::min(v.outer, r0 + sg.piece_rows);
      std::fill(acc.begin(), acc.end(), C(0));
      for (int64_t r = r0; r < r1; r += sg.rb) {
        const int64_t rows = std::min(sg.rb, r1 - r), off = r * ch, m = rows * ch;
        const C* gv = load_block(g + off, buf[0], m);
        if (d != nullptr)  // grad * m, in place in the private copy
          mask_scale(buf[0], block_words(*d, off, m, wb), m, d->args.thr, C(d->args.scale));
        const C* xv = load_block(x + off, buf[1], m);
        prefetch(g + off + m, std::min(m, v.outer * ch - off - m));
        prefetch(x + off + m, std::min(m, v.outer * ch - off - m));
        for (size_t q = 0; q < sk.size(); ++q)
          reduce_strip(act, gv + q * kStrip, xv + q * kStrip, rows, ch, sk[q], acc.data() + 3 * kStrip * q);
      }
      for (int64_t c = 0; c < ch; ++c)
        for (int k = 0; k < 3; ++k) part[(3 * p + k) * ch + c] = acc[3 * kStrip * (c / kStrip) + k * kStrip + c % kStrip];
    }
  });
  add_pieces(part, ch, sums);
}

template <typename S>
void elemt(const S* g, const S* x, S* gi, int64_t act, const Ks& ks, const ChannelView& v, const BnDropout* d) {
  using C = compute_t<S>;
  const auto sk = strips<C>(ks);
  strip_pass<S, 2>(v, {g, x}, gi, d, [&](const auto& in, C* o, int64_t rows) {
    for (size_t q = 0; q < sk.size(); ++q)
      elemt_strip(act, in[0] + q * kStrip, in[1] + q * kStrip, o + q * kStrip, rows, v.channels, sk[q]);
  });
}

}  // namespace

DLK_BN_PATH_OPS(strip_path_ops)

}  // namespace dlk::cpu

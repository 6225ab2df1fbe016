// Batch norm's tile path: a short inner extent that the strip path does not take (e.g.
// channels_last with C % 16 != 0, small spatial NCHW). Memory is cut into units of whole
// [C, inner] tiles, walked with per-element vectors of the constants (one [8, unit] table) and
// per-element accumulators folded per channel; reductions group the units into fixed pieces
// (independent of the thread count, so results are deterministic).
#include <algorithm>
#include <vector>

#include "batch_norm_impl.h"
#include "batch_norm_loops.h"
#include "loadstore.h"

namespace dlk::cpu {
namespace {

DLK_MULTIVERSION(void, col_sum, (const float* x, float* acc, int64_t n), (x, acc, n), col_sum_body)
DLK_MULTIVERSION(void, col_sum, (const double* x, double* acc, int64_t n), (x, acc, n), col_sum_body)
DLK_MULTIVERSION(void, col_sq_dev, (const float* x, const float* m, float* acc, float* res, int64_t n), (x, m, acc, res, n), col_sq_dev_body)
DLK_MULTIVERSION(void, col_sq_dev, (const double* x, const double* m, double* acc, double* res, int64_t n), (x, m, acc, res, n), col_sq_dev_body)

template <typename T>
DLK_INLINE void fwd_vec_dispatch(int act, const T* x, T* y, int64_t n, const VecK<T>& k) {
#define CALL(A) fwd_vec_body<A>(x, y, n, k.scale, k.shift, k.slope)
  DLK_ACT_SWITCH(act, CALL)
#undef CALL
}
DLK_MULTIVERSION(void, fwd_vec, (int act, const float* x, float* y, int64_t n, const VecK<float>& k), (act, x, y, n, k), fwd_vec_dispatch)
DLK_MULTIVERSION(void, fwd_vec, (int act, const double* x, double* y, int64_t n, const VecK<double>& k), (act, x, y, n, k), fwd_vec_dispatch)

template <typename T>
DLK_INLINE void reduce_vec_dispatch(int act, const T* g, const T* x, int64_t n, const VecK<T>& k, T* s0, T* s1, T* s2) {
#define CALL(A) reduce_vec_body<A>(g, x, n, k.scale, k.shift, k.slope, k.mean, k.invstd, s0, s1, s2)
  DLK_ACT_SWITCH(act, CALL)
#undef CALL
}
DLK_MULTIVERSION(void, reduce_vec, (int act, const float* g, const float* x, int64_t n, const VecK<float>& k, float* s0, float* s1, float* s2), (act, g, x, n, k, s0, s1, s2), reduce_vec_dispatch)
DLK_MULTIVERSION(void, reduce_vec, (int act, const double* g, const double* x, int64_t n, const VecK<double>& k, double* s0, double* s1, double* s2), (act, g, x, n, k, s0, s1, s2), reduce_vec_dispatch)

template <typename T>
DLK_INLINE void elemt_vec_dispatch(int act, const T* g, const T* x, T* gi, int64_t n, const VecK<T>& k) {
#define CALL(A) elemt_vec_body<A>(g, x, gi, n, k.scale, k.shift, k.slope, k.mean, k.k1, k.ka, k.kc)
  DLK_ACT_SWITCH(act, CALL)
#undef CALL
}
DLK_MULTIVERSION(void, elemt_vec, (int act, const float* g, const float* x, float* gi, int64_t n, const VecK<float>& k), (act, g, x, gi, n, k), elemt_vec_dispatch)
DLK_MULTIVERSION(void, elemt_vec, (int act, const double* g, const double* x, double* gi, int64_t n, const VecK<double>& k), (act, g, x, gi, n, k), elemt_vec_dispatch)

// Tile path unit: as many whole [C, inner] tiles (rows of `outer`) as make ~512 elements, so
// each SIMD call streams a run rather than one short row (a 64-channel row is 256 bytes), while
// the unit's constant and accumulator vectors still fit in L1 together.
constexpr int64_t kTileUnit = 512;
int64_t unit_len(const ChannelView& v) {
  const int64_t tile = v.channels * v.inner;
  return tile * std::max<int64_t>(1, std::min(v.outer, kTileUnit / tile));
}

// The constants laid out as one tile-path unit: row f of this [8, unit_len] compute-type table is
// field f of RowK for each element's channel. Plain loops: tensor ops here would cost more than
// the kernels on the small inputs (ResNet's late layers) this path serves.
template <typename C>
std::vector<C> tiled(const Ks& ks, const ChannelView& v) {
  static_assert(sizeof(RowK<double>) == 8 * sizeof(double));
  const int64_t len = unit_len(v), tile = v.channels * v.inner;
  std::vector<C> t(8 * len);
  for (int f = 0; f < 8; ++f) {
    C* row = t.data() + f * len;
    for (int64_t c = 0; c < v.channels; ++c)
      std::fill_n(row + c * v.inner, v.inner, C(reinterpret_cast<const double*>(&ks[c])[f]));
    for (int64_t r = tile; r < len; r += tile) std::copy_n(row, tile, row + r);
  }
  return t;
}

template <typename C>
VecK<C> vec_consts(const std::vector<C>& table, int64_t off) {
  const int64_t n = int64_t(table.size()) / 8;
  const C* p = table.data() + off;
  return {p, p + n, p + 2 * n, p + 3 * n, p + 4 * n, p + 5 * n, p + 6 * n, p + 7 * n};
}

// Tile path reductions: fixed groups of units ("pieces", independent of the thread count, so
// results are deterministic), each with its own per-element accumulators of one unit's length.
struct Pieces {
  int64_t len, units, per_piece, count;
};
// A piece is at least kPiece elements and, for large tiles (NCHW with a small spatial extent),
// up to 8 tiles, so that folding its accumulators per channel (a tile's worth of work) stays a
// small share; but at most a quarter of the tensor, which keeps two threads busy.
Pieces pieces_of(const ChannelView& v) {
  const int64_t len = unit_len(v), total = v.outer * v.channels * v.inner;
  const int64_t units = (total + len - 1) / len;
  const int64_t target = std::max(kPiece, std::min(8 * v.channels * v.inner, total / 4));
  const int64_t per_piece = std::max<int64_t>(1, target / len);
  return {len, units, per_piece, (units + per_piece - 1) / per_piece};
}

// out[c] += the unit-laid-out vals of channel c: rows of the unit are added with SIMD first
// (vals is overwritten), then the one remaining [C, inner] tile is folded per channel.
template <typename C>
void fold_to_channels(C* vals, int64_t len, const ChannelView& v, double* out) {
  const int64_t tile = v.channels * v.inner;
  for (int64_t r = tile; r < len; r += tile) col_sum(vals + r, vals, tile);
  for (int64_t c = 0; c < v.channels; ++c) {  // four chains: a channel's run is short
    const C* p = vals + c * v.inner;
    double s[4] = {0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 4 <= v.inner; i += 4)
      for (int k = 0; k < 4; ++k) s[k] += double(p[i + k]);
    for (; i < v.inner; ++i) s[0] += double(p[i]);
    out[c] += (s[0] + s[1]) + (s[2] + s[3]);
  }
}

// ---- the passes ----

template <typename S>
void stats(const S* x, const ChannelView& v, const double* shift, Moments& m) {
  using C = compute_t<S>;
  const int64_t channels = v.channels;
  // Per piece (a fixed group of units that fits in L2): per-element sums, folded into
  // per-channel means, then per-element squared deviations from those, folded likewise; the
  // pieces' (count, mean, M2) are merged per channel in a fixed order. Only the very last unit
  // may be short, so an element's count is its piece's number of units, less one past it.
  const Pieces pc = pieces_of(v);
  const int64_t total = v.outer * v.channels * v.inner, tile = channels * v.inner;
  Moments part(pc.count * channels);
  at::parallel_for(0, pc.count, 1, [&](int64_t b, int64_t e) {
    C buf[kBlock];
    std::vector<C> acc(pc.len), res(pc.len), tmean(pc.len);  // tmean: channel means laid out as the unit
    std::vector<double> sum(channels), rsum(channels);
    for (int64_t p = b; p < e; ++p) {
      const int64_t u0 = p * pc.per_piece, u1 = std::min(pc.units, u0 + pc.per_piece);
      const int64_t last_len = std::min(pc.len, total - (u1 - 1) * pc.len);  // short: last unit only
      // ahead: elements to prefetch ahead of each block (the second sweep, running from cache,
      // fetches the next piece so that memory keeps streaming)
      auto sweep = [&](int64_t ahead, auto&& fn) {
        for (int64_t u = u0; u < u1; ++u)
          for (int64_t j = 0, n = std::min(pc.len, total - u * pc.len); j < n; j += kBlock) {
            const int64_t m = std::min(kBlock, n - j), off = u * pc.len + j;
            if (ahead > 0 && off + ahead < total) prefetch(x + off + ahead, std::min(m, total - off - ahead));
            fn(load(x + off, buf, m), j, m);
          }
      };
      double* n_p = part.n.data() + p * channels;
      double* mu_p = part.mu.data() + p * channels;
      double* m2_p = part.m2.data() + p * channels;
      // Elements per channel in this piece: whole rows of `tile`, the last unit maybe shorter.
      const double rows = double((u1 - u0 - 1) * (pc.len / tile) + last_len / tile);
      std::fill(acc.begin(), acc.end(), C(0));
      std::fill(sum.begin(), sum.end(), 0.0);
      sweep(0, [&](const C* xv, int64_t j, int64_t m) { col_sum(xv, acc.data() + j, m); });
      fold_to_channels(acc.data(), pc.len, v, sum.data());
      for (int64_t c = 0; c < channels; ++c) {
        n_p[c] = rows * double(v.inner);
        mu_p[c] = sum[c] / n_p[c];
      }
      for (int64_t c = 0; c < channels; ++c) std::fill_n(tmean.begin() + c * v.inner, v.inner, C(mu_p[c]));
      for (int64_t r = tile; r < pc.len; r += tile) std::copy_n(tmean.begin(), tile, tmean.begin() + r);
      std::fill(acc.begin(), acc.end(), C(0));
      std::fill(res.begin(), res.end(), C(0));
      sweep((u1 - u0) * pc.len, [&](const C* xv, int64_t j, int64_t m) {
        col_sq_dev(xv, tmean.data() + j, acc.data() + j, res.data() + j, m);
      });
      fold_to_channels(acc.data(), pc.len, v, m2_p);
      std::fill(rsum.begin(), rsum.end(), 0.0);
      fold_to_channels(res.data(), pc.len, v, rsum.data());
      for (int64_t c = 0; c < channels; ++c) {  // the corrected two-pass algorithm (see block_moments)
        mu_p[c] = corrected_mean(double(tmean[c * v.inner]) - shift[c], rsum[c], n_p[c]);
        m2_p[c] -= rsum[c] * rsum[c] / n_p[c];
      }
    }
  });
  m.merge_pieces(part);
}

template <typename S>
void forward(const S* x, S* y, int64_t act, const Ks& ks, const ChannelView& v, const BnDropout* d) {
  using C = compute_t<S>;
  const std::vector<C> kt = tiled<C>(ks, v);
  for_each_unit(v, unit_len(v), [&](int64_t, int64_t off, int64_t len) {
    C xb[kBlock], yb[kBlock];
    WordBufs wb;
    for (int64_t j = 0; j < len; j += kBlock) {
      const int64_t m = std::min(kBlock, len - j);
      if (d != nullptr) {
        fwd_vec(act, load(x + off + j, xb, m), yb, m, vec_consts<C>(kt, j));
        store_dropped(*d, yb, y, off + j, m, wb);
        continue;
      }
      fwd_vec(act, load(x + off + j, xb, m), out_ptr(y + off + j, yb), m, vec_consts<C>(kt, j));
      store(yb, y + off + j, m);
    }
  });
}

template <typename S>
void reduce(const S* g, const S* x, int64_t act, const Ks& ks, const ChannelView& v, double* sums,
            const BnDropout* d) {
  using C = compute_t<S>;
  const int64_t channels = v.channels;
  const std::vector<C> kt = tiled<C>(ks, v);
  const Pieces pc = pieces_of(v);
  const int64_t total = v.outer * channels * v.inner;
  std::vector<double> part(3 * pc.count * channels, 0.0);
  at::parallel_for(0, pc.count, 1, [&](int64_t b, int64_t e) {
    C gb[kBlock], xb[kBlock];
    WordBufs wb;
    std::vector<C> acc(3 * pc.len);
    for (int64_t p = b; p < e; ++p) {
      std::fill(acc.begin(), acc.end(), C(0));
      C* a = acc.data();
      for (int64_t u = p * pc.per_piece; u < std::min(pc.units, (p + 1) * pc.per_piece); ++u)
        for (int64_t j = 0, n = std::min(pc.len, total - u * pc.len); j < n; j += kBlock) {
          const int64_t m = std::min(kBlock, n - j), off = u * pc.len + j;
          const C* gv = d != nullptr ? dropped_grad(*d, g, off, m, gb, wb) : load(g + off, gb, m);
          reduce_vec(act, gv, load(x + off, xb, m), m, vec_consts<C>(kt, j), a + j,
                     a + pc.len + j, a + 2 * pc.len + j);
        }
      for (int q = 0; q < 3; ++q)
        fold_to_channels(a + q * pc.len, pc.len, v, part.data() + (3 * p + q) * channels);
    }
  });
  add_pieces(part, channels, sums);
}

template <typename S>
void elemt(const S* g, const S* x, S* gi, int64_t act, const Ks& ks, const ChannelView& v, const BnDropout* d) {
  using C = compute_t<S>;
  const std::vector<C> kt = tiled<C>(ks, v);
  for_each_unit(v, unit_len(v), [&](int64_t, int64_t off, int64_t len) {
    C gb[kBlock], xb[kBlock], ob[kBlock];
    WordBufs wb;
    for (int64_t j = 0; j < len; j += kBlock) {
      const int64_t m = std::min(kBlock, len - j);
      const C* gv = d != nullptr ? dropped_grad(*d, g, off + j, m, gb, wb) : load(g + off + j, gb, m);
      elemt_vec(act, gv, load(x + off + j, xb, m), out_ptr(gi + off + j, ob), m,
                vec_consts<C>(kt, j));
      store(ob, gi + off + j, m);
    }
  });
}

}  // namespace

DLK_BN_PATH_OPS(tile_path_ops)

}  // namespace dlk::cpu

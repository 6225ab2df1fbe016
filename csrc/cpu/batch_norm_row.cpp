// Batch norm's row path: a long inner extent (NCHW-like layouts), walked row by row, a row being
// the `inner` elements of one channel, with the channel's constants as scalars.
#include <algorithm>
#include <vector>

#include "batch_norm_impl.h"
#include "batch_norm_loops.h"
#include "loadstore.h"

namespace dlk::cpu {
namespace {

DLK_MULTIVERSION(void, block_moments, (const float* x, int64_t n, float* out), (x, n, out), block_moments_body)
DLK_MULTIVERSION(void, block_moments, (const double* x, int64_t n, double* out), (x, n, out), block_moments_body)

template <typename T>
DLK_INLINE void fwd_row_dispatch(int act, const T* x, T* y, int64_t n, const RowK<T>& k) {
#define CALL(A) fwd_row_body<A>(x, y, n, k)
  DLK_ACT_SWITCH(act, CALL)
#undef CALL
}
DLK_MULTIVERSION(void, fwd_row, (int act, const float* x, float* y, int64_t n, const RowK<float>& k), (act, x, y, n, k), fwd_row_dispatch)
DLK_MULTIVERSION(void, fwd_row, (int act, const double* x, double* y, int64_t n, const RowK<double>& k), (act, x, y, n, k), fwd_row_dispatch)

template <typename T>
DLK_INLINE void reduce_row_dispatch(int act, const T* g, const T* x, int64_t n, const RowK<T>& k, T* out) {
#define CALL(A) reduce_row_body<A>(g, x, n, k, out)
  DLK_ACT_SWITCH(act, CALL)
#undef CALL
}
DLK_MULTIVERSION(void, reduce_row, (int act, const float* g, const float* x, int64_t n, const RowK<float>& k, float* out), (act, g, x, n, k, out), reduce_row_dispatch)
DLK_MULTIVERSION(void, reduce_row, (int act, const double* g, const double* x, int64_t n, const RowK<double>& k, double* out), (act, g, x, n, k, out), reduce_row_dispatch)

template <typename T>
DLK_INLINE void elemt_row_dispatch(int act, const T* g, const T* x, T* gi, int64_t n, const RowK<T>& k) {
#define CALL(A) elemt_row_body<A>(g, x, gi, n, k)
  DLK_ACT_SWITCH(act, CALL)
#undef CALL
}
DLK_MULTIVERSION(void, elemt_row, (int act, const float* g, const float* x, float* gi, int64_t n, const RowK<float>& k), (act, g, x, gi, n, k), elemt_row_dispatch)
DLK_MULTIVERSION(void, elemt_row, (int act, const double* g, const double* x, double* gi, int64_t n, const RowK<double>& k), (act, g, x, gi, n, k), elemt_row_dispatch)

// ---- one row of `inner` elements ----

// (mean, M2) of a row: L1 blocks merged in double.
template <typename S>
void row_moments(const S* x, int64_t len, double shift, double& mu, double& m2) {
  compute_t<S> buf[kBlock], mom[3];
  double n = 0;
  mu = m2 = 0;
  for (int64_t i = 0; i < len; i += kBlock) {
    const int64_t m = std::min(kBlock, len - i);
    block_moments(load(x + i, buf, m), m, mom);
    const double r = mom[2];
    merge_moments<double>(n, mu, m2, double(m), corrected_mean(double(mom[0]) - shift, r, double(m)),
                          double(mom[1]) - r * r / double(m));
  }
}

// y[off, off + len): one row. Under dropout each block's words are those of its positions.
template <typename S>
void row_forward(const S* x, S* y, int64_t off, int64_t len, int act, const RowK<compute_t<S>>& k,
                 const BnDropout* d, bool nt) {
  compute_t<S> xb[kBlock], yb[kBlock];
  if (d != nullptr) {
    WordBufs wb;
    for (int64_t i = off; i < off + len; i += kBlock) {
      const int64_t m = std::min(kBlock, off + len - i);
      fwd_row(act, load(x + i, xb, m), yb, m, k);
      store_dropped(*d, yb, y, i, m, wb);
    }
    return;
  }
  for (int64_t i = off; i < off + len; i += kBlock) {
    const int64_t m = std::min(kBlock, off + len - i);
    fwd_row(act, load(x + i, xb, m), out_block(y + i, yb, nt), m, k);
    store_out(yb, y + i, m, nt);
  }
}

// Adds the row's sum dz, sum dz * xhat and PReLU slope gradient to acc[0..2].
template <typename S>
void row_reduce(const S* g, const S* x, int64_t off, int64_t len, int act, const RowK<compute_t<S>>& k,
                double* acc, const BnDropout* d) {
  using C = compute_t<S>;
  C gb[kBlock], xb[kBlock];
  WordBufs wb;
  for (int64_t i = off; i < off + len; i += kBlock) {
    const int64_t m = std::min(kBlock, off + len - i);
    C out[3] = {0, 0, 0};
    const C* gv = d != nullptr ? dropped_grad(*d, g, i, m, gb, wb) : load(g + i, gb, m);
    reduce_row(act, gv, load(x + i, xb, m), m, k, out);
    for (int q = 0; q < 3; ++q) acc[q] += out[q];
  }
}

template <typename S>
void row_elemt(const S* g, const S* x, S* gi, int64_t off, int64_t len, int act, const RowK<compute_t<S>>& k,
               const BnDropout* d, bool nt) {
  using C = compute_t<S>;
  C gb[kBlock], xb[kBlock], ob[kBlock];
  WordBufs wb;
  for (int64_t i = off; i < off + len; i += kBlock) {
    const int64_t m = std::min(kBlock, off + len - i);
    const C* gv = d != nullptr ? dropped_grad(*d, g, i, m, gb, wb) : load(g + i, gb, m);
    elemt_row(act, gv, load(x + i, xb, m), out_block(gi + i, ob, nt), m, k);
    store_out(ob, gi + i, m, nt);
  }
}

// ---- the passes ----

template <typename S>
void stats(const S* x, const ChannelView& v, const double* shift, Moments& m) {
  Moments rows(v.outer * v.channels);  // per row, merged in row order
  std::fill(rows.n.begin(), rows.n.end(), double(v.inner));
  for_each_unit(v, v.inner, [&](int64_t r, int64_t off, int64_t len) {
    row_moments(x + off, len, shift[r % v.channels], rows.mu[r], rows.m2[r]);
  });
  m.merge_pieces(rows);
}

template <typename S>
void forward(const S* x, S* y, int64_t act, const Ks& ks, const ChannelView& v, const BnDropout* d) {
  const auto rk = narrow_all<compute_t<S>>(ks);
  const bool nt = d == nullptr && streams<S>(v.outer * v.channels * v.inner);
  for_each_unit(v, v.inner, [&](int64_t r, int64_t off, int64_t len) {
    row_forward(x, y, off, len, act, rk[r % v.channels], d, nt);
  }, nt);
}

template <typename S>
void reduce(const S* g, const S* x, int64_t act, const Ks& ks, const ChannelView& v, double* sums,
            const BnDropout* d) {
  const auto rk = narrow_all<compute_t<S>>(ks);
  const int64_t channels = v.channels, rows = v.outer * channels;
  std::vector<double> part(3 * rows, 0.0);
  for_each_unit(v, v.inner, [&](int64_t r, int64_t off, int64_t len) {
    row_reduce(g, x, off, len, act, rk[r % channels], part.data() + 3 * r, d);
  });
  for (int64_t r = 0; r < rows; ++r)
    for (int q = 0; q < 3; ++q) sums[q * channels + r % channels] += part[3 * r + q];
}

template <typename S>
void elemt(const S* g, const S* x, S* gi, int64_t act, const Ks& ks, const ChannelView& v, const BnDropout* d) {
  const auto rk = narrow_all<compute_t<S>>(ks);
  const bool nt = streams<S>(v.outer * v.channels * v.inner);
  for_each_unit(v, v.inner, [&](int64_t r, int64_t off, int64_t len) {
    row_elemt(g, x, gi, off, len, act, rk[r % v.channels], d, nt);
  }, nt);
}

}  // namespace

DLK_BN_PATH_OPS(row_path_ops)

}  // namespace dlk::cpu

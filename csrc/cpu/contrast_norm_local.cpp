// Local contrast normalization on the CPU (the contract: dlkernels/reference/contrast_norm.py).
//
// Work is cut into units processed independently: an (example, channel) plane for NCHW input,
// a whole example for channels_last input (its channels interleaved in each row) or across
// channels. A unit is walked row by row; the renormalized Gaussian window G = Z^-1 K is separable
// (K = wh (x) ww, Z(i, j) = zr(i) zc(j)), so G u is a pass along each row (a padded row, 1/zc at
// the border columns) into a unit-sized buffer, then a pass down the columns (1/zr at the border
// rows). Every pass is a plain loop over a whole row (vectorized at each SIMD level by
// DLK_MULTIVERSION), a symmetric pair of taps per step, in buffers of one unit (L2-sized for
// images up to about 256 x 256 per channel).
//
// Forward (per unit): m = G x, v = x - m, s = sqrt(G v^2), then y = v / d: four 1-D passes.
// Backward: nothing is saved by the forward; m and s are recomputed from x (two separable passes:
// cheaper on this machine than writing and re-reading two image-sized float tensors), then
// R = A^T gq = K(gq / Z) and A^T(gv) (two more separable passes, the adjoint taking 1/Z before K).
// Means are about the unit's first value (per channel), so a constant image gives exactly 0.
// Reductions (lecun's mean of s and its gradient) are per row, added in row order in double:
// results do not depend on the thread count or on the path:
// - per-unit path (many units): a task takes whole units, each in one thread's buffers;
// - split path (fewer units than threads, large ones): units one after another, each pass's rows
//   in parallel over shared unit buffers.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "../api/contrast_norm.h"
#include "../common/contrast_norm.h"
#include "loadstore.h"
#include "simd.h"

namespace dlk::cpu {
namespace {

#define R __restrict__
constexpr int kLanes = 32;  // independent accumulators: a vectorizable sum

// ---- loops over one row (n elements) ----

// Elements per register block of the passes: the sums of a block stay in registers across the taps
// (kChunk floats: 4 AVX-512 registers), written once.
constexpr int64_t kChunk = 64;

// out[e] = sum_k w[k] p[e + k ts], w symmetric with 2r + 1 taps: the centre tap, then one pair of
// taps per step (p is the row with r * ts zeros of padding on both sides).
template <typename T>
DLK_INLINE void lcn_row_conv_body(const T* R p, T* R out, int64_t n, const T* R w, int64_t r, int64_t ts) {
  const T wc = w[r];
  int64_t e0 = 0;
  for (; e0 + kChunk <= n; e0 += kChunk) {
    T acc[kChunk];
    const T* pc = p + e0 + r * ts;
    for (int64_t i = 0; i < kChunk; ++i) acc[i] = wc * pc[i];
    for (int64_t k = 0; k < r; ++k) {
      const T wk = w[k];
      const T* a = p + e0 + k * ts;
      const T* b = p + e0 + (2 * r - k) * ts;
      for (int64_t i = 0; i < kChunk; ++i) acc[i] += wk * (a[i] + b[i]);
    }
    for (int64_t i = 0; i < kChunk; ++i) out[e0 + i] = acc[i];
  }
  const T* pc = p + r * ts;
  for (int64_t e = e0; e < n; ++e) out[e] = wc * pc[e];
  for (int64_t k = 0; k < r; ++k) {
    const T wk = w[k];
    const T* a = p + k * ts;
    const T* b = p + (2 * r - k) * ts;
    for (int64_t e = e0; e < n; ++e) out[e] += wk * (a[e] + b[e]);
  }
}
DLK_MULTIVERSION(void, lcn_row_conv, (const float* p, float* out, int64_t n, const float* w, int64_t r, int64_t ts),
                 (p, out, n, w, r, ts), lcn_row_conv_body)
DLK_MULTIVERSION(void, lcn_row_conv, (const double* p, double* out, int64_t n, const double* w, int64_t r,
                                      int64_t ts), (p, out, n, w, r, ts), lcn_row_conv_body)

// Row h of the column pass over t (H rows of n): out = sum_k w[k] t[h + k - r] over the rows
// inside [0, H) (zero padding), a symmetric pair per step where both rows exist.
template <typename T>
DLK_INLINE void lcn_col_conv_body(const T* R t, T* R out, int64_t n, int64_t h, int64_t H, const T* R w, int64_t r) {
  const T wc = w[r];
  const T* c = t + h * n;
  // rows h - d and h + d both inside for d <= both; one of them for both < d <= max(above, below)
  const int64_t above = std::min(r, h), below = std::min(r, H - 1 - h);  // rows inside on each side
  const int64_t both = std::min(above, below);
  int64_t e0 = 0;
  for (; e0 + kChunk <= n; e0 += kChunk) {
    T acc[kChunk];
    for (int64_t i = 0; i < kChunk; ++i) acc[i] = wc * c[e0 + i];
    for (int64_t d = 1; d <= both; ++d) {
      const T wk = w[r - d];
      const T* a = t + (h - d) * n + e0;
      const T* b = t + (h + d) * n + e0;
      for (int64_t i = 0; i < kChunk; ++i) acc[i] += wk * (a[i] + b[i]);
    }
    for (int64_t d = both + 1; d <= std::max(above, below); ++d) {
      const T wk = w[r - d];
      const T* o = t + (d <= above ? h - d : h + d) * n + e0;
      for (int64_t i = 0; i < kChunk; ++i) acc[i] += wk * o[i];
    }
    for (int64_t i = 0; i < kChunk; ++i) out[e0 + i] = acc[i];
  }
  for (int64_t e = e0; e < n; ++e) out[e] = wc * c[e];
  for (int64_t d = 1; d <= both; ++d) {
    const T wk = w[r - d];
    const T* a = t + (h - d) * n;
    const T* b = t + (h + d) * n;
    for (int64_t e = e0; e < n; ++e) out[e] += wk * (a[e] + b[e]);
  }
  for (int64_t d = both + 1; d <= std::max(above, below); ++d) {
    const T wk = w[r - d];
    const T* o = t + (d <= above ? h - d : h + d) * n;
    for (int64_t e = e0; e < n; ++e) out[e] += wk * o[e];
  }
}
DLK_MULTIVERSION(void, lcn_col_conv, (const float* t, float* out, int64_t n, int64_t h, int64_t H, const float* w,
                                      int64_t r), (t, out, n, h, H, w, r), lcn_col_conv_body)
DLK_MULTIVERSION(void, lcn_col_conv, (const double* t, double* out, int64_t n, int64_t h, int64_t H,
                                      const double* w, int64_t r), (t, out, n, h, H, w, r), lcn_col_conv_body)

// out = x - sh
template <typename T>
DLK_INLINE void lcn_sub_body(const T* R x, const T* R sh, T* R out, int64_t n) {
  for (int64_t e = 0; e < n; ++e) out[e] = x[e] - sh[e];
}
DLK_MULTIVERSION(void, lcn_sub, (const float* x, const float* sh, float* out, int64_t n), (x, sh, out, n),
                 lcn_sub_body)
DLK_MULTIVERSION(void, lcn_sub, (const double* x, const double* sh, double* out, int64_t n), (x, sh, out, n),
                 lcn_sub_body)

// out = v^2 with v = (x - sh) - m
template <typename T>
DLK_INLINE void lcn_center_sq_body(const T* R x, const T* R sh, const T* R m, T* R out, int64_t n) {
  for (int64_t e = 0; e < n; ++e) {
    const T v = (x[e] - sh[e]) - m[e];
    out[e] = v * v;
  }
}
DLK_MULTIVERSION(void, lcn_center_sq, (const float* x, const float* sh, const float* m, float* out, int64_t n),
                 (x, sh, m, out, n), lcn_center_sq_body)
DLK_MULTIVERSION(void, lcn_center_sq, (const double* x, const double* sh, const double* m, double* out, int64_t n),
                 (x, sh, m, out, n), lcn_center_sq_body)

// a *= f
template <typename T>
DLK_INLINE void lcn_scale_body(T* R a, int64_t n, T f) {
  for (int64_t e = 0; e < n; ++e) a[e] *= f;
}
DLK_MULTIVERSION(void, lcn_scale, (float* a, int64_t n, float f), (a, n, f), lcn_scale_body)
DLK_MULTIVERSION(void, lcn_scale, (double* a, int64_t n, double f), (a, n, f), lcn_scale_body)

// out = a * f
template <typename T>
DLK_INLINE void lcn_scale_to_body(const T* R a, T* R out, int64_t n, T f) {
  for (int64_t e = 0; e < n; ++e) out[e] = a[e] * f;
}
DLK_MULTIVERSION(void, lcn_scale_to, (const float* a, float* out, int64_t n, float f), (a, out, n, f),
                 lcn_scale_to_body)
DLK_MULTIVERSION(void, lcn_scale_to, (const double* a, double* out, int64_t n, double f), (a, out, n, f),
                 lcn_scale_to_body)

// acc += a
template <typename T>
DLK_INLINE void lcn_add_body(T* R acc, const T* R a, int64_t n) {
  for (int64_t e = 0; e < n; ++e) acc[e] += a[e];
}
DLK_MULTIVERSION(void, lcn_add, (float* acc, const float* a, int64_t n), (acc, a, n), lcn_add_body)
DLK_MULTIVERSION(void, lcn_add, (double* acc, const double* a, int64_t n), (acc, a, n), lcn_add_body)

// a = sqrt(a)
template <typename T>
DLK_INLINE void lcn_sqrt_body(T* R a, int64_t n) {
  for (int64_t e = 0; e < n; ++e) a[e] = std::sqrt(a[e]);
}
DLK_MULTIVERSION(void, lcn_sqrt, (float* a, int64_t n), (a, n), lcn_sqrt_body)
DLK_MULTIVERSION(void, lcn_sqrt, (double* a, int64_t n), (a, n), lcn_sqrt_body)

// sum(a), in kLanes independent lanes added in a fixed order
template <typename T>
DLK_INLINE T lcn_sum_body(const T* R a, int64_t n) {
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += a[i + j];
  for (; i < n; ++i) acc[0] += a[i];
  for (int w = kLanes / 2; w >= 1; w /= 2)
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  return acc[0];
}
DLK_MULTIVERSION(float, lcn_sum, (const float* a, int64_t n), (a, n), lcn_sum_body)
DLK_MULTIVERSION(double, lcn_sum, (const double* a, int64_t n), (a, n), lcn_sum_body)

// y = ((x - sh) - m) * inv, inv from (s, c) (c: lecun's mean of s, per element)
template <typename T>
DLK_INLINE void lcn_out_body(const T* R x, const T* R sh, const T* R m, const T* R s, const T* R c, T* R y,
                             int64_t n, T eps, bool lecun) {
  for (int64_t e = 0; e < n; ++e) y[e] = ((x[e] - sh[e]) - m[e]) * lcn_coef(s[e], c[e], eps, lecun).inv;
}
DLK_MULTIVERSION(void, lcn_out, (const float* x, const float* sh, const float* m, const float* s, const float* c,
                                 float* y, int64_t n, float eps, bool lecun), (x, sh, m, s, c, y, n, eps, lecun),
                 lcn_out_body)
DLK_MULTIVERSION(void, lcn_out, (const double* x, const double* sh, const double* m, const double* s,
                                 const double* c, double* y, int64_t n, double eps, bool lecun),
                 (x, sh, m, s, c, y, n, eps, lecun), lcn_out_body)

// the gradient reaching the divisor: out = -g v inv^2
template <typename T>
DLK_INLINE void lcn_gd_body(const T* R g, const T* R x, const T* R sh, const T* R m, const T* R s, const T* R c,
                            T* R out, int64_t n, T eps, bool lecun) {
  for (int64_t e = 0; e < n; ++e) {
    const T inv = lcn_coef(s[e], c[e], eps, lecun).inv;
    out[e] = -g[e] * ((x[e] - sh[e]) - m[e]) * inv * inv;
  }
}
DLK_MULTIVERSION(void, lcn_gd, (const float* g, const float* x, const float* sh, const float* m, const float* s,
                                const float* c, float* out, int64_t n, float eps, bool lecun),
                 (g, x, sh, m, s, c, out, n, eps, lecun), lcn_gd_body)
DLK_MULTIVERSION(void, lcn_gd, (const double* g, const double* x, const double* sh, const double* m,
                                const double* s, const double* c, double* out, int64_t n, double eps, bool lecun),
                 (g, x, sh, m, s, c, out, n, eps, lecun), lcn_gd_body)

// Where the divisor is s: gs = gd; where it is lecun's c: ct = gd (summed into c's gradient).
template <typename T>
DLK_INLINE void lcn_gs_body(const T* R gd, const T* R s, const T* R c, T* R gs, T* R ct, int64_t n, T eps,
                            bool lecun) {
  // lcn_coef's on_s / on_c, spelled out as selects of loaded values (GCC leaves the loop scalar
  // when it selects on the struct's bools, or loads gd[e] inside a select)
  for (int64_t e = 0; e < n; ++e) {
    const T sv = s[e], cv = c[e], g = gd[e];
    const bool swin = !lecun | !(sv < cv);
    const T t = swin ? sv : cv;
    const bool smooth = !(t <= eps);
    const T a = smooth ? g : T(0);
    gs[e] = swin ? a : T(0);
    ct[e] = swin ? T(0) : a;
  }
}
DLK_MULTIVERSION(void, lcn_gs, (const float* gd, const float* s, const float* c, float* gs, float* ct, int64_t n,
                                float eps, bool lecun), (gd, s, c, gs, ct, n, eps, lecun), lcn_gs_body)
DLK_MULTIVERSION(void, lcn_gs, (const double* gd, const double* s, const double* c, double* gs, double* ct,
                                int64_t n, double eps, bool lecun), (gd, s, c, gs, ct, n, eps, lecun), lcn_gs_body)

// out = (gs + gc) / (2 s) * f (0 where s = 0): the gradient of s^2 = q, times the adjoint's 1/zr
template <typename T>
DLK_INLINE void lcn_gq_body(const T* R gs, const T* R s, const T* R gc, T* R out, int64_t n, T f) {
  for (int64_t e = 0; e < n; ++e) {
    const T q = (gs[e] + gc[e]) / (T(2) * s[e]) * f;  // computed everywhere, then selected: a blend
    out[e] = s[e] > T(0) ? q : T(0);
  }
}
DLK_MULTIVERSION(void, lcn_gq, (const float* gs, const float* s, const float* gc, float* out, int64_t n, float f),
                 (gs, s, gc, out, n, f), lcn_gq_body)
DLK_MULTIVERSION(void, lcn_gq, (const double* gs, const double* s, const double* gc, double* out, int64_t n,
                                double f), (gs, s, gc, out, n, f), lcn_gq_body)

// gv = g inv + f2 v r (r = A^T gq; f2 = 2, or 2 / C across channels)
template <typename T>
DLK_INLINE void lcn_gv_body(const T* R g, const T* R x, const T* R sh, const T* R m, const T* R s, const T* R c,
                            const T* R r, T* R gv, int64_t n, T eps, bool lecun, T f2) {
  for (int64_t e = 0; e < n; ++e)
    gv[e] = g[e] * lcn_coef(s[e], c[e], eps, lecun).inv + f2 * ((x[e] - sh[e]) - m[e]) * r[e];
}
DLK_MULTIVERSION(void, lcn_gv, (const float* g, const float* x, const float* sh, const float* m, const float* s,
                                const float* c, const float* r, float* gv, int64_t n, float eps, bool lecun,
                                float f2), (g, x, sh, m, s, c, r, gv, n, eps, lecun, f2), lcn_gv_body)
DLK_MULTIVERSION(void, lcn_gv, (const double* g, const double* x, const double* sh, const double* m,
                                const double* s, const double* c, const double* r, double* gv, int64_t n,
                                double eps, bool lecun, double f2), (g, x, sh, m, s, c, r, gv, n, eps, lecun, f2),
                 lcn_gv_body)

// gx = gv - f u (u = A^T of the channel sum of gv; f = 1, or 1 / C across channels)
template <typename T>
DLK_INLINE void lcn_gx_body(const T* R gv, const T* R u, T* R gx, int64_t n, T f) {
  for (int64_t e = 0; e < n; ++e) gx[e] = gv[e] - f * u[e];
}
DLK_MULTIVERSION(void, lcn_gx, (const float* gv, const float* u, float* gx, int64_t n, float f), (gv, u, gx, n, f),
                 lcn_gx_body)
DLK_MULTIVERSION(void, lcn_gx, (const double* gv, const double* u, double* gx, int64_t n, double f),
                 (gv, u, gx, n, f), lcn_gx_body)

// ---- the geometry of a call ----

// A unit's row h is nseg segments of lseg elements in memory; its statistics (m, s) are a row of
// ls values, the pass along it taking every ts-th element (the channels of an NHWC row are
// interleaved). Element e of a segment has statistic e / grp (grp = C across channels of an NHWC
// row, else 1) and stat channel e % cs (cs = C for an NHWC row per channel, else 1).
struct Geo {
  int64_t n, c, h, w;
  bool nhwc, across, lecun;
  int64_t units, nseg, lseg, ls, ts, cs, grp;
  int64_t unit_stride, seg_stride, row_stride;
  int64_t r;  // the window's radius (a row or column within r of an edge is a border one)
};

Geo make_geo(const at::Tensor& x, bool nhwc, int64_t kernel_size, bool across, bool lecun) {
  Geo g{};
  g.n = x.size(0), g.c = x.size(1), g.h = x.size(2), g.w = x.size(3);
  g.nhwc = nhwc, g.across = across, g.lecun = lecun;
  g.r = kernel_size / 2;
  const int64_t plane = g.h * g.w;
  if (!nhwc && !across) {
    g.units = g.n * g.c, g.nseg = 1, g.lseg = g.w, g.ls = g.w, g.ts = 1, g.cs = 1, g.grp = 1;
    g.unit_stride = plane, g.seg_stride = 0, g.row_stride = g.w;
  } else if (nhwc && !across) {
    g.units = g.n, g.nseg = 1, g.lseg = g.w * g.c, g.ls = g.w * g.c, g.ts = g.c, g.cs = g.c, g.grp = 1;
    g.unit_stride = plane * g.c, g.seg_stride = 0, g.row_stride = g.w * g.c;
  } else if (!nhwc) {
    g.units = g.n, g.nseg = g.c, g.lseg = g.w, g.ls = g.w, g.ts = 1, g.cs = 1, g.grp = 1;
    g.unit_stride = plane * g.c, g.seg_stride = plane, g.row_stride = g.w;
  } else {
    g.units = g.n, g.nseg = 1, g.lseg = g.w * g.c, g.ls = g.w, g.ts = 1, g.cs = 1, g.grp = g.c;
    g.unit_stride = plane * g.c, g.seg_stride = 0, g.row_stride = g.w * g.c;
  }
  return g;
}

template <typename C>
std::unique_ptr<C[]> buffer(int64_t n) {
  return std::unique_ptr<C[]>(new C[std::max<int64_t>(n, 1)]);
}

// One thread's row buffers.
template <typename C>
struct Rows {
  std::unique_ptr<C[]> pad, xb, gb, ob, tmp, red, ct, mx, sx, ux;
  std::vector<const C*> xs, gs;  // the segments of a row of x and of grad_output
  Rows(const Geo& g, int64_t rw) : xs(g.nseg), gs(g.nseg) {
    const int64_t seg = g.nseg * g.lseg;
    pad = buffer<C>(g.ls + 2 * rw * g.ts);
    std::fill(pad.get(), pad.get() + g.ls + 2 * rw * g.ts, C(0));  // the zero padding, never written
    xb = buffer<C>(seg), gb = buffer<C>(seg), ob = buffer<C>(g.lseg), tmp = buffer<C>(g.lseg);
    red = buffer<C>(g.ls), ct = buffer<C>(g.ls);
    if (g.grp > 1) mx = buffer<C>(g.lseg), sx = buffer<C>(g.lseg), ux = buffer<C>(g.lseg);
  }
};

// One unit's buffers: T (row-pass results), M (local mean), S (local deviation), U (backward),
// GV (backward: gradient of v, element-sized), and its per-unit rows.
template <typename C>
struct Plane {
  std::unique_ptr<C[]> t, m, s, u, gv, sh, crow, gcrow;
  std::vector<double> sums;  // per row and stat channel (lecun)
  Plane(const Geo& g, bool backward) {
    const int64_t n = g.h * g.ls;
    t = buffer<C>(n), m = buffer<C>(n), s = buffer<C>(n);
    if (backward) u = buffer<C>(n), gv = buffer<C>(g.h * g.nseg * g.lseg), gcrow = buffer<C>(g.lseg);
    sh = buffer<C>(g.lseg), crow = buffer<C>(g.lseg);
    sums.resize(g.h * g.cs);
  }
};

template <typename S>
class Lcn {
  using C = compute_t<S>;

 public:
  Lcn(const Geo& g, int64_t kernel_size, double sigma, double eps) : g_(g), eps_(C(eps)) {
    const std::vector<double> ww = lcn::window(kernel_size, sigma, g.w), wh = lcn::window(kernel_size, sigma, g.h);
    rw_ = int64_t(ww.size()) / 2, rh_ = int64_t(wh.size()) / 2;
    ww_.assign(ww.begin(), ww.end()), wh_.assign(wh.begin(), wh.end());
    const std::vector<double> izc = lcn::inv_norm(ww, g.w), izr = lcn::inv_norm(wh, g.h);
    izc_.assign(izc.begin(), izc.end()), izr_.assign(izr.begin(), izr.end());
    for (int64_t j = 0; j < g.w; ++j)
      if (j < g.r || j + g.r >= g.w) border_cols_.push_back(j);
  }

  int64_t rw() const { return rw_; }

  void forward_unit(const S* x, S* y, Plane<C>& pl, Rows<C>* rows, bool split) const {
    statistics(x, pl, rows, split);
    for_rows(split, rows, [&](int64_t h, Rows<C>& rs) {
      const C* const* xs = load_rows(x, h, rs.xb.get(), rs.xs);
      const C *m = stat_row(pl.m.get(), h, rs.mx.get()), *s = stat_row(pl.s.get(), h, rs.sx.get());
      for (int64_t k = 0; k < g_.nseg; ++k) {
        S* dst = y + k * g_.seg_stride + h * g_.row_stride;
        C* o = out_ptr(dst, rs.ob.get());
        lcn_out(xs[k], pl.sh.get(), m, s, g_.lecun ? pl.crow.get() : s, o, g_.lseg, eps_, g_.lecun);
        store(o, dst, g_.lseg);
      }
    });
  }

  void backward_unit(const S* gy, const S* x, S* gx, Plane<C>& pl, Rows<C>* rows, bool split) const {
    statistics(x, pl, rows, split);
    const C* cr = pl.crow.get();
    // gs = the gradient of s (where s is the divisor) into T; lecun: the part for c, summed per row
    for_rows(split, rows, [&](int64_t h, Rows<C>& rs) {
      const C* const* xs = load_rows(x, h, rs.xb.get(), rs.xs);
      const C* const* gs = load_rows(gy, h, rs.gb.get(), rs.gs);
      const C *m = stat_row(pl.m.get(), h, rs.mx.get()), *s = stat_row(pl.s.get(), h, rs.sx.get());
      const C* srow = pl.s.get() + h * g_.ls;
      reduce(rs.red.get(), rs.tmp.get(), C(1), [&](int64_t k, C* out) {
        lcn_gd(gs[k], xs[k], pl.sh.get(), m, s, g_.lecun ? cr : s, out, g_.lseg, eps_, g_.lecun);
      });
      lcn_gs(rs.red.get(), srow, g_.lecun ? cr : srow, pl.t.get() + h * g_.ls, rs.ct.get(), g_.ls, eps_, g_.lecun);
      if (g_.lecun) channel_sums(rs.ct.get(), pl.sums.data() + h * g_.cs);
    });
    if (g_.lecun) {
      per_channel_mean(pl.sums, pl.gcrow.get());
    } else {
      std::fill(pl.gcrow.get(), pl.gcrow.get() + g_.lseg, C(0));
    }
    // T = K_row(gq / Z) row by row (in place: the row is read into the padded buffer first)
    for_rows(split, rows, [&](int64_t h, Rows<C>& rs) {
      C* mid = rs.pad.get() + rw_ * g_.ts;
      C* trow = pl.t.get() + h * g_.ls;
      lcn_gq(trow, pl.s.get() + h * g_.ls, pl.gcrow.get(), mid, g_.ls, izr_[h]);
      fix_cols(mid);
      lcn_row_conv(rs.pad.get(), trow, g_.ls, ww_.data(), rw_, g_.ts);
    });
    // U = R = A^T gq
    for_rows(split, rows, [&](int64_t h, Rows<C>&) {
      lcn_col_conv(pl.t.get(), pl.u.get() + h * g_.ls, g_.ls, h, g_.h, wh_.data(), rh_);
    });
    // GV = g inv + f2 v R; T = K_row(channel sum of GV / Z)
    const C f = g_.across ? C(1) / C(g_.c) : C(1);
    for_rows(split, rows, [&](int64_t h, Rows<C>& rs) {
      const C* const* xs = load_rows(x, h, rs.xb.get(), rs.xs);
      const C* const* gs = load_rows(gy, h, rs.gb.get(), rs.gs);
      const C *m = stat_row(pl.m.get(), h, rs.mx.get()), *s = stat_row(pl.s.get(), h, rs.sx.get());
      const C* u = stat_row(pl.u.get(), h, rs.ux.get());
      C* gv = pl.gv.get() + h * g_.nseg * g_.lseg;
      C* mid = rs.pad.get() + rw_ * g_.ts;
      reduce(mid, rs.tmp.get(), izr_[h], [&](int64_t k, C* out) {
        lcn_gv(gs[k], xs[k], pl.sh.get(), m, s, g_.lecun ? cr : s, u, gv + k * g_.lseg, g_.lseg, eps_, g_.lecun,
               C(2) * f);
        std::copy(gv + k * g_.lseg, gv + (k + 1) * g_.lseg, out);
      });
      fix_cols(mid);
      lcn_row_conv(rs.pad.get(), pl.t.get() + h * g_.ls, g_.ls, ww_.data(), rw_, g_.ts);
    });
    // U = A^T(channel sum of GV)
    for_rows(split, rows, [&](int64_t h, Rows<C>&) {
      lcn_col_conv(pl.t.get(), pl.u.get() + h * g_.ls, g_.ls, h, g_.h, wh_.data(), rh_);
    });
    // grad_input = GV - f U
    for_rows(split, rows, [&](int64_t h, Rows<C>& rs) {
      const C* u = stat_row(pl.u.get(), h, rs.ux.get());
      const C* gv = pl.gv.get() + h * g_.nseg * g_.lseg;
      for (int64_t k = 0; k < g_.nseg; ++k) {
        S* dst = gx + k * g_.seg_stride + h * g_.row_stride;
        C* o = out_ptr(dst, rs.ob.get());
        lcn_gx(gv + k * g_.lseg, u, o, g_.lseg, f);
        store(o, dst, g_.lseg);
      }
    });
  }

 private:
  // The rows h of a unit, one after another in this thread's row buffers, or in parallel.
  template <typename F>
  void for_rows(bool split, Rows<C>* rows, F&& f) const {
    if (!split) {
      for (int64_t h = 0; h < g_.h; ++h) f(h, *rows);
      return;
    }
    const int64_t grain = std::max<int64_t>(1, kGrain / 2 / (g_.nseg * g_.lseg));
    at::parallel_for(0, g_.h, grain, [&](int64_t b, int64_t e) {
      Rows<C> rs(g_, rw_);
      for (int64_t h = b; h < e; ++h) f(h, rs);
    });
  }

  // The segments of row h (compute-type views, buf when converted).
  const C* const* load_rows(const S* base, int64_t h, C* buf, std::vector<const C*>& out) const {
    for (int64_t k = 0; k < g_.nseg; ++k)
      out[k] = load(base + k * g_.seg_stride + h * g_.row_stride, buf + k * g_.lseg, g_.lseg);
    return out.data();
  }

  // Row h of a statistics buffer, aligned with the elements of a segment (repeated over the
  // interleaved channels of an NHWC row when across channels).
  const C* stat_row(const C* plane, int64_t h, C* buf) const {
    const C* row = plane + h * g_.ls;
    if (g_.grp == 1) return row;
    for (int64_t j = 0; j < g_.w; ++j)
      for (int64_t k = 0; k < g_.grp; ++k) buf[j * g_.grp + k] = row[j];
    return buf;
  }

  // out (a statistics row) = f * the channel sum of make(k, segment k) over the segments (f = 1/C:
  // the mean over channels); per channel it is make's row times f.
  template <typename F>
  void reduce(C* out, C* tmp, C f, F&& make) const {
    if (!g_.across) {
      make(0, out);
    } else if (g_.grp == 1) {
      make(0, out);
      for (int64_t k = 1; k < g_.nseg; ++k) {
        make(k, tmp);
        lcn_add(out, tmp, g_.ls);
      }
    } else {
      make(0, tmp);
      for (int64_t j = 0; j < g_.w; ++j) {
        C acc = 0;
        for (int64_t k = 0; k < g_.grp; ++k) acc += tmp[j * g_.grp + k];
        out[j] = acc;
      }
    }
    if (f != C(1)) lcn_scale(out, g_.ls, f);
  }

  // The border columns of a statistics row times 1/zc.
  void fix_cols(C* row) const {
    for (int64_t j : border_cols_)
      for (int64_t k = 0; k < g_.ts; ++k) row[j * g_.ts + k] *= izc_[j];
  }

  // Row h of M (or S) from the row passes in T: the column pass, times 1/zr.
  void col_pass(const C* t, C* out, int64_t h) const {
    lcn_col_conv(t, out, g_.ls, h, g_.h, wh_.data(), rh_);
    if (izr_[h] != C(1)) lcn_scale(out, g_.ls, izr_[h]);
  }

  // Sums of a statistics row per stat channel.
  void channel_sums(const C* row, double* out) const {
    if (g_.cs == 1) {
      out[0] = double(lcn_sum(row, g_.ls));
      return;
    }
    for (int64_t k = 0; k < g_.cs; ++k) {
      C acc = 0;
      for (int64_t j = 0; j < g_.w; ++j) acc += row[j * g_.cs + k];
      out[k] = double(acc);
    }
  }

  // Per stat channel: the sum of sums[h, ch] over the rows in order, / (H W); written as a row
  // repeating over the stat channels.
  void per_channel_mean(const std::vector<double>& sums, C* row) const {
    for (int64_t k = 0; k < g_.cs; ++k) {
      double total = 0;
      for (int64_t h = 0; h < g_.h; ++h) total += sums[h * g_.cs + k];
      const C mean = C(total / double(g_.h * g_.w));
      for (int64_t e = k; e < g_.lseg; e += g_.cs) row[e] = mean;
    }
  }

  // M = G x, S = sqrt(G v^2) and (lecun) crow = the plane means of S, about the unit's first values.
  void statistics(const S* x, Plane<C>& pl, Rows<C>* rows, bool split) const {
    for (int64_t e = 0; e < g_.lseg; ++e) pl.sh[e] = C(x[g_.cs > 1 ? e % g_.cs : 0]);
    const C inv_c = g_.across ? C(1) / C(g_.c) : C(1);
    for_rows(split, rows, [&](int64_t h, Rows<C>& rs) {
      const C* const* xs = load_rows(x, h, rs.xb.get(), rs.xs);
      C* mid = rs.pad.get() + rw_ * g_.ts;
      reduce(mid, rs.tmp.get(), inv_c, [&](int64_t k, C* out) { lcn_sub(xs[k], pl.sh.get(), out, g_.lseg); });
      lcn_row_conv(rs.pad.get(), pl.t.get() + h * g_.ls, g_.ls, ww_.data(), rw_, g_.ts);
      fix_cols(pl.t.get() + h * g_.ls);
    });
    for_rows(split, rows, [&](int64_t h, Rows<C>&) { col_pass(pl.t.get(), pl.m.get() + h * g_.ls, h); });
    for_rows(split, rows, [&](int64_t h, Rows<C>& rs) {
      const C* const* xs = load_rows(x, h, rs.xb.get(), rs.xs);
      const C* m = stat_row(pl.m.get(), h, rs.mx.get());
      C* mid = rs.pad.get() + rw_ * g_.ts;
      reduce(mid, rs.tmp.get(), inv_c,
             [&](int64_t k, C* out) { lcn_center_sq(xs[k], pl.sh.get(), m, out, g_.lseg); });
      lcn_row_conv(rs.pad.get(), pl.t.get() + h * g_.ls, g_.ls, ww_.data(), rw_, g_.ts);
      fix_cols(pl.t.get() + h * g_.ls);
    });
    for_rows(split, rows, [&](int64_t h, Rows<C>&) {
      C* s = pl.s.get() + h * g_.ls;
      col_pass(pl.t.get(), s, h);
      lcn_sqrt(s, g_.ls);
      if (g_.lecun) channel_sums(s, pl.sums.data() + h * g_.cs);
    });
    if (g_.lecun) per_channel_mean(pl.sums, pl.crow.get());
  }

  const Geo& g_;
  C eps_;
  int64_t rw_, rh_;
  std::vector<C> ww_, wh_, izc_, izr_;
  std::vector<int64_t> border_cols_;
};

// Whole units per task when there are enough of them (or they are small), else the rows of each
// unit in parallel; the results are the same either way.
bool split_units(const Geo& g) {
  const int64_t elems = g.h * g.nseg * g.lseg;
  return g.units < 2 * int64_t(at::get_num_threads()) && elems >= 4 * kGrain;
}

template <typename S>
void run(const Geo& g, int64_t kernel_size, double sigma, double eps, const S* x, const S* gy, S* out) {
  using C = compute_t<S>;
  const Lcn<S> lcn(g, kernel_size, sigma, eps);
  const bool backward = gy != nullptr;
  auto unit = [&](int64_t u, Plane<C>& pl, Rows<C>* rows, bool split) {
    const int64_t off = u * g.unit_stride;
    if (backward) {
      lcn.backward_unit(gy + off, x + off, out + off, pl, rows, split);
    } else {
      lcn.forward_unit(x + off, out + off, pl, rows, split);
    }
  };
  if (split_units(g)) {
    Plane<C> pl(g, backward);
    for (int64_t u = 0; u < g.units; ++u) unit(u, pl, nullptr, true);
    return;
  }
  const int64_t elems = g.h * g.nseg * g.lseg;
  at::parallel_for(0, g.units, std::max<int64_t>(1, kGrain / elems), [&](int64_t b, int64_t e) {
    Plane<C> pl(g, backward);
    Rows<C> rows(g, lcn.rw());
    for (int64_t u = b; u < e; ++u) unit(u, pl, &rows, false);
  });
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "dlkernels cpu backend: ", name, " must be a CPU tensor, got ", t.device());
}

}  // namespace

at::Tensor local_contrast_norm(const at::Tensor& x, int64_t kernel_size, double sigma, double eps,
                               const std::string& divisor, bool across_channels) {
  check_cpu(x, "input");
  const bool lecun = lcn::divisor_code(divisor) == kLcnDivisorLecun;
  lcn::check_args(kernel_size, sigma, eps);
  bool nhwc = false;
  const at::Tensor xd = lcn::prepare(x, &nhwc);
  at::Tensor y = at::empty_like(xd);
  if (xd.numel() == 0) return y;
  const Geo g = make_geo(xd, nhwc, kernel_size, across_channels, lecun);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "local_contrast_norm", [&] {
    run<scalar_t>(g, kernel_size, sigma, eps, xd.const_data_ptr<scalar_t>(), nullptr, y.mutable_data_ptr<scalar_t>());
  });
  return y;
}

at::Tensor local_contrast_norm_backward(const at::Tensor& grad, const at::Tensor& x, int64_t kernel_size,
                                        double sigma, double eps, const std::string& divisor,
                                        bool across_channels) {
  check_cpu(x, "input");
  check_cpu(grad, "grad_output");
  const bool lecun = lcn::divisor_code(divisor) == kLcnDivisorLecun;
  lcn::check_args(kernel_size, sigma, eps);
  bool nhwc = false;
  const at::Tensor xd = lcn::prepare(x, &nhwc);
  lcn::check_backward(grad, xd);
  const at::Tensor gd = grad.strides() == xd.strides() ? grad : at::empty_like(xd).copy_(grad);
  at::Tensor gi = at::empty_like(xd);
  if (xd.numel() == 0) return gi;
  const Geo g = make_geo(xd, nhwc, kernel_size, across_channels, lecun);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "local_contrast_norm_backward", [&] {
    run<scalar_t>(g, kernel_size, sigma, eps, xd.const_data_ptr<scalar_t>(), gd.const_data_ptr<scalar_t>(),
                  gi.mutable_data_ptr<scalar_t>());
  });
  return gi;
}

}  // namespace dlk::cpu

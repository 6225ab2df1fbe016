// Per-element math of contrast normalization, shared by the CPU and CUDA kernels. See
// dlkernels/reference/contrast_norm.py for the formulas.
//
// Global (GCN), per example: the coefficients
// y = (x - a) * inv, and the backward
// grad_input = inv * (g - mean(g)) - (x - b) * w * sum(g * (x - a)), where a is the subtracted
// mean (0 without subtract_mean) and b the centre of the sum of squares (gcn_centre).
#pragma once
#include <cmath>

#include "codes.h"
#include "macros.h"

namespace dlk {

// Styles, as the Python strings "book", "pylearn2_std", "pylearn2_l2" (mapped in
// csrc/api/contrast_norm.h for the C++ entry points).
enum GcnStyle : int { kGcnBook = 0, kGcnPylearn2Std = 1, kGcnPylearn2L2 = 2 };

template <typename T>
struct GcnCoef {
  T inv, w;
};

// b: the sum of squares is about the mean for pylearn2_std (pylearn2's X.var), else about a.
template <typename T>
DLK_HD T gcn_centre(int style, bool subtract_mean, T mean) {
  return subtract_mean || style == kGcnPylearn2Std ? mean : T(0);
}

// D in var = m2 / D.
template <typename T>
DLK_HD T gcn_m2_divisor(int style, T m) {
  if (style == kGcnBook) return m;
  if (style == kGcnPylearn2Std) return m > T(1) ? m - T(1) : T(1);
  return T(1);
}

// (inv, w) from m (elements per example) and m2 (sum of squares of c). Where the divisor depends
// on s = sqrt(lam + m2 / D): inv = scale / s, w = inv / (D s^2). Constant branch (book: s <= eps;
// pylearn2: s / scale < eps): inv = scale / eps (book) or 1 (pylearn2), w = 0. A divisor of 0
// (0/0: eps = lam = 0, c = 0): inv = w = 0. NaN statistics stay in the smooth branch (NaN out).
template <typename T>
DLK_HD GcnCoef<T> gcn_coef(int style, T m, T m2, T scale, T lam, T eps) {
  const T d = gcn_m2_divisor(style, m);
  const T s = std::sqrt(lam + m2 / d);
  const bool smooth = style == kGcnBook ? !(s <= eps) : !(s / scale < eps);
  if (!smooth) return {style == kGcnBook ? (eps > T(0) ? scale / eps : T(0)) : T(1), T(0)};
  if (s == T(0)) return {T(0), T(0)};
  const T inv = scale / s;
  return {inv, inv / (d * s * s)};
}

// Local (LCN), per location: the divisor d = max(eps, s) (local) or max(eps, max(c, s)) (lecun; c
// the plane's mean of s); inv = 1/d (0 where d = 0: eps = 0 and s = 0, where v = 0 too, so the
// output is 0, not 0/0). on_s / on_c: the divisor is s / c, not eps (where the gradient flows).
// NaN stays in the s branch (NaN out); at a tie of s and c the divisor is s.
template <typename T>
struct LcnCoef {
  T inv;
  bool on_s, on_c;
};

// (| and & rather than || and &&: no short-circuit branches, so the CPU loops using it vectorize.)
template <typename T>
DLK_HD LcnCoef<T> lcn_coef(T s, T c, T eps, bool lecun) {
  const bool swin = !lecun | !(s < c);
  const T t = swin ? s : c;
  const bool smooth = !(t <= eps);
  const T d = smooth ? t : eps;
  const T inv = T(1) / d;
  return {d == T(0) ? T(0) : inv, bool(smooth & swin), bool(smooth & !swin)};
}

}  // namespace dlk

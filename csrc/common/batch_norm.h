// Per-element batch norm + activation math and the merge of per-chunk moments, shared by the
// CPU and CUDA kernels. T is the compute type (float, or double for fp64).
#pragma once
#include <cmath>

#include "activation.h"
#include "codes.h"
#include "macros.h"

namespace dlk {

// `slope` is the leaky slope, or this channel's PReLU slope.
template <typename T>
DLK_HD T act_fwd(int act, T z, T slope) {
  if (act == kActRelu) return z < T(0) ? T(0) : z;  // NaN stays NaN, as torch.relu
  if (act == kActNone) return z;
  return leaky_relu_fwd(z, slope);
}

// dL/dz from dL/dy; z is the recomputed pre-activation. ReLU passes the gradient where
// relu(z) > 0 or is NaN, as torch's threshold_backward on the result.
template <typename T>
DLK_HD T act_bwd(int act, T g, T z, T slope) {
  if (act == kActRelu) return z <= T(0) ? T(0) : g;
  if (act == kActNone) return g;
  // leaky_relu_bwd's value, as one product with a selected factor (g * 1 == g exactly): the
  // CPU loops then load g once instead of twice, under a mask
  return g * (z > T(0) ? T(1) : slope);
}

// c * d, but 0 where the coefficient c is 0: grad_input's batch-statistics term (c * (x - mean))
// vanishes in eval mode even at an infinite x, where torch's gradient is finite, not 0 * inf = NaN.
template <typename T>
DLK_HD T stat_term(T c, T d) {
  return c == T(0) ? T(0) : c * d;
}

// The corrected two-pass mean (mean + sum(x - mean) / n): a non-finite first-pass mean (an inf in
// the data) is kept as it is, as torch's mean would be, not turned into inf + (inf - inf) / n = NaN.
template <typename T>
DLK_HD T corrected_mean(T mean, T residual, T n) {
  return mean - mean == T(0) ? mean + residual / n : mean;
}

// Chan et al.'s parallel merge of (count, mean, M2) moments: (n, mean, m2) absorbs (nb, mb, m2b).
// A non-finite mean (inf in the data) propagates as a sum would (inf + finite = inf), with M2 NaN,
// as torch's mean and variance of such data are, instead of becoming NaN through inf - inf.
template <typename T>
DLK_HD void merge_moments(T& n, T& mean, T& m2, T nb, T mb, T m2b) {
  if (nb == T(0)) return;
  const T total = n + nb;
  if (!(mean - mean == T(0) && mb - mb == T(0))) {
    mean = n == T(0) ? mb : mean + mb;
    m2 = T(NAN);
    n = total;
    return;
  }
  const T delta = mb - mean;
  mean += delta * (nb / total);
  m2 += m2b + delta * delta * (n * nb / total);
  n = total;
}

}  // namespace dlk

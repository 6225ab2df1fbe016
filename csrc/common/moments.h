// Per-block moments (count, mean, M2 = sum of squared deviations) with Welford's update and
// Chan et al.'s parallel merge: the one definition used by the CPU and CUDA kernels of any family
// that reduces to a mean and a variance. T is the accumulation type (float or double).
//   Moments<T> m;  m.push(x) ...;  m.merge(other);  m.var(ddof)
// Merging in a fixed order gives results independent of how the work was split across threads.
#pragma once
#include "macros.h"

namespace dlk {

template <typename T>
struct Moments {
  T n = T(0), mean = T(0), m2 = T(0);

  Moments() = default;
  DLK_HD Moments(T n_, T mean_, T m2_) : n(n_), mean(mean_), m2(m2_) {}

  // Welford's update with one value.
  DLK_HD void push(T x) {
    n += T(1);
    const T d = x - mean;
    mean += d / n;
    m2 += d * (x - mean);
  }

  // Chan's merge: this absorbs o (o's values as if pushed after this one's).
  DLK_HD void merge(const Moments& o) {
    if (o.n == T(0)) return;
    if (n == T(0)) {
      *this = o;
      return;
    }
    const T total = n + o.n;
    const T delta = o.mean - mean;
    mean += delta * (o.n / total);
    m2 += o.m2 + delta * delta * (n * (o.n / total));
    n = total;
  }

  // Variance with `ddof` delta degrees of freedom (0: biased, 1: unbiased).
  DLK_HD T var(T ddof = T(0)) const { return m2 / (n - ddof); }
  // Sum of squares about 0 (M2 + n mean^2: both terms non-negative, no cancellation).
  DLK_HD T sum_sq() const { return m2 + n * mean * mean; }
};

// Moments of a block from its two-pass sums about a first-pass mean m0: r = sum(x - m0) and
// q = sum((x - m0)^2) (the corrected two-pass algorithm: the residual r removes the rounding of m0).
template <typename T>
DLK_HD Moments<T> moments_from_two_pass(T n, T m0, T r, T q) {
  if (n == T(0)) return Moments<T>();
  return Moments<T>(n, m0 + r / n, q - r * r / n);
}

}  // namespace dlk

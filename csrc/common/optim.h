// Per-element Adam/AdamW/RMSprop math, shared by the CPU and CUDA kernels. Each formula follows
// torch.optim's single-tensor (for-loop) path operation by operation, including where torch's
// vectorized CPU kernels use a fused multiply-add (lerp, addcmul, add with alpha). float32/float64
// results are not bit-identical to torch's: they differ by about one ulp per step (sqrt and the
// order of some roundings), within torch's own error against float64. T is the compute type.
#pragma once
#include <cmath>

#include "macros.h"

namespace dlk {

// Float overloads on purpose: the global C functions would compute float math in double.
DLK_HD float fma(float a, float b, float c) { return std::fma(a, b, c); }
DLK_HD double fma(double a, double b, double c) { return std::fma(a, b, c); }
DLK_HD float sqrt(float x) { return std::sqrt(x); }
DLK_HD double sqrt(double x) { return std::sqrt(x); }

// What happens to a raw gradient before the update: unscale (GradScaler), clamp to
// [-clip, clip] (clip_grad_value_), times the global-norm clip coefficient, negate (maximize).
template <typename T>
struct GradXform {
  T inv_scale, clip, coef, sign;
};

template <typename T>
DLK_HD T clamp_nan(T x, T lo, T hi) {  // NaN passes through, as torch.clamp
  x = x < lo ? lo : x;
  return x > hi ? hi : x;
}

template <typename T>
DLK_HD T transform_grad(T raw, const GradXform<T>& x) {
  return clamp_nan(raw * x.inv_scale, -x.clip, x.clip) * x.coef * x.sign;
}

// torch.lerp with a scalar weight, as ATen's vectorized kernel computes it (one FMA). `small`
// is |w| < 0.5: a bool, or std::true_type where a loop must not branch on it (vectorization).
template <typename T, typename B>
DLK_HD T lerp(T start, T end, T w, B small) {
  return fma(small ? w : w - T(1), end - start, small ? start : end);
}

template <typename T>
DLK_HD bool lerp_small(T w) {
  return w < T(0.5) && w > T(-0.5);
}

// torch.maximum: NaN in either argument gives NaN.
template <typename T>
DLK_HD T nan_max(T a, T b) {
  const T m = a > b ? a : b;
  return a != a ? a : m;
}

enum WeightDecay : int { kNoDecay = 0, kL2 = 1, kDecoupled = 2 };

// Per-tensor Adam constants (bias corrections depend on the tensor's step).
template <typename T>
struct AdamCoefs {
  T lerp_w;         // 1 - beta1
  T beta2, one_minus_beta2, eps;
  T weight_decay;   // L2: g += weight_decay * p
  T decay;          // decoupled: p *= 1 - lr * weight_decay
  T bc2_sqrt;       // sqrt(1 - beta2^step)
  T neg_step_size;  // -lr / (1 - beta1^step)
};

// One element of torch.optim.Adam's _single_tensor_adam (capturable=False).
template <int WD, bool AMSGRAD, typename T, typename B>
DLK_HD void adam_element(T& p, T& m, T& v, T& vmax, T g, const AdamCoefs<T>& c, B small) {
  if (WD == kDecoupled) p = p * c.decay;
  if (WD == kL2) g = fma(p, c.weight_decay, g);  // grad.add(param, alpha=wd)
  m = lerp(m, g, c.lerp_w, small);                       // exp_avg.lerp_(grad, 1 - beta1)
  v = fma(c.one_minus_beta2 * g, g, v * c.beta2);  // exp_avg_sq.mul_(beta2).addcmul_(g, g, 1 - beta2)
  T s = v;
  if (AMSGRAD) {
    vmax = nan_max(vmax, v);
    s = vmax;
  }
  const T denom = sqrt(s) / c.bc2_sqrt + c.eps;  // (v.sqrt() / bc2_sqrt).add_(eps)
  p = p + c.neg_step_size * m / denom;            // param.addcdiv_(exp_avg, denom, -step_size)
}

template <typename T>
struct RMSpropCoefs {
  T alpha, one_minus_alpha, eps, weight_decay, momentum, neg_lr;
};

// One element of torch.optim.RMSprop's _single_tensor_rmsprop.
template <bool WD, bool CENTERED, bool MOMENTUM, typename T, typename B>
DLK_HD void rmsprop_element(T& p, T& sq, T& gavg, T& buf, T g, const RMSpropCoefs<T>& c,
                            B small) {
  if (WD) g = fma(p, c.weight_decay, g);
  sq = fma(c.one_minus_alpha * g, g, sq * c.alpha);  // square_avg.mul_(alpha).addcmul_(g, g, 1 - alpha)
  T avg;
  if (CENTERED) {
    gavg = lerp(gavg, g, c.one_minus_alpha, small);  // grad_avg.lerp_(grad, 1 - alpha)
    avg = sqrt(fma(-gavg, gavg, sq));            // square_avg.addcmul(ga, ga, value=-1).sqrt_()
  } else {
    avg = sqrt(sq);
  }
  avg = avg + c.eps;
  if (MOMENTUM) {
    buf = buf * c.momentum + g / avg;  // buf.mul_(momentum).addcdiv_(grad, avg)
    p = fma(buf, c.neg_lr, p);                // param.add_(buf, alpha=-lr)
  } else {
    p = p + c.neg_lr * g / avg;               // param.addcdiv_(grad, avg, value=-lr)
  }
}

// Adam's per-tensor constants from the tensor's (already incremented) step, computed in double
// as torch does in Python.
template <typename T>
DLK_HD AdamCoefs<T> adam_coefs(double step, double lr, double beta1, double beta2, double eps,
                               double weight_decay) {
  AdamCoefs<T> c;
  c.lerp_w = T(1.0 - beta1);
  c.beta2 = T(beta2);
  c.one_minus_beta2 = T(1.0 - beta2);
  c.eps = T(eps);
  c.weight_decay = T(weight_decay);
  c.decay = T(1.0 - lr * weight_decay);
  c.bc2_sqrt = T(std::pow(1.0 - std::pow(beta2, step), 0.5));
  c.neg_step_size = T(-(lr / (1.0 - std::pow(beta1, step))));
  return c;
}

}  // namespace dlk

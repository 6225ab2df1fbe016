// CUDA local contrast normalization (the contract: dlkernels/reference/contrast_norm.py). The
// same passes as the Triton kernels (triton_ops/contrast_norm.py): one thread per output value,
// grid-stride loops. Statistics planes [n cs, h, w] in the compute type (float, double for f64):
// the pass along W computes its source on the fly (x minus the plane's first value, or v^2; in
// the backward gq / Z or the channel sum of gv / Z), the pass along H takes 1/zr (and sqrt for s).
// The divisor's math is lcn_coef (csrc/common/contrast_norm.h), shared with the CPU kernels.
// Fixed summation orders, no atomics: deterministic.
#include "../common/contrast_norm.h"
#include "common.cuh"
#include "contrast_norm.cuh"

namespace dlk::cuda {
namespace {

constexpr int kThreads = 256;

struct Dims {
  int64_t n, c, h, w, cs;
  bool across;
};

__device__ __forceinline__ int64_t at4(const int64_t* s, int64_t n, int64_t c, int64_t h, int64_t j) {
  return n * s[0] + c * s[1] + h * s[2] + j * s[3];
}

struct Strides {
  int64_t s[4];
};

// The pass along W over x's source: out[p, h, j] = (1/zc(j)) sum_k w[k] src(p, h, j + k - rw) with
// src = x - shift (SQUARE: (x - shift - m)^2), averaged over the channels when across.
template <typename T, bool SQUARE>
__global__ void __launch_bounds__(kThreads)
    lcn_row_x_kernel(const T* __restrict__ x, Strides xs, const compute_t<T>* __restrict__ m,
                     const compute_t<T>* __restrict__ shift, const compute_t<T>* __restrict__ w,
                     const compute_t<T>* __restrict__ izc, compute_t<T>* __restrict__ out, Dims d, int64_t rw) {
  using A = compute_t<T>;
  const int64_t total = d.n * d.cs * d.h * d.w;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = i % d.w, ph = i / d.w, h = ph % d.h, p = ph / d.h, n = p / d.cs;
    const int64_t c0 = d.across ? 0 : p % d.cs, c1 = d.across ? d.c : c0 + 1;
    const A sh = shift[p];
    const int64_t k0 = j < rw ? -j : -rw, k1 = d.w - 1 - j < rw ? d.w - 1 - j : rw;
    A acc = 0;
    for (int64_t k = k0; k <= k1; ++k) {
      A val = 0;
      for (int64_t c = c0; c < c1; ++c) {
        A v = ld(x, at4(xs.s, n, c, h, j + k)) - sh;
        if constexpr (SQUARE) {
          v -= m[ph * d.w + j + k];
          v *= v;
        }
        val += v;
      }
      if (d.across) val /= A(d.c);
      acc += w[k + rw] * val;
    }
    out[i] = acc * izc[j];
  }
}

// The backward's passes along W (the adjoint: 1/Z taken at the source): GQ: src = gq / Z with
// gq = (gs + gc) / (2 s) (0 where s = 0); else src = the channel sum of gv (contiguous NCHW) / Z.
template <typename A, bool GQ>
__global__ void __launch_bounds__(kThreads)
    lcn_row_grad_kernel(const A* __restrict__ src, const A* __restrict__ sd, const A* __restrict__ gc,
                        const A* __restrict__ w, const A* __restrict__ izr, const A* __restrict__ izc,
                        A* __restrict__ out, Dims d, int64_t rw) {
  const int64_t total = d.n * d.cs * d.h * d.w;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = i % d.w, ph = i / d.w, h = ph % d.h, p = ph / d.h, n = p / d.cs;
    const int64_t c0 = d.across ? 0 : p % d.cs, c1 = d.across ? d.c : c0 + 1;
    const int64_t k0 = j < rw ? -j : -rw, k1 = d.w - 1 - j < rw ? d.w - 1 - j : rw;
    A acc = 0;
    for (int64_t k = k0; k <= k1; ++k) {
      const int64_t jj = j + k;
      A val = 0;
      if constexpr (GQ) {
        const A s = sd[ph * d.w + jj];
        val = s > A(0) ? (src[ph * d.w + jj] + gc[p]) / (A(2) * s) : A(0);
      } else {
        for (int64_t c = c0; c < c1; ++c) val += src[((n * d.c + c) * d.h + h) * d.w + jj];
      }
      acc += w[k + rw] * (val * izc[jj]);
    }
    out[i] = acc * izr[h];
  }
}

// The pass along H: out[p, h, j] = sum_k w[k] t[p, h + k - rh, j] (zero outside), NORM: times
// 1/zr(h); SQRT: its square root.
template <typename A>
__global__ void __launch_bounds__(kThreads)
    lcn_col_kernel(const A* __restrict__ t, A* __restrict__ out, const A* __restrict__ w, const A* __restrict__ izr,
                   int64_t planes, int64_t H, int64_t W, int64_t rh, bool norm, bool sqrt_) {
  const int64_t total = planes * H * W;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = i % W, ph = i / W, h = ph % H, p = ph / H;
    const int64_t k0 = h < rh ? -h : -rh, k1 = H - 1 - h < rh ? H - 1 - h : rh;
    A acc = 0;
    for (int64_t k = k0; k <= k1; ++k) acc += w[k + rh] * t[(p * H + h + k) * W + j];
    if (norm) acc *= izr[h];
    out[i] = sqrt_ ? sqrt(acc) : acc;
  }
}

// out[p] = the mean of plane p (hw values): block p, a fixed tree.
template <typename A>
__global__ void __launch_bounds__(kThreads) lcn_mean_kernel(const A* __restrict__ src, A* __restrict__ out, int64_t hw) {
  __shared__ A part[kThreads];
  const int64_t p = blockIdx.x;
  A acc = 0;
  for (int64_t q = threadIdx.x; q < hw; q += kThreads) acc += src[p * hw + q];
  part[threadIdx.x] = acc;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) part[threadIdx.x] += part[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[p] = part[0] / A(hw);
}

struct ElemIdx {
  int64_t n, c, h, j, p, st;  // p: statistics plane; st: index in the statistics planes
};

__device__ __forceinline__ ElemIdx elem(int64_t i, const Dims& d) {
  ElemIdx e;
  e.j = i % d.w;
  const int64_t r = i / d.w;
  e.h = r % d.h;
  const int64_t nc = r / d.h;
  e.c = nc % d.c;
  e.n = nc / d.c;
  e.p = d.across ? e.n : nc;
  e.st = (e.p * d.h + e.h) * d.w + e.j;
  return e;
}

// y = (x - shift - m) * inv
template <typename T>
__global__ void __launch_bounds__(kThreads)
    lcn_out_kernel(const T* __restrict__ x, Strides xs, T* __restrict__ y, Strides ys, const compute_t<T>* __restrict__ m,
                   const compute_t<T>* __restrict__ s, const compute_t<T>* __restrict__ cm,
                   const compute_t<T>* __restrict__ shift, compute_t<T> eps, bool lecun, Dims d) {
  using A = compute_t<T>;
  const int64_t total = d.n * d.c * d.h * d.w;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const ElemIdx e = elem(i, d);
    const A inv = lcn_coef(s[e.st], cm[e.p], eps, lecun).inv;
    st(y, at4(ys.s, e.n, e.c, e.h, e.j), (ld(x, at4(xs.s, e.n, e.c, e.h, e.j)) - shift[e.p] - m[e.st]) * inv);
  }
}

// Per statistic: gd = sum over its channels of -g v inv^2; gsb = gd where s is the divisor, ct =
// gd where lecun's c is.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    lcn_bwd_gs_kernel(const T* __restrict__ g, Strides gs, const T* __restrict__ x, Strides xs,
                      const compute_t<T>* __restrict__ m, const compute_t<T>* __restrict__ s,
                      const compute_t<T>* __restrict__ cm, const compute_t<T>* __restrict__ shift,
                      compute_t<T>* __restrict__ gsb, compute_t<T>* __restrict__ ct, compute_t<T> eps, bool lecun,
                      Dims d) {
  using A = compute_t<T>;
  const int64_t total = d.n * d.cs * d.h * d.w;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = i % d.w, ph = i / d.w, h = ph % d.h, p = ph / d.h, n = p / d.cs;
    const int64_t c0 = d.across ? 0 : p % d.cs, c1 = d.across ? d.c : c0 + 1;
    const LcnCoef<A> k = lcn_coef(s[i], cm[p], eps, lecun);
    A gd = 0;
    for (int64_t c = c0; c < c1; ++c) {
      const A v = ld(x, at4(xs.s, n, c, h, j)) - shift[p] - m[i];
      gd += -ld(g, at4(gs.s, n, c, h, j)) * v * k.inv * k.inv;
    }
    gsb[i] = k.on_s ? gd : A(0);
    ct[i] = k.on_c ? gd : A(0);
  }
}

// gv = g inv + f2 v R (f2 = 2, or 2 / C across channels), gv contiguous NCHW.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    lcn_bwd_gv_kernel(const T* __restrict__ g, Strides gs, const T* __restrict__ x, Strides xs,
                      const compute_t<T>* __restrict__ m, const compute_t<T>* __restrict__ s,
                      const compute_t<T>* __restrict__ cm, const compute_t<T>* __restrict__ shift,
                      const compute_t<T>* __restrict__ r, compute_t<T>* __restrict__ gv, compute_t<T> eps, bool lecun,
                      Dims d) {
  using A = compute_t<T>;
  const int64_t total = d.n * d.c * d.h * d.w;
  const A f2 = d.across ? A(2) / A(d.c) : A(2);
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const ElemIdx e = elem(i, d);
    const A inv = lcn_coef(s[e.st], cm[e.p], eps, lecun).inv;
    const A v = ld(x, at4(xs.s, e.n, e.c, e.h, e.j)) - shift[e.p] - m[e.st];
    gv[i] = ld(g, at4(gs.s, e.n, e.c, e.h, e.j)) * inv + f2 * v * r[e.st];
  }
}

// grad_input = gv - f U (f = 1, or 1 / C across channels)
template <typename T>
__global__ void __launch_bounds__(kThreads)
    lcn_bwd_out_kernel(const compute_t<T>* __restrict__ gv, const compute_t<T>* __restrict__ u, T* __restrict__ gi,
                       Strides os, Dims d) {
  using A = compute_t<T>;
  const int64_t total = d.n * d.c * d.h * d.w;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const ElemIdx e = elem(i, d);
    const A uu = d.across ? u[e.st] / A(d.c) : u[e.st];
    st(gi, at4(os.s, e.n, e.c, e.h, e.j), gv[i] - uu);
  }
}

unsigned blocks(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 65535 * 32 ? b : 65535 * 32);  // grid-stride loops cover the rest
}

Strides strides(const int64_t* s) { return Strides{{s[0], s[1], s[2], s[3]}}; }

// M = G x, S = sqrt(G v^2), lecun: cm = the plane means of S.
template <typename T>
void statistics(const LcnCall& a, const T* x, cudaStream_t st) {
  using A = compute_t<T>;
  const Dims d{a.n, a.c, a.h, a.w, a.cs, a.across};
  const int64_t planes = a.n * a.cs, stat = planes * a.h * a.w;
  auto* t = static_cast<A*>(a.t);
  auto* m = static_cast<A*>(a.m);
  auto* s = static_cast<A*>(a.s);
  const auto *ww = static_cast<const A*>(a.ww), *wh = static_cast<const A*>(a.wh);
  const auto *izc = static_cast<const A*>(a.izc), *izr = static_cast<const A*>(a.izr);
  const auto* shift = static_cast<const A*>(a.shift);
  lcn_row_x_kernel<T, false><<<blocks(stat), kThreads, 0, st>>>(x, strides(a.xs), m, shift, ww, izc, t, d, a.rw);
  lcn_col_kernel<A><<<blocks(stat), kThreads, 0, st>>>(t, m, wh, izr, planes, a.h, a.w, a.rh, true, false);
  lcn_row_x_kernel<T, true><<<blocks(stat), kThreads, 0, st>>>(x, strides(a.xs), m, shift, ww, izc, t, d, a.rw);
  lcn_col_kernel<A><<<blocks(stat), kThreads, 0, st>>>(t, s, wh, izr, planes, a.h, a.w, a.rh, true, true);
  if (a.lecun) lcn_mean_kernel<A><<<static_cast<unsigned>(planes), kThreads, 0, st>>>(s, static_cast<A*>(a.cm), a.h * a.w);
}

}  // namespace

void launch_lcn_forward(DType t, const LcnCall& a, const void* x, void* y, const int64_t* ys, cudaStream_t st) {
  if (a.n * a.c * a.h * a.w == 0) return;
  dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    using A = compute_t<T>;
    statistics<T>(a, static_cast<const T*>(x), st);
    const Dims d{a.n, a.c, a.h, a.w, a.cs, a.across};
    lcn_out_kernel<T><<<blocks(a.n * a.c * a.h * a.w), kThreads, 0, st>>>(
        static_cast<const T*>(x), strides(a.xs), static_cast<T*>(y), strides(ys), static_cast<const A*>(a.m),
        static_cast<const A*>(a.s), static_cast<const A*>(a.cm), static_cast<const A*>(a.shift), A(a.eps), a.lecun, d);
  });
}

void launch_lcn_backward(DType t, const LcnCall& a, const void* g, const int64_t* gs, const void* x, void* gi,
                         const int64_t* os, void* gsb, void* ct, void* gc, void* gv, cudaStream_t st) {
  if (a.n * a.c * a.h * a.w == 0) return;
  dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    using A = compute_t<T>;
    const T* xp = static_cast<const T*>(x);
    const T* gp = static_cast<const T*>(g);
    statistics<T>(a, xp, st);
    const Dims d{a.n, a.c, a.h, a.w, a.cs, a.across};
    const int64_t planes = a.n * a.cs, stat = planes * a.h * a.w, elems = a.n * a.c * a.h * a.w;
    auto *m = static_cast<const A*>(a.m), *s = static_cast<const A*>(a.s), *cm = static_cast<const A*>(a.cm);
    auto* shift = static_cast<const A*>(a.shift);
    auto *ww = static_cast<const A*>(a.ww), *wh = static_cast<const A*>(a.wh);
    auto *izc = static_cast<const A*>(a.izc), *izr = static_cast<const A*>(a.izr);
    auto *tb = static_cast<A*>(a.t), *gsp = static_cast<A*>(gsb), *ctp = static_cast<A*>(ct);
    auto *gcp = static_cast<A*>(gc), *gvp = static_cast<A*>(gv);
    lcn_bwd_gs_kernel<T><<<blocks(stat), kThreads, 0, st>>>(gp, strides(gs), xp, strides(a.xs), m, s, cm, shift, gsp,
                                                            ctp, A(a.eps), a.lecun, d);
    if (a.lecun) lcn_mean_kernel<A><<<static_cast<unsigned>(planes), kThreads, 0, st>>>(ctp, gcp, a.h * a.w);
    lcn_row_grad_kernel<A, true><<<blocks(stat), kThreads, 0, st>>>(gsp, s, gcp, ww, izr, izc, tb, d, a.rw);
    A* r = ctp;  // ct is no longer needed: R = A^T gq
    lcn_col_kernel<A><<<blocks(stat), kThreads, 0, st>>>(tb, r, wh, izr, planes, a.h, a.w, a.rh, false, false);
    lcn_bwd_gv_kernel<T><<<blocks(elems), kThreads, 0, st>>>(gp, strides(gs), xp, strides(a.xs), m, s, cm, shift, r,
                                                             gvp, A(a.eps), a.lecun, d);
    lcn_row_grad_kernel<A, false><<<blocks(stat), kThreads, 0, st>>>(gvp, s, gcp, ww, izr, izc, tb, d, a.rw);
    A* u = gsp;  // gs is no longer needed: U = A^T(channel sum of gv)
    lcn_col_kernel<A><<<blocks(stat), kThreads, 0, st>>>(tb, u, wh, izr, planes, a.h, a.w, a.rh, false, false);
    lcn_bwd_out_kernel<T><<<blocks(elems), kThreads, 0, st>>>(gvp, u, static_cast<T*>(gi), strides(os), d);
  });
}

}  // namespace dlk::cuda

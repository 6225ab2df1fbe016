// CUDA global contrast normalization. The per-example moments are csrc/common/moments.h and the
// coefficients csrc/common/contrast_norm.h, shared with the CPU kernels; storage may be
// fp16/bf16, compute is float (double for fp64). Reductions write one partial per
// (example, split) block, merged in a fixed order: deterministic, no atomics.
#include "../common/contrast_norm.h"
#include "../common/moments.h"
#include "common.cuh"
#include "contrast_norm.cuh"

namespace dlk::cuda {
namespace {

constexpr int kThreads = 256;

// Block (s, i): thread t pushes positions s * kThreads + t, + split * kThreads, ... of example i
// (minus the example's first value) into its Welford moments, then the block merges them in a fixed tree; part[i, s] = (n, mean, M2).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    gcn_partial_kernel(const T* __restrict__ x, compute_t<T>* __restrict__ part, int64_t n, int64_t m) {
  using A = compute_t<T>;
  __shared__ A sn[kThreads], smean[kThreads], sm2[kThreads];
  for (int64_t i = blockIdx.y; i < n; i += gridDim.y) {
    const T* xi = x + i * m;
    const A shift = to_compute(xi[0]);  // about the first value: a constant example is exactly (value, 0)
    Moments<A> mo;
    for (int64_t k = int64_t(blockIdx.x) * kThreads + threadIdx.x; k < m; k += int64_t(gridDim.x) * kThreads)
      mo.push(to_compute(xi[k]) - shift);
    sn[threadIdx.x] = mo.n;
    smean[threadIdx.x] = mo.mean;
    sm2[threadIdx.x] = mo.m2;
    __syncthreads();
    for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
      if (threadIdx.x < stride) {
        Moments<A> a(sn[threadIdx.x], smean[threadIdx.x], sm2[threadIdx.x]);
        a.merge(Moments<A>(sn[threadIdx.x + stride], smean[threadIdx.x + stride], sm2[threadIdx.x + stride]));
        sn[threadIdx.x] = a.n;
        smean[threadIdx.x] = a.mean;
        sm2[threadIdx.x] = a.m2;
      }
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      A* out = part + (i * gridDim.x + blockIdx.x) * 3;
      out[0] = sn[0];
      out[1] = smean[0];
      out[2] = sm2[0];
    }
    __syncthreads();
  }
}

// One thread per example: merges its split partials in order, writes (a, inv, w, b).
template <typename T>
__global__ void gcn_stats_kernel(const T* __restrict__ x, const compute_t<T>* __restrict__ part,
                                 compute_t<T>* __restrict__ stats, int64_t n, int64_t m, int split, int style,
                                 compute_t<T> scale, compute_t<T> lam, compute_t<T> eps, bool subtract_mean) {
  using A = compute_t<T>;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  Moments<A> mo;
  for (int s = 0; s < split; ++s) {
    const A* p = part + (i * split + s) * 3;
    mo.merge(Moments<A>(p[0], p[1], p[2]));
  }
  mo.mean += to_compute(x[i * m]);  // the partials are about the first value
  const A b = gcn_centre(style, subtract_mean, mo.mean);
  const A m2 = subtract_mean || style == kGcnPylearn2Std ? mo.m2 : mo.sum_sq();  // about b
  const GcnCoef<A> k = gcn_coef<A>(style, A(m), m2, scale, lam, eps);
  stats[4 * i] = subtract_mean ? mo.mean : A(0);
  stats[4 * i + 1] = k.inv;
  stats[4 * i + 2] = k.w;
  stats[4 * i + 3] = b;
}

// Grid (blocks over m, examples): y = (x - mean) * inv.
template <typename T>
__global__ void gcn_apply_kernel(const T* __restrict__ x, const compute_t<T>* __restrict__ stats, T* __restrict__ y,
                                 int64_t n, int64_t m) {
  using A = compute_t<T>;
  for (int64_t i = blockIdx.y; i < n; i += gridDim.y) {
    const A mean = stats[4 * i], inv = stats[4 * i + 1];
    for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < m; k += int64_t(gridDim.x) * blockDim.x)
      y[i * m + k] = from_compute<T>((to_compute(x[i * m + k]) - mean) * inv);
  }
}

// part[i, s] = (sum(g), sum(g * (x - a))) over block s's positions of example i.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    gcn_bwd_partial_kernel(const T* __restrict__ g, const T* __restrict__ x, const compute_t<T>* __restrict__ stats,
                           compute_t<T>* __restrict__ part, int64_t n, int64_t m) {
  using A = compute_t<T>;
  __shared__ A s0[kThreads], s1[kThreads];
  for (int64_t i = blockIdx.y; i < n; i += gridDim.y) {
    const A mean = stats[4 * i];
    A a0 = 0, a1 = 0;
    for (int64_t k = int64_t(blockIdx.x) * kThreads + threadIdx.x; k < m; k += int64_t(gridDim.x) * kThreads) {
      const A gv = to_compute(g[i * m + k]);
      a0 += gv;
      a1 += gv * (to_compute(x[i * m + k]) - mean);
    }
    s0[threadIdx.x] = a0;
    s1[threadIdx.x] = a1;
    __syncthreads();
    for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
      if (threadIdx.x < stride) {
        s0[threadIdx.x] += s0[threadIdx.x + stride];
        s1[threadIdx.x] += s1[threadIdx.x + stride];
      }
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      A* out = part + (i * gridDim.x + blockIdx.x) * 2;
      out[0] = s0[0];
      out[1] = s1[0];
    }
    __syncthreads();
  }
}

// grad_input = (g - mean(g)) * inv - (x - b) * w * sum(g * (x - a)); every thread adds the
// example's split partials in the same order.
template <typename T>
__global__ void gcn_bwd_apply_kernel(const T* __restrict__ g, const T* __restrict__ x,
                                     const compute_t<T>* __restrict__ stats, const compute_t<T>* __restrict__ part,
                                     T* __restrict__ gi, int64_t n, int64_t m, int split, bool subtract_mean) {
  using A = compute_t<T>;
  for (int64_t i = blockIdx.y; i < n; i += gridDim.y) {
    A sg = 0, sgc = 0;
    for (int s = 0; s < split; ++s) {
      sg += part[(i * split + s) * 2];
      sgc += part[(i * split + s) * 2 + 1];
    }
    const A b = stats[4 * i + 3], inv = stats[4 * i + 1], kc = stats[4 * i + 2] * sgc;
    const A mg = subtract_mean ? sg / A(m) : A(0);
    for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < m; k += int64_t(gridDim.x) * blockDim.x) {
      const A gv = to_compute(g[i * m + k]), xv = to_compute(x[i * m + k]);
      gi[i * m + k] = from_compute<T>((gv - mg) * inv - (xv - b) * kc);
    }
  }
}

dim3 elementwise_grid(int64_t n, int64_t m) {
  const int64_t bx = (m + kThreads - 1) / kThreads;
  return dim3(static_cast<unsigned>(bx < 4096 ? bx : 4096), static_cast<unsigned>(n < 65535 ? n : 65535));
}

}  // namespace

void launch_gcn_forward(DType t, const void* x, void* y, void* stats, void* part, int64_t n, int64_t m, int split,
                        int style, double scale, double lam, double eps, bool subtract_mean, cudaStream_t s) {
  if (n == 0 || m == 0) return;
  dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    using A = compute_t<T>;
    const dim3 grid(split, static_cast<unsigned>(n < 65535 ? n : 65535));
    gcn_partial_kernel<T><<<grid, kThreads, 0, s>>>(static_cast<const T*>(x), static_cast<A*>(part), n, m);
    gcn_stats_kernel<T><<<static_cast<unsigned>((n + kThreads - 1) / kThreads), kThreads, 0, s>>>(
        static_cast<const T*>(x), static_cast<const A*>(part), static_cast<A*>(stats), n, m, split, style, A(scale), A(lam), A(eps),
        subtract_mean);
    gcn_apply_kernel<T><<<elementwise_grid(n, m), kThreads, 0, s>>>(
        static_cast<const T*>(x), static_cast<const A*>(stats), static_cast<T*>(y), n, m);
  });
}

void launch_gcn_backward(DType t, const void* g, const void* x, const void* stats, void* gi, void* part, int64_t n,
                         int64_t m, int split, bool subtract_mean, cudaStream_t s) {
  if (n == 0 || m == 0) return;
  dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    using A = compute_t<T>;
    const dim3 grid(split, static_cast<unsigned>(n < 65535 ? n : 65535));
    gcn_bwd_partial_kernel<T><<<grid, kThreads, 0, s>>>(static_cast<const T*>(g), static_cast<const T*>(x),
                                                        static_cast<const A*>(stats), static_cast<A*>(part), n, m);
    gcn_bwd_apply_kernel<T><<<elementwise_grid(n, m), kThreads, 0, s>>>(
        static_cast<const T*>(g), static_cast<const T*>(x), static_cast<const A*>(stats),
        static_cast<const A*>(part), static_cast<T*>(gi), n, m, split, subtract_mean);
  });
}

}  // namespace dlk::cuda

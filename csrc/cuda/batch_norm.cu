// CUDA batch norm fused with an activation: statistics, forward, and the two backward passes.
// The per-element math and the merge of moments are csrc/common/batch_norm.h, shared with the
// CPU kernels; storage may be fp16/bf16, compute is float (double for fp64). Reductions write
// one partial per (channel, split) block, combined by the caller: deterministic, no atomics.
// Dropout after the activation (DROP kernels, docs/dropout.md): each position evaluates the
// Philox of its own logical index (csrc/common/philox.h: the position itself where memory order
// is row-major, else through the index map) and keeps one of the four words; the backward passes
// regenerate the mask the same way.
#include "../common/batch_norm.h"
#include "../common/philox.h"
#include "batch_norm.cuh"
#include "common.cuh"

namespace dlk::cuda {
namespace {

// Welford's d / n: the IEEE float division's slow path spills on sm_90; 2 ulp is plenty here.
__device__ __forceinline__ float div_count(float d, float n) { return __fdividef(d, n); }
__device__ __forceinline__ double div_count(double d, double n) { return d / n; }

constexpr int kThreads = 256;  // bx * by of every block (BnGrid)

// Thread (tx, ty) of block (cb, s) owns channel cb * bx + tx; it visits positions
// k = s * by + ty, k + split * by, ... < outer * inner of that channel, at memory offset
// (row * C + c) * inner + col with (row, col) = divmod(k, inner) kept incrementally (no
// division per element). inner == 1 walks rows of [outer, C], so a warp reads adjacent channels.
template <typename F>
__device__ __forceinline__ void for_each_position(int64_t c, const BnShape& s, F&& f) {
  const int64_t m = s.outer * s.inner;
  const int64_t stride = int64_t(gridDim.y) * blockDim.y;
  const int64_t dq = stride / s.inner, dr = stride % s.inner;
  int64_t k = int64_t(blockIdx.y) * blockDim.y + threadIdx.y;
  int64_t row = k / s.inner, col = k % s.inner;
  for (; k < m; k += stride) {
    f((row * s.channels + c) * s.inner + col);
    row += dq;
    col += dr;
    if (col >= s.inner) {
      col -= s.inner;
      ++row;
    }
  }
}

__device__ __forceinline__ int64_t my_channel() {
  return int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
}

// Slot of partial k of channel c written by this block: partials are [3, C, split].
__device__ __forceinline__ int64_t partial(int k, int64_t c, int64_t C) {
  return (k * C + c) * gridDim.y + blockIdx.y;
}

// Dropout variants of the elementwise kernels (template argument DROP): none; memory order is
// row-major order (the logical index is the position); any other dense layout (through the map).
constexpr int kNoDrop = 0, kDropRowMajor = 1, kDropMapped = 2;

int drop_mode(const BnParams& p) {
  return !p.drop.on ? kNoDrop : is_row_major(p.map) ? kDropRowMajor : kDropMapped;
}

// The dropout multiplier of memory position i: 1 / (1 - p) (rounded once to A) or 0.
template <typename A, int DROP>
__device__ __forceinline__ A drop_mult(const BnParams& p, int64_t i) {
  const int64_t li = DROP == kDropRowMajor ? i : logical_index(p.map, i);
  return dropout_multiplier(dropout_word(uint64_t(li), p.drop.k0, p.drop.k1), p.drop.thr, A(p.drop.scale));
}

template <typename A>
struct Channel {  // one channel's parameters, in registers for the whole walk
  A mean, invstd, w, b, slope;
  __device__ Channel(const BnParams& p, int64_t c) {
    mean = static_cast<const A*>(p.mean)[c];
    invstd = static_cast<const A*>(p.invstd)[c];
    w = static_cast<const A*>(p.weight)[c];
    b = static_cast<const A*>(p.bias)[c];
    slope = p.act == kActPrelu ? static_cast<const A*>(p.prelu)[c] : A(p.slope);
  }
};

// (count, mean, M2) of a channel: per-thread Welford on values shifted by one value of the
// channel (a large mean costs no precision), then Chan's merge across ty in shared memory, in
// double: a float merge tree adds a few ulp to the mean, an error systematic per channel that
// the backward multiplies by mean(grad). Partials are double.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    bn_stats_kernel(const T* __restrict__ x, const compute_t<T>* __restrict__ shift,
                    double* __restrict__ part, BnShape s) {
  using A = compute_t<T>;
  const int64_t c = my_channel();
  A tn = 0, tmean = 0, tm2 = 0, bad = 0;
  if (c < s.channels) {
    const A k0 = shift[c];
    for_each_position(c, s, [&](int64_t i) {
      A v = to_compute(x[i]) - k0;
      // +-inf/NaN are summed apart (inf + finite = inf, as torch's mean) and count as the shift in
      // the update, whose inf - inf would make the mean NaN
      if (!(v - v == A(0))) {
        bad += v;
        v = A(0);
      }
      tn += A(1);
      const A d = v - tmean;
      tmean += div_count(d, tn);
      tm2 += d * (v - tmean);
    });
  }
  // a non-finite sum makes the mean inf (or NaN) and M2 NaN, as torch's; 0 changes nothing
  double n = tn, mean = double(tmean) + double(bad), m2 = double(tm2) + double(bad - bad);
  __shared__ double sn[kThreads], smean[kThreads], sm2[kThreads];
  const int t = threadIdx.y * blockDim.x + threadIdx.x;
  sn[t] = n;
  smean[t] = mean;
  sm2[t] = m2;
  __syncthreads();
  for (int half = blockDim.y / 2; half > 0; half >>= 1) {
    if (threadIdx.y < half) {
      const int o = t + half * blockDim.x;
      merge_moments(n, mean, m2, sn[o], smean[o], sm2[o]);
      sn[t] = n;
      smean[t] = mean;
      sm2[t] = m2;
    }
    __syncthreads();
  }
  if (threadIdx.y == 0 && c < s.channels) {
    part[partial(0, c, s.channels)] = n;
    part[partial(1, c, s.channels)] = mean;
    part[partial(2, c, s.channels)] = m2;
  }
}

// y = act(z), or under dropout the value y stores (rounded to T) times the mask, rounded again:
// bit for bit what the dropout kernels give on y.
template <typename T, int DROP>
__global__ void __launch_bounds__(kThreads)
    bn_fwd_kernel(const T* __restrict__ x, T* __restrict__ y, BnParams p, BnShape s) {
  using A = compute_t<T>;
  const int64_t c = my_channel();
  if (c >= s.channels) return;
  const Channel<A> ch(p, c);
  const int act = p.act;
  for_each_position(c, s, [&](int64_t i) {
    const A z = (to_compute(x[i]) - ch.mean) * ch.invstd * ch.w + ch.b;  // the reference's order
    A v = act_fwd(act, z, ch.slope);
    if constexpr (DROP != kNoDrop) v = to_compute(from_compute<T>(v)) * drop_mult<A, DROP>(p, i);
    y[i] = from_compute<T>(v);
  });
}

// (sum dz, sum dz * xhat, PReLU slope gradient) of a channel, one pass over grad and x; under
// dropout, grad * m stands for grad.
template <typename T, int DROP>
__global__ void __launch_bounds__(kThreads)
    bn_bwd_reduce_kernel(const T* __restrict__ g, const T* __restrict__ x, BnParams p,
                         compute_t<T>* __restrict__ part, BnShape s) {
  using A = compute_t<T>;
  const int64_t c = my_channel();
  A sums[3] = {0, 0, 0};
  if (c < s.channels) {
    const Channel<A> ch(p, c);
    const int act = p.act;
    for_each_position(c, s, [&](int64_t i) {
      A gv = to_compute(g[i]);
      if constexpr (DROP != kNoDrop) gv *= drop_mult<A, DROP>(p, i);
      const A xhat = (to_compute(x[i]) - ch.mean) * ch.invstd;
      const A z = xhat * ch.w + ch.b;
      const A dz = act_bwd(act, gv, z, ch.slope);
      sums[0] += dz;
      sums[1] += dz * xhat;
      if (act == kActPrelu) sums[2] += prelu_weight_grad(gv, z);
    });
  }
  __shared__ A sm[3][kThreads];
  const int t = threadIdx.y * blockDim.x + threadIdx.x;
  for (int k = 0; k < 3; ++k) sm[k][t] = sums[k];
  __syncthreads();
  for (int half = blockDim.y / 2; half > 0; half >>= 1) {
    if (threadIdx.y < half)
      for (int k = 0; k < 3; ++k) sm[k][t] += sm[k][t + half * blockDim.x];
    __syncthreads();
  }
  if (threadIdx.y == 0 && c < s.channels)
    for (int k = 0; k < 3; ++k) part[partial(k, c, s.channels)] = sm[k][t];
}

template <typename T, int DROP>
__global__ void __launch_bounds__(kThreads)
    bn_bwd_elemt_kernel(const T* __restrict__ g, const T* __restrict__ x, BnParams p,
                        const compute_t<T>* __restrict__ a, const compute_t<T>* __restrict__ q,
                        T* __restrict__ gi, BnShape s) {
  using A = compute_t<T>;
  const int64_t c = my_channel();
  if (c >= s.channels) return;
  const Channel<A> ch(p, c);
  const A ac = a[c], qc = q[c], k = ch.w * ch.invstd;
  const int act = p.act;
  for_each_position(c, s, [&](int64_t i) {
    const A xhat = (to_compute(x[i]) - ch.mean) * ch.invstd;
    A gv = to_compute(g[i]);
    if constexpr (DROP != kNoDrop) gv *= drop_mult<A, DROP>(p, i);
    const A dz = act_bwd(act, gv, xhat * ch.w + ch.b, ch.slope);
    gi[i] = from_compute<T>(k * (dz - ac - stat_term(qc, xhat)));
  });
}

dim3 grid_of(const BnGrid& g) { return dim3(static_cast<unsigned>(g.cblocks), g.split); }
dim3 block_of(const BnGrid& g) { return dim3(g.bx, g.by); }

}  // namespace

void launch_bn_stats(DType t, const void* x, const void* shift, void* partials, BnShape s,
                     BnGrid g, cudaStream_t st) {
  dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    using A = compute_t<T>;
    bn_stats_kernel<T><<<grid_of(g), block_of(g), 0, st>>>(
        static_cast<const T*>(x), static_cast<const A*>(shift), static_cast<double*>(partials), s);
  });
}

void launch_bn_fwd(DType t, const void* x, void* y, const BnParams& p, BnShape s, BnGrid g,
                   cudaStream_t st) {
  dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    decltype(&bn_fwd_kernel<T, kNoDrop>) kernels[] = {bn_fwd_kernel<T, kNoDrop>, bn_fwd_kernel<T, kDropRowMajor>,
                                                      bn_fwd_kernel<T, kDropMapped>};
    auto kernel = kernels[drop_mode(p)];
    kernel<<<grid_of(g), block_of(g), 0, st>>>(static_cast<const T*>(x), static_cast<T*>(y), p, s);
  });
}

void launch_bn_bwd_reduce(DType t, const void* grad, const void* x, const BnParams& p,
                          void* partials, BnShape s, BnGrid g, cudaStream_t st) {
  dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    decltype(&bn_bwd_reduce_kernel<T, kNoDrop>) kernels[] = {
        bn_bwd_reduce_kernel<T, kNoDrop>, bn_bwd_reduce_kernel<T, kDropRowMajor>, bn_bwd_reduce_kernel<T, kDropMapped>};
    auto kernel = kernels[drop_mode(p)];
    kernel<<<grid_of(g), block_of(g), 0, st>>>(
        static_cast<const T*>(grad), static_cast<const T*>(x), p,
        static_cast<compute_t<T>*>(partials), s);
  });
}

void launch_bn_bwd_elemt(DType t, const void* grad, const void* x, const BnParams& p,
                         const void* a, const void* q, void* grad_input, BnShape s, BnGrid g,
                         cudaStream_t st) {
  dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    using A = compute_t<T>;
    decltype(&bn_bwd_elemt_kernel<T, kNoDrop>) kernels[] = {
        bn_bwd_elemt_kernel<T, kNoDrop>, bn_bwd_elemt_kernel<T, kDropRowMajor>, bn_bwd_elemt_kernel<T, kDropMapped>};
    auto kernel = kernels[drop_mode(p)];
    kernel<<<grid_of(g), block_of(g), 0, st>>>(
        static_cast<const T*>(grad), static_cast<const T*>(x), p, static_cast<const A*>(a),
        static_cast<const A*>(q), static_cast<T*>(grad_input), s);
  });
}

}  // namespace dlk::cuda

// CUDA Adam/AdamW/RMSprop steps and gradient norm over many tensors per launch. The per-element
// math is csrc/common/optim.h, shared with the CPU kernels. Block b finds its tensor by binary
// search over the table's first_chunk, reads the tensor's step (incremented by a tiny kernel
// launched just before), and updates kOptimChunk elements.
#include <type_traits>

#include "../common/optim.h"
#include "common.cuh"
#include "optim.cuh"

namespace dlk::cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ const OptimTensor& find_tensor(const OptimTensor* tab, int count,
                                                          int64_t chunk) {
  int lo = 0, hi = count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (tab[mid].first_chunk <= chunk) lo = mid; else hi = mid - 1;
  }
  return tab[lo];
}

__device__ __forceinline__ bool skipped(const DeviceScalars& s) {
  return s.skip != nullptr && *s.skip != 0.0f;
}

template <typename C>
__device__ __forceinline__ GradXform<C> grad_xform(const DeviceScalars& s, double clip, bool maximize) {
  return {s.grad_scale ? C(1.0 / double(*s.grad_scale)) : C(1), C(clip),
          s.clip_coef ? C(*s.clip_coef) : C(1), C(maximize ? -1 : 1)};
}

__global__ void increment_steps(const OptimTensor* tab, int count, DeviceScalars s) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < count && !skipped(s)) *tab[i].step += 1.0f;
}

// Runtime flags select the instantiation; they are uniform across the grid (no divergence).
template <typename C>
__device__ __forceinline__ void adam_any(int wd, bool ams, C& p, C& m, C& v, C& vm, C g,
                                         const AdamCoefs<C>& c, bool small) {
  if (wd == kNoDecay) {
    ams ? adam_element<kNoDecay, true>(p, m, v, vm, g, c, small)
        : adam_element<kNoDecay, false>(p, m, v, vm, g, c, small);
  } else if (wd == kL2) {
    ams ? adam_element<kL2, true>(p, m, v, vm, g, c, small)
        : adam_element<kL2, false>(p, m, v, vm, g, c, small);
  } else {
    ams ? adam_element<kDecoupled, true>(p, m, v, vm, g, c, small)
        : adam_element<kDecoupled, false>(p, m, v, vm, g, c, small);
  }
}

template <typename S, typename M>
__global__ void __launch_bounds__(kThreads) adam_kernel(const OptimTensor* __restrict__ tab, int count,
                                                        AdamArgs a, DeviceScalars s) {
  using C = compute_t<S>;
  if (skipped(s)) return;
  const OptimTensor& t = find_tensor(tab, count, blockIdx.x);
  const int64_t begin = (blockIdx.x - t.first_chunk) * kOptimChunk;
  const int64_t end = min(begin + kOptimChunk, t.n);
  const AdamCoefs<C> c = adam_coefs<C>(*t.step, a.lr, a.beta1, a.beta2, a.eps, a.weight_decay);
  const GradXform<C> x = grad_xform<C>(s, a.clip_value, a.maximize);
  const bool small = lerp_small(C(1.0 - a.beta1));
  S* p = static_cast<S*>(t.p);
  const S* g = static_cast<const S*>(t.g);
  M *m = static_cast<M*>(t.s0), *v = static_cast<M*>(t.s1), *vm = static_cast<M*>(t.s2);
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    C pc = to_c<C>(p[i]), mc = to_c<C>(m[i]), vc = to_c<C>(v[i]);
    C vmc = a.amsgrad ? to_c<C>(vm[i]) : C(0);
    adam_any(a.wd_mode, a.amsgrad, pc, mc, vc, vmc, transform_grad(to_c<C>(g[i]), x), c, small);
    p[i] = from_c<S>(pc);
    m[i] = from_c<M>(mc);
    v[i] = from_c<M>(vc);
    if (a.amsgrad) vm[i] = from_c<M>(vmc);
  }
}

template <typename C>
__device__ __forceinline__ void rms_any(bool wd, bool cen, bool mom, C& p, C& sq, C& ga, C& buf,
                                        C g, const RMSpropCoefs<C>& c, bool small) {
  const int k = wd * 4 + cen * 2 + mom;
  switch (k) {
    case 0: return rmsprop_element<false, false, false>(p, sq, ga, buf, g, c, small);
    case 1: return rmsprop_element<false, false, true>(p, sq, ga, buf, g, c, small);
    case 2: return rmsprop_element<false, true, false>(p, sq, ga, buf, g, c, small);
    case 3: return rmsprop_element<false, true, true>(p, sq, ga, buf, g, c, small);
    case 4: return rmsprop_element<true, false, false>(p, sq, ga, buf, g, c, small);
    case 5: return rmsprop_element<true, false, true>(p, sq, ga, buf, g, c, small);
    case 6: return rmsprop_element<true, true, false>(p, sq, ga, buf, g, c, small);
    default: return rmsprop_element<true, true, true>(p, sq, ga, buf, g, c, small);
  }
}

template <typename S, typename M>
__global__ void __launch_bounds__(kThreads) rmsprop_kernel(const OptimTensor* __restrict__ tab, int count,
                                                           RMSpropArgs a, DeviceScalars s) {
  using C = compute_t<S>;
  if (skipped(s)) return;
  const OptimTensor& t = find_tensor(tab, count, blockIdx.x);
  const int64_t begin = (blockIdx.x - t.first_chunk) * kOptimChunk;
  const int64_t end = min(begin + kOptimChunk, t.n);
  const RMSpropCoefs<C> c{C(a.alpha), C(1.0 - a.alpha), C(a.eps), C(a.weight_decay), C(a.momentum),
                          C(-a.lr)};
  const GradXform<C> x = grad_xform<C>(s, a.clip_value, a.maximize);
  const bool small = lerp_small(C(1.0 - a.alpha)), wd = a.weight_decay != 0, mom = a.momentum > 0;
  S* p = static_cast<S*>(t.p);
  const S* g = static_cast<const S*>(t.g);
  M *sq = static_cast<M*>(t.s0), *ga = static_cast<M*>(t.s1), *buf = static_cast<M*>(t.s2);
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    C pc = to_c<C>(p[i]), sc = to_c<C>(sq[i]);
    C gc = a.centered ? to_c<C>(ga[i]) : C(0), bc = mom ? to_c<C>(buf[i]) : C(0);
    rms_any(wd, a.centered, mom, pc, sc, gc, bc, transform_grad(to_c<C>(g[i]), x), c, small);
    p[i] = from_c<S>(pc);
    sq[i] = from_c<M>(sc);
    if (a.centered) ga[i] = from_c<M>(gc);
    if (mom) buf[i] = from_c<M>(bc);
  }
}

// ---- gradient norm ----

__device__ __forceinline__ double norm_add(int kind, double acc, double t) {
  if (kind == 2) return (t > acc || t != t) ? t : acc;  // max, NaN wins
  return acc + t;
}

template <typename S>
__global__ void __launch_bounds__(kThreads) norm_partials_kernel(const OptimTensor* __restrict__ tab,
                                                                 int count, int kind, double p,
                                                                 double clip, const float* grad_scale,
                                                                 double* partials) {
  using C = compute_t<S>;
  const OptimTensor& t = find_tensor(tab, count, blockIdx.x);
  const int64_t begin = (blockIdx.x - t.first_chunk) * kOptimChunk;
  const int64_t end = min(begin + kOptimChunk, t.n);
  const C inv = grad_scale ? C(1.0 / double(*grad_scale)) : C(1);
  const S* g = static_cast<const S*>(t.p);
  C acc = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const C a = fabs(clamp_nan(to_c<C>(g[i]) * inv, C(-clip), C(clip)));
    const C term = kind == 0 ? a * a : kind == 3 ? C(pow(a, C(p))) : a;
    acc = C(norm_add(kind, acc, term));
  }
  __shared__ double red[kThreads];
  red[threadIdx.x] = acc;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) red[threadIdx.x] = norm_add(kind, red[threadIdx.x], red[threadIdx.x + stride]);
    __syncthreads();
  }
  if (threadIdx.x == 0) partials[blockIdx.x] = red[0];
}

__global__ void norm_finish_kernel(const double* partials, int64_t count, int kind, double p, void* out,
                                   bool out_double) {
  __shared__ double red[kThreads];
  double acc = 0;
  for (int64_t i = threadIdx.x; i < count; i += kThreads) acc = norm_add(kind, acc, partials[i]);
  red[threadIdx.x] = acc;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) red[threadIdx.x] = norm_add(kind, red[threadIdx.x], red[threadIdx.x + stride]);
    __syncthreads();
  }
  if (threadIdx.x != 0) return;
  double total = red[0];
  if (kind == 0) total = ::sqrt(total);
  else if (kind == 3) total = ::pow(total, 1.0 / p);
  if (out_double) *static_cast<double*>(out) = total;
  else *static_cast<float*>(out) = float(total);
}

template <typename F>
void dispatch_pair(DType param, DType state, F&& f) {
  switch (param) {
    case DType::f32: return f(float{}, float{});
    case DType::f64: return f(double{}, double{});
    case DType::f16: return state == DType::f32 ? f(__half{}, float{}) : f(__half{}, __half{});
    case DType::bf16:
      return state == DType::f32 ? f(__nv_bfloat16{}, float{}) : f(__nv_bfloat16{}, __nv_bfloat16{});
  }
}

unsigned grid_for(int count) { return unsigned((count + kThreads - 1) / kThreads); }

}  // namespace

void launch_adam(DType param, DType state, const OptimTensor* table, int count, int64_t chunks,
                 const AdamArgs& a, DeviceScalars s, cudaStream_t stream) {
  if (count == 0) return;
  increment_steps<<<grid_for(count), kThreads, 0, stream>>>(table, count, s);
  dispatch_pair(param, state, [&](auto ptag, auto stag) {
    adam_kernel<decltype(ptag), decltype(stag)><<<unsigned(chunks), kThreads, 0, stream>>>(table, count, a, s);
  });
}

void launch_rmsprop(DType param, DType state, const OptimTensor* table, int count,
                    int64_t chunks, const RMSpropArgs& a, DeviceScalars s, cudaStream_t stream) {
  if (count == 0) return;
  increment_steps<<<grid_for(count), kThreads, 0, stream>>>(table, count, s);
  dispatch_pair(param, state, [&](auto ptag, auto stag) {
    rmsprop_kernel<decltype(ptag), decltype(stag)><<<unsigned(chunks), kThreads, 0, stream>>>(table, count, a, s);
  });
}

void launch_norm_partials(DType grad, const OptimTensor* table, int count, int64_t chunks, int kind,
                          double norm_type, double clip_value, const float* grad_scale,
                          double* partials, cudaStream_t stream) {
  if (chunks == 0) return;
  dispatch_pair(grad, grad, [&](auto tag, auto) {
    norm_partials_kernel<decltype(tag)><<<unsigned(chunks), kThreads, 0, stream>>>(
        table, count, kind, norm_type, clip_value, grad_scale, partials);
  });
}

void launch_norm_finish(const double* partials, int64_t count, int kind, double norm_type,
                        void* out, bool out_double, cudaStream_t stream) {
  norm_finish_kernel<<<1, kThreads, 0, stream>>>(partials, count, kind, norm_type, out, out_double);
}

}  // namespace dlk::cuda

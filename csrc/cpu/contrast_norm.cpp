// Global contrast normalization on the CPU. x is (N, M) in memory: example i is the dense block
// [i * M, (i + 1) * M) (contiguous or channels_last; the ops layer brings anything else to that).
// Statistics: each example is cut into fixed chunks of kBlock elements; a chunk's moments are
// computed by the corrected two-pass algorithm over the L1-resident chunk (float32 for
// fp32/fp16/bf16, float64 for fp64) and the chunks of an example are merged in order with Chan's
// formula in double (csrc/common/moments.h). The backward's two per-example sums are per chunk too,
// added in order in double. So results do not depend on the thread count or on the path:
// - per-example path (N large or examples small): a task takes whole examples, computes an
//   example's statistics then normalizes it while it is still in cache (L2/L3);
// - split path (few large examples): all chunks in parallel, then the elementwise pass over all
//   elements in parallel.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <vector>

#include "../api/contrast_norm.h"
#include "../common/contrast_norm.h"
#include "../common/moments.h"
#include "loadstore.h"
#include "simd.h"
#include "output.h"

namespace dlk::cpu {
namespace {

#define R __restrict__
constexpr int kLanes = 32;  // independent accumulators: vectorizable reductions

// Of v = x - shift: out = {m0, r, q} with the first-pass mean m0 = sum(v) / n, r = sum(v - m0) and
// q = sum((v - m0)^2). The shift (the example's first value) makes a constant example's moments
// exactly (value, 0) and keeps precision when |mean| >> std.
template <typename T>
DLK_INLINE void chunk_moments_body(const T* R x, int64_t n, T shift, T* R out) {
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += x[i + j] - shift;
  for (; i < n; ++i) acc[0] += x[i] - shift;
  const T m0 = lane_sum<kLanes>(acc) / T(n);
  T aq[kLanes] = {}, ar[kLanes] = {};
  for (i = 0; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const T d = (x[i + j] - shift) - m0;
      aq[j] += d * d;
      ar[j] += d;
    }
    // the next chunk streams in from DRAM while this pass runs from L1
    for (int j = 0; j < kLanes; j += 64 / int(sizeof(T))) __builtin_prefetch(x + n + i + j);
  }
  for (; i < n; ++i) {
    const T d = (x[i] - shift) - m0;
    aq[0] += d * d;
    ar[0] += d;
  }
  out[0] = m0;
  out[1] = lane_sum<kLanes>(ar);
  out[2] = lane_sum<kLanes>(aq);
}
DLK_MULTIVERSION(void, chunk_moments, (const float* x, int64_t n, float shift, float* out), (x, n, shift, out),
                 chunk_moments_body)
DLK_MULTIVERSION(void, chunk_moments, (const double* x, int64_t n, double shift, double* out), (x, n, shift, out),
                 chunk_moments_body)

// y = (x - mean) * inv
template <typename T>
DLK_INLINE void apply_body(const T* R x, T* R y, int64_t n, T mean, T inv) {
  for (int64_t i = 0; i < n; ++i) y[i] = (x[i] - mean) * inv;
}
DLK_MULTIVERSION(void, apply, (const float* x, float* y, int64_t n, float mean, float inv), (x, y, n, mean, inv),
                 apply_body)
DLK_MULTIVERSION(void, apply, (const double* x, double* y, int64_t n, double mean, double inv),
                 (x, y, n, mean, inv), apply_body)

// out = {sum(g), sum(g * (x - mean))}
template <typename T>
DLK_INLINE void bwd_sums_body(const T* R g, const T* R x, int64_t n, T mean, T* R out) {
  T a0[kLanes] = {}, a1[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      a0[j] += g[i + j];
      a1[j] += g[i + j] * (x[i + j] - mean);
    }
  for (; i < n; ++i) {
    a0[0] += g[i];
    a1[0] += g[i] * (x[i] - mean);
  }
  out[0] = lane_sum<kLanes>(a0);
  out[1] = lane_sum<kLanes>(a1);
}
DLK_MULTIVERSION(void, bwd_sums, (const float* g, const float* x, int64_t n, float mean, float* out),
                 (g, x, n, mean, out), bwd_sums_body)
DLK_MULTIVERSION(void, bwd_sums, (const double* g, const double* x, int64_t n, double mean, double* out),
                 (g, x, n, mean, out), bwd_sums_body)

// grad_input = (g - mg) * inv - (x - b) * k
template <typename T>
DLK_INLINE void bwd_apply_body(const T* R g, const T* R x, T* R gi, int64_t n, T b, T inv, T mg, T k) {
  for (int64_t i = 0; i < n; ++i) gi[i] = (g[i] - mg) * inv - (x[i] - b) * k;
}
DLK_MULTIVERSION(void, bwd_apply, (const float* g, const float* x, float* gi, int64_t n, float b, float inv,
                                   float mg, float k), (g, x, gi, n, b, inv, mg, k), bwd_apply_body)
DLK_MULTIVERSION(void, bwd_apply, (const double* g, const double* x, double* gi, int64_t n, double b,
                                   double inv, double mg, double k), (g, x, gi, n, b, inv, mg, k),
                 bwd_apply_body)

// ---- drivers ----

struct Params {
  int64_t n, m;  // examples, elements per example
  int style;
  double scale, lam, eps;
  bool subtract_mean;
};

int64_t chunks_of(int64_t m) { return (m + kBlock - 1) / kBlock; }

// Whole examples per task when there are enough of them (or they are small); the results are the
// same either way.
bool per_example(const Params& p) {
  return p.m <= kGrain || p.n >= 4 * int64_t(at::get_num_threads());
}

// Moments of x[0..len) - shift.
template <typename S>
Moments<double> chunk_stats(const S* x, int64_t len, compute_t<S> shift) {
  using C = compute_t<S>;
  C buf[kBlock], out[3];
  chunk_moments(load(x, buf, len), len, shift, out);
  return moments_from_two_pass<double>(double(len), double(out[0]), double(out[1]), double(out[2]));
}

// Merges an example's chunk moments in order and writes its stats row (a, inv, w, b).
// The chunks' moments are about `shift`.
template <typename C>
void finish_example(const Moments<double>* parts, int64_t chunks, const Params& p, C shift, C* st) {
  Moments<double> mo;
  for (int64_t j = 0; j < chunks; ++j) mo.merge(parts[j]);
  mo.mean += double(shift);
  const double a = p.subtract_mean ? mo.mean : 0.0;
  const double b = gcn_centre(p.style, p.subtract_mean, mo.mean);
  const double m2 = p.subtract_mean || p.style == kGcnPylearn2Std ? mo.m2 : mo.sum_sq();  // about b
  const GcnCoef<double> k = gcn_coef<double>(p.style, double(p.m), m2, p.scale, p.lam, p.eps);
  st[0] = C(a);
  st[1] = C(k.inv);
  st[2] = C(k.w);
  st[3] = C(b);
}

template <typename S>
void apply_range(const S* x, S* y, int64_t len, compute_t<S> mean, compute_t<S> inv) {
  using C = compute_t<S>;
  C xb[kBlock], yb[kBlock];
  for (int64_t i = 0; i < len; i += kBlock) {
    const int64_t l = std::min(kBlock, len - i);
    apply(load(x + i, xb, l), out_ptr(y + i, yb), l, mean, inv);
    store(yb, y + i, l);
  }
}

template <typename S>
void forward_impl(const S* x, S* y, compute_t<S>* stats, const Params& p) {
  using C = compute_t<S>;
  const int64_t chunks = chunks_of(p.m);
  auto first = [&](int64_t i) { return C(x[i * p.m]); };
  auto example_stats = [&](int64_t i, Moments<double>* parts) {
    for (int64_t j = 0; j < chunks; ++j) {
      const int64_t off = j * kBlock;
      parts[j] = chunk_stats(x + i * p.m + off, std::min(kBlock, p.m - off), first(i));
    }
  };
  if (per_example(p)) {
    at::parallel_for(0, p.n, std::max<int64_t>(1, kGrain / p.m), [&](int64_t b, int64_t e) {
      std::vector<Moments<double>> parts(chunks);
      for (int64_t i = b; i < e; ++i) {
        example_stats(i, parts.data());
        finish_example(parts.data(), chunks, p, first(i), stats + 4 * i);
        apply_range(x + i * p.m, y + i * p.m, p.m, stats[4 * i], stats[4 * i + 1]);
      }
    });
    return;
  }
  std::vector<Moments<double>> parts(p.n * chunks);
  at::parallel_for(0, p.n * chunks, std::max<int64_t>(1, kGrain / kBlock), [&](int64_t b, int64_t e) {
    for (int64_t q = b; q < e; ++q) {
      const int64_t i = q / chunks, off = (q % chunks) * kBlock;
      parts[q] = chunk_stats(x + i * p.m + off, std::min(kBlock, p.m - off), first(i));
    }
  });
  for (int64_t i = 0; i < p.n; ++i) finish_example(parts.data() + i * chunks, chunks, p, first(i), stats + 4 * i);
  at::parallel_for(0, p.n * p.m, kGrain, [&](int64_t b, int64_t e) {
    while (b < e) {  // the pieces of [b, e) in each example
      const int64_t i = b / p.m, end = std::min(e, (i + 1) * p.m);
      apply_range(x + b, y + b, end - b, C(stats[4 * i]), C(stats[4 * i + 1]));
      b = end;
    }
  });
}

// Per chunk {sum(g), sum(g * (x - a))} in double.
template <typename S>
void chunk_sums(const S* g, const S* x, int64_t len, compute_t<S> mean, double* out) {
  using C = compute_t<S>;
  C gb[kBlock], xb[kBlock], s[2];
  bwd_sums(load(g, gb, len), load(x, xb, len), len, mean, s);
  out[0] = double(s[0]);
  out[1] = double(s[1]);
}

template <typename S>
void bwd_apply_range(const S* g, const S* x, S* gi, int64_t len, const compute_t<S>* st, compute_t<S> mg,
                     compute_t<S> k) {
  using C = compute_t<S>;
  C gb[kBlock], xb[kBlock], ob[kBlock];
  for (int64_t i = 0; i < len; i += kBlock) {
    const int64_t l = std::min(kBlock, len - i);
    bwd_apply(load(g + i, gb, l), load(x + i, xb, l), out_ptr(gi + i, ob), l, st[3], st[1], mg, k);
    store(ob, gi + i, l);
  }
}

// (mg, k) of example i from its chunk sums, added in order.
template <typename C>
std::pair<C, C> bwd_coefs(const double* sums, int64_t chunks, const C* st, const Params& p) {
  double sg = 0, sgc = 0;
  for (int64_t j = 0; j < chunks; ++j) {
    sg += sums[2 * j];
    sgc += sums[2 * j + 1];
  }
  const double mg = p.subtract_mean ? sg / double(p.m) : 0.0;
  return {C(mg), C(double(st[2]) * sgc)};
}

template <typename S>
void backward_impl(const S* g, const S* x, S* gi, const compute_t<S>* stats, const Params& p) {
  using C = compute_t<S>;
  const int64_t chunks = chunks_of(p.m);
  auto example_sums = [&](int64_t i, double* sums) {
    for (int64_t j = 0; j < chunks; ++j) {
      const int64_t off = i * p.m + j * kBlock;
      chunk_sums(g + off, x + off, std::min(kBlock, p.m - j * kBlock), stats[4 * i], sums + 2 * j);
    }
  };
  if (per_example(p)) {
    at::parallel_for(0, p.n, std::max<int64_t>(1, kGrain / p.m), [&](int64_t b, int64_t e) {
      std::vector<double> sums(2 * chunks);
      for (int64_t i = b; i < e; ++i) {
        example_sums(i, sums.data());
        const auto [mg, k] = bwd_coefs(sums.data(), chunks, stats + 4 * i, p);
        bwd_apply_range(g + i * p.m, x + i * p.m, gi + i * p.m, p.m, stats + 4 * i, mg, k);
      }
    });
    return;
  }
  std::vector<double> sums(2 * p.n * chunks);
  at::parallel_for(0, p.n * chunks, std::max<int64_t>(1, kGrain / kBlock), [&](int64_t b, int64_t e) {
    for (int64_t q = b; q < e; ++q) {
      const int64_t i = q / chunks, j = q % chunks, off = i * p.m + j * kBlock;
      chunk_sums(g + off, x + off, std::min(kBlock, p.m - j * kBlock), stats[4 * i], sums.data() + 2 * q);
    }
  });
  std::vector<C> coefs(2 * p.n);
  for (int64_t i = 0; i < p.n; ++i) {
    const auto [mg, k] = bwd_coefs(sums.data() + 2 * i * chunks, chunks, stats + 4 * i, p);
    coefs[2 * i] = mg;
    coefs[2 * i + 1] = k;
  }
  at::parallel_for(0, p.n * p.m, kGrain, [&](int64_t b, int64_t e) {
    while (b < e) {
      const int64_t i = b / p.m, end = std::min(e, (i + 1) * p.m);
      bwd_apply_range(g + b, x + b, gi + b, end - b, stats + 4 * i, coefs[2 * i], coefs[2 * i + 1]);
      b = end;
    }
  });
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "dlkernels cpu backend: ", name, " must be a CPU tensor, got ", t.device());
}

at::ScalarType acc_of(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

std::tuple<at::Tensor, at::Tensor> global_contrast_norm(const at::Tensor& x, double scale, double lam, double eps,
                                                        const std::string& style, bool subtract_mean) {
  check_cpu(x, "input");
  const at::Tensor xd = gcn::prepare(x);
  const Params p{xd.size(0), xd.size(0) ? xd.numel() / xd.size(0) : 0, gcn::style_code(style), scale, lam, eps,
                 subtract_mean};
  at::Tensor y = new_output(xd);
  at::Tensor stats = at::zeros({p.n, 4}, x.options().dtype(acc_of(x)));
  if (p.n == 0 || p.m == 0) return {y, stats};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "global_contrast_norm", [&] {
    forward_impl(xd.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
                 stats.mutable_data_ptr<compute_t<scalar_t>>(), p);
  });
  return {y, stats};
}

at::Tensor global_contrast_norm_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& stats,
                                         bool subtract_mean) {
  check_cpu(x, "input");
  check_cpu(grad, "grad_output");
  const at::Tensor xd = gcn::prepare(x);
  gcn::check_backward(grad, xd, stats);
  const at::Tensor gd = gcn::like(grad, xd);
  const at::Tensor st = stats.contiguous();
  const Params p{xd.size(0), xd.size(0) ? xd.numel() / xd.size(0) : 0, kGcnBook, 1.0, 0.0, 0.0, subtract_mean};
  at::Tensor gi = new_output(xd);
  if (p.n == 0 || p.m == 0) return gi;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "global_contrast_norm_backward", [&] {
    backward_impl(gd.const_data_ptr<scalar_t>(), xd.const_data_ptr<scalar_t>(), gi.mutable_data_ptr<scalar_t>(),
                  st.const_data_ptr<compute_t<scalar_t>>(), p);
  });
  return gi;
}

}  // namespace dlk::cpu

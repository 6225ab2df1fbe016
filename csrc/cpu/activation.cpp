// Leaky ReLU and PReLU on the CPU: OpenMP across tasks (at::parallel_for), SIMD within a task
// (plain loops compiled per capability level, simd.h), fp16/bf16 converted to float block by block.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <vector>

#include "../api/activation.h"
#include "../common/activation.h"
#include "../prep.h"
#include "loadstore.h"
#include "output.h"

namespace dlk::cpu {
namespace {

// ---- SIMD loops over one block, float and double (versions per overload and level) ----

template <typename T>
DLK_INLINE void leaky_fwd_body(const T* x, T* y, int64_t n, T slope) {
  for (int64_t i = 0; i < n; ++i) y[i] = leaky_relu_fwd(x[i], slope);
}
DLK_MULTIVERSION(void, leaky_fwd, (const float* x, float* y, int64_t n, float s), (x, y, n, s), leaky_fwd_body)
DLK_MULTIVERSION(void, leaky_fwd, (const double* x, double* y, int64_t n, double s), (x, y, n, s), leaky_fwd_body)

template <typename T>
DLK_INLINE void leaky_bwd_body(const T* g, const T* x, T* gi, int64_t n, T slope) {
  for (int64_t i = 0; i < n; ++i) gi[i] = leaky_relu_bwd(g[i], x[i], slope);
}
DLK_MULTIVERSION(void, leaky_bwd, (const float* g, const float* x, float* gi, int64_t n, float s), (g, x, gi, n, s), leaky_bwd_body)
DLK_MULTIVERSION(void, leaky_bwd, (const double* g, const double* x, double* gi, int64_t n, double s), (g, x, gi, n, s), leaky_bwd_body)

// bf16 storage converted in registers: one pass instead of convert / compute / convert blocks.
DLK_INLINE void leaky_fwd_bf16_body(const c10::BFloat16* x, c10::BFloat16* y, int64_t n, float s) {
  const auto* xs = reinterpret_cast<const uint16_t*>(x);
  auto* ys = reinterpret_cast<uint16_t*>(y);
  for (int64_t i = 0; i < n; ++i) ys[i] = float_to_bf16_bits(leaky_relu_fwd(bf16_bits_to_float(xs[i]), s));
}
DLK_INLINE void leaky_bwd_bf16_body(const c10::BFloat16* g, const c10::BFloat16* x, c10::BFloat16* gi, int64_t n,
                                    float s) {
  const auto* gs = reinterpret_cast<const uint16_t*>(g);
  const auto* xs = reinterpret_cast<const uint16_t*>(x);
  auto* os = reinterpret_cast<uint16_t*>(gi);
  for (int64_t i = 0; i < n; ++i)
    os[i] = float_to_bf16_bits(leaky_relu_bwd(bf16_bits_to_float(gs[i]), bf16_bits_to_float(xs[i]), s));
}
DLK_MULTIVERSION(void, leaky_fwd, (const c10::BFloat16* x, c10::BFloat16* y, int64_t n, float s), (x, y, n, s),
                 leaky_fwd_bf16_body)
DLK_MULTIVERSION(void, leaky_bwd, (const c10::BFloat16* g, const c10::BFloat16* x, c10::BFloat16* gi, int64_t n,
                                   float s), (g, x, gi, n, s), leaky_bwd_bf16_body)

// One slope per element (the slopes of a [C, inner] tile, used when inner is short).
template <typename T>
DLK_INLINE void prelu_fwd_vec_body(const T* x, const T* w, T* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = leaky_relu_fwd(x[i], w[i]);
}
DLK_MULTIVERSION(void, prelu_fwd_vec, (const float* x, const float* w, float* y, int64_t n), (x, w, y, n), prelu_fwd_vec_body)
DLK_MULTIVERSION(void, prelu_fwd_vec, (const double* x, const double* w, double* y, int64_t n), (x, w, y, n), prelu_fwd_vec_body)

// One slope for the block; returns the block's slope gradient. 16 independent partial sums
// let the compiler vectorize the reduction without reassociating a single accumulator.
constexpr int kLanes = 16;
template <typename T>
DLK_INLINE T prelu_bwd_row_body(const T* g, const T* x, T* gi, int64_t n, T w) {
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      gi[i + j] = leaky_relu_bwd(g[i + j], x[i + j], w);
      acc[j] += prelu_weight_grad(g[i + j], x[i + j]);
    }
  }
  for (; i < n; ++i) {
    gi[i] = leaky_relu_bwd(g[i], x[i], w);
    acc[0] += prelu_weight_grad(g[i], x[i]);
  }
  T total = 0;
  for (int j = 0; j < kLanes; ++j) total += acc[j];
  return total;
}
DLK_MULTIVERSION(float, prelu_bwd_row, (const float* g, const float* x, float* gi, int64_t n, float w), (g, x, gi, n, w), prelu_bwd_row_body)
DLK_MULTIVERSION(double, prelu_bwd_row, (const double* g, const double* x, double* gi, int64_t n, double w), (g, x, gi, n, w), prelu_bwd_row_body)

// One slope per element; slope gradients accumulate per element into acc.
template <typename T>
DLK_INLINE void prelu_bwd_vec_body(const T* g, const T* x, const T* w, T* gi, T* acc, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    gi[i] = leaky_relu_bwd(g[i], x[i], w[i]);
    acc[i] += prelu_weight_grad(g[i], x[i]);
  }
}
DLK_MULTIVERSION(void, prelu_bwd_vec, (const float* g, const float* x, const float* w, float* gi, float* acc, int64_t n), (g, x, w, gi, acc, n), prelu_bwd_vec_body)
DLK_MULTIVERSION(void, prelu_bwd_vec, (const double* g, const double* x, const double* w, double* gi, double* acc, int64_t n), (g, x, w, gi, acc, n), prelu_bwd_vec_body)

// ---- drivers: split into tasks, convert storage blocks, call the loops above ----

// Inner extents at least this long run row by row with one slope; shorter ones (channels_last:
// inner == 1) run over whole [C, inner] tiles with a slope per element.
constexpr int64_t kRowMin = 64;

// nt: stream the output (loadstore.h's streams()).
template <typename S>
void leaky_fwd_range(const S* x, S* y, int64_t n, compute_t<S> slope, bool nt) {
  using C = compute_t<S>;
  if constexpr (std::is_same_v<S, c10::BFloat16>) return leaky_fwd(x, y, n, slope);
  C xb[kBlock], yb[kBlock];
  for (int64_t i = 0; i < n; i += kBlock) {
    const int64_t m = std::min(kBlock, n - i);
    leaky_fwd(load(x + i, xb, m), out_block(y + i, yb, nt), m, slope);
    store_out(yb, y + i, m, nt);
  }
}

template <typename S>
void leaky_fwd_impl(const S* x, S* y, int64_t n, double slope) {
  const bool nt = streams<S>(n);
  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
    leaky_fwd_range(x + b, y + b, e - b, compute_t<S>(slope), nt);
    if (nt) stream_fence();
  });
}

template <typename S>
void leaky_bwd_impl(const S* g, const S* x, S* gi, int64_t n, double slope) {
  using C = compute_t<S>;
  const bool nt = streams<S>(n);
  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
    if constexpr (std::is_same_v<S, c10::BFloat16>) return leaky_bwd(g + b, x + b, gi + b, e - b, float(slope));
    C gb[kBlock], xb[kBlock], ob[kBlock];
    for (int64_t i = b; i < e; i += kBlock) {
      const int64_t m = std::min(kBlock, e - i);
      leaky_bwd(load(g + i, gb, m), load(x + i, xb, m), out_block(gi + i, ob, nt), m, C(slope));
      store_out(ob, gi + i, m, nt);
    }
    if (nt) stream_fence();
  });
}

// Slopes in compute type, repeated `inner` times each: the [C, inner] tile of slopes.
template <typename S>
std::vector<compute_t<S>> tile_slopes(const S* w, const ChannelView& v) {
  std::vector<compute_t<S>> t(v.channels * v.inner);
  for (int64_t c = 0; c < v.channels; ++c)
    std::fill_n(t.begin() + c * v.inner, v.inner, compute_t<S>(w[c]));
  return t;
}

template <typename S>
void prelu_fwd_impl(const S* x, const S* w, S* y, const ChannelView& v) {
  using C = compute_t<S>;
  if (v.channels == 1) return leaky_fwd_impl(x, y, v.inner * v.outer, double(C(w[0])));
  const bool nt = streams<S>(v.outer * v.channels * v.inner);
  if (v.inner >= kRowMin) {
    const int64_t grain = std::max<int64_t>(1, kGrain / v.inner);
    at::parallel_for(0, v.outer * v.channels, grain, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r)
        leaky_fwd_range(x + r * v.inner, y + r * v.inner, v.inner, C(w[r % v.channels]), nt);
      if (nt) stream_fence();
    });
    return;
  }
  const int64_t tile = v.channels * v.inner;
  const auto slopes = tile_slopes(w, v);
  const int64_t grain = std::max<int64_t>(1, kGrain / tile);
  at::parallel_for(0, v.outer, grain, [&](int64_t b, int64_t e) {
    C xb[kBlock], yb[kBlock];
    for (int64_t o = b; o < e; ++o) {
      for (int64_t j = 0; j < tile; j += kBlock) {
        const int64_t m = std::min(kBlock, tile - j), off = o * tile + j;
        prelu_fwd_vec(load(x + off, xb, m), slopes.data() + j, out_block(y + off, yb, nt), m);
        store_out(yb, y + off, m, nt);
      }
    }
    if (nt) stream_fence();
  });
}

// Slope gradient of rows [r0, r1) of length `len`, all with slope `w`; writes grad_input.
template <typename S>
double prelu_bwd_rows(const S* g, const S* x, S* gi, int64_t len, compute_t<S> w) {
  using C = compute_t<S>;
  C gb[kBlock], xb[kBlock], ob[kBlock];
  double total = 0;
  for (int64_t i = 0; i < len; i += kBlock) {
    const int64_t m = std::min(kBlock, len - i);
    total += prelu_bwd_row(load(g + i, gb, m), load(x + i, xb, m), out_ptr(gi + i, ob), m, w);
    store(ob, gi + i, m);
  }
  return total;
}

// Fills gw (num_channels doubles). Partial sums are per fixed-size piece, then added in order,
// so the result does not depend on the number of threads.
template <typename S>
void prelu_bwd_impl(const S* g, const S* x, const S* w, S* gi, double* gw, const ChannelView& v) {
  using C = compute_t<S>;
  if (v.channels == 1 || v.inner >= kRowMin) {
    // Pieces: rows of one channel (NCHW-like), or fixed chunks when there is one slope.
    const int64_t len = v.channels == 1 ? kGrain : v.inner;
    const int64_t total = v.outer * v.channels * v.inner;
    const int64_t pieces = (total + len - 1) / len;
    std::vector<double> part(pieces);
    at::parallel_for(0, pieces, std::max<int64_t>(1, kGrain / len), [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) {
        const int64_t off = p * len, m = std::min(len, total - off);
        const C slope = C(w[v.channels == 1 ? 0 : p % v.channels]);
        part[p] = prelu_bwd_rows(g + off, x + off, gi + off, m, slope);
      }
    });
    std::fill_n(gw, v.channels, 0.0);
    for (int64_t p = 0; p < pieces; ++p) gw[v.channels == 1 ? 0 : p % v.channels] += part[p];
    return;
  }
  const int64_t tile = v.channels * v.inner;
  const auto slopes = tile_slopes(w, v);
  const int64_t rows_per_piece = std::max<int64_t>(1, kGrain / tile);
  const int64_t pieces = (v.outer + rows_per_piece - 1) / rows_per_piece;
  std::vector<C> acc(pieces * tile, C(0));
  at::parallel_for(0, pieces, 1, [&](int64_t b, int64_t e) {
    C gb[kBlock], xb[kBlock], ob[kBlock];
    for (int64_t p = b; p < e; ++p) {
      const int64_t o_end = std::min(v.outer, (p + 1) * rows_per_piece);
      for (int64_t o = p * rows_per_piece; o < o_end; ++o) {
        for (int64_t j = 0; j < tile; j += kBlock) {
          const int64_t m = std::min(kBlock, tile - j), off = o * tile + j;
          prelu_bwd_vec(load(g + off, gb, m), load(x + off, xb, m), slopes.data() + j,
                        out_ptr(gi + off, ob), acc.data() + p * tile + j, m);
          store(ob, gi + off, m);
        }
      }
    }
  });
  std::fill_n(gw, v.channels, 0.0);
  for (int64_t p = 0; p < pieces; ++p)
    for (int64_t t = 0; t < tile; ++t) gw[t / v.inner] += acc[p * tile + t];
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "dlkernels cpu backend: ", name, " must be a CPU tensor, got ",
              t.device());
}

}  // namespace

at::Tensor leaky_relu(const at::Tensor& x, double slope) {
  check_cpu(x, "input");
  check_float_dtype(x, "input");
  const at::Tensor xd = dense(x);
  at::Tensor y = new_output(xd);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "leaky_relu", [&] {
    leaky_fwd_impl(xd.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), xd.numel(), slope);
  });
  return y;
}

void leaky_relu_(at::Tensor& x, double slope) {
  check_cpu(x, "input");
  check_float_dtype(x, "input");
  at::Tensor xd = dense(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "leaky_relu_", [&] {
    auto* p = xd.mutable_data_ptr<scalar_t>();
    leaky_fwd_impl(p, p, xd.numel(), slope);
  });
  if (!xd.is_same(x)) x.copy_(xd);
}

at::Tensor leaky_relu_backward(const at::Tensor& grad, const at::Tensor& x, double slope) {
  check_cpu(x, "input");
  check_cpu(grad, "grad_output");
  check_float_dtype(x, "input");
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(),
              "leaky_relu_backward: grad_output must match input in shape and dtype");
  const at::Tensor xd = dense(x);
  const at::Tensor gd = same_layout(grad, xd);
  at::Tensor gi = new_output(xd);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "leaky_relu_bwd", [&] {
    leaky_bwd_impl(gd.const_data_ptr<scalar_t>(), xd.const_data_ptr<scalar_t>(),
                   gi.mutable_data_ptr<scalar_t>(), xd.numel(), slope);
  });
  return gi;
}

at::Tensor prelu(const at::Tensor& x, const at::Tensor& weight) {
  check_cpu(x, "input");
  check_prelu_args(x, weight);
  const at::Tensor xd = dense(x);
  const at::Tensor w = weight.contiguous();
  at::Tensor y = new_output(xd);
  const ChannelView v = channel_view(xd, w.numel());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "prelu", [&] {
    if (xd.numel() == 0) return;
    prelu_fwd_impl(xd.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                   y.mutable_data_ptr<scalar_t>(), v);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> prelu_backward(const at::Tensor& grad, const at::Tensor& x,
                                                  const at::Tensor& weight) {
  check_cpu(x, "input");
  check_cpu(grad, "grad_output");
  check_prelu_args(x, weight);
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(),
              "prelu_backward: grad_output must match input in shape and dtype");
  const at::Tensor xd = dense(x);
  const at::Tensor gd = same_layout(grad, xd);
  const at::Tensor w = weight.contiguous();
  at::Tensor gi = new_output(xd);
  const ChannelView v = channel_view(xd, w.numel());
  at::Tensor gw = at::zeros({v.channels}, weight.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "prelu_bwd", [&] {
    if (xd.numel() == 0) return;
    prelu_bwd_impl(gd.const_data_ptr<scalar_t>(), xd.const_data_ptr<scalar_t>(),
                   w.const_data_ptr<scalar_t>(), gi.mutable_data_ptr<scalar_t>(),
                   gw.mutable_data_ptr<double>(), v);
  });
  return {gi, gw.to(weight.scalar_type()).reshape(weight.sizes())};
}

}  // namespace dlk::cpu

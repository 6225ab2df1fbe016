// Tensor checks, layout preparation and stream lookup for the CUDA dropout kernels.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "../api/dropout.h"
#include "../prep.h"
#include "binding.h"
#include "dropout.cuh"

namespace dlk::cuda {
namespace {

DropoutParams params(double p, int64_t seed, double slope = 0.0) {
  const uint64_t s = uint64_t(seed);
  return {seed_k0(s), seed_k1(s), dropout_threshold(p), 1.0 / (1.0 - p), slope};
}

// r (computed on a contiguous copy) in the layout of the dense tensor xd.
at::Tensor in_layout_of(const at::Tensor& r, const at::Tensor& xd) {
  return r.strides() == xd.strides() ? r : at::empty_like(xd).copy_(r);
}

void check_counter(const at::Tensor& counter) {
  check_cuda(counter, "counter");
  TORCH_CHECK(counter.scalar_type() == at::kLong, "philox4x32_10: counter must be int64, got ",
              counter.scalar_type());
  TORCH_CHECK(counter.dim() >= 1 && counter.size(-1) == 4,
              "philox4x32_10: counter must have shape [..., 4], got ", counter.sizes());
}

}  // namespace

at::Tensor philox4x32_10(const at::Tensor& counter, int64_t key0, int64_t key1) {
  check_counter(counter);
  const c10::cuda::CUDAGuard guard(counter.device());
  const at::Tensor c = counter.contiguous();
  at::Tensor out = at::empty(c.sizes(), c.options());
  launch_philox(c.const_data_ptr<int64_t>(), out.mutable_data_ptr<int64_t>(), c.numel() / 4, uint32_t(key0),
                uint32_t(key1), stream());
  check_launch();
  return out;
}

at::Tensor dropout_bits(const at::Tensor& x, int64_t seed) {
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kLong));
  const uint64_t s = uint64_t(seed);
  launch_dropout_bits(out.mutable_data_ptr<int64_t>(), out.numel(), seed_k0(s), seed_k1(s), stream());
  check_launch();
  return out;
}

at::Tensor dropout(const at::Tensor& x, double p, int64_t seed, bool per_channel) {
  check_cuda(x, "x");
  check_float_dtype(x, "x");
  check_dropout_p(p);
  check_per_channel(x, per_channel);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xd = dense(x);
  at::Tensor y = at::empty_like(xd);
  if (xd.numel() == 0) return y;
  const IndexMap map = make_index_map(xd, per_channel);
  if (map.ndim > kIndexMapMaxDims) return in_layout_of(dlk::cuda::dropout(xd.contiguous(), p, seed, per_channel), xd);
  const DropoutParams prm = params(p, seed);
  at::Tensor grid;  // per channel, unless every position is its own (n, c): the (N, C) grid's words
  if (per_channel && !is_row_major(map)) {
    const int64_t cells = xd.size(0) * xd.size(1);
    grid = at::empty({cells}, xd.options().dtype(at::kInt));
    launch_dropout_grid(static_cast<uint32_t*>(grid.mutable_data_ptr()), cells, prm.k0, prm.k1, stream());
    check_launch();
  }
  launch_dropout_fwd(dtype_of(x), kActNone, xd.const_data_ptr(), nullptr, y.mutable_data_ptr(), xd.numel(), 1, 1,
                     map, grid.defined() ? static_cast<const uint32_t*>(grid.const_data_ptr()) : nullptr, prm,
                     stream());
  check_launch();
  return y;
}

at::Tensor leaky_relu_dropout(const at::Tensor& x, double negative_slope, double p, int64_t seed) {
  check_cuda(x, "x");
  check_float_dtype(x, "x");
  check_dropout_p(p);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xd = dense(x);
  at::Tensor y = at::empty_like(xd);
  if (xd.numel() == 0) return y;
  const IndexMap map = make_index_map(xd, false);
  if (map.ndim > kIndexMapMaxDims)
    return in_layout_of(dlk::cuda::leaky_relu_dropout(xd.contiguous(), negative_slope, p, seed), xd);
  launch_dropout_fwd(dtype_of(x), kActLeakyRelu, xd.const_data_ptr(), nullptr, y.mutable_data_ptr(), xd.numel(),
                     1, 1, map, nullptr, params(p, seed, negative_slope), stream());
  check_launch();
  return y;
}

at::Tensor leaky_relu_dropout_backward(const at::Tensor& grad, const at::Tensor& x, double negative_slope, double p,
                                       int64_t seed) {
  check_cuda(x, "x");
  check_cuda(grad, "grad");
  check_float_dtype(x, "x");
  check_grad_like(grad, x, "leaky_relu_dropout_backward");
  check_dropout_p(p);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xd = dense(x);
  const at::Tensor gd = same_layout(grad, xd);
  at::Tensor gi = at::empty_like(xd);
  if (xd.numel() == 0) return gi;
  const IndexMap map = make_index_map(xd, false);
  if (map.ndim > kIndexMapMaxDims)
    return in_layout_of(
        dlk::cuda::leaky_relu_dropout_backward(gd.contiguous(), xd.contiguous(), negative_slope, p, seed), xd);
  launch_leaky_relu_dropout_bwd(dtype_of(x), gd.const_data_ptr(), xd.const_data_ptr(), gi.mutable_data_ptr(),
                                xd.numel(), map, params(p, seed, negative_slope), stream());
  check_launch();
  return gi;
}

at::Tensor prelu_dropout(const at::Tensor& x, const at::Tensor& weight, double p, int64_t seed) {
  check_cuda(x, "x");
  check_prelu_args(x, weight);
  check_dropout_p(p);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xd = dense(x);
  const at::Tensor w = weight.contiguous();
  at::Tensor y = at::empty_like(xd);
  if (xd.numel() == 0) return y;
  const IndexMap map = make_index_map(xd, false);
  if (map.ndim > kIndexMapMaxDims) return in_layout_of(dlk::cuda::prelu_dropout(xd.contiguous(), weight, p, seed), xd);
  const ChannelView v = channel_view(xd, w.numel());
  launch_dropout_fwd(dtype_of(x), kActPrelu, xd.const_data_ptr(), w.const_data_ptr(), y.mutable_data_ptr(),
                     xd.numel(), v.channels, v.inner, map, nullptr, params(p, seed), stream());
  check_launch();
  return y;
}

std::tuple<at::Tensor, at::Tensor> prelu_dropout_backward(const at::Tensor& grad, const at::Tensor& x,
                                                          const at::Tensor& weight, double p, int64_t seed) {
  check_cuda(x, "x");
  check_cuda(grad, "grad");
  check_prelu_args(x, weight);
  check_grad_like(grad, x, "prelu_dropout_backward");
  check_dropout_p(p);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xd = dense(x);
  const at::Tensor gd = same_layout(grad, xd);
  const at::Tensor w = weight.contiguous();
  at::Tensor gi = at::empty_like(xd);
  const ChannelView v = channel_view(xd, w.numel());
  if (xd.numel() == 0) return {gi, at::zeros_like(weight)};
  const IndexMap map = make_index_map(xd, false);
  if (map.ndim > kIndexMapMaxDims) {
    auto [gi_c, gw_c] = dlk::cuda::prelu_dropout_backward(gd.contiguous(), xd.contiguous(), weight, p, seed);
    return {in_layout_of(gi_c, xd), gw_c};
  }
  auto [split, partials] = prelu_partials(x, v, "prelu_dropout_backward");
  launch_prelu_dropout_bwd(dtype_of(x), gd.const_data_ptr(), xd.const_data_ptr(), w.const_data_ptr(),
                           gi.mutable_data_ptr(), partials.mutable_data_ptr(), v.outer, v.channels, v.inner, split,
                           map, params(p, seed), stream());
  check_launch();
  at::Tensor gw = partials.sum(1).to(weight.scalar_type()).reshape(weight.sizes());
  return {gi, gw};
}

}  // namespace dlk::cuda

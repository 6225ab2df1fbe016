// Tensor checks, layout preparation, partial buffers and their combine for the CUDA batch norm
// kernels (batch_norm.cu). The math of the combine is the reference's (Chan's merge in closed
// form), on [C, split] tensors.
#include <ATen/TensorOperators.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/rsqrt.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <limits>

#include "../api/batch_norm.h"
#include "../api/dropout.h"
#include "../common/batch_norm.h"
#include "../prep.h"
#include "batch_norm.cuh"
#include "binding.h"

namespace dlk::cuda {
namespace {

void check_grad(const at::Tensor& grad, const at::Tensor& x) {
  check_cuda(grad, "grad_output");
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(),
              "dlkernels batch_norm: grad_output must match input in shape and dtype");
}

// Dense input as [outer, C, inner] and the launch grid.
struct Geometry {
  BnShape shape;
  BnGrid grid;
};

Geometry geometry(const at::Tensor& xd) {
  const ChannelView v = channel_view(xd, xd.size(1));
  const BnShape s{v.outer, v.channels, v.inner};
  const BnGrid g = bn_grid(s);
  TORCH_CHECK(g.cblocks <= std::numeric_limits<int32_t>::max(),
              "dlkernels cuda batch_norm: too many channels: ", s.channels);
  return {s, g};
}

// Per-channel values the kernels read; the tensors must outlive the launch.
struct ChannelTensors {
  at::Tensor mean, invstd, weight, bias, prelu;
  BnParams params(int64_t act, double slope, const DropoutArgs& drop = {}, const IndexMap& map = {}) const {
    return {mean.const_data_ptr(), invstd.const_data_ptr(), weight.const_data_ptr(),
            bias.const_data_ptr(),  prelu.defined() ? prelu.const_data_ptr() : nullptr,
            static_cast<int>(act), slope, drop, map};
  }
};

// Dropout after the activation (p > 0) over dense xd's memory positions, or none (drop.on false).
struct Dropout {
  DropoutArgs drop{};
  IndexMap map{};
};
Dropout dropout_of(const at::Tensor& xd, double p, int64_t seed) {
  if (p == 0.0) return {};
  check_dropout_p(p);
  return {dropout_args(p, uint64_t(seed)), make_index_map(xd, false)};
}

// Under dropout, a layout of more coalesced dims than the index map takes (rare: a permuted
// tensor of 9+ dims) runs the dropout family's kernel as a pass of its own, on the output
// (forward) or on grad (backward); batch norm itself runs as without dropout (see the CPU's).
bool separate_dropout(const at::Tensor& xd, double p) {
  return p != 0.0 && make_index_map(xd, false).ndim > kIndexMapMaxDims;
}

ChannelTensors channel_tensors(const at::Tensor& x, const at::Tensor& mean,
                               const at::Tensor& invstd, const std::optional<at::Tensor>& w,
                               const std::optional<at::Tensor>& b,
                               const std::optional<at::Tensor>& prelu_w, int64_t act) {
  return {channel_values(mean, x, 0.0), channel_values(invstd, x, 1.0),
          channel_values(w, x, 1.0), channel_values(b, x, 0.0),
          act == kActPrelu ? channel_values(prelu_w, x, 0.25) : at::Tensor()};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> batch_norm_stats(const at::Tensor& x) {
  check_cuda(x, "input");
  check_float_dtype(x, "input");
  TORCH_CHECK(x.dim() >= 2, "dlkernels batch_norm: input must have a channel dim 1, got ", x.dim(),
              "-d input");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto acc = acc_type(x);
  const int64_t c = x.size(1);
  if (x.numel() == 0) {
    at::Tensor nan = at::full({c}, std::numeric_limits<double>::quiet_NaN(), x.options().dtype(acc));
    return {nan, nan.clone()};
  }
  const at::Tensor xd = dense(x);
  const Geometry geo = geometry(xd);
  // One value of each channel (its first in memory) that the kernel subtracts before Welford.
  at::Tensor shift = xd.as_strided({c}, {geo.shape.inner}).to(acc);
  shift = at::where(shift.isfinite(), shift, at::zeros_like(shift)).contiguous();  // a non-finite shift: none
  at::Tensor part = at::zeros({3, c, geo.grid.split}, x.options().dtype(at::kDouble));
  launch_bn_stats(dtype_of(x), xd.const_data_ptr(), shift.const_data_ptr(), part.mutable_data_ptr(),
                  geo.shape, geo.grid, stream());
  check_launch();
  // Chan's merge of the split partials in closed form, in float64.
  const at::Tensor n = part[0], mu = part[1], m2 = part[2];
  const at::Tensor total = n.sum(1);
  const at::Tensor mean = (n * mu).sum(1) / total;
  const at::Tensor var = (m2.sum(1) + (n * (mu - mean.unsqueeze(1)).pow(2)).sum(1)) / total;
  return {(mean + shift.to(at::kDouble)).to(acc), var.to(acc)};
}

at::Tensor batch_norm_act_forward(const at::Tensor& x, const at::Tensor& mean,
                                  const at::Tensor& invstd, const std::optional<at::Tensor>& w,
                                  const std::optional<at::Tensor>& b,
                                  const std::optional<at::Tensor>& prelu_w, int64_t act,
                                  double slope, double p, int64_t seed) {
  check_cuda(x, "input");
  check_batch_norm_args(x, mean, invstd, w, b, prelu_w, act);
  const c10::cuda::CUDAGuard guard(x.device());
  if (x.numel() == 0) return at::empty_like(x);
  const at::Tensor xd = dense(x);
  if (separate_dropout(xd, p))
    return dropout(batch_norm_act_forward(xd, mean, invstd, w, b, prelu_w, act, slope, 0.0, 0), p, seed, false);
  at::Tensor y = at::empty_like(xd);
  const Geometry geo = geometry(xd);
  const ChannelTensors ct = channel_tensors(x, mean, invstd, w, b, prelu_w, act);
  const Dropout d = dropout_of(xd, p, seed);
  launch_bn_fwd(dtype_of(x), xd.const_data_ptr(), y.mutable_data_ptr(), ct.params(act, slope, d.drop, d.map),
                geo.shape, geo.grid, stream());
  check_launch();
  return y;
}

at::Tensor batch_norm_act_eval(const at::Tensor& x, const at::Tensor& running_mean, const at::Tensor& running_var,
                               const std::optional<at::Tensor>& w, const std::optional<at::Tensor>& b,
                               const std::optional<at::Tensor>& prelu_w, double eps, int64_t act, double slope) {
  check_cuda(x, "input");
  check_batch_norm_args(x, running_mean, running_var, w, b, prelu_w, act);
  const c10::cuda::CUDAGuard guard(x.device());
  // torch's eval statistics: in the compute type, invstd = rsqrt(var + eps) there
  const auto acc = acc_type(x);
  return batch_norm_act_forward(x, running_mean.to(acc), at::rsqrt(running_var.to(acc) + eps), w, b, prelu_w, act,
                                slope, 0.0, 0);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_backward_reduce(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
    const std::optional<at::Tensor>& w, const std::optional<at::Tensor>& b,
    const std::optional<at::Tensor>& prelu_w, int64_t act, double slope, double p, int64_t seed) {
  check_cuda(x, "input");
  check_batch_norm_args(x, mean, invstd, w, b, prelu_w, act);
  check_grad(grad, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto acc = acc_type(x);
  const int64_t c = x.size(1);
  at::Tensor sums;
  if (x.numel() == 0) {
    sums = at::zeros({3, c}, x.options().dtype(acc));
  } else {
    const at::Tensor xd = dense(x);
    const at::Tensor gd = same_layout(grad, xd);
    if (separate_dropout(xd, p))
      return batch_norm_act_backward_reduce(dropout(gd, p, seed, false), xd, mean, invstd, w, b, prelu_w, act,
                                            slope, 0.0, 0);
    const Geometry geo = geometry(xd);
    const ChannelTensors ct = channel_tensors(x, mean, invstd, w, b, prelu_w, act);
    const Dropout d = dropout_of(xd, p, seed);
    at::Tensor part = at::zeros({3, c, geo.grid.split}, x.options().dtype(acc));
    launch_bn_bwd_reduce(dtype_of(x), gd.const_data_ptr(), xd.const_data_ptr(),
                         ct.params(act, slope, d.drop, d.map), part.mutable_data_ptr(), geo.shape,
                         geo.grid, stream());
    check_launch();
    sums = part.sum(2);
  }
  at::Tensor grad_prelu;
  if (act == kActPrelu) {
    const at::Tensor gp = prelu_w->numel() == 1 ? sums[2].sum() : sums[2];
    grad_prelu = gp.to(prelu_w->scalar_type()).reshape(prelu_w->sizes());
  } else {
    grad_prelu = at::empty({0}, x.options().dtype(acc));
  }
  return {sums[0], sums[1], grad_prelu};
}

at::Tensor batch_norm_act_backward_elemt(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
    const std::optional<at::Tensor>& w, const std::optional<at::Tensor>& b,
    const std::optional<at::Tensor>& prelu_w, const at::Tensor& sum_dz,
    const at::Tensor& sum_dz_xhat, int64_t count, int64_t act, double slope, double p,
    int64_t seed) {
  check_cuda(x, "input");
  check_batch_norm_args(x, mean, invstd, w, b, prelu_w, act);
  check_grad(grad, x);
  check_channel_tensor(sum_dz, x, "sum_dz");
  check_channel_tensor(sum_dz_xhat, x, "sum_dz_xhat");
  const c10::cuda::CUDAGuard guard(x.device());
  if (x.numel() == 0) return at::empty_like(x);
  const at::Tensor xd = dense(x);
  const at::Tensor gd = same_layout(grad, xd);
  if (separate_dropout(xd, p))
    return batch_norm_act_backward_elemt(dropout(gd, p, seed, false), xd, mean, invstd, w, b, prelu_w, sum_dz,
                                         sum_dz_xhat, count, act, slope, 0.0, 0);
  at::Tensor gi = at::empty_like(xd);
  const Geometry geo = geometry(xd);
  const ChannelTensors ct = channel_tensors(x, mean, invstd, w, b, prelu_w, act);
  const Dropout d = dropout_of(xd, p, seed);
  // Divided as the reference does: a tensor by the integer count.
  const at::Tensor a = channel_values(sum_dz, x, 0.0) / count;
  const at::Tensor q = channel_values(sum_dz_xhat, x, 0.0) / count;
  launch_bn_bwd_elemt(dtype_of(x), gd.const_data_ptr(), xd.const_data_ptr(),
                      ct.params(act, slope, d.drop, d.map), a.const_data_ptr(), q.const_data_ptr(),
                      gi.mutable_data_ptr(), geo.shape, geo.grid, stream());
  check_launch();
  return gi;
}

// The whole training forward and backward: the kernels above in sequence, glue in C++.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_act_train(
    const at::Tensor& x, const std::optional<at::Tensor>& w, const std::optional<at::Tensor>& b,
    const std::optional<at::Tensor>& prelu_w, double eps, int64_t act, double slope, double p,
    int64_t seed) {
  check_cuda(x, "input");
  check_batch_norm_params(x, w, b, prelu_w, act);
  auto [mean, var] = batch_norm_stats(x);
  at::Tensor invstd = (var + eps).rsqrt();
  at::Tensor y = batch_norm_act_forward(x, mean, invstd, w, b, prelu_w, act, slope, p, seed);
  return {y, mean, invstd, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_act_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
    const std::optional<at::Tensor>& w, const std::optional<at::Tensor>& b,
    const std::optional<at::Tensor>& prelu_w, int64_t act, double slope, bool training, double p,
    int64_t seed) {
  auto [sum_dz, sum_dz_xhat, grad_prelu] =
      batch_norm_act_backward_reduce(grad, x, mean, invstd, w, b, prelu_w, act, slope, p, seed);
  const int64_t count = std::max<int64_t>(1, x.numel() / std::max<int64_t>(1, x.size(1)));
  // eval mode: the statistics are constants, so the mean terms vanish
  const at::Tensor a = training ? sum_dz : at::zeros_like(sum_dz);
  const at::Tensor q = training ? sum_dz_xhat : at::zeros_like(sum_dz_xhat);
  at::Tensor gi =
      batch_norm_act_backward_elemt(grad, x, mean, invstd, w, b, prelu_w, a, q, count, act, slope, p, seed);
  return {gi, sum_dz, sum_dz_xhat, grad_prelu};
}

}  // namespace dlk::cuda

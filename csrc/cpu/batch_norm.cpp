// Batch norm fused with an activation on the CPU: the tensor-level entry points (checks, layout,
// dtype dispatch) and the glue between passes. The passes themselves run on one of three memory
// paths (batch_norm_impl.h).
#include <ATen/Dispatch.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../api/batch_norm.h"
#include "../api/dropout.h"
#include "../prep.h"
#include "batch_norm_impl.h"
#include "loadstore.h"
#include "output.h"

namespace dlk::cpu {
namespace {

// Statistics as the kernels store them (compute type), invstd as torch.rsqrt(var + eps) would.
template <typename C>
void finish_stats(double mu, double var, double eps, C* mean, C* var_out, C* invstd) {
  *mean = C(mu);
  *var_out = C(var);
  *invstd = C(1) / std::sqrt(*var_out + C(eps));
}

// Per-channel mean and (biased) variance of x, in double.
template <typename S>
void stats_impl(const S* x, const ChannelView& v, double* mean, double* var) {
  const int64_t channels = v.channels;
  Moments m(channels);
  // Means are merged relative to a shift per channel (its first value): differences of block means
  // then round at the data's spread, not at |mean| (float64 data with |mean| / std of 1e7 lost
  // 1e5 ulps of its variance in the merge otherwise).
  std::vector<double> shift(channels);
  for (int64_t c = 0; c < channels; ++c) {
    const double s0 = double(compute_t<S>(x[c * v.inner]));
    shift[c] = s0 - s0 == 0 ? s0 : 0.0;  // a non-finite first value: no shift
  }
  path_ops<S>(v).stats(x, v, shift.data(), m);
  for (int64_t c = 0; c < channels; ++c) {
    mean[c] = m.mu[c] + shift[c];
    var[c] = m.n[c] > 0 ? m.m2[c] / m.n[c] : std::nan("");
  }
}

// Training forward: statistics into mean/var/invstd ([C], compute type), then y; the glue
// between the two passes stays in C++.
template <typename S>
void train_impl(const S* x, S* y, int64_t act, const ChannelParams& p, double eps, const ChannelView& v,
                compute_t<S>* mean, compute_t<S>* var, compute_t<S>* invstd, const BnDropout* d) {
  const int64_t channels = v.channels;
  std::vector<double> mu(channels), vr(channels), m(channels), is(channels);
  stats_impl(x, v, mu.data(), vr.data());
  for (int64_t c = 0; c < channels; ++c) {
    finish_stats(mu[c], vr[c], eps, mean + c, var + c, invstd + c);
    m[c] = mean[c];
    is[c] = invstd[c];
  }
  path_ops<S>(v).forward(x, y, act, make_consts(p, m, is), v, d);
}

// Backward: adds into sums[3][C] (zeros: sum dz, sum dz * xhat, PReLU slope gradient per
// channel) and writes grad_input; eval mode (training false) treats the statistics as constants.
template <typename S>
void backward_impl(const S* g, const S* x, S* gi, int64_t act, const ChannelParams& p, const std::vector<double>& mean,
                   const std::vector<double>& invstd, bool training, const ChannelView& v, double* sums,
                   const BnDropout* d) {
  const int64_t channels = v.channels;
  const double count = double(std::max<int64_t>(1, v.outer * v.inner));
  const Ks ks = make_consts(p, mean, invstd);
  const PathOps<S> ops = path_ops<S>(v);
  ops.reduce(g, x, act, ks, v, sums, d);
  ops.elemt(g, x, gi, act, training ? make_consts(p, mean, invstd, sums, sums + channels, count) : ks, v, d);
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "dlkernels cpu backend: ", name, " must be a CPU tensor, got ", t.device());
}

void check_grad(const at::Tensor& grad, const at::Tensor& x) {
  check_cpu(grad, "grad_output");
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(),
              "dlkernels batch_norm backward: grad_output must match input in shape and dtype");
}

// The checked input and grad_output of a backward entry point, dense and in the same layout.
struct BackwardInputs {
  at::Tensor x, grad;
};
BackwardInputs backward_inputs(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean,
                               const at::Tensor& invstd, const std::optional<at::Tensor>& w,
                               const std::optional<at::Tensor>& b, const std::optional<at::Tensor>& prelu_w,
                               int64_t act) {
  check_cpu(x, "input");
  check_grad(grad, x);
  check_batch_norm_args(x, mean, invstd, w, b, prelu_w, act);
  const at::Tensor xd = dense(x);
  return {xd, same_layout(grad, xd)};
}

// sums[3][C] (double) as the backward returns them: sum dz and sum dz * xhat in the compute
// type, and the PReLU weight gradient (summed for a single slope; empty without PReLU).
std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_grads(const at::Tensor& sums, const at::Tensor& x,
                                                             const std::optional<at::Tensor>& prelu_w, int64_t act) {
  const at::Tensor sum_dz = sums[0].to(acc_type(x)), sum_dz_xhat = sums[1].to(acc_type(x));
  if (act != kActPrelu) return {sum_dz, sum_dz_xhat, at::empty({0}, x.options().dtype(acc_type(x)))};
  const at::Tensor per_channel = sums[2];
  return {sum_dz, sum_dz_xhat,
          (prelu_w->numel() == 1 ? per_channel.sum() : per_channel).to(prelu_w->scalar_type()).reshape(prelu_w->sizes())};
}

// Dropout after the activation (p > 0), or none: the stream over xd's memory positions.
std::optional<BnDropout> make_dropout(const at::Tensor& xd, double p, int64_t seed) {
  if (p == 0.0) return std::nullopt;
  check_dropout_p(p);
  return BnDropout{dropout_args(p, uint64_t(seed)), make_stream(xd, seed, false)};
}

const BnDropout* ptr(const std::optional<BnDropout>& d) { return d ? &*d : nullptr; }

// Under dropout, a layout of more coalesced dims than the stream's index map takes (rare: a
// permuted tensor of 9+ dims) runs the dropout family's kernel as a pass of its own, which
// handles such layouts: on the output (forward), or on grad (backward; fp16/bf16 grad * m is
// then rounded to the storage type once). Batch norm itself runs on x's layout as without
// dropout, so the forward stays bit for bit dropout(batch_norm_act(x)).
bool separate_dropout(const at::Tensor& xd, double p) {
  return p != 0.0 && make_index_map(xd, false).ndim > kIndexMapMaxDims;
}

#define DLK_DISPATCH_BN(x, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (x).scalar_type(), NAME, __VA_ARGS__)

}  // namespace

std::tuple<at::Tensor, at::Tensor> batch_norm_stats(const at::Tensor& x) {
  check_cpu(x, "input");
  check_float_dtype(x, "input");
  TORCH_CHECK(x.dim() >= 2, "dlkernels batch_norm: input must have a channel dim 1, got ", x.dim(), "-d input");
  const at::Tensor xd = dense(x);
  const ChannelView v = channel_view(xd, xd.size(1));
  at::Tensor mean = at::empty({xd.size(1)}, xd.options().dtype(at::kDouble));
  at::Tensor var = at::empty({xd.size(1)}, xd.options().dtype(at::kDouble));
  DLK_DISPATCH_BN(x, "batch_norm_stats", [&] {
    if (xd.numel() == 0) {  // as torch.var_mean of nothing; also no view of C == 0 channels to divide by
      mean.fill_(NAN), var.fill_(NAN);
      return;
    }
    stats_impl(xd.const_data_ptr<scalar_t>(), v, mean.mutable_data_ptr<double>(), var.mutable_data_ptr<double>());
  });
  return {mean.to(acc_type(x)), var.to(acc_type(x))};
}

namespace {
// The normalize(+activate, +drop) pass over dense xd with the per-channel constants ks: the
// forward and eval entry points differ only in where the statistics come from.
at::Tensor normalize(const at::Tensor& xd, const Ks& ks, int64_t act, const BnDropout* d) {
  at::Tensor y = new_output(xd);
  DLK_DISPATCH_BN(xd, "batch_norm_act_forward", [&] {
    if (xd.numel() == 0) return;
    const ChannelView v = channel_view(xd, xd.size(1));
    path_ops<scalar_t>(v).forward(xd.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), act, ks, v, d);
  });
  return y;
}
}  // namespace

at::Tensor batch_norm_act_forward(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
                                  const std::optional<at::Tensor>& w, const std::optional<at::Tensor>& b,
                                  const std::optional<at::Tensor>& prelu_w, int64_t act, double slope, double p,
                                  int64_t seed) {
  check_cpu(x, "input");
  check_batch_norm_args(x, mean, invstd, w, b, prelu_w, act);
  const at::Tensor xd = dense(x);
  if (separate_dropout(xd, p))
    return dropout(batch_norm_act_forward(xd, mean, invstd, w, b, prelu_w, act, slope, 0.0, 0), p, seed, false);
  const std::optional<BnDropout> drop = make_dropout(xd, p, seed);
  return normalize(xd, make_consts(channel_params(xd, w, b, prelu_w, act, slope), doubles(mean), doubles(invstd)),
                   act, ptr(drop));
}

at::Tensor batch_norm_act_eval(const at::Tensor& x, const at::Tensor& running_mean, const at::Tensor& running_var,
                               const std::optional<at::Tensor>& w, const std::optional<at::Tensor>& b,
                               const std::optional<at::Tensor>& prelu_w, double eps, int64_t act, double slope) {
  check_cpu(x, "input");
  check_batch_norm_args(x, running_mean, running_var, w, b, prelu_w, act);
  const at::Tensor xd = dense(x);
  // torch's eval statistics: mean and var rounded to the compute type, invstd = 1 / sqrt(var + eps)
  // there (the same bits as its rsqrt); computed here, two tensor ops less per call on small inputs
  const bool as_float = acc_type(x) == at::kFloat;
  const int64_t channels = xd.size(1);
  std::vector<double> mean = doubles(running_mean, channels, as_float), invstd = doubles(running_var, channels, as_float);
  for (double& v : invstd)
    v = as_float ? double(1.0f / std::sqrt(float(v) + float(eps))) : 1.0 / std::sqrt(v + eps);
  return normalize(xd, make_consts(channel_params(xd, w, b, prelu_w, act, slope), mean, invstd), act, nullptr);
}

void batch_norm_update_stats_(const at::Tensor& running_mean, const at::Tensor& running_var, const at::Tensor& mean,
                              const at::Tensor& var, int64_t count, double momentum) {
  const int64_t c = running_mean.numel();
  for (const at::Tensor* t : {&running_mean, &running_var}) {
    check_cpu(*t, "running statistics");
    TORCH_CHECK(t->is_contiguous() && t->numel() == c && t->scalar_type() == running_mean.scalar_type() &&
                    (t->scalar_type() == at::kFloat || t->scalar_type() == at::kDouble),
                "dlkernels batch_norm_update_stats_: contiguous float32/float64 buffers of one size and dtype");
  }
  TORCH_CHECK(mean.numel() == c && var.numel() == c, "dlkernels batch_norm_update_stats_: ", c, " channels expected");
  // first, as an in-place op: it raises (nothing written) for an inference tensor outside inference mode
  running_mean.unsafeGetTensorImpl()->bump_version();
  running_var.unsafeGetTensorImpl()->bump_version();
  const std::vector<double> mu = doubles(mean), v = doubles(var);
  const double unbias = double(count) / double(std::max<int64_t>(count - 1, 1));
  AT_DISPATCH_FLOATING_TYPES(running_mean.scalar_type(), "batch_norm_update_stats_", [&] {
    scalar_t* rm = running_mean.mutable_data_ptr<scalar_t>();
    scalar_t* rv = running_var.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < c; ++i) {
      rm[i] = scalar_t(momentum * mu[i] + (1 - momentum) * double(rm[i]));
      rv[i] = scalar_t(momentum * (v[i] * unbias) + (1 - momentum) * double(rv[i]));
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_act_train(
    const at::Tensor& x, const std::optional<at::Tensor>& w, const std::optional<at::Tensor>& b,
    const std::optional<at::Tensor>& prelu_w, double eps, int64_t act, double slope, double p, int64_t seed) {
  check_cpu(x, "input");
  check_batch_norm_params(x, w, b, prelu_w, act);
  const at::Tensor xd = dense(x);
  if (separate_dropout(xd, p)) {
    auto [y, mean, invstd, var] = batch_norm_act_train(xd, w, b, prelu_w, eps, act, slope, 0.0, 0);
    return {dropout(y, p, seed, false), mean, invstd, var};
  }
  const std::optional<BnDropout> drop = make_dropout(xd, p, seed);
  const int64_t channels = xd.size(1);
  at::Tensor y = new_output(xd);
  const auto opts = xd.options().dtype(acc_type(x));
  at::Tensor mean = at::empty({channels}, opts), var = at::empty({channels}, opts), invstd = at::empty({channels}, opts);
  const ChannelParams cp = channel_params(xd, w, b, prelu_w, act, slope);
  DLK_DISPATCH_BN(x, "batch_norm_act_train", [&] {
    using C = compute_t<scalar_t>;
    if (xd.numel() == 0) {
      mean.fill_(NAN), var.fill_(NAN), invstd.fill_(NAN);
      return;
    }
    train_impl(xd.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), act, cp, eps, channel_view(xd, channels),
               mean.mutable_data_ptr<C>(), var.mutable_data_ptr<C>(), invstd.mutable_data_ptr<C>(), ptr(drop));
  });
  return {y, mean, invstd, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_backward_reduce(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
    const std::optional<at::Tensor>& w, const std::optional<at::Tensor>& b, const std::optional<at::Tensor>& prelu_w,
    int64_t act, double slope, double p, int64_t seed) {
  const BackwardInputs in = backward_inputs(grad, x, mean, invstd, w, b, prelu_w, act);
  const at::Tensor &xd = in.x, &gd = in.grad;
  if (separate_dropout(xd, p))
    return batch_norm_act_backward_reduce(dropout(gd, p, seed, false), xd, mean, invstd, w, b, prelu_w, act, slope,
                                          0.0, 0);
  const std::optional<BnDropout> drop = make_dropout(xd, p, seed);
  const Ks ks = make_consts(channel_params(xd, w, b, prelu_w, act, slope), doubles(mean), doubles(invstd));
  at::Tensor sums = at::zeros({3, xd.size(1)}, xd.options().dtype(at::kDouble));
  DLK_DISPATCH_BN(x, "batch_norm_act_backward_reduce", [&] {
    if (xd.numel() == 0) return;
    const ChannelView v = channel_view(xd, xd.size(1));
    path_ops<scalar_t>(v).reduce(gd.const_data_ptr<scalar_t>(), xd.const_data_ptr<scalar_t>(), act, ks, v,
                                 sums.mutable_data_ptr<double>(), ptr(drop));
  });
  return channel_grads(sums, xd, prelu_w, act);
}

at::Tensor batch_norm_act_backward_elemt(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean,
                                         const at::Tensor& invstd, const std::optional<at::Tensor>& w,
                                         const std::optional<at::Tensor>& b,
                                         const std::optional<at::Tensor>& prelu_w, const at::Tensor& sum_dz,
                                         const at::Tensor& sum_dz_xhat, int64_t count, int64_t act, double slope,
                                         double p, int64_t seed) {
  const BackwardInputs in = backward_inputs(grad, x, mean, invstd, w, b, prelu_w, act);
  const at::Tensor &xd = in.x, &gd = in.grad;
  if (separate_dropout(xd, p))
    return batch_norm_act_backward_elemt(dropout(gd, p, seed, false), xd, mean, invstd, w, b, prelu_w, sum_dz,
                                         sum_dz_xhat, count, act, slope, 0.0, 0);
  const std::optional<BnDropout> drop = make_dropout(xd, p, seed);
  check_channel_tensor(sum_dz, x, "sum_dz");
  check_channel_tensor(sum_dz_xhat, x, "sum_dz_xhat");
  TORCH_CHECK(count > 0, "dlkernels batch_norm backward: count must be positive, got ", count);
  at::Tensor gi = new_output(xd);
  const std::vector<double> s0 = doubles(sum_dz), s1 = doubles(sum_dz_xhat);
  const Ks ks = make_consts(channel_params(xd, w, b, prelu_w, act, slope), doubles(mean), doubles(invstd), s0.data(),
                            s1.data(), double(count));
  DLK_DISPATCH_BN(x, "batch_norm_act_backward_elemt", [&] {
    if (xd.numel() == 0) return;
    const ChannelView v = channel_view(xd, xd.size(1));
    path_ops<scalar_t>(v).elemt(gd.const_data_ptr<scalar_t>(), xd.const_data_ptr<scalar_t>(),
                                gi.mutable_data_ptr<scalar_t>(), act, ks, v, ptr(drop));
  });
  return gi;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_act_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
    const std::optional<at::Tensor>& w, const std::optional<at::Tensor>& b, const std::optional<at::Tensor>& prelu_w,
    int64_t act, double slope, bool training, double p, int64_t seed) {
  const BackwardInputs in = backward_inputs(grad, x, mean, invstd, w, b, prelu_w, act);
  const at::Tensor &xd = in.x, &gd = in.grad;
  if (separate_dropout(xd, p))
    return batch_norm_act_backward(dropout(gd, p, seed, false), xd, mean, invstd, w, b, prelu_w, act, slope, training,
                                   0.0, 0);
  const std::optional<BnDropout> drop = make_dropout(xd, p, seed);
  at::Tensor gi = new_output(xd);
  at::Tensor sums = at::zeros({3, xd.size(1)}, xd.options().dtype(at::kDouble));
  const ChannelParams cp = channel_params(xd, w, b, prelu_w, act, slope);
  DLK_DISPATCH_BN(x, "batch_norm_act_backward", [&] {
    if (xd.numel() == 0) return;
    backward_impl(gd.const_data_ptr<scalar_t>(), xd.const_data_ptr<scalar_t>(), gi.mutable_data_ptr<scalar_t>(), act,
                  cp, doubles(mean), doubles(invstd), training, channel_view(xd, xd.size(1)),
                  sums.mutable_data_ptr<double>(), ptr(drop));
  });
  const auto [sum_dz, sum_dz_xhat, grad_prelu] = channel_grads(sums, xd, prelu_w, act);
  return {gi, sum_dz, sum_dz_xhat, grad_prelu};
}

}  // namespace dlk::cpu

// Tensor checks, layout preparation and stream lookup for the CUDA contrast normalization (global
// and local).
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "../api/contrast_norm.h"
#include "binding.h"
#include "contrast_norm.cuh"

namespace dlk::cuda {
namespace {

at::ScalarType acc_of(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// Blocks per example of the reductions: about 1024 blocks in all, each with a long stretch of work.
int split_for(int64_t n, int64_t m) {
  return static_cast<int>(std::clamp<int64_t>(m / (256 * 16), 1, std::max<int64_t>(1, 1024 / std::max<int64_t>(n, 1))));
}

// A 1-d tensor of vals on x's device in the compute type.
at::Tensor device_vector(const std::vector<double>& vals, const at::Tensor& x) {
  auto host = at::from_blob(const_cast<double*>(vals.data()), {int64_t(vals.size())}, at::kDouble);
  return host.to(x.device(), acc_of(x));
}

// The windows, 1/z, shifts and statistics buffers of one LCN call (kept alive by `keep`).
LcnCall lcn_call(const at::Tensor& xd, int64_t kernel_size, double sigma, double eps, bool lecun, bool across,
                 std::vector<at::Tensor>& keep) {
  LcnCall a{};
  a.n = xd.size(0), a.c = xd.size(1), a.h = xd.size(2), a.w = xd.size(3);
  a.cs = across ? 1 : a.c;
  a.across = across, a.lecun = lecun, a.eps = eps;
  for (int k = 0; k < 4; ++k) a.xs[k] = xd.stride(k);
  const std::vector<double> ww = lcn::window(kernel_size, sigma, a.w), wh = lcn::window(kernel_size, sigma, a.h);
  a.rw = int64_t(ww.size()) / 2, a.rh = int64_t(wh.size()) / 2;
  const auto opts = xd.options().dtype(acc_of(xd));
  keep = {device_vector(ww, xd), device_vector(wh, xd), device_vector(lcn::inv_norm(ww, a.w), xd),
          device_vector(lcn::inv_norm(wh, a.h), xd),
          // the first value of each statistics plane (per channel, or per example across channels)
          (across ? xd.select(3, 0).select(2, 0).narrow(1, 0, 1) : xd.select(3, 0).select(2, 0))
              .to(acc_of(xd))
              .contiguous(),
          at::empty({a.n * a.cs, a.h, a.w}, opts), at::empty({a.n * a.cs, a.h, a.w}, opts),
          at::empty({a.n * a.cs, a.h, a.w}, opts), at::zeros({a.n * a.cs}, opts)};
  a.ww = keep[0].const_data_ptr(), a.wh = keep[1].const_data_ptr();
  a.izc = keep[2].const_data_ptr(), a.izr = keep[3].const_data_ptr(), a.shift = keep[4].const_data_ptr();
  a.t = keep[5].mutable_data_ptr(), a.m = keep[6].mutable_data_ptr(), a.s = keep[7].mutable_data_ptr();
  a.cm = keep[8].mutable_data_ptr();
  return a;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> global_contrast_norm(const at::Tensor& x, double scale, double lam, double eps,
                                                        const std::string& style, bool subtract_mean) {
  check_cuda(x, "input");
  const int code = gcn::style_code(style);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xd = gcn::prepare(x);
  const int64_t n = xd.size(0), m = n ? xd.numel() / n : 0;
  at::Tensor y = at::empty_like(xd);
  at::Tensor stats = at::zeros({n, 4}, x.options().dtype(acc_of(x)));
  if (n == 0 || m == 0) return {y, stats};
  const int split = split_for(n, m);
  at::Tensor part = at::empty({n, split, 3}, stats.options());
  launch_gcn_forward(dtype_of(x), xd.const_data_ptr(), y.mutable_data_ptr(), stats.mutable_data_ptr(),
                     part.mutable_data_ptr(), n, m, split, code, scale, lam, eps, subtract_mean, stream());
  check_launch();
  return {y, stats};
}

at::Tensor global_contrast_norm_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& stats,
                                         bool subtract_mean) {
  check_cuda(x, "input");
  check_cuda(grad, "grad_output");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xd = gcn::prepare(x);
  gcn::check_backward(grad, xd, stats);
  const at::Tensor gd = gcn::like(grad, xd);
  const at::Tensor st = stats.contiguous();
  const int64_t n = xd.size(0), m = n ? xd.numel() / n : 0;
  at::Tensor gi = at::empty_like(xd);
  if (n == 0 || m == 0) return gi;
  const int split = split_for(n, m);
  at::Tensor part = at::empty({n, split, 2}, st.options());
  launch_gcn_backward(dtype_of(x), gd.const_data_ptr(), xd.const_data_ptr(), st.const_data_ptr(),
                      gi.mutable_data_ptr(), part.mutable_data_ptr(), n, m, split, subtract_mean, stream());
  check_launch();
  return gi;
}

at::Tensor local_contrast_norm(const at::Tensor& x, int64_t kernel_size, double sigma, double eps,
                               const std::string& divisor, bool across_channels) {
  check_cuda(x, "input");
  const bool lecun = lcn::divisor_code(divisor) == kLcnDivisorLecun;
  lcn::check_args(kernel_size, sigma, eps);
  const c10::cuda::CUDAGuard guard(x.device());
  bool nhwc = false;
  const at::Tensor xd = lcn::prepare(x, &nhwc);
  at::Tensor y = at::empty_like(xd);
  if (xd.numel() == 0) return y;
  std::vector<at::Tensor> keep;
  const LcnCall a = lcn_call(xd, kernel_size, sigma, eps, lecun, across_channels, keep);
  const int64_t ys[4] = {y.stride(0), y.stride(1), y.stride(2), y.stride(3)};
  launch_lcn_forward(dtype_of(x), a, xd.const_data_ptr(), y.mutable_data_ptr(), ys, stream());
  check_launch();
  return y;
}

at::Tensor local_contrast_norm_backward(const at::Tensor& grad, const at::Tensor& x, int64_t kernel_size,
                                        double sigma, double eps, const std::string& divisor,
                                        bool across_channels) {
  check_cuda(x, "input");
  check_cuda(grad, "grad_output");
  const bool lecun = lcn::divisor_code(divisor) == kLcnDivisorLecun;
  lcn::check_args(kernel_size, sigma, eps);
  const c10::cuda::CUDAGuard guard(x.device());
  bool nhwc = false;
  const at::Tensor xd = lcn::prepare(x, &nhwc);
  lcn::check_backward(grad, xd);
  at::Tensor gi = at::empty_like(xd);
  if (xd.numel() == 0) return gi;
  std::vector<at::Tensor> keep;
  const LcnCall a = lcn_call(xd, kernel_size, sigma, eps, lecun, across_channels, keep);
  const auto opts = xd.options().dtype(acc_of(xd));
  at::Tensor gsb = at::empty({a.n * a.cs, a.h, a.w}, opts), ct = at::empty_like(gsb);
  at::Tensor gc = at::zeros({a.n * a.cs}, opts), gv = at::empty(xd.sizes(), opts);
  const int64_t gs[4] = {grad.stride(0), grad.stride(1), grad.stride(2), grad.stride(3)};
  const int64_t os[4] = {gi.stride(0), gi.stride(1), gi.stride(2), gi.stride(3)};
  launch_lcn_backward(dtype_of(x), a, grad.const_data_ptr(), gs, xd.const_data_ptr(), gi.mutable_data_ptr(), os,
                      gsb.mutable_data_ptr(), ct.mutable_data_ptr(), gc.mutable_data_ptr(), gv.mutable_data_ptr(),
                      stream());
  check_launch();
  return gi;
}

}  // namespace dlk::cuda

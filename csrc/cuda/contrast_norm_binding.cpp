// Tensor checks, layout preparation and stream lookup for the CUDA global contrast normalization.
#include <ATen/ops/empty.h>
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

}  // namespace dlk::cuda

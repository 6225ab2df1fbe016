// Tensor checks, layout preparation and stream lookup for the CUDA activation kernels.
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "../api/activation.h"
#include "../prep.h"
#include "activation.cuh"
#include "binding.h"

namespace dlk::cuda {

at::Tensor leaky_relu(const at::Tensor& x, double slope) {
  check_cuda(x, "input");
  check_float_dtype(x, "input");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xd = dense(x);
  at::Tensor y = at::empty_like(xd);
  launch_leaky_relu_fwd(dtype_of(x), xd.const_data_ptr(), y.mutable_data_ptr(), xd.numel(), slope,
                        stream());
  check_launch();
  return y;
}

void leaky_relu_(at::Tensor& x, double slope) {
  check_cuda(x, "input");
  check_float_dtype(x, "input");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor xd = dense(x);
  launch_leaky_relu_fwd(dtype_of(x), xd.const_data_ptr(), xd.mutable_data_ptr(), xd.numel(), slope,
                        stream());
  check_launch();
  if (!xd.is_same(x)) x.copy_(xd);
}

at::Tensor leaky_relu_backward(const at::Tensor& grad, const at::Tensor& x, double slope) {
  check_cuda(x, "input");
  check_cuda(grad, "grad_output");
  check_float_dtype(x, "input");
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(),
              "leaky_relu_backward: grad_output must match input in shape and dtype");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xd = dense(x);
  const at::Tensor gd = same_layout(grad, xd);
  at::Tensor gi = at::empty_like(xd);
  launch_leaky_relu_bwd(dtype_of(x), gd.const_data_ptr(), xd.const_data_ptr(), gi.mutable_data_ptr(),
                        xd.numel(), slope, stream());
  check_launch();
  return gi;
}

at::Tensor prelu(const at::Tensor& x, const at::Tensor& weight) {
  check_cuda(x, "input");
  check_prelu_args(x, weight);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xd = dense(x);
  const at::Tensor w = weight.contiguous();
  at::Tensor y = at::empty_like(xd);
  const ChannelView v = channel_view(xd, w.numel());
  launch_prelu_fwd(dtype_of(x), xd.const_data_ptr(), w.const_data_ptr(), y.mutable_data_ptr(),
                   v.outer, v.channels, v.inner, stream());
  check_launch();
  return y;
}

std::tuple<at::Tensor, at::Tensor> prelu_backward(const at::Tensor& grad, const at::Tensor& x,
                                                  const at::Tensor& weight) {
  check_cuda(x, "input");
  check_cuda(grad, "grad_output");
  check_prelu_args(x, weight);
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(),
              "prelu_backward: grad_output must match input in shape and dtype");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xd = dense(x);
  const at::Tensor gd = same_layout(grad, xd);
  const at::Tensor w = weight.contiguous();
  at::Tensor gi = at::empty_like(xd);
  const ChannelView v = channel_view(xd, w.numel());
  auto [split, partials] = prelu_partials(x, v, "prelu");
  launch_prelu_bwd(dtype_of(x), gd.const_data_ptr(), xd.const_data_ptr(), w.const_data_ptr(),
                   gi.mutable_data_ptr(), partials.mutable_data_ptr(), v.outer, v.channels, v.inner,
                   split, stream());
  check_launch();
  at::Tensor gw = partials.sum(1).to(weight.scalar_type()).reshape(weight.sizes());
  return {gi, gw};
}

}  // namespace dlk::cuda

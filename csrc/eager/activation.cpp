// Eager entries of the activation family (eager.h): leaky ReLU and PReLU forward, with their autograd
// nodes; the same kernels, formulas and double-backward behaviour as dlkernels/ops/activation.py.
#include "../api/activation.h"
#include "eager.h"

namespace dlk::eager {
namespace {

namespace py = pybind11;
using torch::autograd::Function;

at::Tensor leaky_backward(const at::Tensor& grad, const at::Tensor& x, double slope);

// Both leaky nodes save x and the slope, and the gradient through either is leaky_backward of the
// incoming gradient: the backward is linear in grad, so the double backward is the same op.
void save_leaky(AutogradContext* ctx, const at::Tensor& x, double slope) {
  ctx->save_for_backward({x});
  ctx->saved_data["slope"] = slope;
}
at::Tensor leaky_grad(AutogradContext* ctx, const at::Tensor& grad) {
  return leaky_backward(grad, ctx->get_saved_variables()[0], ctx->saved_data["slope"].toDouble());
}

struct LeakyRelu : Function<LeakyRelu> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, double slope) {
    save_leaky(ctx, x, slope);
    return cpu::leaky_relu(x, slope);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {leaky_grad(ctx, grads[0]), at::Tensor()};
  }
};

struct LeakyReluBackward : Function<LeakyReluBackward> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad, const at::Tensor& x, double slope) {
    save_leaky(ctx, x, slope);
    return cpu::leaky_relu_backward(grad, x, slope);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {leaky_grad(ctx, grads[0]), at::Tensor(), at::Tensor()};
  }
};

at::Tensor leaky_backward(const at::Tensor& grad, const at::Tensor& x, double slope) {
  return records_grad({&grad, &x}) ? LeakyReluBackward::apply(grad, x, slope)
                                   : cpu::leaky_relu_backward(grad, x, slope);
}

struct Prelu : Function<Prelu> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight) {
    ctx->save_for_backward({x, weight});
    return cpu::prelu(x, weight);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    auto [gx, gw] = cpu::prelu_backward(grads[0], saved[0], saved[1]);
    variable_list out{ctx->needs_input_grad(0) ? gx : at::Tensor(), ctx->needs_input_grad(1) ? gw : at::Tensor()};
    return once_differentiable(std::move(out), {&grads[0], &saved[0], &saved[1]},
                               "Trying to backward through dlkernels.prelu_backward.default but no autograd "
                               "formula was registered. Please use register_autograd to add one.");
  }
};

// leaky_relu(input, negative_slope): dlkernels.functional.leaky_relu's out-of-place call
py::object leaky_relu(py::handle input, py::handle negative_slope) {
  const at::Tensor* x = float_tensor(input.ptr());
  double slope = 0;
  if (x == nullptr || !number(negative_slope.ptr(), slope) || !plain_call()) return py::none();
  return wrap(records_grad({x}) ? LeakyRelu::apply(*x, slope) : cpu::leaky_relu(*x, slope));
}

// prelu(input, weight): torch's checks passed here are exactly those of ops/activation.py's _check_prelu
py::object prelu(py::handle input, py::handle weight) {
  const at::Tensor* x = float_tensor(input.ptr());
  const at::Tensor* w = x != nullptr ? cpu_tensor(weight.ptr()) : nullptr;
  if (w == nullptr || w->scalar_type() != x->scalar_type() || w->dim() > 1) return py::none();
  if (w->numel() != 1 && (x->dim() < 2 || x->size(1) != w->numel())) return py::none();
  if (!plain_call()) return py::none();
  return wrap(records_grad({x, w}) ? Prelu::apply(*x, *w) : cpu::prelu(*x, *w));
}

void bind(py::module_& m) {
  m.def("leaky_relu", &leaky_relu, py::arg("input"), py::arg("negative_slope"));
  m.def("prelu", &prelu, py::arg("input"), py::arg("weight"));
}

}  // namespace
}  // namespace dlk::eager

DLK_REGISTER_EAGER(activation, &dlk::eager::bind);

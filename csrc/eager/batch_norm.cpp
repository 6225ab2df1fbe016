// Eager entry of the batch_norm family (eager.h): batch_norm_act without dropout, training (with the
// running-statistics update) and eval, with its autograd nodes. The same kernels, formulas and
// double-backward behaviour as dlkernels/ops/batch_norm.py's batch_norm_act, which runs every call
// this one declines.
#include "../api/batch_norm.h"
#include "../common/codes.h"
#include "../prep.h"
#include "eager.h"

#include <cstring>
#include <iterator>

namespace dlk::eager {
namespace {

namespace py = pybind11;
using torch::autograd::Function;
using OptTensor = std::optional<at::Tensor>;

const char* const kNoDoubleBackward =
    "Trying to backward through dlkernels.batch_norm_act_backward.default but no autograd formula was "
    "registered. Please use register_autograd to add one.";

at::Tensor maybe(const OptTensor& t) { return t.value_or(at::Tensor()); }

// The four parameter gradients (x, weight, bias, prelu_weight) from the fused backward kernel; saved:
// x, weight, bias, prelu_weight as given (undefined for None), then the per-channel mean and invstd.
// Autograd numbers its edges over the defined inputs only: x is edge 0, the parameters count from
// `param_edge` (the edges between belong to the running buffers of eval).
variable_list input_grads(AutogradContext* ctx, const at::Tensor& grad, const variable_list& s, bool training,
                          size_t param_edge) {
  const at::Tensor &x = s[0], &w = s[1], &b = s[2], &prelu = s[3];
  const auto act = ctx->saved_data["act"].toInt();
  auto [gx, sum_dz, sum_dz_xhat, gp] = cpu::batch_norm_act_backward(
      grad, x, s[4], s[5], w.defined() ? OptTensor(w) : std::nullopt, b.defined() ? OptTensor(b) : std::nullopt,
      prelu.defined() ? OptTensor(prelu) : std::nullopt, act, ctx->saved_data["slope"].toDouble(), training, 0.0, 0);
  // a backend may return both sums as rows of one buffer: gradients own their storage
  auto own = [](at::Tensor t, const at::Tensor& like) {
    at::Tensor g = t.to(like.scalar_type());
    return g.is_view() ? g.clone() : g;
  };
  variable_list out{gx, w.defined() ? own(sum_dz_xhat, w) : at::Tensor(), b.defined() ? own(sum_dz, b) : at::Tensor(),
                    prelu.defined() ? gp : at::Tensor()};
  if (!ctx->needs_input_grad(0)) out[0] = at::Tensor();
  for (size_t i = 1, edge = param_edge; i < 4; ++i)
    if (s[i].defined() && !ctx->needs_input_grad(edge++)) out[i] = at::Tensor();
  return once_differentiable(std::move(out), {&grad, &x, &w, &b, &prelu}, kNoDoubleBackward);
}

void save_params(AutogradContext* ctx, int64_t act, double slope) {
  ctx->saved_data["act"] = act;
  ctx->saved_data["slope"] = slope;
}

// Training forward: y; the batch mean and variance go to *stats for the running-statistics update.
struct Train : Function<Train> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const OptTensor& w, const OptTensor& b,
                            const OptTensor& prelu, double eps, int64_t act, double slope,
                            std::pair<at::Tensor, at::Tensor>* stats) {
    auto [y, mean, invstd, var] = cpu::batch_norm_act_train(x, w, b, prelu, eps, act, slope, 0.0, 0);
    ctx->save_for_backward({x, maybe(w), maybe(b), maybe(prelu), mean, invstd});
    save_params(ctx, act, slope);
    *stats = {mean, var};
    return y;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list g = input_grads(ctx, grads[0], ctx->get_saved_variables(), true, 1);
    g.resize(8);
    return g;
  }
};

// Eval forward: saves the running buffers themselves; the backward derives invstd (torch's eval
// statistics, reference eval_stats) only when it runs.
struct Eval : Function<Eval> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& rm, const at::Tensor& rv,
                            const OptTensor& w, const OptTensor& b, const OptTensor& prelu, double eps, int64_t act,
                            double slope) {
    ctx->save_for_backward({x, maybe(w), maybe(b), maybe(prelu), rm, rv});
    save_params(ctx, act, slope);
    ctx->saved_data["eps"] = eps;
    return cpu::batch_norm_act_eval(x, rm, rv, w, b, prelu, eps, act, slope);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list s = ctx->get_saved_variables();
    const at::ScalarType c = acc_type(s[0]);
    s[4] = s[4].to(c);
    s[5] = (s[5].to(c) + ctx->saved_data["eps"].toDouble()).rsqrt();
    // edges: x, running_mean, running_var (no gradient, as the Python path), then w, b, prelu
    variable_list g = input_grads(ctx, grads[0], s, false, 3);
    return {g[0], at::Tensor(), at::Tensor(), g[1], g[2], g[3], at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// activation=: None, or a name of codes.h's kActNames (Python's names; the string "none" is not one)
bool activation_code(PyObject* obj, int64_t& act) {
  if (obj == Py_None) {
    act = kActNone;
    return true;
  }
  const char* s = PyUnicode_CheckExact(obj) ? PyUnicode_AsUTF8(obj) : nullptr;
  if (s == nullptr) {
    PyErr_Clear();
    return false;
  }
  for (int a = kActNone + 1; a < int(std::size(kActNames)); ++a) {
    if (std::strcmp(s, kActNames[a]) == 0) {
      act = a;
      return true;
    }
  }
  return false;
}

// torch's dtype rule for the CPU: parameters share the input's dtype, or are all float32 for fp16/bf16 input
bool dtypes_ok(const at::Tensor& x, std::initializer_list<const OptTensor*> params) {
  const at::ScalarType xt = x.scalar_type();
  const bool reduced = xt == at::kHalf || xt == at::kBFloat16;
  bool all_x = true, all_float = true;
  for (const OptTensor* p : params) {
    if (!p->has_value()) continue;
    all_x = all_x && (*p)->scalar_type() == xt;
    all_float = all_float && (*p)->scalar_type() == at::kFloat;
  }
  return all_x || (reduced && all_float);
}

// Running buffers the C++ update takes (cpu::batch_norm_update_stats_): contiguous float32/float64, one dtype.
bool update_buffers_ok(const at::Tensor& rm, const at::Tensor& rv) {
  return rm.is_contiguous() && rv.is_contiguous() && rm.scalar_type() == rv.scalar_type() &&
         (rm.scalar_type() == at::kFloat || rm.scalar_type() == at::kDouble);
}

// batch_norm_act(input, running_mean, running_var, weight, bias, training, momentum, eps, activation,
//                negative_slope, prelu_weight, dropout): dlkernels.functional.batch_norm_act's arguments
py::object batch_norm_act(py::handle input, py::handle running_mean, py::handle running_var, py::handle weight,
                          py::handle bias, py::handle training, py::handle momentum, py::handle eps,
                          py::handle activation, py::handle negative_slope, py::handle prelu_weight,
                          py::handle dropout) {
  const at::Tensor* x = float_tensor(input.ptr());
  if (x == nullptr || x->dim() < 2 || x->numel() == 0) return py::none();
  const int64_t channels = x->size(1);
  OptTensor rm, rv, w, b, prelu;
  int64_t act = 0;
  double eps_v = 0, slope = 0, p = 0, mom = 0;
  if (!optional_tensor(running_mean.ptr(), rm) || !optional_tensor(running_var.ptr(), rv) ||
      rm.has_value() != rv.has_value() || !optional_tensor(weight.ptr(), w) || !optional_tensor(bias.ptr(), b) ||
      !activation_code(activation.ptr(), act) || !number(eps.ptr(), eps_v) || !number(negative_slope.ptr(), slope) ||
      !number(dropout.ptr(), p) || p != 0.0 || (training.ptr() != Py_True && training.ptr() != Py_False))
    return py::none();
  for (const OptTensor* t : {&rm, &rv, &w, &b})
    if (t->has_value() && (*t)->numel() != channels) return py::none();
  if (act == kActPrelu) {
    if (!optional_tensor(prelu_weight.ptr(), prelu) || !prelu.has_value() ||
        (prelu->numel() != 1 && prelu->numel() != channels))
      return py::none();
  } else if (prelu_weight.ptr() != Py_None) {
    return py::none();
  }
  if (!dtypes_ok(*x, {&rm, &rv, &w, &b})) return py::none();
  const bool train = training.ptr() == Py_True;
  if (train) {
    if (x->numel() / channels <= 1 || !(eps_v > 0)) return py::none();
    if (rm.has_value() && (!PyFloat_CheckExact(momentum.ptr()) || !number(momentum.ptr(), mom) || !update_buffers_ok(*rm, *rv))) return py::none();
  } else if (!(eps_v >= 0) || !rm.has_value()) {
    return py::none();
  }
  if (!plain_call()) return py::none();

  const bool grad = records_grad({x, w ? &*w : nullptr, b ? &*b : nullptr, prelu ? &*prelu : nullptr});
  if (!train) {
    return wrap(grad ? Eval::apply(*x, *rm, *rv, w, b, prelu, eps_v, act, slope)
                     : cpu::batch_norm_act_eval(*x, *rm, *rv, w, b, prelu, eps_v, act, slope));
  }
  at::Tensor y;
  std::pair<at::Tensor, at::Tensor> stats;
  if (grad) {
    y = Train::apply(*x, w, b, prelu, eps_v, act, slope, &stats);
  } else {
    auto [out, mean, invstd, var] = cpu::batch_norm_act_train(*x, w, b, prelu, eps_v, act, slope, 0.0, 0);
    y = out;
    stats = {mean, var};
  }
  if (rm.has_value()) cpu::batch_norm_update_stats_(*rm, *rv, stats.first, stats.second, x->numel() / channels, mom);
  return wrap(std::move(y));
}

void bind(py::module_& m) {
  m.def("batch_norm_act", &batch_norm_act, py::arg("input"), py::arg("running_mean"), py::arg("running_var"),
        py::arg("weight"), py::arg("bias"), py::arg("training"), py::arg("momentum"), py::arg("eps"),
        py::arg("activation"), py::arg("negative_slope"), py::arg("prelu_weight"), py::arg("dropout"));
}

}  // namespace
}  // namespace dlk::eager

DLK_REGISTER_EAGER(batch_norm, &dlk::eager::bind);

// The eager fast path (docs/DESIGN.md, "The op path and its per-call cost"): for a plain eager call
// on CPU tensors, one C++ call does what the Python op path does in several (the argument checks,
// the kernel, the autograd node). An entry returns None whenever the call is anything else - a
// tensor subclass, a dispatch or torch-function mode, JIT tracing, a functorch transform, another
// backend asked for, an argument torch would reject - and the caller then takes the Python op
// path, which raises torch's errors and goes through the custom op. So this layer never decides an
// error message or a backend; it only recognizes the common valid call and runs the cpu backend's
// kernels on it, which is what the Python path would have run.
#pragma once
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include "../registry.h"

#include <initializer_list>
#include <optional>

namespace dlk::eager {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The call as a whole may take the fast path: no dispatch or torch-function mode, no JIT tracing,
// no functorch transform, and the backend asked for (dlkernels.use_backend, else DLK_BACKEND) is
// none or "cpu".
bool plain_call();

// The tensor behind a Python argument when it is a plain CPU tensor: exactly torch.Tensor or
// nn.Parameter (no subclass), dense strided storage on the CPU, no negative/conjugate view bit, no
// forward-mode tangent. Null otherwise.
const at::Tensor* cpu_tensor(PyObject* obj);

// As cpu_tensor for a floating-point tensor (float32, float64, float16, bfloat16).
const at::Tensor* float_tensor(PyObject* obj);

// An optional tensor argument: None -> nullopt (true); a cpu_tensor -> it (true); otherwise false.
bool optional_tensor(PyObject* obj, std::optional<at::Tensor>& out);

// A Python float or int (not bool, not a 0-d tensor: those take the Python path) as a double.
bool number(PyObject* obj, double& out);

// Autograd records this call: grad mode is on and some input requires grad.
bool records_grad(std::initializer_list<const at::Tensor*> inputs);

inline pybind11::object wrap(at::Tensor t) {
  return pybind11::reinterpret_steal<pybind11::object>(THPVariable_Wrap(std::move(t)));
}

// Outputs of a backward that are not differentiable again (ops without a double backward): when
// `inputs` (the backward's) record a graph (create_graph=True), a second backward through the outputs
// raises `message` instead of silently giving zero, as torch's once_differentiable.
variable_list once_differentiable(variable_list outputs, std::initializer_list<const at::Tensor*> inputs,
                                  const std::string& message);

}  // namespace dlk::eager

// The eager fast path's shared checks (eager.h) and the dlkernels._C.eager submodule's set-up.
#include "eager.h"

#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/jit/frontend/tracer.h>

#include <cstdlib>
#include <cstring>

namespace dlk::eager {
namespace {

// dlkernels._backend's use_backend ContextVar, handed over when that module loads.
PyObject* backend_var = nullptr;

// A backend name the fast path may run under: unset (automatic) or the cpu backend.
bool automatic_or_cpu(const char* name) {
  return name == nullptr || name[0] == '\0' || std::strcmp(name, "auto") == 0 || std::strcmp(name, "cpu") == 0;
}

bool backend_allows_cpu() {
  if (backend_var == nullptr) return false;
  PyObject* value = nullptr;
  if (PyContextVar_Get(backend_var, nullptr, &value) < 0) {
    PyErr_Clear();
    return false;
  }
  const bool unset = value == nullptr || value == Py_None;
  bool ok = unset;
  if (!unset) ok = PyUnicode_Check(value) && PyUnicode_CompareWithASCIIString(value, "cpu") == 0;
  Py_XDECREF(value);
  // use_backend's answer wins; DLK_BACKEND only counts when use_backend asked for nothing
  return unset ? automatic_or_cpu(std::getenv("DLK_BACKEND")) : ok;
}

// What a plain dense CPU tensor carries, and nothing else (no Negative/Conjugate bit, no functorch
// wrapper, no nested, sparse, quantized or MKL-DNN storage).
const c10::DispatchKeySet kPlainCpu{c10::DispatchKey::CPU, c10::DispatchKey::ADInplaceOrView,
                                    c10::DispatchKey::AutogradCPU, c10::DispatchKey::AutocastCPU};

// What plain eager execution includes in the thread's dispatch keys. A functorch transform adds its
// FuncTorchDynamicLayer keys, a dispatch mode (FakeTensorMode, make_fx, ...) its Python keys.
const c10::DispatchKeySet kPlainIncluded{c10::DispatchKey::BackendSelect, c10::DispatchKey::ADInplaceOrView};

}  // namespace

bool plain_call() {
  return (c10::impl::tls_local_dispatch_key_set().included_ | kPlainIncluded) == kPlainIncluded &&
         c10::impl::TorchDispatchModeTLS::stack_len() == 0 && !at::impl::torch_function_mode_enabled() &&
         !torch::jit::tracer::isTracing() && backend_allows_cpu();
}

const at::Tensor* cpu_tensor(PyObject* obj) {
  if (!THPVariable_CheckExact(obj)) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(obj);
  const c10::DispatchKeySet keys = t.key_set();
  if (!keys.has(c10::DispatchKey::CPU) || (keys | kPlainCpu) != kPlainCpu || t.layout() != at::kStrided) return nullptr;
  if (t._fw_grad(/*level=*/0).defined()) return nullptr;  // forward-mode AD: the custom op's business
  return &t;
}

const at::Tensor* float_tensor(PyObject* obj) {
  const at::Tensor* t = cpu_tensor(obj);
  return t != nullptr && at::isFloatingType(t->scalar_type()) ? t : nullptr;
}

bool optional_tensor(PyObject* obj, std::optional<at::Tensor>& out) {
  if (obj == Py_None) {
    out.reset();
    return true;
  }
  const at::Tensor* t = cpu_tensor(obj);
  if (t == nullptr) return false;
  out = *t;
  return true;
}

bool number(PyObject* obj, double& out) {
  if (PyFloat_CheckExact(obj)) {
    out = PyFloat_AS_DOUBLE(obj);
    return true;
  }
  if (PyLong_CheckExact(obj)) {  // bool is a subclass of int, not int itself: excluded
    out = PyLong_AsDouble(obj);
    if (out == -1.0 && PyErr_Occurred()) {
      PyErr_Clear();
      return false;
    }
    return true;
  }
  return false;
}

bool records_grad(std::initializer_list<const at::Tensor*> inputs) {
  if (!at::GradMode::is_enabled()) return false;
  for (const at::Tensor* t : inputs)
    if (t != nullptr && t->defined() && t->requires_grad()) return true;
  return false;
}

variable_list once_differentiable(variable_list outputs, std::initializer_list<const at::Tensor*> inputs,
                                  const std::string& message) {
  if (!records_grad(inputs)) return outputs;
  // as torch.autograd.function.once_differentiable: aliases that require grad, so the error node attaches
  for (at::Tensor& t : outputs)
    if (t.defined()) t = t.detach().requires_grad_(true);
  return torch::autograd::DelayedError(message, static_cast<int64_t>(outputs.size())).apply(std::move(outputs));
}

namespace {

void bind_eager(pybind11::module_& m) {
  m.def("set_backend_var", [](pybind11::object var) {
    TORCH_CHECK(PyContextVar_CheckExact(var.ptr()), "set_backend_var: a contextvars.ContextVar expected");
    Py_XDECREF(backend_var);
    backend_var = var.release().ptr();
  }, "the use_backend ContextVar of dlkernels._backend (called once, when it loads)");
  m.def("plain_call", &plain_call, "whether a call here may take the eager fast path (tests)");
}

}  // namespace
}  // namespace dlk::eager

DLK_REGISTER_EAGER(shared, &dlk::eager::bind_eager);

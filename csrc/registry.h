// Self-registration of a family's Python bindings: csrc/bind/<family>.cpp says
//   DLK_REGISTER_FAMILY(<family>, BIND)   with   #define BIND(m, ns) m.def("op", &ns::op, ...);
// and bindings.cpp, which knows no family, calls every registered BIND on the `cpu` submodule
// (namespace dlk::cpu) and, in a CUDA build, on the `cuda` submodule (namespace dlk::cuda).
// csrc/eager/<family>.cpp registers its one-call eager entries the same way, for the `eager`
// submodule: DLK_REGISTER_EAGER(<family>, bind) with void bind(pybind11::module_&).
#pragma once
#include <torch/extension.h>

#include <vector>

namespace dlk {

// What one registration binds on each submodule; null where it binds nothing there.
struct FamilyBinding {
  const char* family;
  void (*bind_cpu)(pybind11::module_&);
  void (*bind_cuda)(pybind11::module_&);  // null in a CPU-only build, or for a CPU-only helper
  void (*bind_eager)(pybind11::module_&) = nullptr;
};

// Function-local static: filled by static initializers of the bind files, in any order.
inline std::vector<FamilyBinding>& family_bindings() {
  static std::vector<FamilyBinding> all;
  return all;
}

struct RegisterFamily {
  explicit RegisterFamily(FamilyBinding b) { family_bindings().push_back(b); }
};

}  // namespace dlk

#ifdef DLK_WITH_CUDA
#define DLK_BIND_CUDA_FN(family, BIND) \
  [](pybind11::module_& m) { namespace py = pybind11; BIND(m, ::dlk::cuda) }
#else
#define DLK_BIND_CUDA_FN(family, BIND) nullptr
#endif

#define DLK_REGISTER_FAMILY(family, BIND)                                                        \
  static const ::dlk::RegisterFamily dlk_register_##family({                                     \
      #family, [](pybind11::module_& m) { namespace py = pybind11; BIND(m, ::dlk::cpu) },          \
      DLK_BIND_CUDA_FN(family, BIND)})

// Bindings on the `cpu` submodule only: host-side helpers of a family with no CUDA counterpart
// (e.g. batch norm's running-statistics update on CPU buffers).
#define DLK_REGISTER_CPU_ONLY(name, BIND_CPU)                                                    \
  static const ::dlk::RegisterFamily dlk_register_##name({                                       \
      #name, [](pybind11::module_& m) { namespace py = pybind11; BIND_CPU(m) }, nullptr})

// Eager entries (csrc/eager/eager.h) on the `eager` submodule.
#define DLK_REGISTER_EAGER(name, bind) \
  static const ::dlk::RegisterFamily dlk_register_eager_##name({#name, nullptr, nullptr, bind})

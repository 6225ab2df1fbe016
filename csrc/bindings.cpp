// The Python module dlkernels._C: submodule `cpu` always, `cuda` when built with CUDA, each holding
// the kernels of every family registered by csrc/bind/<family>.cpp, and `eager`, the entries of
// csrc/eager/<family>.cpp (see registry.h).
#include <torch/extension.h>

#include "cpu/simd.h"
#include "registry.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dlkernels compiled kernels";
  auto cpu = m.def_submodule("cpu", "C++ CPU kernels (OpenMP + SIMD)");
  auto eager = m.def_submodule("eager", "one-call eager entries for plain CPU calls (csrc/eager/eager.h)");
  for (const auto& family : dlk::family_bindings()) {
    if (family.bind_cpu != nullptr) family.bind_cpu(cpu);
    if (family.bind_eager != nullptr) family.bind_eager(eager);
  }
  cpu.def("capability", [] { return dlk::cpu::capability_name(dlk::cpu::capability()); },
          "SIMD level the CPU kernels run at: avx512, avx2 or default (DLK_CPU_CAPABILITY lowers it)");
  cpu.def("native_capability", [] { return dlk::cpu::capability_name(dlk::cpu::native_capability()); },
          "the best SIMD level this CPU supports");

  py::dict info;
#ifdef DLK_WITH_CUDA
  auto cuda = m.def_submodule("cuda", "CUDA C++ kernels");
  for (const auto& family : dlk::family_bindings())
    if (family.bind_cuda != nullptr) family.bind_cuda(cuda);
  info["cuda"] = true;
  info["cuda_arch_list"] = DLK_CUDA_ARCH_LIST;
#else
  info["cuda"] = false;
  info["cuda_arch_list"] = "";
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  m.attr("build_info") = info;
}

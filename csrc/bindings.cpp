// The Python module dlkernels._C: submodule `cpu` always, `cuda` when built with CUDA.
#include <torch/extension.h>

#include "api.h"
#include "cpu/simd.h"

#define DLK_BIND_ACTIVATION(m, ns)                                                       \
  m.def("leaky_relu", &ns::leaky_relu, py::arg("input"), py::arg("negative_slope"));     \
  m.def("leaky_relu_", &ns::leaky_relu_, py::arg("input"), py::arg("negative_slope"));   \
  m.def("leaky_relu_backward", &ns::leaky_relu_backward, py::arg("grad_output"),         \
        py::arg("input"), py::arg("negative_slope"));                                    \
  m.def("prelu", &ns::prelu, py::arg("input"), py::arg("weight"));                       \
  m.def("prelu_backward", &ns::prelu_backward, py::arg("grad_output"), py::arg("input"), \
        py::arg("weight"));

#define DLK_BIND_BATCH_NORM(m, ns)                                                             \
  m.def("batch_norm_stats", &ns::batch_norm_stats, py::arg("input"));                          \
  m.def("batch_norm_act_forward", &ns::batch_norm_act_forward, py::arg("input"), py::arg("mean"), \
        py::arg("invstd"), py::arg("weight"), py::arg("bias"), py::arg("prelu_weight"),          \
        py::arg("act"), py::arg("slope"));                                                     \
  m.def("batch_norm_act_backward_reduce", &ns::batch_norm_act_backward_reduce,                  \
        py::arg("grad_output"), py::arg("input"), py::arg("mean"), py::arg("invstd"),            \
        py::arg("weight"), py::arg("bias"), py::arg("prelu_weight"), py::arg("act"),             \
        py::arg("slope"));                                                                     \
  m.def("batch_norm_act_backward_elemt", &ns::batch_norm_act_backward_elemt,                    \
        py::arg("grad_output"), py::arg("input"), py::arg("mean"), py::arg("invstd"),            \
        py::arg("weight"), py::arg("bias"), py::arg("prelu_weight"), py::arg("sum_dz"),          \
        py::arg("sum_dz_xhat"), py::arg("count"), py::arg("act"), py::arg("slope"));          \
  m.def("batch_norm_act_train", &ns::batch_norm_act_train, py::arg("input"), py::arg("weight"),  \
        py::arg("bias"), py::arg("prelu_weight"), py::arg("eps"), py::arg("act"),               \
        py::arg("slope"));                                                                     \
  m.def("batch_norm_act_backward", &ns::batch_norm_act_backward, py::arg("grad_output"),        \
        py::arg("input"), py::arg("mean"), py::arg("invstd"), py::arg("weight"), py::arg("bias"), \
        py::arg("prelu_weight"), py::arg("act"), py::arg("slope"), py::arg("training"));

#define DLK_BIND_OPTIM(m, ns)                                                                    \
  m.def("grad_norm", &ns::grad_norm, py::arg("grads"), py::arg("norm_type"),                     \
        py::arg("clip_value"), py::arg("grad_scale"));                                           \
  m.def("adam_step_", &ns::adam_step_);                                                          \
  m.def("rmsprop_step_", &ns::rmsprop_step_);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dlkernels compiled kernels";
  auto cpu = m.def_submodule("cpu", "C++ CPU kernels (OpenMP + SIMD)");
  DLK_BIND_ACTIVATION(cpu, dlk::cpu)
  DLK_BIND_BATCH_NORM(cpu, dlk::cpu)
  DLK_BIND_OPTIM(cpu, dlk::cpu)
  cpu.def("capability", [] { return dlk::cpu::capability_name(dlk::cpu::capability()); },
          "SIMD level the CPU kernels run at: avx512, avx2 or default (DLK_CPU_CAPABILITY lowers it)");
  cpu.def("native_capability", [] { return dlk::cpu::capability_name(dlk::cpu::native_capability()); },
          "the best SIMD level this CPU supports");

  py::dict info;
#ifdef DLK_WITH_CUDA
  auto cuda = m.def_submodule("cuda", "CUDA C++ kernels");
  DLK_BIND_ACTIVATION(cuda, dlk::cuda)
  DLK_BIND_BATCH_NORM(cuda, dlk::cuda)
  DLK_BIND_OPTIM(cuda, dlk::cuda)
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

// Python bindings of the contrast_norm family: dlkernels._C.cpu.* and dlkernels._C.cuda.*, same names.
#include "../api/contrast_norm.h"
#include "../registry.h"

#define BIND(m, ns)                                                                              \
  m.def("global_contrast_norm", &ns::global_contrast_norm, py::arg("input"), py::arg("scale"),    \
        py::arg("lam"), py::arg("eps"), py::arg("style"), py::arg("subtract_mean"));              \
  m.def("global_contrast_norm_backward", &ns::global_contrast_norm_backward,                      \
        py::arg("grad_output"), py::arg("input"), py::arg("stats"), py::arg("subtract_mean"));       \
  m.def("local_contrast_norm", &ns::local_contrast_norm, py::arg("input"), py::arg("kernel_size"),   \
        py::arg("sigma"), py::arg("eps"), py::arg("divisor"), py::arg("across_channels"));          \
  m.def("local_contrast_norm_backward", &ns::local_contrast_norm_backward, py::arg("grad_output"),   \
        py::arg("input"), py::arg("kernel_size"), py::arg("sigma"), py::arg("eps"), py::arg("divisor"), \
        py::arg("across_channels"));

DLK_REGISTER_FAMILY(contrast_norm, BIND);

// Python bindings of the activation family: dlkernels._C.cpu.* and dlkernels._C.cuda.*, same names.
#include "../api/activation.h"
#include "../registry.h"

#define BIND(m, ns)                                                       \
  m.def("leaky_relu", &ns::leaky_relu, py::arg("input"), py::arg("negative_slope"));     \
  m.def("leaky_relu_", &ns::leaky_relu_, py::arg("input"), py::arg("negative_slope"));   \
  m.def("leaky_relu_backward", &ns::leaky_relu_backward, py::arg("grad_output"),         \
        py::arg("input"), py::arg("negative_slope"));                                    \
  m.def("prelu", &ns::prelu, py::arg("input"), py::arg("weight"));                       \
  m.def("prelu_backward", &ns::prelu_backward, py::arg("grad_output"), py::arg("input"), \
        py::arg("weight"));

DLK_REGISTER_FAMILY(activation, BIND);

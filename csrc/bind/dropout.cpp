// Python bindings of the dropout family: dlkernels._C.cpu.* and dlkernels._C.cuda.*, same names
// and argument names as dlkernels/reference/dropout.py (except philox4x32_10's key, two ints).
#include "../api/dropout.h"
#include "../registry.h"

#define BIND(m, ns)                                                                               \
  m.def("philox4x32_10", &ns::philox4x32_10, py::arg("counter"), py::arg("key0"), py::arg("key1")); \
  m.def("dropout_bits", &ns::dropout_bits, py::arg("x"), py::arg("seed"));                        \
  m.def("dropout", &ns::dropout, py::arg("x"), py::arg("p"), py::arg("seed"),                     \
        py::arg("per_channel"));                                                                  \
  m.def("leaky_relu_dropout", &ns::leaky_relu_dropout, py::arg("x"), py::arg("negative_slope"),   \
        py::arg("p"), py::arg("seed"));                                                           \
  m.def("leaky_relu_dropout_backward", &ns::leaky_relu_dropout_backward, py::arg("grad"),         \
        py::arg("x"), py::arg("negative_slope"), py::arg("p"), py::arg("seed"));                  \
  m.def("prelu_dropout", &ns::prelu_dropout, py::arg("x"), py::arg("weight"), py::arg("p"),       \
        py::arg("seed"));                                                                         \
  m.def("prelu_dropout_backward", &ns::prelu_dropout_backward, py::arg("grad"), py::arg("x"),     \
        py::arg("weight"), py::arg("p"), py::arg("seed"));

DLK_REGISTER_FAMILY(dropout, BIND);

// Python bindings of the optim family: dlkernels._C.cpu.* and dlkernels._C.cuda.*, same names.
#include "../api/optim.h"
#include "../registry.h"

#define BIND(m, ns)                                                                    \
  m.def("grad_norm", &ns::grad_norm, py::arg("grads"), py::arg("norm_type"),                     \
        py::arg("clip_value"), py::arg("grad_scale"));                                           \
  m.def("adam_step_", &ns::adam_step_);                                                          \
  m.def("rmsprop_step_", &ns::rmsprop_step_);

DLK_REGISTER_FAMILY(optim, BIND);

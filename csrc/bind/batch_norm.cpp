// Python bindings of the batch_norm family: dlkernels._C.cpu.* and dlkernels._C.cuda.*, same names.
#include "../api/batch_norm.h"
#include "../registry.h"

// The dropout arguments, last and optional: p = 0 is no dropout.
#define DROP py::arg("p") = 0.0, py::arg("seed") = 0

#define BIND(m, ns)                                                                               \
  m.def("batch_norm_stats", &ns::batch_norm_stats, py::arg("input"));                             \
  m.def("batch_norm_act_forward", &ns::batch_norm_act_forward, py::arg("input"), py::arg("mean"), \
        py::arg("invstd"), py::arg("weight"), py::arg("bias"), py::arg("prelu_weight"),           \
        py::arg("act"), py::arg("slope"), DROP);                                                  \
  m.def("batch_norm_act_backward_reduce", &ns::batch_norm_act_backward_reduce,                    \
        py::arg("grad_output"), py::arg("input"), py::arg("mean"), py::arg("invstd"),             \
        py::arg("weight"), py::arg("bias"), py::arg("prelu_weight"), py::arg("act"),              \
        py::arg("slope"), DROP);                                                                  \
  m.def("batch_norm_act_backward_elemt", &ns::batch_norm_act_backward_elemt,                      \
        py::arg("grad_output"), py::arg("input"), py::arg("mean"), py::arg("invstd"),             \
        py::arg("weight"), py::arg("bias"), py::arg("prelu_weight"), py::arg("sum_dz"),           \
        py::arg("sum_dz_xhat"), py::arg("count"), py::arg("act"), py::arg("slope"), DROP);        \
  m.def("batch_norm_act_eval", &ns::batch_norm_act_eval, py::arg("input"), py::arg("running_mean"), \
        py::arg("running_var"), py::arg("weight"), py::arg("bias"), py::arg("prelu_weight"),      \
        py::arg("eps"), py::arg("act"), py::arg("slope"));                                        \
  m.def("batch_norm_act_train", &ns::batch_norm_act_train, py::arg("input"), py::arg("weight"),   \
        py::arg("bias"), py::arg("prelu_weight"), py::arg("eps"), py::arg("act"),                 \
        py::arg("slope"), DROP);                                                                  \
  m.def("batch_norm_act_backward", &ns::batch_norm_act_backward, py::arg("grad_output"),          \
        py::arg("input"), py::arg("mean"), py::arg("invstd"), py::arg("weight"), py::arg("bias"), \
        py::arg("prelu_weight"), py::arg("act"), py::arg("slope"), py::arg("training"), DROP);

DLK_REGISTER_FAMILY(batch_norm, BIND);

// CPU-only: the running-statistics update of CPU buffers (dlkernels/ops/batch_norm.py's fast path).
#define BIND_CPU_ONLY(m)                                                                          \
  m.def("batch_norm_update_stats_", &::dlk::cpu::batch_norm_update_stats_, py::arg("running_mean"), \
        py::arg("running_var"), py::arg("mean"), py::arg("var"), py::arg("count"), py::arg("momentum"));

DLK_REGISTER_CPU_ONLY(batch_norm_cpu, BIND_CPU_ONLY);

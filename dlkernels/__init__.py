"""dlkernels: fused CPU (C++/OpenMP/SIMD), CUDA C++ and Triton kernels behind torch.nn-style
modules and functions, each checked against a plain-torch reference.

    import dlkernels
    act = dlkernels.nn.PReLU(64)              # drop-in for torch.nn.PReLU
    fused = dlkernels.fuse(model)             # dlkernels modules, BatchNorm -> activation fused
    with dlkernels.use_backend("reference"):  # or DLK_BACKEND=cpu|cuda|triton|reference
        ...
"""

# `ops` registers the torch.ops.dlkernels namespace.
from dlkernels import _backend, cpu, functional, nn, ops, optim
from dlkernels._backend import BACKENDS, BackendUnavailableError, use_backend
from dlkernels._fuse import fuse, unfuse

__version__ = "0.1.0"


def available_backends() -> dict[str, tuple[bool, str]]:
    """Each backend -> (usable here, why or why not)."""
    return _backend.status()


__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "cpu",
    "functional",
    "fuse",
    "nn",
    "ops",
    "optim",
    "unfuse",
    "use_backend",
]

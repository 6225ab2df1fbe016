"""`python -m dlkernels`: versions, backends (and why not), CPU SIMD path, and a quick
self-check of every usable backend against the reference implementation."""

from __future__ import annotations

import os
import platform
import sys

import torch

import dlkernels
from dlkernels import _backend
from dlkernels.ops import FAMILIES, family_module

TOLERANCE = 1e-4


def main() -> int:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(f"dlkernels {dlkernels.__version__}  torch {torch.__version__} (CUDA build: {torch.version.cuda})"
          f"  triton {triton_version}  python {platform.python_version()}")
    if _backend._C is not None:
        info = _backend._C.build_info
        print(f"extension: {_backend._C.__file__}\n  CUDA kernels: {info['cuda']}"
              f" (arch list {info['cuda_arch_list'] or '-'}), OpenMP: {info['openmp']},"
              f" CPU SIMD path: {_backend._C.cpu.capability()} (this CPU: {_backend._C.cpu.native_capability()};"
              f" DLK_CPU_CAPABILITY={os.environ.get('DLK_CPU_CAPABILITY', 'unset')}),"
              f" threads: {torch.get_num_threads()}")
    print("backends:")
    status = dlkernels.available_backends()
    for name in dlkernels.BACKENDS:
        ok, why = status[name]
        print(f"  {name:10s} {'available' if ok else 'unavailable':12s} {why}")
    print("self-check against the reference:")
    failed = False
    for name in dlkernels.BACKENDS:
        if name == "reference" or not status[name][0]:
            continue
        device = torch.device("cpu" if name == "cpu" or not torch.cuda.is_available() else "cuda")
        for family in FAMILIES:
            check = family_module(family).self_check
            with dlkernels.use_backend(name):
                try:
                    err = check(device)
                    ok = err <= TOLERANCE
                    detail = f"max abs error {err:.2e}"
                except dlkernels.BackendUnavailableError as e:  # a family this backend lacks
                    print(f"  {name:10s} {family:12s} {'n/a':7s} {e}")
                    continue
                except Exception as e:  # report every backend, then fail
                    ok, detail = False, f"{type(e).__name__}: {e}"
            failed |= not ok
            print(f"  {name:10s} {family:12s} {'ok' if ok else 'FAILED':7s} {detail} ({device.type})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""What the built extension carries: CPU SIMD clones, and the CUDA kernels for sm_80 and sm_90
when it was built with CUDA (checked in the binary with the cuobjdump shipped by triton)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from dlkernels import _backend

pytestmark = pytest.mark.skipif(_backend._C is None, reason="dlkernels._C is not built")


def _cuobjdump() -> str | None:
    try:
        import triton
    except ImportError:
        return shutil.which("cuobjdump")
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else shutil.which("cuobjdump")


def test_simd_path_is_reported():
    assert _backend._C.cpu.simd_path() in ("avx512", "avx2", "baseline")


def test_cuda_kernels_are_in_the_binary():
    info = _backend._C.build_info
    if not info["cuda"]:
        pytest.skip("built without CUDA (DLK_CUDA=0 or no CUDA toolkit)")
    assert hasattr(_backend._C, "cuda") and hasattr(_backend._C.cuda, "prelu_backward")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (ships with triton)")
    so = _backend._C.__file__
    elfs = subprocess.run([tool, "--list-elf", so], capture_output=True, text=True, check=True).stdout
    for arch in ("sm_80", "sm_90"):
        assert f"activation.{arch}.cubin" in elfs, elfs
    usage = subprocess.run([tool, "--dump-resource-usage", so], capture_output=True, text=True, check=True).stdout
    rows = re.findall(r"Function (\S+):\s+REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    assert rows, usage
    print("\nCUDA kernels (per arch): name  registers  stack  shared  local(spill)")
    for name, reg, stack, shared, local in rows:
        short = re.sub(r"_ZN3dlk4cuda\d+_GLOBAL__N__\w+?_cu_\w+?(\d+)", "", name)[:60]
        print(f"  {short:60s} {reg:>4s} {stack:>4s} {shared:>6s} {local:>4s}")
        assert int(local) == 0 and int(stack) == 0, f"{name} spills to local memory"

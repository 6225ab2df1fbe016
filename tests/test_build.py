"""What the built extension carries: CPU hot loops vectorized at every SIMD level, and the CUDA
kernels for sm_80 and sm_90 when it was built with CUDA (checked in the binary with objdump and
with the cuobjdump shipped by triton)."""

from __future__ import annotations

import collections
import os
import platform
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


def test_cpu_capability_is_reported_and_honoured():
    cpu = _backend._C.cpu
    levels = _backend.CPU_CAPABILITIES
    assert cpu.capability() in levels and cpu.native_capability() in levels
    assert levels.index(cpu.capability()) <= levels.index(cpu.native_capability())
    want = os.environ.get("DLK_CPU_CAPABILITY")
    if want in levels and levels.index(want) <= levels.index(cpu.native_capability()):
        assert cpu.capability() == want  # tests/test_cpu_capability.py runs the suite so


# What each level's hot loops must use: AVX2 ymm and AVX-512 zmm registers; the default level
# (SSE2, xmm only) packed arithmetic. A loop GCC left scalar shows only ss/sd instructions.
PACKED_SSE = re.compile(r"\s(add|sub|mul|div|max|min|and|andn|cmp\w*|sqrt)p[sd]\s"
                        r"|\s(padd|psub|pand|psrl|psll|pmul)\w*\s")
# Versions allowed to stay scalar, and why.
SCALAR_OK = {
    "norm_block_3": "the general-p gradient norm calls pow() per element (rare: p not in 1, 2, inf)",
}
SCALAR_OK_DEFAULT = {
    "adam_block": "the update's fused multiply-adds (torch's results need them) are libm calls without FMA",
    "rms_block": "the same",
}


def _versions() -> dict[tuple[str, str], collections.Counter]:
    """(function, level) -> counts of ymm/zmm operands and packed instructions, for every
    DLK_MULTIVERSION version in the binary."""
    out = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", _backend._C.__file__],
                         capture_output=True, text=True, check=True).stdout
    versions: dict[tuple[str, str], collections.Counter] = {}
    current = None
    for line in out.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if head:
            # name_<level>(signature): overloads (float, double, ...) are told apart by signature
            m = re.search(r"dlk::cpu::(?:\(anonymous namespace\)::)?(\w+)_(avx512|avx2|default)(\(.*)", head.group(1))
            current = versions.setdefault((m.group(1) + m.group(3), m.group(2)), collections.Counter()) if m else None
        elif current is not None:
            for reg in ("ymm", "zmm"):
                current[reg] += line.count("%" + reg)
            current["packed"] += bool(PACKED_SSE.search(line))
    return versions


@pytest.mark.skipif(platform.machine() != "x86_64" or shutil.which("objdump") is None,
                    reason="needs an x86-64 build and objdump")
def test_hot_loops_are_vectorized_at_every_level():
    versions = _versions()
    names = {name for name, _ in versions}
    assert len(names) >= 40, f"expected the CPU hot loops' versions in the binary, found {sorted(names)}"
    offenders = []
    for (name, level), found in sorted(versions.items()):
        base = name.split("(")[0]
        assert all((name, lv) in versions for lv in _backend.CPU_CAPABILITIES), name
        need = {"avx2": "ymm", "avx512": "zmm", "default": "packed"}[level]
        allowed = SCALAR_OK | (SCALAR_OK_DEFAULT if level == "default" else {})
        if found[need] == 0 and not any(base.startswith(k) for k in allowed):
            offenders.append(f"{level:7s} {name} (found: {dict(found)})")
    print(f"\n{len(names)} hot loops x 3 levels checked; allowed scalar: {SCALAR_OK}, "
          f"at the default level also: {SCALAR_OK_DEFAULT}")
    assert not offenders, "hot loops without vector instructions of their level:\n" + "\n".join(offenders)

"""The CPU kernels' numerical checks of every family at each SIMD level this CPU runs below its
best (the best level is what the rest of the test run uses): each level runs those tests in a
pytest subprocess under DLK_CPU_CAPABILITY=<level>, which the extension reads when it loads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dlkernels import _backend

HERE = Path(__file__).resolve().parent
# The backend-parametrized comparisons with torch and the reference (ids carry "cpu"), plus the
# build test, which checks that the forced level is the one in use.
FILES = ["test_activation.py", "test_batch_norm.py", "test_optim.py", "test_build.py"]
SELECT = "cpu and not compile"


def _lower_levels() -> list:
    if _backend._C is None:
        return [pytest.param("default", marks=pytest.mark.skip(reason="dlkernels._C is not built"))]
    levels = _backend.CPU_CAPABILITIES
    native = levels.index(_backend._C.cpu.native_capability())
    lower = list(levels[:native])
    return lower or [pytest.param("none", marks=pytest.mark.skip(reason="this CPU runs only the default level"))]


@pytest.mark.parametrize("level", _lower_levels())
def test_cpu_kernels_at_level(level):
    env = dict(os.environ, DLK_CPU_CAPABILITY=level)
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *FILES, "-k", SELECT]
    proc = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=1200)
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
    print(f"\nDLK_CPU_CAPABILITY={level}: {tail.splitlines()[-1] if tail else ''}")
    assert proc.returncode == 0, f"CPU tests at DLK_CPU_CAPABILITY={level} failed:\n{tail}"

"""The examples run: examples/train_digits.py in its reduced setting (--smoke), in a subprocess
as a user would start it. Nothing here is timed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_train_digits_smoke(tmp_path: Path) -> None:
    pytest.importorskip("sklearn", reason="examples/train_digits.py needs scikit-learn (requirements-dev.txt)")
    pytest.importorskip("matplotlib", reason="examples/train_digits.py needs matplotlib (requirements-dev.txt)")
    out = tmp_path / "curves.png"
    # the checkout first on the path: the example imports the dlkernels being tested
    path = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "train_digits.py"), "--smoke", "--seed", "1",
                           "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # one summary line per run, each with an accuracy in [0, 100] %
    accs = dict(re.findall(r"^\s*(torch|dlkernels): test accuracy ([\d.]+)%", proc.stdout, flags=re.M))
    assert set(accs) == {"torch", "dlkernels"}, proc.stdout
    assert all(0.0 <= float(a) <= 100.0 for a in accs.values())
    assert out.is_file() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

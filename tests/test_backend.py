"""Backend selection, graceful degradation without the extension, and `python -m dlkernels`."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

import dlkernels
import dlkernels.functional as F
from dlkernels import _backend


def test_use_backend_nests_and_restores():
    assert _backend.requested() in (None, os.environ.get("DLK_BACKEND"))
    with dlkernels.use_backend("reference"):
        assert _backend.select(torch.device("cpu")) == "reference"
        with dlkernels.use_backend(None):
            assert _backend.select(torch.device("cpu")) in ("cpu", "reference")
        assert _backend.requested() == "reference"


def test_automatic_choice_by_device():
    with dlkernels.use_backend(None):
        expected_cpu = "cpu" if _backend._C is not None else "reference"
        assert _backend.select(torch.device("cpu")) == expected_cpu
        assert _backend.select(torch.device("meta")) == "reference"
        if _backend._C is not None and _backend._C.build_info["cuda"]:
            assert _backend.select(torch.device("cuda")) == "cuda"


def test_unknown_backend_is_a_clear_error(monkeypatch):
    with pytest.raises(ValueError, match="unknown dlkernels backend 'gpu'"):
        with dlkernels.use_backend("gpu"):
            pass
    monkeypatch.setenv("DLK_BACKEND", "fast")
    with pytest.raises(ValueError, match="DLK_BACKEND='fast'"):
        F.leaky_relu(torch.randn(3))


def test_env_variable_selects_backend(monkeypatch):
    monkeypatch.setenv("DLK_BACKEND", "reference")
    assert _backend.select(torch.device("cpu")) == "reference"
    with dlkernels.use_backend("cpu" if _backend._C is not None else "reference"):
        assert _backend.select(torch.device("cpu")) != "reference" or _backend._C is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_unavailable_backend_names_what_is_missing():
    with dlkernels.use_backend("cuda"), pytest.raises(dlkernels.BackendUnavailableError, match="cuda"):
        F.leaky_relu(torch.randn(3))
    if os.environ.get("TRITON_INTERPRET") != "1":
        with dlkernels.use_backend("triton"), pytest.raises(dlkernels.BackendUnavailableError,
                                                            match="TRITON_INTERPRET=1"):
            F.prelu(torch.randn(3), torch.rand(1))


@pytest.mark.skipif(_backend._C is None, reason="dlkernels._C is not built")
def test_cpu_backend_refuses_other_devices():
    with dlkernels.use_backend("cpu"), pytest.raises(dlkernels.BackendUnavailableError, match="meta"):
        _backend.select(torch.device("meta"))


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_missing_extension_warns_once_and_uses_reference():
    code = (
        "import sys, warnings\n"
        "sys.modules['dlkernels._C'] = None  # makes `from dlkernels import _C` raise ImportError\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch, dlkernels, dlkernels.functional as F\n"
        "    y = F.prelu(torch.tensor([-1.0, 2.0]), torch.tensor([0.5]))\n"
        "msgs = [str(x.message) for x in w if 'dlkernels._C' in str(x.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert y.tolist() == [-0.5, 2.0]\n"
        "assert not dlkernels.available_backends()['cpu'][0]\n"
        "print('ok')\n"
    )
    out = _run(code, DLK_BACKEND="")
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_python_m_dlkernels_reports_every_backend():
    out = subprocess.run([sys.executable, "-m", "dlkernels"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    for name in dlkernels.BACKENDS:
        assert f"  {name} " in out.stdout
    assert "FAILED" not in out.stdout
    if _backend._C is not None:
        assert "CPU SIMD path" in out.stdout
        assert "cpu        activation   ok" in out.stdout


def test_automatic_backend_without_a_kernel_warns_once(monkeypatch):
    """An automatically chosen backend that lacks a kernel runs the reference, with a warning."""
    monkeypatch.delenv("DLK_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "select", lambda device: "cpu")
    monkeypatch.setattr(_backend, "_module", lambda backend, family: (
        __import__("dlkernels.reference.activation", fromlist=["x"]) if backend == "reference" else object()))
    monkeypatch.setattr(_backend, "_fallbacks_warned", set())
    monkeypatch.setattr(_backend, "_resolved", {})
    with pytest.warns(RuntimeWarning, match="backend 'cpu' .* has no activation kernel 'leaky_relu'.*reference"):
        fn = _backend.impl("activation", "leaky_relu", torch.device("cpu"))
    assert fn is dlkernels.reference.activation.leaky_relu
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _backend.impl("activation", "leaky_relu", torch.device("cpu"))  # once only
    with dlkernels.use_backend("cpu"), pytest.raises(dlkernels.BackendUnavailableError, match="no activation kernel"):
        _backend.impl("activation", "leaky_relu", torch.device("cpu"))

"""Shared test helpers: which backends can run here, and the tolerance rule of DESIGN.md."""

from __future__ import annotations

import pytest
import torch

import dlkernels

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Absolute slack on top of "twice torch's own error against float64".
ATOL = {torch.float32: 1e-6, torch.float64: 1e-12, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def backend_params(device: str = "cpu") -> list:
    """One pytest param per backend, skipped with the reason when it cannot run on `device`."""
    status = dlkernels.available_backends()
    params = []
    for name in dlkernels.BACKENDS:
        ok, why = status[name]
        reason = why
        if device == "cpu" and name == "cuda":
            ok, reason = False, "the cuda backend runs CUDA tensors only"
        if device == "cuda" and not torch.cuda.is_available():
            ok, reason = False, "no CUDA device on this machine"
        if device == "cuda" and name == "cpu":
            ok, reason = False, "the cpu backend runs CPU tensors only"
        marks = [] if ok else [pytest.mark.skip(reason=f"{name}: {reason}")]
        params.append(pytest.param(name, id=name, marks=marks))
    return params


def assert_close_like_torch(ours: torch.Tensor, theirs: torch.Tensor, exact: torch.Tensor) -> None:
    """ours must be within 2x torch's own error against a float64 computation, plus a small atol."""
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    ours64, theirs64, exact64 = ours.double(), theirs.double(), exact.double()
    assert torch.equal(ours64.isnan(), exact64.isnan())
    finite = ~exact64.isnan()
    err = (ours64 - exact64)[finite].abs().max().item() if finite.any() else 0.0
    torch_err = (theirs64 - exact64)[finite].abs().max().item() if finite.any() else 0.0
    scale = exact64[finite].abs().max().item() if finite.any() else 0.0
    bound = 2 * torch_err + ATOL[ours.dtype] * max(1.0, scale)
    assert err <= bound, f"max error {err:.3g} > bound {bound:.3g} (torch's own error {torch_err:.3g})"


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``gpu`` (each family's GPU runtime tests; ``pytest -m gpu`` runs them all)
    skip where no CUDA device is visible."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

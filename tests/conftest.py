"""Shared test helpers: which backends can run here, the tolerance rule of DESIGN.md, and the
inputs of the dropout tests (seeds, Philox known answers, tensors in every memory layout)."""

from __future__ import annotations

import zlib
from collections.abc import Callable

import numpy as np
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


def seed_of(*tag) -> int:
    """A 64-bit seed as the signed int64 the kernels take, from a stable hash of tag."""
    h = zlib.crc32(repr(tag).encode())
    return ((h * 0x9E3779B97F4A7C15) % 2**64) - 2**63


SEEDS = [0, 1, -1, 2**63 - 1, -(2**63), seed_of("seeds")]

# Random123's tests/kat_vectors, the three "philox4x32 10" lines (counter, key, output): the table
# of docs/dropout.md, checked against the Python, Triton and C++ Philox. Also copied in
# Random123-Boost's libs/random/test/test_philox.cpp and TensorFlow's Philox tests.
PHILOX_KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]  # fmt: skip
PHILOX_KAT_IDS = ["zeros", "ones", "pi"]


def make_layout(shape, dtype, layout: str, tag="x") -> torch.Tensor:
    """Random normal values of `shape` in `layout`: contiguous, channels_last(_3d), strided (not
    dense: transposed and sliced), permuted (dense, an unusual 5-d dim order) or deep (dense, a
    dim order that coalesces to more dims than the kernels' index map holds)."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, str(dtype), layout, tag)).encode()))
    if layout == "strided":
        # converted before slicing: .to() of a non-dense tensor returns a dense copy
        big = torch.randn(tuple(reversed(shape[:-1])) + (2 * shape[-1],), generator=gen, dtype=torch.float64)
        x = big.to(dtype)[..., ::2].permute(*reversed(range(len(shape) - 1)), len(shape) - 1)
    elif layout == "permuted":
        perm = (3, 0, 4, 2, 1)
        inv = [perm.index(d) for d in range(5)]
        x = torch.randn([shape[d] for d in perm], generator=gen, dtype=torch.float64).permute(*inv)
    elif layout == "deep":
        x = torch.randn(tuple(reversed(shape)), generator=gen, dtype=torch.float64).permute(
            *reversed(range(len(shape)))
        )
    else:
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)
        elif layout == "channels_last_3d":
            x = x.to(memory_format=torch.channels_last_3d)
    x = x.to(dtype)
    assert x.shape == shape
    assert (layout == "strided") == (x.stride() != torch.empty_like(x).stride())  # not dense, or dense
    return x


def case_gen(*case) -> torch.Generator:
    """A generator seeded from a stable hash of the case."""
    return torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))


def make_image(shape, dtype, layout="contiguous", *case) -> torch.Tensor:
    """Images of values around 1 with unit-ish contrast (the contrast-normalization tests), in
    `layout`: contiguous, channels_last or strided (every other column of a wider tensor)."""
    gen = case_gen(shape, dtype, layout, *case)
    if layout == "strided":
        x = torch.randn(*shape[:-1], 2 * shape[-1], generator=gen, dtype=torch.float64)[..., ::2] * 2 + 1
    else:
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)
    return x.to(dtype)


def check_image_module(
    m: torch.nn.Module, functional: Callable[[torch.Tensor], torch.Tensor], tol: float
) -> tuple[torch.Tensor, np.ndarray]:
    """The inputs every contrast-normalization module takes, against `functional` on a float
    batch: a uint8 (N, C, H, W) batch and one (C, H, W) image (float32 out, values kept: no / 255),
    numpy N,C,H,W and H,W,C images (numpy out, in their layout), negative strides and float64.
    Returns the batch and the H,W,C image for the module's own checks."""
    batch = torch.randint(0, 256, (3, 3, 8, 9), generator=case_gen("module"), dtype=torch.uint8)
    want = functional(batch.float())
    torch.testing.assert_close(m(batch), want)
    assert m(batch).dtype == torch.float32
    torch.testing.assert_close(m(batch[1]), want[1])  # one C,H,W image
    out = m(batch.numpy())  # numpy N,C,H,W -> numpy N,C,H,W
    assert isinstance(out, np.ndarray) and out.shape == (3, 3, 8, 9) and out.dtype == np.float32
    np.testing.assert_allclose(out, want.numpy(), rtol=tol, atol=tol)
    hwc = batch[2].permute(1, 2, 0).numpy()  # numpy H,W,C image -> numpy H,W,C
    out = m(hwc)
    assert isinstance(out, np.ndarray) and out.shape == hwc.shape
    np.testing.assert_allclose(out, want[2].permute(1, 2, 0).numpy(), rtol=tol, atol=tol)
    np.testing.assert_allclose(m(hwc[:, ::-1]), m(np.ascontiguousarray(hwc[:, ::-1])))  # negative strides
    assert m(hwc.astype(np.float64)).dtype == np.float64
    return batch, hwc


def compare_with_spec(
    backend: str,
    fn: Callable[[torch.Tensor], torch.Tensor],
    spec: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    grad_seed: str = "g",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of fn (dlkernels, under `backend`) vs `spec` in x's dtype and in
    float64, each on its own copy of x (the contrast-normalization tests); returns fn's output and
    input gradient."""
    # fn gets x's own layout (a clone would make a strided view dense); the spec a copy
    xs = [x.detach().requires_grad_(), x.detach().clone().requires_grad_()]
    x64 = x.detach().double().requires_grad_()
    with dlkernels.use_backend(backend):
        y = fn(xs[0])
    y_t, y64 = spec(xs[1]), spec(x64)
    assert_close_like_torch(y, y_t, y64)
    g = torch.randn(x.shape, generator=case_gen(x.shape, grad_seed), dtype=torch.float64).to(x.dtype).to(x.device)
    with dlkernels.use_backend(backend):
        (gx,) = torch.autograd.grad(y, xs[0], g)
    (gx_t,) = torch.autograd.grad(y_t, xs[1], g)
    (gx64,) = torch.autograd.grad(y64, x64, g.double())
    assert_close_like_torch(gx, gx_t, gx64)
    return y, gx


def assert_same_for_thread_counts(
    backend: str, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, g: torch.Tensor
) -> None:
    """fn(x) and its gradient for grad output g under `backend` with 1, 2 and 3 threads: the same
    bits (the thread count restored after)."""
    threads = torch.get_num_threads()
    out = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            with dlkernels.use_backend(backend):
                y = fn(x)
                out.append((y, *torch.autograd.grad(y, x, g)))
    finally:
        torch.set_num_threads(threads)
    for other in out[1:]:
        for a, b in zip(out[0], other, strict=True):
            assert torch.equal(a, b)

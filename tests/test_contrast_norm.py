"""Global contrast normalization on every backend against the float64 reference of each formula
(dlkernels.reference.contrast_norm.gcn), forward and backward, over styles, dtypes, layouts and
dims; hand-worked values, constant images, pylearn2's behaviour, the module's inputs (one image,
uint8, numpy), gradcheck, opcheck, torch.compile and bad input."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import DTYPES, assert_same_for_thread_counts, backend_params, check_image_module, compare_with_spec
from conftest import case_gen as _gen
from conftest import make_image as make

import dlkernels
import dlkernels.functional as F
from dlkernels.reference.contrast_norm import gcn

BACKENDS = backend_params("cpu")
STYLES = ["book", "pylearn2_std", "pylearn2_l2"]


def compare(backend, x, kwargs, grad_seed="g"):
    """Forward and backward of dlkernels (backend) vs the spec in x's dtype and in float64."""
    dims = kwargs.get("dims")
    dims = [dims] if isinstance(dims, int) else dims  # the spec takes a list of dims
    spec = {k: v for k, v in kwargs.items() if k != "dims"}
    y, _ = compare_with_spec(backend, lambda t: F.global_contrast_norm(t, **kwargs),
                             lambda t: gcn(t, dims=dims, **spec), x, grad_seed)
    return y


# ---- against the reference formulas ----

SHAPES = [((3, 5, 7, 11), "contiguous"), ((3, 5, 7, 11), "channels_last"), ((3, 5, 7, 11), "strided"),
          ((2, 3000), "contiguous"), ((7,), "contiguous"), ((1, 1, 1, 1), "contiguous")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", SHAPES, ids=str)
def test_dtypes_layouts(backend, dtype, shape, layout):
    x = make(shape, dtype, layout)
    y = compare(backend, x, dict(scale=1.5, lam=0.1, eps=1e-8))
    if layout == "channels_last":
        assert y.stride() == x.stride()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("subtract_mean", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_styles(backend, style, subtract_mean, dtype):
    x = make((4, 3, 6, 5), dtype, "contiguous", style)
    for lam, eps in ((0.0, 1e-8), (10.0, 0.0), (0.5, 1e-3)):
        compare(backend, x, dict(scale=2.0, lam=lam, eps=eps, style=style, subtract_mean=subtract_mean))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dims", [(1,), (2, 3), (0, 2), 0, (-1, 1), (0, 1, 2, 3)], ids=str)
def test_dims(backend, dims):
    x = make((3, 4, 5, 6), torch.float32, "channels_last", dims)
    compare(backend, x, dict(scale=1.0, lam=0.2, eps=1e-8, style="pylearn2_std", dims=dims))


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] in ("cpu", "reference")])
def test_large_examples_split_path(backend):
    # few examples longer than one parallel task: the CPU splits within examples
    x = make((2, 40000), torch.float32)
    compare(backend, x, dict(scale=1.0, lam=0.0, eps=1e-8))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(backend):
    for shape in ((0, 3, 4), (0,)):
        x = torch.empty(shape, requires_grad=True)
        with dlkernels.use_backend(backend):
            y = F.global_contrast_norm(x)
            y.sum().backward()
        assert y.shape == x.shape and x.grad.shape == x.shape


# ---- hand-worked values ----

C = torch.tensor([-1.5, -0.5, 0.5, 1.5], dtype=torch.float64)  # [1, 2, 3, 4] minus its mean 2.5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("style,scale,lam,want", [
    ("book", 1.0, 0.0, C / 1.25 ** 0.5),  # mean(c^2) = 1.25
    ("book", 2.0, 0.75, C * 2 ** 0.5),  # 2 c / sqrt(0.75 + 1.25)
    ("pylearn2_std", 1.0, 1 / 3, C / 2 ** 0.5),  # var(ddof=1) = 5/3; sqrt(1/3 + 5/3)
    ("pylearn2_l2", 3.0, 4.0, C),  # sum(c^2) = 5; sqrt(4 + 5) / 3 = 1
])
def test_hand_worked(backend, style, scale, lam, want):
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=torch.float64)
    with dlkernels.use_backend(backend):
        y = F.global_contrast_norm(x, scale, lam, 1e-8, style=style)
    torch.testing.assert_close(y.flatten(), want, rtol=1e-12, atol=1e-12)


# ---- constant images and pylearn2's replacement ----

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_constant_image(backend, style, dtype):
    x = torch.full((2, 3, 4, 4), 0.7, dtype=dtype).requires_grad_()
    g = make((2, 3, 4, 4), dtype, "contiguous", "g")
    g64 = g.double().reshape(2, -1)
    for lam, eps, inv in ((0.0, 1e-3, None), (0.0, 0.0, 0.0)):
        if inv is None:  # the constant branch: scale / eps (book) or 1 (pylearn2)
            inv = 2.0 / eps if style == "book" else 1.0
        with dlkernels.use_backend(backend):
            y = F.global_contrast_norm(x, 2.0, lam, eps, style=style)
            (gx,) = torch.autograd.grad(y, x, g)
        assert torch.isfinite(y).all() and torch.isfinite(gx).all()
        assert (y == 0).all()
        want = inv * (g64 - g64.mean(1, keepdim=True))
        tol = 1e-12 if dtype == torch.float64 else 1e-5 * max(inv, 1) if dtype == torch.float32 else 1e-2 * max(inv, 1)
        torch.testing.assert_close(gx.double().reshape(2, -1), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_over_zero_without_mean(backend):
    x = torch.zeros(3, 8, requires_grad=True)
    with dlkernels.use_backend(backend):
        y = F.global_contrast_norm(x, 1.0, 0.0, 0.0, subtract_mean=False)
        (gx,) = torch.autograd.grad(y, x, torch.randn(3, 8, generator=_gen("z")))
    assert (y == 0).all() and (gx == 0).all()


def pylearn2_global_contrast_normalize(X, scale=1.0, subtract_mean=True, use_std=False, sqrt_bias=0.0,
                                       min_divisor=1e-8):
    """pylearn2.expr.preprocessing.global_contrast_normalize, transcribed (numpy, float64)."""
    X = np.array(X, dtype=np.float64).reshape(X.shape[0], -1)
    mean = X.mean(axis=1)
    if subtract_mean:
        X = X - mean[:, np.newaxis]
    if use_std:
        ddof = 0 if X.shape[1] == 1 else 1
        normalizers = np.sqrt(sqrt_bias + X.var(axis=1, ddof=ddof)) / scale
    else:
        normalizers = np.sqrt(sqrt_bias + (X ** 2).sum(axis=1)) / scale
    normalizers[normalizers < min_divisor] = 1.0
    X /= normalizers[:, np.newaxis]
    return X


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use_std", [True, False])
@pytest.mark.parametrize("subtract_mean", [True, False])
def test_pylearn2_behaviour(backend, use_std, subtract_mean):
    gen = _gen("pylearn2", use_std, subtract_mean)
    x = torch.randn(6, 3, 5, 5, generator=gen, dtype=torch.float64) + 0.5
    x[1] = x[1] * 1e-4  # divisor below min_divisor: replaced by 1 (not blown up)
    x[2] = 3.0  # constant
    style = "pylearn2_std" if use_std else "pylearn2_l2"
    for scale, lam, eps in ((1.0, 0.0, 1e-2), (55.0, 10.0, 1e-8), (1.0, 0.0, 0.5)):
        want = pylearn2_global_contrast_normalize(x.numpy(), scale, subtract_mean, use_std, lam, eps)
        with dlkernels.use_backend(backend):
            y = F.global_contrast_norm(x, scale, lam, eps, style=style, subtract_mean=subtract_mean)
        np.testing.assert_allclose(y.reshape(6, -1).numpy(), want, rtol=1e-10, atol=1e-12)
    # one element per example: ddof=0
    x1 = torch.tensor([[2.0], [-3.0]], dtype=torch.float64)
    with dlkernels.use_backend(backend):
        y1 = F.global_contrast_norm(x1, 1.0, 0.0, 1e-8, style=style, subtract_mean=False)
    np.testing.assert_allclose(y1.numpy(), pylearn2_global_contrast_normalize(x1.numpy(), 1.0, False, use_std))


# ---- gradcheck, determinism ----

@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] in ("cpu", "reference", "triton")])
@pytest.mark.parametrize("style", STYLES)
def test_gradcheck_float64(backend, style):
    x = make((2, 2, 3, 2), torch.float64, "contiguous", "gc").requires_grad_()
    with dlkernels.use_backend(backend):
        # the interpreter runs thousands of calls slowly: fewer settings for triton
        settings = ((0.3, 0.05),) if backend == "triton" else ((0.0, 1e-8), (10.0, 0.0), (0.3, 0.05))
        for sub in (True, False):
            for lam, eps in settings:
                kw = dict(scale=1.5, lam=lam, eps=eps, style=style, subtract_mean=sub)
                assert torch.autograd.gradcheck(lambda t, kw=kw: F.global_contrast_norm(t, **kw), (x,))
        assert torch.autograd.gradcheck(lambda t: F.global_contrast_norm(t, style=style, dims=(0, 2)), (x,))
        # the constant branch (book: eps above the contrast; pylearn2: divisor replaced by 1)
        assert torch.autograd.gradcheck(lambda t: F.global_contrast_norm(t, 1.0, 0.0, 50.0, style=style), (x,))


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] == "cpu"])
@pytest.mark.parametrize("shape", [(16, 3, 8, 8), (2, 70000)], ids=str)
def test_cpu_independent_of_thread_count(backend, shape):
    x = make(shape, torch.float32, "contiguous", "threads").requires_grad_()
    g = make(shape, torch.float32, "contiguous", "threads-g")
    assert_same_for_thread_counts(backend, lambda t: F.global_contrast_norm(t, 1.0, 0.1, 1e-8), x, g)


# Every CPU kernel of the family (GCN and LCN) on seeded inputs, for the cross-level comparison
# below (the central script of tests/test_cpu_capability.py does not list this family's kernels).
_LEVEL_SCRIPT = r"""
import sys, torch, dlkernels, dlkernels.functional as F
g = torch.Generator().manual_seed(0)
out = {}
for dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
    for shape in ((3, 37, 5, 7), (2, 40000), (20, 2100)):
        x = (torch.randn(shape, generator=g) * 3 + 2).to(dt).requires_grad_()
        gy = torch.randn(shape, generator=g).to(dt)
        for style in ("book", "pylearn2_std", "pylearn2_l2"):
            for sub in (True, False):
                with dlkernels.use_backend("cpu"):
                    y = F.global_contrast_norm(x, 1.5, 0.1, 1e-8, style=style, subtract_mean=sub)
                    (gx,) = torch.autograd.grad(y, x, gy)
                out[f"{dt} {shape} {style} {sub}"] = torch.cat([y.detach().flatten(), gx.flatten()])
    # local contrast normalization: every loop and path (per unit / split rows, NCHW / NHWC)
    for shape, cl in (((2, 3, 13, 21), False), ((2, 3, 13, 21), True), ((1, 2, 300, 450), False)):
        x = (torch.randn(shape, generator=g) * 3 + 2).to(dt)
        x = x.to(memory_format=torch.channels_last) if cl else x
        x.requires_grad_()
        gy = torch.randn(shape, generator=g).to(dt)
        for divisor in ("local", "lecun"):
            for across in (False, True):
                with dlkernels.use_backend("cpu"):
                    y = F.local_contrast_norm(x, 7, 1.5, 1e-4, divisor=divisor, across_channels=across)
                    (gx,) = torch.autograd.grad(y, x, gy)
                out[f"lcn {dt} {shape} {cl} {divisor} {across}"] = torch.cat([y.detach().flatten(), gx.flatten()])
torch.save(out, sys.argv[1])
"""


def _lower_levels() -> list[str]:
    from dlkernels import _backend

    if _backend._C is None:
        return []
    levels = _backend.CPU_CAPABILITIES
    return list(levels[:levels.index(_backend._C.cpu.native_capability())])


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] == "cpu"])
def test_cpu_levels_give_the_same_bits(backend, tmp_path):
    levels = _lower_levels()
    if not levels:
        pytest.skip("this CPU runs only the default SIMD level")
    results = {}
    for level in [None, *levels]:
        env = {k: v for k, v in os.environ.items() if k != "DLK_CPU_CAPABILITY"}
        if level is not None:
            env["DLK_CPU_CAPABILITY"] = level
        path = tmp_path / f"{level}.pt"
        proc = subprocess.run([sys.executable, "-c", _LEVEL_SCRIPT, str(path)], env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[level] = torch.load(path)
    bits = lambda t: t.contiguous().view(torch.uint8)  # noqa: E731
    for level in levels:
        differ = [k for k in results[None] if not torch.equal(bits(results[None][k]), bits(results[level][k]))]
        assert not differ, f"DLK_CPU_CAPABILITY={level}: {len(differ)} outputs differ from the best: {differ[:5]}"


# ---- the module ----

def test_module_inputs():
    m = dlkernels.nn.GlobalContrastNorm(2.0, 0.5, 1e-8, style="pylearn2_std")
    assert repr(m) == "GlobalContrastNorm(scale=2.0, lam=0.5, eps=1e-08, style='pylearn2_std', subtract_mean=True)"
    assert list(m.parameters()) == [] and m.state_dict() == {}
    batch, _ = check_image_module(m, lambda b: F.global_contrast_norm(b, 2.0, 0.5, 1e-8, style="pylearn2_std"), 1e-6)
    dm = dlkernels.nn.GlobalContrastNorm(dims=(2, 3))
    assert "dims=(2, 3)" in repr(dm)
    torch.testing.assert_close(dm(batch[0]), F.global_contrast_norm(batch[:1].float(), dims=(2, 3))[0])


# ---- opcheck, compile ----

@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] in ("cpu", "reference")])
def test_opcheck(backend):
    ops = torch.ops.dlkernels
    x = make((2, 3, 4, 5), torch.float32, "contiguous", "op").requires_grad_()
    x_cl = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    x_t = x.detach().transpose(0, 1).requires_grad_()  # dense, but examples are not blocks
    with dlkernels.use_backend(backend):
        _, stats = ops.global_contrast_norm.default(x.detach(), 1.0, 0.0, 1e-8, "book", True)
        g = torch.randn(x.shape, generator=_gen("op-g"))
        cases = [
            (ops.global_contrast_norm.default, (x, 1.0, 0.0, 1e-8, "book", True)),
            (ops.global_contrast_norm.default, (x_cl, 2.0, 10.0, 0.0, "pylearn2_std", False)),
            (ops.global_contrast_norm.default, (x_t, 1.0, 0.0, 1e-8, "pylearn2_l2", True)),
            (ops.global_contrast_norm_backward.default, (g, x.detach(), stats, True)),
        ]
        for op, args in cases:
            torch.library.opcheck(op, args)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compile_backend):
    # Static shapes: the ops layer's dims/layout logic sorts over sizes, which dynamo cannot do with
    # SymInts; earlier tests' compiles of nn.Sequential would otherwise turn the sizes dynamic.
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), dlkernels.nn.GlobalContrastNorm(1.0, 10.0, 0.0), torch.nn.Conv2d(4, 2, 1),
        dlkernels.nn.GlobalContrastNorm(3.0, 1.0, style="pylearn2_l2", dims=(2, 3)))
    x = torch.randn(2, 3, 9, 9)
    compiled = torch.compile(model, fullgraph=True, backend=compile_backend, dynamic=False)
    y, y_c = model(x), compiled(x)
    torch.testing.assert_close(y_c, y)
    grads = torch.autograd.grad(y.sum() + (y * y).sum(), list(model.parameters()))
    yc = compiled(x)
    grads_c = torch.autograd.grad(yc.sum() + (yc * yc).sum(), list(model.parameters()))
    for a, b in zip(grads, grads_c, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---- bad input ----

BAD_CALLS = [
    ("input list", lambda: F.global_contrast_norm([1.0, 2.0]), TypeError, "input"),
    ("input int", lambda: F.global_contrast_norm(torch.tensor([[1, 2]])), TypeError, "input"),
    ("input bool", lambda: F.global_contrast_norm(torch.tensor([[True]])), TypeError, "input"),
    ("input complex", lambda: F.global_contrast_norm(torch.randn(2, 2, dtype=torch.cfloat)), TypeError, "input"),
    ("input 0-d", lambda: F.global_contrast_norm(torch.tensor(1.0)), ValueError, "input"),
    ("scale str", lambda: F.global_contrast_norm(torch.randn(2, 3), "1"), TypeError, "scale"),
    ("scale nan", lambda: F.global_contrast_norm(torch.randn(2, 3), float("nan")), ValueError, "scale"),
    ("lam negative", lambda: F.global_contrast_norm(torch.randn(2, 3), 1.0, -1.0), ValueError, "lam"),
    ("lam None", lambda: F.global_contrast_norm(torch.randn(2, 3), 1.0, None), TypeError, "lam"),
    ("eps negative", lambda: F.global_contrast_norm(torch.randn(2, 3), eps=-1e-8), ValueError, "eps"),
    ("eps str", lambda: F.global_contrast_norm(torch.randn(2, 3), eps="x"), TypeError, "eps"),
    ("style unknown", lambda: F.global_contrast_norm(torch.randn(2, 3), style="pylearn2"), ValueError, "style"),
    ("style None", lambda: F.global_contrast_norm(torch.randn(2, 3), style=None), ValueError, "style"),
    ("subtract_mean str", lambda: F.global_contrast_norm(torch.randn(2, 3), subtract_mean="no"), TypeError,
     "subtract_mean"),
    ("dims out of range", lambda: F.global_contrast_norm(torch.randn(2, 3), dims=2), IndexError, "dims"),
    ("dims repeated", lambda: F.global_contrast_norm(torch.randn(2, 3), dims=(1, -1)), ValueError, "dims"),
    ("dims empty", lambda: F.global_contrast_norm(torch.randn(2, 3), dims=()), ValueError, "dims"),
    ("dims str", lambda: F.global_contrast_norm(torch.randn(2, 3), dims="1"), TypeError, "dims"),
    ("module style", lambda: dlkernels.nn.GlobalContrastNorm(style="std"), ValueError, "style"),
    ("module eps", lambda: dlkernels.nn.GlobalContrastNorm(eps=-1.0), ValueError, "eps"),
    ("module input str", lambda: dlkernels.nn.GlobalContrastNorm()("image"), TypeError, "input"),
    ("module input bool", lambda: dlkernels.nn.GlobalContrastNorm()(np.zeros((2, 2), bool)), TypeError, "input"),
]


@pytest.mark.parametrize("name,call,exc,arg", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input(name, call, exc, arg):
    with pytest.raises(exc) as e:
        call()
    assert arg in str(e.value)


def test_kernel_rejects_unknown_style():
    for backend in ("reference", "cpu"):
        if not dlkernels.available_backends()[backend][0]:
            continue
        with dlkernels.use_backend(backend), pytest.raises((RuntimeError, KeyError, ValueError)):
            torch.ops.dlkernels.global_contrast_norm(torch.randn(2, 3), 1.0, 0.0, 1e-8, "nope", True)


# ---- on a GPU (pytest -m gpu; skipped without one) ----

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("style", STYLES)
def test_contrast_norm_on_gpu(backend, dtype, style):
    for shape, layout in (((5, 3, 33, 17), "channels_last"), ((3, 70000), "contiguous"), ((4, 3, 8, 8), "strided")):
        x = make(shape, dtype, layout, "gpu").cuda()
        compare(backend, x, dict(scale=1.0, lam=0.1, eps=1e-8, style=style))

"""Local contrast normalization on every backend against the float64 reference of the formulas
(dlkernels.reference.contrast_norm.lcn), forward and backward, over divisors, across_channels,
dtypes, layouts and image sizes (1x1 up to larger than the window); hand-worked values, constant
images, gradcheck, the thread count, the module's inputs (one image, uint8, numpy, a torchvision
transform), opcheck, torch.compile and bad input. The CPU kernels' SIMD levels are compared bit
for bit in tests/test_contrast_norm.py (its cross-level script covers both ops)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from conftest import DTYPES, assert_same_for_thread_counts, backend_params, check_image_module, compare_with_spec
from conftest import case_gen as _gen
from conftest import make_image as make

import dlkernels
import dlkernels.functional as F
from dlkernels.reference import contrast_norm as ref
from dlkernels.reference.contrast_norm import lcn

BACKENDS = backend_params("cpu")
# The Triton interpreter runs each program in Python: fewer, smaller cases for it.
NOT_TRITON = [p for p in BACKENDS if p.values[0] != "triton"]
MODES = [("local", False), ("lecun", False), ("local", True), ("lecun", True)]
MODE_IDS = ["local", "lecun", "local-across", "lecun-across"]


def compare(backend, x, kwargs, grad_seed="g"):
    """Forward and backward of dlkernels (backend) vs the spec in x's dtype and in float64."""
    return compare_with_spec(backend, lambda t: F.local_contrast_norm(t, **kwargs), lambda t: lcn(t, **kwargs), x,
                             grad_seed)


# ---- against the reference formulas ----

LAYOUTS = [((2, 3, 7, 9), "contiguous"), ((2, 3, 7, 9), "channels_last"), ((1, 3, 5, 6), "strided")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", LAYOUTS, ids=str)
def test_dtypes_layouts(backend, dtype, shape, layout):
    if backend == "triton" and (layout == "strided" or dtype == torch.float16):
        pytest.skip("interpreter time: the triton kernels read x through its strides either way")
    if backend == "triton":
        shape = (1, 2, 5, 7)
    x = make(shape, dtype, layout)
    y, gx = compare(backend, x, dict(kernel_size=5, sigma=1.5, eps=1e-4))
    if layout != "strided":
        assert y.stride() == x.stride() and gx.stride() == x.stride()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divisor,across", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_divisors_across(backend, divisor, across, dtype, layout):
    if backend == "triton" and layout == "channels_last" and dtype == torch.float64:
        pytest.skip("interpreter time")
    x = make((1, 2, 5, 6) if backend == "triton" else (2, 3, 6, 8), dtype, layout, divisor, across)
    compare(backend, x, dict(kernel_size=5, sigma=1.2, eps=1e-4, divisor=divisor, across_channels=across))


# Image sizes against the window: one pixel, a row, a column, smaller than the window, larger.
SIZES = [((2, 3, 1, 1), 3), ((1, 2, 1, 7), 5), ((1, 2, 6, 1), 3), ((1, 2, 3, 5), 9), ((2, 2, 12, 13), 5),
         ((1, 1, 20, 3), 25)]


@pytest.mark.parametrize("backend", NOT_TRITON)
@pytest.mark.parametrize("shape,kernel_size", SIZES, ids=str)
@pytest.mark.parametrize("divisor,across", MODES, ids=MODE_IDS)
def test_sizes(backend, shape, kernel_size, divisor, across):
    x = make(shape, torch.float32, "contiguous", kernel_size)
    if shape[2] * shape[3] == 1 and not across:
        pytest.skip("a 1x1 plane is constant: test_constant_image")
    compare(backend, x, dict(kernel_size=kernel_size, sigma=2.0, eps=1e-4, divisor=divisor,
                             across_channels=across))


@pytest.mark.parametrize("shape,kernel_size", [((1, 2, 1, 7), 5), ((1, 2, 3, 5), 9)], ids=str)
def test_sizes_triton(shape, kernel_size):
    if not dlkernels.available_backends()["triton"][0]:
        pytest.skip("triton cannot run here")
    for divisor, across in (("local", True), ("lecun", False)):
        compare("triton", make(shape, torch.float32, "channels_last", kernel_size),
                dict(kernel_size=kernel_size, sigma=2.0, eps=1e-4, divisor=divisor, across_channels=across))


@pytest.mark.parametrize("backend", NOT_TRITON)
@pytest.mark.parametrize("sigma", [0.0, 0.3, 50.0])
def test_sigma_extremes(backend, sigma):
    # sigma = 0: the one-tap window (v = 0, y = 0); tiny and huge sigma: a near delta / near box
    x = make((1, 2, 5, 6), torch.float64, "contiguous", sigma)
    if sigma == 0.0:
        with dlkernels.use_backend(backend):
            assert (F.local_contrast_norm(x, 7, 0.0) == 0).all()
        return
    compare(backend, x, dict(kernel_size=7, sigma=sigma, eps=1e-4, divisor="lecun"))


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] == "cpu"])
def test_large_planes_both_cpu_paths(backend):
    # units larger than a parallel task: the CPU runs the rows of each unit in parallel (split path)
    for shape, across, layout in (((1, 1, 160, 830), False, "contiguous"), ((1, 3, 300, 150), True, "contiguous"),
                                  ((1, 3, 200, 230), False, "channels_last")):
        x = make(shape, torch.float32, layout, across)
        compare(backend, x, dict(kernel_size=9, sigma=2.0, eps=1e-4, divisor="lecun", across_channels=across))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(backend):
    for shape in ((0, 3, 4, 4), (2, 0, 4, 4), (2, 3, 0, 4)):
        x = torch.empty(shape, requires_grad=True)
        with dlkernels.use_backend(backend):
            y = F.local_contrast_norm(x)
            y.sum().backward()
        assert y.shape == x.shape and x.grad.shape == x.shape


# ---- hand-worked values ----

@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_worked_1x3(backend):
    # x = [0, 3, 0], kernel_size 3 with exp(-1 / (2 sigma^2)) = 1/2: taps (1/2, 1, 1/2), renormalized
    # at the ends by 3/2 (one tap falls outside) and in the middle by 2. One row: the pass down the
    # columns is the identity.
    sigma = (1 / (2 * math.log(2))) ** 0.5
    x = torch.tensor([[[[0.0, 3.0, 0.0]]]], dtype=torch.float64)
    m = [(0 + 0.5 * 3) / 1.5, (0.5 * 0 + 3 + 0.5 * 0) / 2, (0.5 * 3 + 0) / 1.5]  # = [1, 1.5, 1]
    v = [0 - m[0], 3 - m[1], 0 - m[2]]  # [-1, 1.5, -1]
    q = [(v[0] ** 2 + 0.5 * v[1] ** 2) / 1.5, (0.5 * v[0] ** 2 + v[1] ** 2 + 0.5 * v[2] ** 2) / 2,
         (0.5 * v[1] ** 2 + v[2] ** 2) / 1.5]  # [17/12, 13/8, 17/12]
    s = [qi ** 0.5 for qi in q]
    c = sum(s) / 3  # lecun: the image's mean of s, 1.2184 (between s[0] = 1.1902 and s[1] = 1.2748)
    want = {"local": [vi / si for vi, si in zip(v, s, strict=True)],
            "lecun": [vi / max(c, si) for vi, si in zip(v, s, strict=True)]}
    assert s[0] < c < s[1]
    for divisor in ("local", "lecun"):
        with dlkernels.use_backend(backend):
            y = F.local_contrast_norm(x, 3, sigma, 1e-4, divisor=divisor)
        torch.testing.assert_close(y.flatten(), torch.tensor(want[divisor], dtype=torch.float64), rtol=1e-12,
                                   atol=1e-12)
        with dlkernels.use_backend(backend):  # eps above the contrast: v / eps
            y = F.local_contrast_norm(x, 3, sigma, 10.0, divisor=divisor)
        torch.testing.assert_close(y.flatten(), torch.tensor(v, dtype=torch.float64) / 10, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_worked_trivial_windows(backend):
    x = make((2, 3, 4, 5), torch.float64, "contiguous", "trivial").requires_grad_()
    with dlkernels.use_backend(backend):
        # kernel_size 1: the window is the pixel itself, v = 0: output and gradient 0
        y = F.local_contrast_norm(x, 1, 2.0, 1e-4)
        (gx,) = torch.autograd.grad(y, x, torch.ones_like(x))
        assert (y == 0).all() and gx.abs().max() < 1e-12
        # one pixel, across channels: m = the channel mean, s = the channels' deviation, so two
        # channels give +-1 (the sign of x_c - the other channel)
        x2 = torch.tensor([[[[3.0]], [[-1.0]]]], dtype=torch.float64)
        y2 = F.local_contrast_norm(x2, 5, 1.0, 1e-4, across_channels=True)
    torch.testing.assert_close(y2.flatten(), torch.tensor([1.0, -1.0], dtype=torch.float64))


# ---- constant images ----

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("divisor,across", MODES, ids=MODE_IDS)
def test_constant_image(backend, dtype, divisor, across):
    if backend == "triton" and dtype != torch.float32:
        pytest.skip("interpreter time")
    # exactly 0 out, whatever the value (the window is renormalized at the border and the means
    # are about the plane's first value); the gradient is the reference's, finite (eps = 0: 0)
    shape = (1, 2, 4, 3) if backend == "triton" else (2, 3, 5, 4)
    x = torch.full(shape, 255.0 / 7, dtype=dtype).requires_grad_()
    g = make(shape, dtype, "contiguous", "g")
    for eps in (1e-4, 0.0):
        with dlkernels.use_backend(backend):
            y = F.local_contrast_norm(x, 5, 1.5, eps, divisor=divisor, across_channels=across)
            (gx,) = torch.autograd.grad(y, x, g)
        assert (y == 0).all() and torch.isfinite(gx).all()
        want = ref.local_contrast_norm_backward(g.double(), x.detach().double(), 5, 1.5, eps, divisor, across)
        if eps == 0:
            assert (gx == 0).all()
        scale = want.abs().max().item()
        tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype] * max(scale, 1)
        torch.testing.assert_close(gx.double(), want, rtol=0, atol=tol)


# ---- gradcheck, threads ----

@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] in ("cpu", "reference")])
@pytest.mark.parametrize("divisor,across", MODES, ids=MODE_IDS)
def test_gradcheck_float64(backend, divisor, across):
    # away from max()'s kinks: eps far below s (or far above it: the eps branch), s and c apart
    x = make((2, 2, 4, 5), torch.float64, "contiguous", "gc", divisor, across).requires_grad_()
    with dlkernels.use_backend(backend):
        for kernel_size, sigma, eps in ((3, 1.0, 1e-4), (9, 2.0, 1e-4), (5, 1.5, 100.0)):
            assert torch.autograd.gradcheck(lambda t, k=kernel_size, s=sigma, e=eps: F.local_contrast_norm(
                t, k, s, e, divisor=divisor, across_channels=across), (x,))
        xc = x.detach().to(memory_format=torch.channels_last).requires_grad_()
        assert torch.autograd.gradcheck(lambda t: F.local_contrast_norm(
            t, 5, 1.5, 1e-4, divisor=divisor, across_channels=across), (xc,))


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] == "cpu"])
@pytest.mark.parametrize("across", [False, True])
def test_cpu_independent_of_thread_count(backend, across):
    # 3 units of 2 * 65536 elements: one thread runs whole units, two and three split their rows
    x = make((3, 2, 256, 256), torch.float32, "contiguous", "threads", across).requires_grad_()
    g = make((3, 2, 256, 256), torch.float32, "contiguous", "threads-g")
    assert_same_for_thread_counts(
        backend, lambda t: F.local_contrast_norm(t, 7, 2.0, 1e-4, divisor="lecun", across_channels=across), x, g)


# ---- the module ----

def test_module_inputs():
    m = dlkernels.nn.LocalContrastNorm(7, 1.5, 1e-3, divisor="lecun")
    assert repr(m) == ("LocalContrastNorm(kernel_size=7, sigma=1.5, eps=0.001, divisor='lecun', "
                       "across_channels=False)")
    assert list(m.parameters()) == [] and m.state_dict() == {}
    _, hwc = check_image_module(m, lambda b: F.local_contrast_norm(b, 7, 1.5, 1e-3, divisor="lecun"), 1e-5)
    frozen = hwc.copy()
    frozen.flags.writeable = False  # e.g. a decoded image: copied, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_allclose(m(frozen), m(hwc))


def test_module_in_torchvision_compose():
    v2 = pytest.importorskip("torchvision.transforms.v2")
    pipeline = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32), dlkernels.nn.LocalContrastNorm(5, 1.0)])
    img = np.random.default_rng(0).integers(0, 256, (10, 12, 3), dtype=np.uint8)  # H,W,C as read from disk
    out = pipeline(img)
    assert out.shape == (3, 10, 12)
    want = F.local_contrast_norm(torch.from_numpy(img).permute(2, 0, 1)[None].float(), 5, 1.0)[0]
    torch.testing.assert_close(out.as_subclass(torch.Tensor), want)


# ---- opcheck, compile ----

@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] in ("cpu", "reference")])
def test_opcheck(backend):
    ops = torch.ops.dlkernels
    x = make((2, 3, 4, 5), torch.float32, "contiguous", "op").requires_grad_()
    x_cl = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    x_t = x.detach().transpose(2, 3).requires_grad_()  # neither contiguous nor channels_last
    g = torch.randn(x.shape, generator=_gen("op-g"))
    with dlkernels.use_backend(backend):
        cases = [
            (ops.local_contrast_norm.default, (x, 5, 1.5, 1e-4, "local", False)),
            (ops.local_contrast_norm.default, (x_cl, 3, 1.0, 1e-4, "lecun", True)),
            (ops.local_contrast_norm.default, (x_t, 7, 2.0, 0.0, "lecun", False)),
            (ops.local_contrast_norm_backward.default, (g, x.detach(), 5, 1.5, 1e-4, "lecun", True)),
        ]
        for op, args in cases:
            torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), dlkernels.nn.LocalContrastNorm(5, 1.0),
                                torch.nn.Conv2d(4, 2, 1),
                                dlkernels.nn.LocalContrastNorm(3, 1.0, divisor="lecun", across_channels=True))
    x = torch.randn(2, 3, 9, 9)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=False)
    y, y_c = model(x), compiled(x)
    torch.testing.assert_close(y_c, y)
    grads = torch.autograd.grad((y * y).sum(), list(model.parameters()))
    yc = compiled(x)
    grads_c = torch.autograd.grad((yc * yc).sum(), list(model.parameters()))
    for a, b in zip(grads, grads_c, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---- bad input ----

X = torch.randn(1, 2, 4, 4)
BAD_CALLS = [
    ("input list", lambda: F.local_contrast_norm([[1.0]]), TypeError, "input"),
    ("input int", lambda: F.local_contrast_norm(torch.ones(1, 1, 2, 2, dtype=torch.int64)), TypeError, "input"),
    ("input bool", lambda: F.local_contrast_norm(torch.ones(1, 1, 2, 2, dtype=torch.bool)), TypeError, "input"),
    ("input complex", lambda: F.local_contrast_norm(torch.ones(1, 1, 2, 2, dtype=torch.cfloat)), TypeError, "input"),
    ("input 3-d", lambda: F.local_contrast_norm(torch.randn(2, 4, 4)), ValueError, "input"),
    ("input 5-d", lambda: F.local_contrast_norm(torch.randn(1, 2, 4, 4, 1)), ValueError, "input"),
    ("kernel_size even", lambda: F.local_contrast_norm(X, 4), ValueError, "kernel_size"),
    ("kernel_size 0", lambda: F.local_contrast_norm(X, 0), ValueError, "kernel_size"),
    ("kernel_size negative", lambda: F.local_contrast_norm(X, -3), ValueError, "kernel_size"),
    ("kernel_size float", lambda: F.local_contrast_norm(X, 3.0), TypeError, "kernel_size"),
    ("kernel_size bool", lambda: F.local_contrast_norm(X, True), TypeError, "kernel_size"),
    ("sigma negative", lambda: F.local_contrast_norm(X, 3, -1.0), ValueError, "sigma"),
    ("sigma str", lambda: F.local_contrast_norm(X, 3, "2"), TypeError, "sigma"),
    ("sigma inf", lambda: F.local_contrast_norm(X, 3, float("inf")), ValueError, "sigma"),
    ("eps negative", lambda: F.local_contrast_norm(X, eps=-1e-4), ValueError, "eps"),
    ("eps nan", lambda: F.local_contrast_norm(X, eps=float("nan")), ValueError, "eps"),
    ("eps None", lambda: F.local_contrast_norm(X, eps=None), TypeError, "eps"),
    ("divisor unknown", lambda: F.local_contrast_norm(X, divisor="global"), ValueError, "divisor"),
    ("divisor None", lambda: F.local_contrast_norm(X, divisor=None), ValueError, "divisor"),
    ("across_channels str", lambda: F.local_contrast_norm(X, across_channels="yes"), TypeError, "across_channels"),
    ("module kernel_size", lambda: dlkernels.nn.LocalContrastNorm(8), ValueError, "kernel_size"),
    ("module sigma", lambda: dlkernels.nn.LocalContrastNorm(sigma=-2.0), ValueError, "sigma"),
    ("module divisor", lambda: dlkernels.nn.LocalContrastNorm(divisor="LeCun"), ValueError, "divisor"),
    ("module input str", lambda: dlkernels.nn.LocalContrastNorm()("image"), TypeError, "input"),
    ("module input 2-d", lambda: dlkernels.nn.LocalContrastNorm()(torch.zeros(4, 4)), ValueError, "input"),
    ("module input 5-d", lambda: dlkernels.nn.LocalContrastNorm()(np.zeros((1, 1, 1, 4, 4))), ValueError, "input"),
    ("module input bool", lambda: dlkernels.nn.LocalContrastNorm()(torch.zeros(1, 4, 4, dtype=torch.bool)),
     TypeError, "input"),
]


@pytest.mark.parametrize("name,call,exc,arg", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input(name, call, exc, arg):
    with pytest.raises(exc) as e:
        call()
    assert arg in str(e.value)


def test_kernels_reject_bad_arguments():
    # the backends' own checks (reached through torch.ops, past the functional's)
    for backend in ("reference", "cpu"):
        if not dlkernels.available_backends()[backend][0]:
            continue
        with dlkernels.use_backend(backend), pytest.raises((RuntimeError, ValueError)):
            torch.ops.dlkernels.local_contrast_norm(X, 3, 1.0, 1e-4, "nope", False)
    with pytest.raises(RuntimeError, match="kernel_size"):
        dlkernels._backend._C.cpu.local_contrast_norm(X, 4, 1.0, 1e-4, "local", False)
    with pytest.raises(RuntimeError, match="4-d"):
        dlkernels._backend._C.cpu.local_contrast_norm(X[0], 3, 1.0, 1e-4, "local", False)


# ---- on a GPU (pytest -m gpu; skipped without one) ----

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("divisor,across", MODES, ids=MODE_IDS)
def test_local_contrast_norm_on_gpu(backend, dtype, divisor, across):
    for shape, layout, k in (((5, 3, 33, 17), "channels_last", 9), ((2, 3, 70, 90), "contiguous", 9),
                             ((2, 3, 4, 6), "strided", 11), ((1, 3, 1, 1), "contiguous", 3)):
        if shape[2] * shape[3] == 1 and not across:
            continue  # a constant plane: the reference's autograd gives NaN (sqrt at 0)
        x = make(shape, dtype, layout, "gpu").cuda()
        compare(backend, x, dict(kernel_size=k, sigma=2.0, eps=1e-4, divisor=divisor, across_channels=across))

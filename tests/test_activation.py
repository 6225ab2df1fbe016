"""Leaky ReLU and PReLU on every backend against torch (and its float64 result), forward and
backward, over dtypes, layouts and odd sizes; in-place semantics, modules, errors, opcheck,
gradcheck and torch.compile."""

from __future__ import annotations

import zlib
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as TF
from conftest import DTYPES, assert_close_like_torch, backend_params

import dlkernels
import dlkernels.functional as F

BACKENDS = backend_params("cpu")
SHAPES = [(1,), (7,), (13, 17), (2, 3, 5, 7), (3, 1, 1, 1), (2, 64, 3, 3), (0, 3), (4, 3, 67, 5)]


def make(shape, dtype, layout: str, requires_grad: bool = False) -> torch.Tensor:
    """A random tensor of `shape` in `layout`: contiguous, channels_last or a strided view."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, dtype, layout)).encode()))
    if layout == "contiguous":
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
    elif layout == "channels_last":
        x = torch.randn(shape, generator=gen, dtype=torch.float64).to(memory_format=torch.channels_last)
    else:  # transposed and sliced: not dense
        big = torch.randn(tuple(reversed(shape[:-1])) + (2 * shape[-1],), generator=gen, dtype=torch.float64)
        x = big[..., ::2].permute(*reversed(range(len(shape) - 1)), len(shape) - 1)
        assert x.shape == shape
    x = x.to(dtype)
    return x.requires_grad_(requires_grad)


def layouts_for(shape):
    out = ["contiguous", "strided"]
    if len(shape) == 4:
        out.append("channels_last")
    return out


CASES = [(s, lay) for s in SHAPES for lay in layouts_for(s)]


def check_like_torch(backend: str, fn: Callable, torch_fn: Callable, inputs: list[torch.Tensor], layout: str,
                     g: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], ...]:
    """fn(*inputs) under `backend` against torch_fn on copies of inputs and on float64 copies:
    checks the output (and its strides unless `layout` is strided) and the gradient of inputs[0]
    for grad output g. Returns (ours, torch's, float64) gradients of all inputs for more checks.
    ours runs on `inputs` themselves: a clone of a strided input would be dense."""
    ins_t = [t.detach().clone().requires_grad_() for t in inputs]
    ins64 = [t.detach().double().requires_grad_() for t in inputs]
    with dlkernels.use_backend(backend):
        y = fn(*inputs)
    y_t, y64 = torch_fn(*ins_t), torch_fn(*ins64)
    assert_close_like_torch(y, y_t, y64)
    if layout != "strided":
        assert y.stride() == y_t.stride()
    with dlkernels.use_backend(backend):
        grads = torch.autograd.grad(y, inputs, g)
    grads_t = torch.autograd.grad(y_t, ins_t, g)
    grads64 = torch.autograd.grad(y64, ins64, g.double())
    assert_close_like_torch(grads[0], grads_t[0], grads64[0])
    return grads, grads_t, grads64


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", CASES, ids=str)
@pytest.mark.parametrize("slope", [0.01, -0.3])
def test_leaky_relu_forward_backward(backend, dtype, shape, layout, slope):
    x = make(shape, dtype, layout, requires_grad=True)
    g = make(shape, dtype, "contiguous")
    check_like_torch(backend, lambda t: F.leaky_relu(t, slope), lambda t: TF.leaky_relu(t, slope), [x], layout, g)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", CASES, ids=str)
@pytest.mark.parametrize("per_channel", [True, False], ids=["C", "1"])
def test_prelu_forward_backward(backend, dtype, shape, layout, per_channel):
    channels = shape[1] if (per_channel and len(shape) > 1) else 1
    x = make(shape, dtype, layout, requires_grad=True)
    w = (torch.rand(channels, dtype=torch.float64) * 0.5 - 0.1).to(dtype).requires_grad_()
    g = make(shape, dtype, "contiguous")
    (_, gw), (_, gw_t), (_, gw64) = check_like_torch(backend, F.prelu, TF.prelu, [x, w], layout, g)
    assert gw.shape == w.shape and gw.dtype == w.dtype
    # torch's reduced-precision slope gradient may be exact by luck on tiny inputs: allow one
    # rounding of the float64 sum in the output dtype.
    ulp = torch.finfo(dtype).eps * gw64.abs().max().item()
    err = (gw.double() - gw64).abs().max().item() if gw.numel() else 0.0
    torch_err = (gw_t.double() - gw64).abs().max().item() if gw.numel() else 0.0
    assert err <= 2 * torch_err + 2 * ulp + 1e-5 * max(1.0, x.numel() ** 0.5), (err, torch_err)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,weight_shape", [((), (1,)), ((), ()), ((5,), (1,)), ((3, 4), ()), ((3, 4), (4,))])
def test_prelu_rank_edge_cases(backend, shape, weight_shape):
    x = torch.randn(shape, requires_grad=True)
    w = torch.full(weight_shape, 0.2, requires_grad=True)
    with dlkernels.use_backend(backend):
        y = F.prelu(x, w)
        gx, gw = torch.autograd.grad(y.sum(), (x, w))
    y_t = TF.prelu(x, w)
    gx_t, gw_t = torch.autograd.grad(y_t.sum(), (x, w))
    torch.testing.assert_close(y, y_t)
    torch.testing.assert_close(gx, gx_t)
    torch.testing.assert_close(gw, gw_t)
    assert gw.shape == w.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_leaky_relu_inplace(backend, layout, dtype):
    base = make((2, 3, 5, 7), dtype, layout)
    x = base.clone() if layout != "strided" else base
    with dlkernels.use_backend(backend):
        expected = F.leaky_relu(base, 0.2)  # closeness to torch is checked out of place above
        out = F.leaky_relu(x, 0.2, inplace=True)
    assert out is x
    torch.testing.assert_close(x, expected, rtol=0, atol=0)

    # Backward through the in-place op, from the output (non-negative slope).
    a = torch.randn(3, 4, requires_grad=True)
    with dlkernels.use_backend(backend):
        y = F.leaky_relu(a * 1.0, 0.2, inplace=True)
        (g,) = torch.autograd.grad((y * y).sum(), a)
    (g_t,) = torch.autograd.grad((TF.leaky_relu(a * 1.0, 0.2, inplace=True) ** 2).sum(), a)
    torch.testing.assert_close(g, g_t)


def test_leaky_relu_inplace_errors_match_torch():
    def neg_slope(fn):
        a = torch.randn(5, requires_grad=True)
        fn(a * 1.0, -0.1, inplace=True).sum().backward()

    def leaf(fn):
        fn(torch.randn(5, requires_grad=True), 0.1, inplace=True)

    for case in (neg_slope, leaf):
        with pytest.raises(RuntimeError) as theirs:
            case(TF.leaky_relu)
        with pytest.raises(RuntimeError) as ours:
            case(F.leaky_relu)
        assert str(ours.value) == str(theirs.value)
    # Slope 0 is allowed in place, as in torch.
    a = torch.randn(5, requires_grad=True)
    F.leaky_relu(a * 1.0, 0.0, inplace=True).sum().backward()
    torch.testing.assert_close(a.grad, (a > 0).float())


BAD_CALLS = [
    ("leaky_relu int", lambda f: f.leaky_relu(torch.tensor([1, 2]))),
    ("leaky_relu bool", lambda f: f.leaky_relu(torch.tensor([True]))),
    ("leaky_relu complex", lambda f: f.leaky_relu(torch.randn(2, dtype=torch.cfloat))),
    ("leaky_relu slope str", lambda f: f.leaky_relu(torch.randn(2), "a")),
    ("leaky_relu slope None", lambda f: f.leaky_relu(torch.randn(2), None)),
    ("leaky_relu slope complex", lambda f: f.leaky_relu(torch.randn(2), 1j)),
    ("leaky_relu input list", lambda f: f.leaky_relu([1.0])),
    ("prelu int", lambda f: f.prelu(torch.tensor([1, 2]), torch.tensor([1]))),
    ("prelu dtype mismatch", lambda f: f.prelu(torch.randn(3, 4), torch.randn(1, dtype=torch.double))),
    ("prelu half/float", lambda f: f.prelu(torch.randn(3, 4).half(), torch.randn(1))),
    ("prelu wrong size", lambda f: f.prelu(torch.randn(3, 4), torch.randn(3))),
    ("prelu 0-d input", lambda f: f.prelu(torch.randn(()), torch.randn(4))),
    ("prelu 1-d input", lambda f: f.prelu(torch.randn(4), torch.randn(4))),
    ("prelu 2-d weight", lambda f: f.prelu(torch.randn(3, 4), torch.randn(4, 1))),
    ("prelu weight list", lambda f: f.prelu(torch.randn(3, 4), [1.0])),
    ("prelu other device", lambda f: f.prelu(torch.randn(3, 4), torch.randn(4, device="meta"))),
]


@pytest.mark.parametrize("name,call", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises_like_torch(name, call):
    with pytest.raises(Exception) as theirs:
        call(TF)
    with pytest.raises(Exception) as ours:
        call(F)
    assert type(ours.value) is type(theirs.value)
    assert str(ours.value) == str(theirs.value)


def test_slope_accepts_what_torch_accepts():
    x = torch.randn(4, 5)
    for slope in (True, 2, 0.5, torch.tensor(0.3)):
        torch.testing.assert_close(F.leaky_relu(x, slope), TF.leaky_relu(x, slope))


def test_modules_are_torch_compatible():
    ours, theirs = dlkernels.nn.PReLU(3, init=0.1), torch.nn.PReLU(3, init=0.1)
    assert repr(ours) == repr(theirs) and isinstance(ours, torch.nn.PReLU)
    theirs.weight.data.uniform_()
    ours.load_state_dict(theirs.state_dict())
    back = torch.nn.PReLU(3)
    back.load_state_dict(ours.state_dict())
    torch.testing.assert_close(back.weight, theirs.weight)
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(ours(x), theirs(x))
    assert dlkernels.nn.PReLU().weight.shape == (1,) and dlkernels.nn.PReLU().weight.item() == 0.25
    dtype_mod = dlkernels.nn.PReLU(2, dtype=torch.float64)
    assert dtype_mod.weight.dtype == torch.float64
    lr = dlkernels.nn.LeakyReLU(0.2, inplace=True)
    assert repr(lr) == repr(torch.nn.LeakyReLU(0.2, inplace=True)) and lr.state_dict() == {}
    assert dlkernels.nn.LeakyReLU().negative_slope == 0.01
    x = torch.randn(5)
    torch.testing.assert_close(dlkernels.nn.LeakyReLU(0.2)(x), TF.leaky_relu(x, 0.2))


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] in ("cpu", "reference", "triton")])
def test_gradcheck_float64(backend):
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    x = torch.where(x.abs() < 1e-3, x + 0.1, x).detach().requires_grad_()  # stay off the kink
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    with dlkernels.use_backend(backend):
        assert torch.autograd.gradcheck(lambda t: F.leaky_relu(t, 0.2), (x,))
        assert torch.autograd.gradgradcheck(lambda t: F.leaky_relu(t, 0.2), (x,))
        assert torch.autograd.gradcheck(F.prelu, (x, w))
        assert torch.autograd.gradcheck(F.prelu, (x, w[:1]))


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] in ("cpu", "reference")])
def test_opcheck(backend):
    ops = torch.ops.dlkernels
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    x_cl = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    w = torch.rand(3, requires_grad=True)
    g = torch.randn(2, 3, 4, 5)
    cases = [
        (ops.leaky_relu.default, (x, 0.2)),
        (ops.leaky_relu.default, (x_cl, -0.1)),
        (ops.leaky_relu_backward.default, (g, x.detach(), 0.2)),
        (ops.leaky_relu_.default, (x.detach().clone(), 0.2)),
        (ops.prelu.default, (x, w)),
        (ops.prelu.default, (x_cl, w[:1])),
        (ops.prelu_backward.default, (g, x.detach(), w.detach())),
    ]
    with dlkernels.use_backend(backend):
        for op, args in cases:
            torch.library.opcheck(op, args)


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), dlkernels.nn.PReLU(8), torch.nn.Conv2d(8, 4, 1),
        dlkernels.nn.LeakyReLU(0.1), torch.nn.Conv2d(4, 4, 1), dlkernels.nn.LeakyReLU(0.2, inplace=True),
    )


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compile_backend):
    torch.manual_seed(0)
    model = _model()
    x = torch.randn(2, 3, 9, 9)
    compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
    y, y_c = model(x), compiled(x)
    torch.testing.assert_close(y_c, y)
    grads = torch.autograd.grad(y.sum(), list(model.parameters()))
    grads_c = torch.autograd.grad(compiled(x).sum(), list(model.parameters()))
    for a, b in zip(grads, grads_c, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---- on a GPU (pytest -m gpu; skipped without one) ----

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_activation_on_gpu(backend, dtype, layout):
    x = torch.randn(4, 33, 17, 9, device="cuda", dtype=torch.float64)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "strided":
        x = x[:, :, ::2]
    x = x.to(dtype).requires_grad_()
    w = torch.rand(33, device="cuda", dtype=dtype, requires_grad=True)
    g = torch.randn(x.shape, device="cuda", dtype=dtype)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    with dlkernels.use_backend(backend):
        ours = [F.leaky_relu(x, 0.1), F.prelu(x, w)]
        ours_g = torch.autograd.grad(ours, (x, w), (g, g))
    theirs = [TF.leaky_relu(x, 0.1), TF.prelu(x, w)]
    theirs_g = torch.autograd.grad(theirs, (x, w), (g, g))
    exact = [TF.leaky_relu(x64, 0.1), TF.prelu(x64, w64)]
    exact_g = torch.autograd.grad(exact, (x64, w64), (g.double(), g.double()))
    for a, b, c in zip(ours + list(ours_g[:1]), theirs + list(theirs_g[:1]), exact + list(exact_g[:1]), strict=True):
        assert_close_like_torch(a, b, c)
    torch.testing.assert_close(ours_g[1].double(), exact_g[1], rtol=1e-2, atol=1e-2)

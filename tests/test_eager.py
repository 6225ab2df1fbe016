"""The eager fast path (csrc/eager): one C++ call for plain eager CPU calls.

It must be invisible: the same outputs, gradients and running statistics, bit for bit, as the op
path it short-cuts (forced here by replacing the entries with ones that handle nothing), and it must
decline (return None) every call it does not own, so that those take the op path with its errors,
backends and custom op.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dlkernels
import dlkernels.functional as F
import dlkernels.nn as dnn
from dlkernels import _backend
from dlkernels.ops import activation as act_ops
from dlkernels.ops import batch_norm as bn_ops
from tests.conftest import case_gen, make_layout

eager = _backend.eager
pytestmark = pytest.mark.skipif(eager is None, reason="dlkernels._C is not built")

ENTRIES = ((act_ops, "_eager_leaky_relu"), (act_ops, "_eager_prelu"), (bn_ops, "_eager_batch_norm_act"))


@pytest.fixture
def op_path(monkeypatch):
    """Within the test, every call takes the op path (the entries handle nothing)."""

    def run(fn):
        with monkeypatch.context() as m:
            for module, name in ENTRIES:
                m.setattr(module, name, lambda *args: None)
            return fn()

    return run


def _leaves(*ts):
    return [t.detach().clone().requires_grad_(t.requires_grad) for t in ts]


def _grads(out, leaves, gen):
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    need = [t for t in leaves if t.requires_grad]
    return list(torch.autograd.grad(out, need, g, allow_unused=True)) if need else []


def _same(a, b):
    assert type(a) is type(b)
    if a is None:
        return
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same(x, y)
    else:
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        assert torch.equal(a, b) or torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


# ---- the same results as the op path ----

LAYOUTS = ["contiguous", "channels_last", "strided"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("grad", [False, True])
def test_activations_match_op_path(op_path, dtype, layout, grad):
    x0 = make_layout((3, 5, 4, 7), dtype, layout, "eager-act").requires_grad_(grad)
    w0 = (torch.rand(5, generator=case_gen("w", dtype)) * 0.5).to(dtype).requires_grad_(grad)

    def run():
        x, w = _leaves(x0, w0)
        y1, y2, y3 = F.leaky_relu(x, 0.2), F.prelu(x, w), F.prelu(x, w[:1])
        gen = case_gen("g", dtype, layout)
        return [y1, y2, y3, *_grads(y1 + y2 + y3, [x, w], gen)]

    _same(run(), op_path(run))


BN_CASES = list(itertools.product(
    [torch.float32, torch.float64, torch.bfloat16],   # input dtype (bf16: float32 parameters)
    ["contiguous", "channels_last", "strided"],
    [True, False],                                    # training
    [None, "relu", "leaky_relu", "prelu"],
    ["all", "params", "none", "x"],                   # which tensors require grad
))


@pytest.mark.parametrize("dtype,layout,training,activation,needs", BN_CASES,
                         ids=[f"{d}-{lay}-{'train' if t else 'eval'}-{a}-{n}" for d, lay, t, a, n in BN_CASES])
def test_batch_norm_act_matches_op_path(op_path, dtype, layout, training, activation, needs):
    pdt = torch.float32 if dtype == torch.bfloat16 else dtype
    gen = case_gen("bn", dtype, layout, training, activation, needs)
    x0 = (make_layout((4, 6, 3, 5), dtype, layout, "eager-bn") * 2 + 1).requires_grad_(needs in ("all", "x"))
    w0, b0, p0 = (torch.rand(6, generator=gen, dtype=torch.float64).to(pdt).requires_grad_(needs in ("all", "params"))
                  for _ in range(3))
    rm0, rv0 = torch.randn(6, generator=gen, dtype=pdt), torch.rand(6, generator=gen, dtype=pdt) + 0.5

    def run():
        x, w, b, p = _leaves(x0, w0, b0, p0)
        rm, rv = rm0.clone(), rv0.clone()
        y = F.batch_norm_act(x, rm, rv, w, b, training, 0.3, 1e-3, activation, 0.05,
                             p.to(dtype) if activation == "prelu" else None)
        return [y, rm, rv, *_grads(y, [x, w, b, p], case_gen("g", dtype, layout, training))]

    _same(run(), op_path(run))


@pytest.mark.parametrize("cls", ["BatchNorm1d", "BatchNorm2d", "BatchNormAct2d"])
def test_modules_match_op_path_over_steps(op_path, cls):
    shape = (16, 8) if cls == "BatchNorm1d" else (4, 8, 3, 3)
    torch.manual_seed(0)
    ref = getattr(dnn, cls)(8)

    def run():
        m = getattr(dnn, cls)(8)
        m.load_state_dict(ref.state_dict())
        out = []
        for step in range(3):
            m.train(step < 2)
            x = torch.randn(shape, generator=case_gen(cls, step), requires_grad=True)
            y = m(x)
            out += [y, *torch.autograd.grad(y.square().sum(), [x, m.weight, m.bias])]
        return out + list(m.state_dict().values())

    _same(run(), op_path(run))


# ---- the fast path is the one taken ----

def test_plain_calls_take_it():
    x = torch.randn(2, 3, 4, requires_grad=True)
    m = dnn.BatchNormAct2d(3)
    for y in (F.leaky_relu(x, 0.1), F.prelu(x, torch.ones(3)), m(x.unsqueeze(-1))):
        assert "dlk::eager" in y.grad_fn.name()
    with torch.no_grad():
        assert eager.leaky_relu(x, 0.1) is not None
    with torch.inference_mode():
        assert eager.batch_norm_act(torch.randn(2, 3), None, None, None, None, True, 0.1, 1e-5, None, 0.0, None,
                                    0.0) is not None


def test_leaky_relu_double_backward_matches():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: F.leaky_relu(t, 0.3), (x,))
    assert torch.autograd.gradgradcheck(lambda t: F.leaky_relu(t, 0.3), (x,))
    (g,) = torch.autograd.grad(F.leaky_relu(x, 0.3).square().sum(), x, create_graph=True)
    assert "dlk::eager" in g.grad_fn.name()


def test_gradcheck_float64():
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    w, b, p = (torch.rand(4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    assert torch.autograd.gradcheck(F.prelu, (x, p))
    for training in (True, False):
        fn = lambda x, w, b, p, t=training: F.batch_norm_act(x, rm.clone(), rv.clone(), w, b, t,  # noqa: E731
                                                              activation="prelu", prelu_weight=p)
        assert torch.autograd.gradcheck(fn, (x, w, b, p))


@pytest.mark.parametrize("which", ["prelu", "batch_norm_train", "batch_norm_eval"])
def test_no_double_backward_is_an_error_not_zero(which):
    x = torch.randn(4, 3, 5, requires_grad=True)
    w = torch.rand(3, requires_grad=True)
    if which == "prelu":
        y = F.prelu(x, w)
    else:
        y = F.batch_norm_act(x, torch.zeros(3), torch.ones(3), w, None, which.endswith("train"))
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula was registered"):
        gx.sum().backward()


def test_autograd_bookkeeping():
    # a saved input changed in place: autograd's version check, as for any op
    x = torch.randn(4, 3, 2, requires_grad=True)
    h = x * 1
    y = F.batch_norm_act(h, None, None, None, None, True)
    h.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    # saved_tensors_hooks see the saved tensors
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        y = F.leaky_relu(x, 0.1)
    assert any(t is x or t.data_ptr() == x.data_ptr() for t in packed)
    # the graph is freed after backward unless retained
    y.sum().backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        y.sum().backward()


# ---- every other call is declined (and then behaves as before) ----

class _Sub(torch.Tensor):
    pass


class _Mode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _bn(x=None, rm=None, rv=None, w=None, b=None, training=True, momentum=0.1, eps=1e-5, act="leaky_relu",
        slope=0.01, prelu=None, p=0.0):
    x = torch.randn(4, 3, 5) if x is None else x
    return eager.batch_norm_act(x, rm, rv, w, b, training, momentum, eps, act, slope, prelu, p)


DECLINED = {
    "subclass": lambda: eager.leaky_relu(torch.randn(3).as_subclass(_Sub), 0.1),
    "int tensor": lambda: eager.leaky_relu(torch.arange(3), 0.1),
    "bool slope": lambda: eager.leaky_relu(torch.randn(3), True),
    "tensor slope": lambda: eager.leaky_relu(torch.randn(3), torch.tensor(0.1)),
    "neg view": lambda: eager.leaky_relu(torch._neg_view(torch.randn(3)), 0.1),
    "sparse": lambda: eager.leaky_relu(torch.randn(2, 2).to_sparse(), 0.1),
    "meta": lambda: eager.leaky_relu(torch.randn(2, device="meta"), 0.1),
    "prelu dtypes": lambda: eager.prelu(torch.randn(2, 3), torch.ones(3, dtype=torch.float64)),
    "prelu channels": lambda: eager.prelu(torch.randn(2, 3), torch.ones(2)),
    "prelu 1-d": lambda: eager.prelu(torch.randn(3), torch.ones(3)),
    "prelu 2-d weight": lambda: eager.prelu(torch.randn(2, 3), torch.ones(3, 1)),
    "bn empty": lambda: _bn(torch.randn(0, 3, 5)),
    "bn one value per channel": lambda: _bn(torch.randn(1, 3)),
    "bn 1-d": lambda: _bn(torch.randn(3)),
    "bn eps": lambda: _bn(eps=0.0),
    "bn channels": lambda: _bn(w=torch.ones(4)),
    "bn one buffer": lambda: _bn(rm=torch.zeros(3)),
    "bn eval without buffers": lambda: _bn(training=False),
    "bn mixed dtypes": lambda: _bn(w=torch.ones(3, dtype=torch.float64)),
    "bn int momentum": lambda: _bn(rm=torch.zeros(3), rv=torch.ones(3), momentum=1),
    "bn tensor momentum": lambda: _bn(rm=torch.zeros(3), rv=torch.ones(3), momentum=torch.tensor(0.1)),
    "bn strided buffers": lambda: _bn(rm=torch.zeros(6)[::2], rv=torch.ones(3)),
    "bn half buffers": lambda: _bn(rm=torch.zeros(3).half(), rv=torch.ones(3).half()),
    "bn dropout": lambda: _bn(p=0.1),
    "bn activation": lambda: _bn(act="gelu"),
    "bn prelu without weight": lambda: _bn(act="prelu"),
    "bn prelu weight unused": lambda: _bn(act="relu", prelu=torch.ones(3)),
    "bn training flag": lambda: _bn(training=1),
}


@pytest.mark.parametrize("case", list(DECLINED))
def test_declines(case):
    assert DECLINED[case]() is None


def test_declines_under_modes_transforms_and_other_backends(monkeypatch):
    x = torch.randn(3, 4)
    call = lambda: eager.leaky_relu(x, 0.1)  # noqa: E731
    assert call() is not None
    for ctx in (_Mode(), dlkernels.use_backend("reference"), torch.overrides.TorchFunctionMode()):
        with ctx:
            assert call() is None
    with dlkernels.use_backend("cpu"):
        assert call() is not None
    seen = []
    torch.func.vmap(lambda t: seen.append(eager.leaky_relu(t, 0.1)) or t)(x)
    assert seen == [None]
    with torch.autograd.forward_ad.dual_level():
        assert eager.leaky_relu(torch.autograd.forward_ad.make_dual(x, x), 0.1) is None
    for value, taken in (("reference", False), ("triton", False), ("cpu", True), ("auto", True), ("", True)):
        monkeypatch.setenv("DLK_BACKEND", value)
        assert (call() is not None) == taken, value
    monkeypatch.delenv("DLK_BACKEND")
    traced = torch.jit.trace(lambda t: F.leaky_relu(t, 0.1), x, check_trace=False)
    x2 = torch.randn(3, 4)  # a trace that had taken the fast path would have recorded a constant
    assert torch.equal(traced(x2), F.leaky_relu(x2, 0.1))


def test_forward_ad_raises_instead_of_dropping_the_tangent():
    with torch.autograd.forward_ad.dual_level():
        d = torch.autograd.forward_ad.make_dual(torch.randn(3), torch.ones(3))
        with pytest.raises(NotImplementedError, match="forward AD with dlkernels::leaky_relu"):
            F.leaky_relu(d, 0.1)

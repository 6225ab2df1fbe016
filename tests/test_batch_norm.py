"""Batch norm (+ fused activation) against torch.nn.BatchNorm* (+ activation) on every backend:
outputs, input/parameter gradients, running statistics over several steps, eval mode, dtypes,
layouts, momentum=None, no running stats, no affine; state dicts, errors, opcheck, gradcheck,
torch.compile, memory saved for backward, and SyncBatchNorm on 2 gloo ranks."""

from __future__ import annotations

import copy
import os
import socket
import zlib

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as TF
from conftest import DTYPES, assert_close_like_torch, backend_params

import dlkernels
import dlkernels.functional as F
import dlkernels.nn as dnn

BACKENDS = backend_params("cpu")
ACTS = [None, "relu", "leaky_relu", "prelu"]


def torch_block(bn: torch.nn.Module, act: str | None, prelu_parameters: int) -> torch.nn.Module:
    """The torch modules our fused block replaces."""
    if act is None:
        return torch.nn.Sequential(bn)
    a = {"relu": torch.nn.ReLU(), "leaky_relu": torch.nn.LeakyReLU(0.2),
         "prelu": torch.nn.PReLU(prelu_parameters, init=0.3)}[act]
    return torch.nn.Sequential(bn, a.to(bn.weight.dtype if bn.weight is not None else torch.float32))


def ours_block(cls_dim: int, c: int, act, prelu_parameters=1, **kw) -> torch.nn.Module:
    cls = {1: dnn.BatchNormAct1d, 2: dnn.BatchNormAct2d, 3: dnn.BatchNormAct3d}[cls_dim]
    return cls(c, activation=act, negative_slope=0.2, prelu_parameters=prelu_parameters, prelu_init=0.3, **kw)


def copy_params(ours: torch.nn.Module, theirs: torch.nn.Sequential) -> None:
    with torch.no_grad():
        bn = theirs[0]
        if bn.weight is not None:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        ours.load_state_dict(bn.state_dict(), strict=False)
        if getattr(ours, "prelu_weight", None) is not None:
            ours.prelu_weight.copy_(theirs[1].weight)


def make_input(shape, dtype, layout, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 3  # a mean far from 0
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
    elif layout == "strided":
        x = torch.cat([x, x], dim=-1)[..., ::2]
    return x.to(dtype)


def run(module, x, steps, g):
    outs = []
    for _ in range(steps):
        xi = x.detach().clone().requires_grad_()
        y = module(xi)
        params = [p for p in module.parameters()]
        grads = torch.autograd.grad(y, [xi, *params], g)
        outs.append((y.detach(), grads))
    return outs


CASES = [
    # (module dim, input shape, layout)
    (1, (6, 5), "contiguous"),
    (1, (3, 4, 9), "contiguous"),
    (2, (2, 3, 5, 7), "contiguous"),
    (2, (2, 3, 5, 7), "channels_last"),
    (2, (3, 5, 4, 3), "strided"),
    (2, (2, 3, 9, 70), "contiguous"),  # long rows
    (2, (5, 3, 20, 20), "channels_last"),  # several tile runs, the last one short
    (1, (1000, 3), "contiguous"),
    (2, (3, 32, 5, 7), "channels_last"),  # the CPU's strip path: C % 16 == 0, rows of C channels
    (1, (300, 16), "contiguous"),  # strip path on 2-D input, several blocks and pieces
    (3, (2, 3, 2, 3, 4), "contiguous"),
    (3, (2, 3, 2, 3, 4), "channels_last"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}d-{'x'.join(map(str, c[1]))}-{c[2]}")
@pytest.mark.parametrize("act", ACTS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_training_and_eval_match_torch(backend, case, act, dtype):
    if backend == "triton" and dtype in (torch.float16, torch.float64) and case[2] != "contiguous":
        pytest.skip("the Triton interpreter is slow: fp16/fp64 run on contiguous inputs only")
    dim, shape, layout = case
    c = shape[1]
    prelu_n = c if act == "prelu" else 1
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    bn_cls = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}[dim]
    theirs = torch_block(bn_cls(c, dtype=param_dtype), act, prelu_n)
    if act == "prelu":
        theirs[1].to(dtype)  # torch's prelu needs the input's dtype
    ours = ours_block(dim, c, act, prelu_n, dtype=param_dtype)
    copy_params(ours, theirs)
    exact = copy.deepcopy(theirs).double()
    x = make_input(shape, dtype, layout, seed=zlib.crc32(repr(case).encode()))  # not hash(): it varies per process
    g = make_input(shape, dtype, "contiguous", seed=1)
    with dlkernels.use_backend(backend):
        got = run(ours, x, 2, g)
    want, ref = run(theirs, x, 2, g), run(exact, x.double(), 2, g.double())
    for (y, gr), (y_t, gr_t), (y_e, gr_e) in zip(got, want, ref, strict=True):
        assert_close_like_torch(y, y_t, y_e)
        assert_close_like_torch(gr[0], gr_t[0], gr_e[0])
        for p, p_t, p_e in zip(gr[1:], gr_t[1:], gr_e[1:], strict=True):  # weight, bias, prelu
            p_t = p_t.to(p.dtype)
            scale = max(1.0, p_e.abs().max().item())
            tol = {torch.float64: 1e-10, torch.float32: 1e-4}.get(dtype, 5e-2) * scale
            err, err_t = (p.double() - p_e).abs().max().item(), (p_t.double() - p_e).abs().max().item()
            assert err <= 2 * err_t + tol, (err, err_t)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs[0], name), rtol=1e-4, atol=1e-5)
    ours.eval(), theirs.eval(), exact.eval()
    with dlkernels.use_backend(backend):
        (y, gr), = run(ours, x, 1, g)
    (y_t, gr_t), = run(theirs, x, 1, g)
    (y_e, gr_e), = run(exact, x.double(), 1, g.double())
    assert_close_like_torch(y, y_t, y_e)
    assert_close_like_torch(gr[0], gr_t[0], gr_e[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs", [
    dict(momentum=None), dict(track_running_stats=False), dict(affine=False), dict(bias=False),
    dict(momentum=None, affine=False), dict(eps=1e-3, momentum=0.5),
], ids=str)
def test_batch_norm_module_semantics(backend, kwargs):
    torch.manual_seed(0)
    theirs = torch.nn.BatchNorm2d(4, **kwargs)
    ours = dnn.BatchNorm2d(4, **kwargs)
    if theirs.weight is not None:
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 1.5)
    ours.load_state_dict(theirs.state_dict())
    assert repr(ours) == repr(theirs)
    for step in range(3):
        x = torch.randn(3, 4, 5, 5) * (step + 1) + step
        with dlkernels.use_backend(backend):
            y = ours(x)
        torch.testing.assert_close(y, theirs(x), rtol=1e-5, atol=1e-5)
    for k, v in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    ours.eval(), theirs.eval()
    x = torch.randn(2, 4, 3, 3)
    with dlkernels.use_backend(backend):
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_state_dicts_load_both_ways():
    theirs = torch.nn.BatchNorm2d(3)
    theirs.train()(torch.randn(4, 3, 2, 2))
    for cls in (dnn.BatchNorm2d, dnn.BatchNormAct2d, dnn.SyncBatchNorm):
        ours = cls(3)
        ours.load_state_dict(theirs.state_dict())
        back = torch.nn.BatchNorm2d(3)
        back.load_state_dict(ours.state_dict())
        for k, v in theirs.state_dict().items():
            assert torch.equal(back.state_dict()[k], v)
    prelu = dnn.BatchNormAct2d(3, activation="prelu", prelu_parameters=3)
    assert set(prelu.state_dict()) == set(theirs.state_dict()) | {"prelu_weight"}
    assert "activation='prelu', prelu_parameters=3" in repr(prelu)


def test_functional_batch_norm_matches_torch():
    x = torch.randn(4, 3, 5)
    rm, rv, w, b = torch.randn(3), torch.rand(3) + 0.5, torch.rand(3), torch.randn(3)
    for training in (False, True):
        rm1, rv1, rm2, rv2 = rm.clone(), rv.clone(), rm.clone(), rv.clone()
        torch.testing.assert_close(F.batch_norm(x, rm1, rv1, w, b, training, 0.3, 1e-4),
                                   TF.batch_norm(x, rm2, rv2, w, b, training, 0.3, 1e-4))
        torch.testing.assert_close((rm1, rv1), (rm2, rv2))
    y = F.batch_norm_act(x, None, None, w, b, True, activation="prelu", prelu_weight=torch.tensor([0.1]))
    torch.testing.assert_close(y, TF.prelu(TF.batch_norm(x, None, None, w, b, True), torch.tensor([0.1])))


BAD_CALLS = [
    ("one value per channel", lambda m, f: m(2)(torch.randn(1, 2, 1, 1))),
    ("wrong rank", lambda m, f: m(2)(torch.randn(3, 2, 2))),
    ("wrong channels", lambda m, f: m(2)(torch.randn(2, 3, 2, 2))),
    ("int input", lambda m, f: m(2)(torch.ones(2, 2, 2, 2, dtype=torch.long))),
    ("float64 input, float32 params", lambda m, f: m(2)(torch.randn(2, 2, 2, 2, dtype=torch.float64))),
    ("float32 input, float64 weight", lambda m, f: f.batch_norm(torch.randn(2, 3, 4), None, None,
                                                                torch.ones(3, dtype=torch.float64), None, True)),
    ("weight size", lambda m, f: f.batch_norm(torch.randn(2, 3, 4), torch.zeros(3), torch.ones(3),
                                              torch.ones(4), None, True)),
    ("running_var size", lambda m, f: f.batch_norm(torch.randn(2, 3, 4), torch.zeros(3), torch.ones(4))),
    ("only running_mean", lambda m, f: f.batch_norm(torch.randn(2, 3, 4), torch.zeros(3), None, training=True)),
    ("eval without stats", lambda m, f: f.batch_norm(torch.randn(2, 3), None, None, training=False)),
    ("negative eps", lambda m, f: f.batch_norm(torch.randn(2, 3, 4), None, None, None, None, True, 0.1, -1.0)),
    ("other device", lambda m, f: f.batch_norm(torch.randn(2, 3, 4), torch.zeros(3, device="meta"),
                                               torch.ones(3, device="meta"), None, None, True)),
]


@pytest.mark.parametrize("name,call", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises_like_torch(name, call):
    with pytest.raises(Exception) as theirs:
        call(torch.nn.BatchNorm2d, TF)
    with pytest.raises(Exception) as ours:
        call(dnn.BatchNorm2d, F)
    assert type(ours.value) is type(theirs.value)
    if name != "other device":  # torch's wording depends on which of its checks fires first
        assert str(ours.value) == str(theirs.value)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="activation"):
        dnn.BatchNormAct2d(3, activation="gelu")
    with pytest.raises(ValueError, match="dropout probability"):  # torch.nn.Dropout's message
        dnn.BatchNormAct2d(3, dropout=1.1)
    with pytest.raises(ValueError, match="prelu_parameters"):
        dnn.BatchNormAct2d(3, activation="prelu", prelu_parameters=2)


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] in ("cpu", "reference")])
@pytest.mark.parametrize("act", ACTS, ids=str)
@pytest.mark.parametrize("shape", [(3, 2, 4), (2, 2, 65), (5, 16)], ids=str)  # the CPU's tile, row, strip paths
def test_gradcheck_float64(backend, act, shape):
    torch.manual_seed(0)
    c = shape[1]
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = torch.rand(c, dtype=torch.float64, requires_grad=True)
    b = torch.randn(c, dtype=torch.float64, requires_grad=True)
    p = torch.rand(c, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5
    with dlkernels.use_backend(backend):
        for training in (True, False):
            def fn(x, w, b, p, training=training):
                return F.batch_norm_act(x, rm.clone(), rv.clone(), w, b, training, activation=act,
                                        negative_slope=0.2, prelu_weight=p)

            assert torch.autograd.gradcheck(fn, (x, w, b, p))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [((6, 5), "contiguous"), ((4, 3, 70), "contiguous"), ((8, 32, 3, 3), "channels_last"),
                                  ((5, 3, 4, 4), "channels_last")], ids=str)
def test_batch_mean_accuracy(backend, case):
    """A batch mean off by an ulp is a systematic error that the backward multiplies by mean(grad),
    so the statistics must be as good as torch's (which sums in double). The bound that holds: one
    float32 ulp of |mean| plus one of the channel's std (a mean near 0 is not within an ulp of its
    own value: the residual sum rounds at the data's scale)."""
    shape, layout = case
    for seed in range(5):
        x = make_input(shape, torch.float32, layout, seed)
        with dlkernels.use_backend(backend):
            _, mean, _, var = torch.ops.dlkernels.batch_norm_act_train(x, None, None, None, 1e-5, 0, 0.0)
        dims = [d for d in range(x.dim()) if d != 1]
        exact = x.double().mean(dims)
        eps = torch.finfo(torch.float32).eps
        bound = eps * (exact.abs() + x.double().std(dims))
        assert ((mean.double() - exact).abs() <= bound).all(), (seed, (mean.double() - exact).abs() / bound)
        torch.testing.assert_close(var.double(), x.double().var(dims, unbiased=False), rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] in ("cpu", "reference")])
def test_opcheck(backend):
    ops = torch.ops.dlkernels
    x = torch.randn(3, 4, 5, 2, requires_grad=True)
    x_cl = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    w, b, p = (torch.rand(4, requires_grad=True) for _ in range(3))
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    mean, invstd = torch.randn(4), torch.rand(4) + 0.5
    g = torch.randn(3, 4, 5, 2)
    cases = [
        (ops.batch_norm_act_train.default, (x, w, b, None, 1e-5, 2, 0.1)),
        (ops.batch_norm_act_train.default, (x_cl, w, b, p, 1e-5, 3, 0.0)),
        (ops.batch_norm_act_train.default, (x, None, None, None, 1e-5, 1, 0.0)),
        (ops.batch_norm_act_eval.default, (x, rm, rv, w, b, p, 1e-5, 3, 0.0)),
        (ops.batch_norm_act_backward.default, (g, x.detach(), w.detach(), b.detach(), None, mean, invstd, 2, 0.1,
                                               True)),
    ]
    with dlkernels.use_backend(backend):
        for op, args in cases:
            torch.library.opcheck(op, args)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compile_backend):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), dnn.BatchNormAct2d(8, momentum=None), torch.nn.Conv2d(8, 4, 1),
        dnn.BatchNormAct2d(4, activation="prelu", prelu_parameters=4), dnn.BatchNorm2d(4))
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, fullgraph=True, backend=compile_backend)
    for _ in range(2):
        x = torch.randn(2, 3, 9, 9)
        y, y_c = model(x), compiled(x)
        torch.testing.assert_close(y_c, y, rtol=1e-4, atol=1e-5)
        g = torch.autograd.grad(y.sum(), list(model.parameters()))
        g_c = torch.autograd.grad(y_c.sum(), list(twin.parameters()))
        for a, b in zip(g, g_c, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for (k, v), (_, v2) in zip(model.state_dict().items(), twin.state_dict().items(), strict=True):
        torch.testing.assert_close(v, v2, rtol=1e-5, atol=1e-6, msg=k)
    model.eval(), twin.eval()
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


def saved_bytes(module: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd keeps for backward."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(seen.values())


def test_saves_at_most_half_of_torchs_bytes():
    x = torch.randn(8, 16, 20, 20, requires_grad=True)
    ours = saved_bytes(dnn.BatchNormAct2d(16), x * 1.0)
    theirs = saved_bytes(torch.nn.Sequential(torch.nn.BatchNorm2d(16), torch.nn.LeakyReLU(0.01)), x * 1.0)
    print(f"\nsaved for backward: dlkernels {ours} B, torch BN+LeakyReLU {theirs} B ({ours / theirs:.2f}x)")
    assert ours <= theirs / 2 + 4096


# ---- edge cases found by comparing with torch over random inputs ----

EMPTY = [(0, 1, 4, 4), (4, 0), (4, 0, 3), (0, 3, 4, 4), (0, 1)]  # torch itself fails on (0, 0, 3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", EMPTY, ids=str)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("training", [True, False])
def test_empty_inputs_like_torch(backend, shape, act, training):
    """Empty batches and zero channels: empty outputs and zero parameter gradients, running
    statistics unchanged (num_batches_tracked still counts), as torch; never a crash."""
    c = shape[1]
    cls_dim = {2: 1, 3: 1, 4: 2}[len(shape)]
    ours = ours_block(cls_dim, c, act, prelu_parameters=max(c, 1) if act == "prelu" else 1)
    theirs = torch_block(getattr(torch.nn, f"BatchNorm{cls_dim}d")(c), act, max(c, 1) if act == "prelu" else 1)
    copy_params(ours, theirs)
    ours.running_mean.fill_(0.5), theirs[0].running_mean.fill_(0.5)
    ours.train(training), theirs.train(training)
    x = torch.randn(shape, requires_grad=True)
    with dlkernels.use_backend(backend):
        y = ours(x)
        y.sum().backward()
    try:
        y_t = theirs(x)
    except IndexError:  # torch's own failure with zero channels and a weight: ours returns an empty output
        assert c == 0 and y.shape == x.shape and x.grad.shape == x.shape
        return
    assert y.shape == y_t.shape and x.grad.shape == x.shape
    for name, v in theirs[0].state_dict().items():
        assert torch.equal(ours.state_dict()[name], v), name
    if ours.weight is not None and ours.weight.grad is not None:
        assert not ours.weight.grad.any() and not ours.bias.grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_prelu_and_functional_batch_norm(backend):
    with dlkernels.use_backend(backend):
        assert F.prelu(torch.randn(4, 0, 3), torch.ones(0)).shape == (4, 0, 3)
        assert F.batch_norm(torch.randn(4, 0), None, None, training=True).shape == (4, 0)
        assert F.batch_norm(torch.randn(4, 0), torch.zeros(0), torch.ones(0)).shape == (4, 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_eval_backward_at_infinities(backend, act, dtype):
    """A finite gradient at x = +-inf in eval (torch: weight * invstd * dz), not 0 * inf = NaN."""
    x = torch.randn(2, 3, 4, 4, dtype=dtype)
    x[0, 1, 0, 0], x[1, 2, 1, 1] = float("inf"), float("-inf")
    p = torch.full((3,), 0.3, dtype=dtype)
    x_t = x.clone().requires_grad_()
    x.requires_grad_()
    with dlkernels.use_backend(backend):
        F.batch_norm_act(x, torch.zeros(3), torch.ones(3), training=False, activation=act, negative_slope=0.2,
                         prelu_weight=p).sum().backward()
    y_t = TF.batch_norm(x_t, torch.zeros(3), torch.ones(3), training=False)
    y_t = {None: y_t, "relu": TF.relu(y_t), "leaky_relu": TF.leaky_relu(y_t, 0.2), "prelu": TF.prelu(y_t, p)}[act]
    y_t.sum().backward()
    assert torch.equal(x.grad.isnan(), x_t.grad.isnan())
    torch.testing.assert_close(x.grad, x_t.grad, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("call", [
    lambda x: F.batch_norm(x, torch.zeros(3), torch.ones(3), training=False, eps=-1.0),
    lambda x: dnn.BatchNorm2d(3, eps=-1).eval()(x),
    lambda x: dnn.BatchNormAct2d(3, eps=-0.5).eval()(x),
])
def test_negative_eps_raises_like_torch(call):
    with pytest.raises(ValueError, match="eps must be non-negative"):
        call(torch.randn(2, 3, 4, 4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_cumulative_momentum_matches_torch(backend):
    ours, theirs = dnn.BatchNorm1d(2, momentum=None).double(), torch.nn.BatchNorm1d(2, momentum=None).double()
    g = torch.Generator().manual_seed(1)
    with dlkernels.use_backend(backend):
        for _ in range(3):
            x = torch.randn(5, 2, dtype=torch.float64, generator=g) * 3 + 1
            ours(x), theirs(x)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-14, atol=0)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-14, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_eval_with_tiny_eps(backend):
    """rsqrt(running_var + eps) in float32, as torch: eps=1e-8 underflows in half."""
    ours, theirs = dnn.BatchNorm2d(2, eps=1e-8).half().eval(), torch.nn.BatchNorm2d(2, eps=1e-8).half().eval()
    for m in (ours, theirs):
        m.running_var.zero_()
    x = torch.full((1, 2, 2, 2), 1e-3, dtype=torch.float16)
    with dlkernels.use_backend(backend):
        y = ours(x)
    torch.testing.assert_close(y, theirs(x))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", [0.1, 0.7])
def test_infinities_in_a_training_batch_reach_running_stats_like_torch(backend, momentum):
    ours, theirs = dnn.BatchNorm2d(3, momentum=momentum), torch.nn.BatchNorm2d(3, momentum=momentum)
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(3))
    x[1, 0, 2, 2] = float("inf")
    x[:, 2] *= 1e35  # overflows the variance, not the mean
    with dlkernels.use_backend(backend):
        ours(x)
    theirs(x)
    chans = [0, 1, 2]
    # the means are small against the data (std 1e35 in channel 2): an error of a float32 ulp of the
    # data's scale is what the mean accuracy bound allows
    scale = x.abs().nan_to_num(posinf=0).max().item()
    torch.testing.assert_close(ours.running_mean[chans], theirs.running_mean[chans], rtol=0, atol=1e-6 * scale,
                               equal_nan=True)
    torch.testing.assert_close(ours.running_var[chans], theirs.running_var[chans], equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["relu", "leaky_relu", "prelu"])
def test_input_equal_to_the_mean_normalizes_to_the_bias(backend, act):
    """x == mean gives exactly the bias (0), so the activation's gradient there is torch's (a
    double-folded shift left a residue of 0.0156 that flipped ReLU's gradient)."""
    x = torch.full((2, 1), -50.0, requires_grad=True)
    w, b, p, g = torch.tensor([0.42501047]), torch.zeros(1), torch.full((1,), 0.25), torch.tensor([[1.0], [0.0]])
    with dlkernels.use_backend(backend):
        y = F.batch_norm_act(x, None, None, w, b, training=True, eps=1e-8, activation=act, prelu_weight=p)
        (gx,) = torch.autograd.grad(y, x, g)
    y_t = TF.batch_norm(x, None, None, w, b, training=True, eps=1e-8)
    y_t = {"relu": TF.relu, "leaky_relu": lambda t: TF.leaky_relu(t, 0.01), "prelu": lambda t: TF.prelu(t, p)}[act](y_t)
    (gx_t,) = torch.autograd.grad(y_t, x, g)
    assert not y.any()
    torch.testing.assert_close(gx, gx_t, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_running_var_does_not_overflow(backend):
    ours, theirs = dnn.BatchNorm1d(1, dtype=torch.float16), torch.nn.BatchNorm1d(1, dtype=torch.float16)
    x = torch.tensor([[-300.0], [300.0]], dtype=torch.float16)
    with dlkernels.use_backend(backend):
        ours(x)
    theirs(x)
    torch.testing.assert_close(ours.running_var, theirs.running_var)


def test_eval_without_running_stats_on_an_empty_input_like_torch():
    x = torch.randn(0, 3)
    assert F.batch_norm(x, None, None, training=False).shape == TF.batch_norm(x, None, None, training=False).shape
    with pytest.raises(RuntimeError, match="running_mean must be defined"):
        F.batch_norm(torch.randn(2, 3), None, None, training=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", [1e5, 1e7])
def test_float64_variance_with_a_large_mean(backend, offset):
    """|mean| / std of 1e5-1e7 in float64: the variance within 100 ulps of the exact one (torch: <= 30);
    block means were merged at the scale of |mean| and lost up to 6e5 ulps."""
    g = torch.Generator().manual_seed(zlib.crc32(repr(offset).encode()))
    x = torch.randn(16, 3, 33, 17, generator=g, dtype=torch.float64) + offset
    with dlkernels.use_backend(backend):
        _, mean, _, var = torch.ops.dlkernels.batch_norm_act_train(x, None, None, None, 1e-5, 0, 0.0)
    dims = [0, 2, 3]
    exact_var = (x - x[0:1, :, 0:1, 0:1]).var(dims, unbiased=False)  # shifted: exact far below rounding
    ulps = ((var - exact_var).abs() / (exact_var * torch.finfo(torch.float64).eps)).max().item()
    assert ulps <= 100, ulps


# ---- SyncBatchNorm on 2 gloo ranks ----

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync_worker(rank: int, port: int, act: str | None, sizes: list[int], tail: tuple, result: dict) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    x_all = torch.randn(sum(sizes), 4, *tail) * 2 + 1
    g_all = torch.randn_like(x_all)
    lo = sum(sizes[:rank])
    x, g = x_all[lo:lo + sizes[rank]].clone().requires_grad_(), g_all[lo:lo + sizes[rank]]
    if act == "sync_bn":
        m = dnn.SyncBatchNorm.convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(4)))
    else:
        m = torch.nn.Sequential(ours_block(len(tail) or 1, 4, act, prelu_parameters=4, sync=True))
    y = m(x)
    gx, *gp = torch.autograd.grad(y, [x, *m.parameters()], g)
    for t in gp:
        dist.all_reduce(t)  # what DDP does (up to the averaging)
    result[rank] = (y.detach(), gx, [t for t in gp], {k: v.clone() for k, v in m.state_dict().items()})
    dist.destroy_process_group()


# (batch sizes per rank, shape after the channel dim): unequal batches; an empty rank (torch drops
# it from the statistics); one sample per rank of a 2-D input (only a total of 1 is an error)
SYNC_CASES = [([3, 5], (3, 3)), ([0, 6], (5, 5)), ([1, 1], ())]


@pytest.mark.parametrize("act", ["sync_bn", "leaky_relu", "prelu"])
@pytest.mark.parametrize("sizes,tail", SYNC_CASES, ids=str)
def test_sync_batch_norm_two_ranks_match_one_process(act, sizes, tail):
    if act == "sync_bn" and tail != (3, 3):
        pytest.skip("the plain module runs the same code; one case suffices")
    ctx = mp.get_context("spawn")
    manager = ctx.Manager()
    result = manager.dict()
    port = _free_port()
    procs = [ctx.Process(target=_sync_worker, args=(r, port, act, sizes, tail, result)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0, f"rank exited with {p.exitcode}"
    torch.manual_seed(0)
    x_all = torch.randn(sum(sizes), 4, *tail) * 2 + 1
    g_all = torch.randn_like(x_all)
    x_all.requires_grad_()
    if act == "sync_bn":
        m = torch.nn.Sequential(torch.nn.BatchNorm2d(4))
    else:
        m = torch.nn.Sequential(ours_block(len(tail) or 1, 4, act, prelu_parameters=4))
    y = m(x_all)
    gx, *gp = torch.autograd.grad(y, [x_all, *m.parameters()], g_all)
    y_ranks = torch.cat([result[0][0], result[1][0]])
    gx_ranks = torch.cat([result[0][1], result[1][1]])
    torch.testing.assert_close(y_ranks, y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_ranks, gx, rtol=1e-4, atol=1e-5)
    for a, b in zip(result[0][2], gp, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for k, v in m.state_dict().items():
        torch.testing.assert_close(result[0][3][k], v, rtol=1e-5, atol=1e-6, msg=k)
        torch.testing.assert_close(result[1][3][k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_sync_batch_norm_without_process_group_is_batch_norm():
    assert not torch.distributed.is_initialized()
    m, t = dnn.SyncBatchNorm(3), torch.nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(m(x), t(x))
    converted = dnn.SyncBatchNorm.convert_sync_batchnorm(
        torch.nn.Sequential(torch.nn.BatchNorm2d(3), dnn.BatchNormAct2d(3)))
    assert isinstance(converted[0], dnn.SyncBatchNorm) and converted[1].sync
    assert os.environ.get("RANK") is None


# ---- on a GPU (pytest -m gpu; skipped without one) ----

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("act", [None, "relu", "leaky_relu", "prelu"])
def test_batch_norm_on_gpu(backend, dtype, layout, act):
    """BatchNormAct2d on CUDA tensors against torch's BatchNorm2d + activation: training output,
    every gradient and the running statistics, then eval."""
    x = torch.randn(6, 33, 7, 9, device="cuda", dtype=torch.float64) * 2 + 1
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    x = x.to(dtype)
    g = torch.randn(x.shape, device="cuda", dtype=dtype)
    ours = dlkernels.nn.BatchNormAct2d(33, activation=act, negative_slope=0.2, prelu_parameters=33).cuda()
    bn = torch.nn.BatchNorm2d(33).cuda()
    extra = {None: [], "relu": [torch.nn.ReLU()], "leaky_relu": [torch.nn.LeakyReLU(0.2)],
             "prelu": [torch.nn.PReLU(33)]}[act]
    theirs = torch.nn.Sequential(bn, *extra).cuda()
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    ours.to(param_dtype), theirs.to(param_dtype)
    if act == "prelu":
        theirs[1].to(dtype)
        ours.prelu_weight.data = ours.prelu_weight.data.to(dtype)
    for mode in ("train", "eval"):
        ours.train(mode == "train"), theirs.train(mode == "train")
        xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        with dlkernels.use_backend(backend):
            yo = ours(xo)
            go = torch.autograd.grad(yo, [xo, ours.weight, ours.bias], g)
        yt = theirs(xt)
        gt = torch.autograd.grad(yt, [xt, bn.weight, bn.bias], g)
        tol = {"rtol": 2e-2, "atol": 2e-2} if dtype in (torch.float16, torch.bfloat16) else {"rtol": 1e-4, "atol": 1e-4}
        torch.testing.assert_close(yo, yt, **tol)
        for a, b in zip(go, gt, strict=True):
            torch.testing.assert_close(a.to(b.dtype), b, **tol)
        torch.testing.assert_close(ours.running_mean, bn.running_mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.running_var, bn.running_var, rtol=1e-4, atol=1e-5)


def test_running_stats_update_is_an_inplace_op():
    """The CPU update of the running statistics (one C++ call) bumps the buffers' version counters as
    torch's in-place ops do: a backward through an eval forward that saved them sees the change."""
    bn = dnn.BatchNormAct2d(3, activation="relu")
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    versions = bn.running_mean._version, bn.running_var._version
    y = bn.eval()(x)  # saves the running statistics for its backward
    bn.train()(torch.randn(4, 3, 2, 2))
    assert bn.running_mean._version > versions[0] and bn.running_var._version > versions[1]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()

"""Batch norm + activation + dropout in one pass (BatchNormAct*(dropout=p), functional
batch_norm_act(..., dropout=p)): on every backend the output is bit for bit dlkernels' dropout of
the output without dropout (the stream of docs/dropout.md over logical indices, whatever the
layout), the backward equals the backward without dropout fed grad * mask (the mask regenerated,
nothing per element saved), values and gradients agree with the reference; seeds, eval, p = 0
and 1, running statistics, empty batches, bad p, gradcheck, opcheck, compile, checkpoint, and
SyncBatchNorm on 2 gloo ranks."""

from __future__ import annotations

import socket
import zlib

import pytest
import torch
import torch.multiprocessing as mp
from conftest import DTYPES, assert_close_like_torch, backend_params

import dlkernels
import dlkernels.functional as F
import dlkernels.nn as dnn
from dlkernels.reference.dropout import dropout_bits, threshold

BACKENDS = backend_params("cpu")
ACTS = [None, "relu", "leaky_relu", "prelu"]


def _seed(*key) -> int:
    return zlib.crc32(repr(key).encode())  # not hash(): it varies per process


def _x(shape, dtype=torch.float64, key="x", scale=2.0, shift=1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(_seed(key, shape))
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)


_LAYOUTS = {}  # other layouts by name (a test's own)


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout in _LAYOUTS:
        return _LAYOUTS[layout](x)
    if layout == "channels_last":
        return x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    if layout == "strided":  # non-dense: copied to a dense tensor first
        big = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
        big[..., ::2] = x
        return big[..., ::2]
    if layout == "permuted":  # dense, not row-major, long inner extent (the CPU's row path, per-element words)
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    return x


# (shape, layout): the CPU's three memory paths, each with row-major and per-element words
CASES = [
    ((7, 5), "contiguous"),  # tile path, 2-D
    ((9, 16), "contiguous"),  # strip path, 2-D (row-major memory)
    ((3, 4, 9), "contiguous"),  # tile path, 3-D
    ((2, 3, 45, 50), "contiguous"),  # row path, rows longer than a block
    ((2, 3, 9, 70), "permuted"),  # row path, per-element words
    ((3, 32, 5, 7), "channels_last"),  # strip path, per-element words
    ((5, 3, 4, 6), "channels_last"),  # tile path, per-element words
    ((2, 3, 2, 3, 4), "channels_last"),  # 5-D
    ((3, 5, 4, 3), "strided"),
]


def _params(c: int, dtype: torch.dtype, key) -> tuple[torch.Tensor, ...]:
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(_seed("params", key))
    return ((torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(pdt),
            torch.randn(c, generator=g, dtype=torch.float64).to(pdt),
            (torch.rand(c, generator=g, dtype=torch.float64) * 0.5).to(pdt))


def _bn(x, w, b, pw, act, p, seed, **kw):
    return F.batch_norm_act(x, None, None, w, b, True, activation=act, negative_slope=0.2, prelu_weight=pw,
                            dropout=p, seed=seed, **kw)


def _run(backend, x0, layout, w0, b0, pw0, g, act, p, seed):
    """Output and gradients (x, weight, bias, prelu weight) on a backend."""
    x = _layout(x0, layout).requires_grad_()
    w, b, pw = (t.clone().requires_grad_() for t in (w0, b0, pw0))
    with dlkernels.use_backend(backend):
        y = _bn(x, w, b, pw, act, p, seed)
        grads = torch.autograd.grad(y, (x, w, b, pw) if act == "prelu" else (x, w, b), g)
    return y.detach(), grads


# The Triton interpreter takes ~0.5 s per batch-norm launch: Triton runs these (case, dtype)
# pairs, each with one activation (in turn), covering both tile shapes, every index-map depth
# (row-major, permuted, channels_last 4-D and 5-D) and every dtype.
TRITON_RUNS = [(0, torch.float32), (2, torch.bfloat16), (2, torch.float64), (2, torch.float16),
               (4, torch.float32), (6, torch.float32), (7, torch.bfloat16), (5, torch.float32)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-{c[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_is_dropout_of_batch_norm_act_and_matches_reference(backend, case, dtype):
    shape, layout = case
    acts = ACTS
    if backend == "triton":
        run = (CASES.index(case), dtype)
        if run not in TRITON_RUNS:
            pytest.skip("the Triton interpreter is slow: a subset of cases (TRITON_RUNS)")
        acts = [ACTS[TRITON_RUNS.index(run) % len(ACTS)]]
    c = shape[1]
    x0 = _x(shape, dtype, key=case)
    g = _x(shape, dtype, key="g", scale=1.0, shift=0.0)
    w0, b0, pw0 = _params(c, dtype, case)
    for act in acts:
        p, seed = (0.2, 0.5)[ACTS.index(act) % 2], _seed(case, str(dtype), act)
        keep = dropout_bits(x0, seed) >= threshold(p)
        got = _run(backend, x0, layout, w0, b0, pw0, g, act, p, seed)
        # without dropout, fed grad * m (F.dropout of g: exact in float32/64)
        plain = _run(backend, x0, layout, w0, b0, pw0, F.dropout(g, p, seed=seed), act, 0.0, None)
        y, y_plain = got[0], plain[0]
        assert y.stride() == torch.empty_like(_layout(x0, layout)).stride()
        with dlkernels.use_backend(backend):  # the one pass is exactly dropout(batch_norm_act(x)), same seed
            assert torch.equal(y, F.dropout(y_plain, p, seed=seed)), act
        assert torch.equal(y == 0, (y_plain == 0) | ~keep)  # the reference stream's mask, logical indices
        if dtype in (torch.float32, torch.float64):  # the backward regenerates the same mask
            for a, e in zip(got[1], plain[1], strict=True):
                assert torch.equal(a, e), act
        # values and gradients against the reference (same dtype) and a float64 computation
        ref = _run("reference", x0, layout, w0, b0, pw0, g, act, p, seed)
        exact = _run("reference", x0.double(), layout, w0.double(), b0.double(), pw0.double(), g.double(), act, p,
                     seed)
        assert_close_like_torch(got[0], ref[0], exact[0])
        assert_close_like_torch(got[1][0], ref[1][0], exact[1][0])
        for a, r, e in zip(got[1][1:], ref[1][1:], exact[1][1:], strict=True):  # weight, bias, prelu weight
            scale = max(1.0, e.abs().max().item())
            tol = {torch.float64: 1e-10, torch.float32: 1e-4}.get(dtype, 5e-2) * scale
            err, err_r = (a.double() - e).abs().max().item(), (r.double() - e).abs().max().item()
            assert err <= 2 * err_r + tol, (act, err, err_r)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layout_of_more_dims_than_the_index_map(backend):
    """A dense layout whose dims do not coalesce (reversed 10-d): dropout as a separate pass."""
    shape = (2, 3, 2, 2, 2, 2, 2, 2, 2, 2)
    x0, g = _x(shape, torch.float32), _x(shape, torch.float32, key="g")
    w, b, pw = _params(3, torch.float32, "deep")
    layout = "reversed"
    _LAYOUTS[layout] = lambda t: t.permute(*reversed(range(10))).contiguous().permute(*reversed(range(10)))
    y, grads = _run(backend, x0, layout, w, b, pw, g, "leaky_relu", 0.4, 9)
    y_plain, grads_plain = _run(backend, x0, layout, w, b, pw, F.dropout(g, 0.4, seed=9), "leaky_relu", 0.0, None)
    assert y.stride() == _layout(x0, layout).stride()
    with dlkernels.use_backend(backend):
        assert torch.equal(y, F.dropout(y_plain, 0.4, seed=9))
    for a, e in zip(grads, grads_plain, strict=True):
        assert torch.equal(a, e)


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] in ("cpu", "reference")])
@pytest.mark.parametrize("act", ACTS, ids=str)
@pytest.mark.parametrize("shape", [(3, 2, 4), (2, 2, 65), (5, 16)], ids=str)  # the CPU's tile, row, strip paths
def test_gradcheck_float64(backend, act, shape):
    if backend == "reference" and shape != (3, 2, 4):
        pytest.skip("the reference is slow under gradcheck; one shape suffices for the spec")
    c = shape[1]
    x = _x(shape, key="gc").requires_grad_()
    w, b, pw = (t.requires_grad_() for t in _params(c, torch.float64, "gc"))
    with dlkernels.use_backend(backend):
        assert torch.autograd.gradcheck(lambda x, w, b, pw: _bn(x, w, b, pw, act, 0.3, 5), (x, w, b, pw))


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] in ("cpu", "reference")])
def test_opcheck(backend):
    ops = torch.ops.dlkernels
    x = _x((3, 4, 5, 2), torch.float32).requires_grad_()
    x_cl = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    w, b, pw = (t.requires_grad_() for t in _params(4, torch.float32, "opcheck"))
    mean, invstd = torch.randn(4), torch.rand(4) + 0.5
    seed = torch.tensor(-12345, dtype=torch.int64)
    g = _x((3, 4, 5, 2), torch.float32, key="g")
    cases = [
        (ops.batch_norm_act_train_dropout.default, (x, w, b, None, 1e-5, 2, 0.1, 0.3, seed)),
        (ops.batch_norm_act_train_dropout.default, (x_cl, w, b, pw, 1e-5, 3, 0.0, 0.5, seed)),
        (ops.batch_norm_act_train_dropout.default, (x, None, None, None, 1e-5, 1, 0.0, 0.2, seed)),
        (ops.batch_norm_act_backward.default, (g, x.detach(), w.detach(), b.detach(), None, mean, invstd, 2, 0.1,
                                               True, 0.3, seed)),
    ]
    with dlkernels.use_backend(backend):
        for op, args in cases:
            torch.library.opcheck(op, args)


def test_seeds_generators_and_fresh_masks():
    x = _x((4, 3, 5, 5), torch.float32)
    m = dnn.BatchNormAct2d(3, dropout=0.5)
    torch.manual_seed(5)
    a = m(x)
    torch.manual_seed(5)
    assert torch.equal(m(x), a)  # torch.manual_seed makes it reproducible
    assert not torch.equal(m(x), a)  # a fresh draw per call
    y = F.batch_norm_act(x, None, None, training=True, dropout=0.5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(y, F.batch_norm_act(x, None, None, training=True, dropout=0.5,
                                           generator=torch.Generator().manual_seed(7)))
    with pytest.raises(ValueError, match="not both"):
        F.batch_norm_act(x, None, None, training=True, dropout=0.5, seed=1, generator=torch.Generator())
    with pytest.raises(TypeError, match="seed must be an int"):
        F.batch_norm_act(x, None, None, training=True, dropout=0.5, seed=1.5)


def test_eval_and_zero_p_draw_nothing_and_change_nothing():
    x = _x((4, 3, 5, 5), torch.float32)
    ours, plain = dnn.BatchNormAct2d(3, dropout=0.5), dnn.BatchNormAct2d(3)
    ours.load_state_dict(plain.state_dict())
    for mode in (False, True):
        ours.train(mode), plain.train(mode)
        if mode:  # training with p = 0
            ours.dropout = 0.0
        state = torch.get_rng_state()
        assert torch.equal(ours(x), plain(x))
        assert torch.equal(torch.get_rng_state(), state)  # no seed drawn
    # eval without running statistics normalizes with the batch's, and still drops nothing
    a = dnn.BatchNormAct2d(3, dropout=0.5, track_running_stats=False).eval()
    b = dnn.BatchNormAct2d(3, track_running_stats=False).eval()
    assert torch.equal(a(x), b(x))
    y = F.batch_norm_act(x, torch.zeros(3), torch.ones(3), training=False, dropout=0.5)
    assert torch.equal(y, F.batch_norm_act(x, torch.zeros(3), torch.ones(3), training=False))


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] in ("cpu", "reference")])
def test_p_one_gives_zeros_and_running_stats_ignore_dropout(backend):
    x = _x((4, 3, 5, 5), torch.float32).requires_grad_()
    mods = [dnn.BatchNormAct2d(3, activation="prelu", prelu_parameters=3, dropout=p) for p in (0.0, 0.3, 1.0)]
    with dlkernels.use_backend(backend):
        ys = [m(x) for m in mods]
        gx, gw, gp = torch.autograd.grad(ys[2], (x, mods[2].weight, mods[2].prelu_weight), torch.ones_like(x))
    assert ys[2].shape == x.shape and not ys[2].any()  # p = 1: zeros, as torch
    assert not gx.any() and not gw.any() and not gp.any()
    for m in mods[1:]:  # the statistics of the input, whatever is dropped after
        assert torch.equal(m.running_mean, mods[0].running_mean) and torch.equal(m.running_var, mods[0].running_var)
    y = F.batch_norm_act(torch.tensor([[float("nan")], [1.0]]), None, None, training=True, dropout=1.0)
    assert y.isnan().all()  # torch's x * 0: a NaN stays NaN


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    m = dnn.BatchNormAct2d(3, dropout=0.5)
    m.running_mean.fill_(0.5)
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    with dlkernels.use_backend(backend):
        y = m(x)
        y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    assert torch.equal(m.running_mean, torch.full((3,), 0.5))


def test_bad_p_raises_like_torch():
    for p in (-0.1, 1.5):
        with pytest.raises(ValueError) as theirs:
            torch.nn.Dropout(p)
        with pytest.raises(ValueError) as ours:
            dnn.BatchNormAct2d(3, dropout=p)
        assert str(ours.value) == str(theirs.value)
        with pytest.raises(ValueError) as ours_f:
            F.batch_norm_act(torch.randn(2, 3), None, None, training=True, dropout=p)
        assert str(ours_f.value) == str(theirs.value)
    assert "dropout=0.25" in repr(dnn.BatchNormAct1d(3, dropout=0.25))


def test_nothing_per_element_saved_for_backward():
    def saved(module: torch.nn.Module, x: torch.Tensor) -> list[int]:
        sizes: list[int] = []

        def pack(t):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(x)
        return sizes

    x = torch.randn(8, 16, 20, 20, requires_grad=True)
    plain = saved(dnn.BatchNormAct2d(16), x * 1.0)
    drop = saved(dnn.BatchNormAct2d(16, dropout=0.2), x * 1.0)
    assert sorted(drop) == sorted([*plain, 1])  # the seed, no mask


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_equals_eager(compile_backend):
    torch._dynamo.reset()
    model = torch.nn.Sequential(dnn.BatchNormAct2d(3, dropout=0.3),
                                dnn.BatchNormAct2d(3, activation="prelu", prelu_parameters=3, dropout=0.5))
    compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
    x = _x((2, 3, 9, 9), torch.float32)
    for _ in range(2):
        torch.manual_seed(3)
        y = model(x)
        g = torch.autograd.grad(y.sum(), list(model.parameters()))
        torch.manual_seed(3)
        y_c = compiled(x)
        g_c = torch.autograd.grad(y_c.sum(), list(model.parameters()))
        assert torch.equal(y == 0, y_c == 0)  # the same masks: the same seeds, drawn in the same order
        torch.testing.assert_close(y_c, y, rtol=1e-5, atol=1e-5)
        for a, b in zip(g, g_c, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    y_s = torch.compile(lambda t: F.batch_norm_act(t, None, None, training=True, dropout=0.4, seed=21),
                        fullgraph=True, backend=compile_backend)(x)
    assert torch.equal(y_s, F.batch_norm_act(x, None, None, training=True, dropout=0.4, seed=21))


def test_checkpoint_recomputes_the_same_mask():
    from torch.utils.checkpoint import checkpoint

    block = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), dnn.BatchNormAct2d(4, dropout=0.5))
    x = _x((2, 3, 6, 6), torch.float32).requires_grad_()
    torch.manual_seed(4)
    y = checkpoint(block, x, use_reentrant=False)
    g_ckpt = torch.autograd.grad(y.sum(), [x, *block.parameters()])
    torch.manual_seed(4)
    y2 = block(x)
    g = torch.autograd.grad(y2.sum(), [x, *block.parameters()])
    assert torch.equal(y, y2)
    for a, b in zip(g_ckpt, g, strict=True):
        assert torch.equal(a, b)


# ---- SyncBatchNorm with dropout on 2 gloo ranks ----

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync_worker(rank: int, port: int, result: dict) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    x = _x((3 + rank, 4, 3, 3), torch.float32, key=("sync", rank)).requires_grad_()
    g = _x((3 + rank, 4, 3, 3), torch.float32, key=("sync g", rank))
    m = dnn.BatchNormAct2d(4, dropout=0.5, sync=True)
    plain = dnn.BatchNormAct2d(4, sync=True)
    torch.manual_seed(rank)
    seed = int(torch.empty((), dtype=torch.int64).random_(-(2**63), None))  # the draw the module makes
    torch.manual_seed(rank)
    y = m(x)
    (gx,) = torch.autograd.grad(y, x, g)
    y_plain = plain(x)
    (gx_plain,) = torch.autograd.grad(y_plain, x, F.dropout(g, 0.5, seed=seed))
    result[rank] = (torch.equal(y, F.dropout(y_plain, 0.5, seed=seed)), torch.equal(gx, gx_plain),
                    torch.equal(m.running_mean, plain.running_mean))
    dist.destroy_process_group()


def test_sync_batch_norm_with_dropout_two_ranks():
    ctx = mp.get_context("spawn")
    result = ctx.Manager().dict()
    port = _free_port()
    procs = [ctx.Process(target=_sync_worker, args=(r, port, result)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0, f"rank exited with {p.exitcode}"
    assert result[0] == (True, True, True) and result[1] == (True, True, True), dict(result)


# ---- on a GPU (pytest -m gpu; skipped without one) ----

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("act", ACTS)
def test_batch_norm_dropout_on_gpu(backend, dtype, layout, act):
    """On CUDA tensors: bit for bit dropout(batch_norm_act(x)) with the reference stream's mask, the
    backward equal to the one without dropout fed grad * m (float32/64), values and gradients close
    to the reference on the CPU."""
    shape = (6, 33, 7, 9)
    x0, g = _x(shape, dtype, key="gpu"), _x(shape, dtype, key="gpu g", scale=1.0, shift=0.0)
    w0, b0, pw0 = _params(33, dtype, "gpu")
    seed, p = _seed("gpu", str(dtype), layout, act), 0.3
    keep = dropout_bits(x0, seed) >= threshold(p)
    cuda = [t.cuda() for t in (x0, w0, b0, pw0, g)]
    x = _layout(cuda[0], layout)
    with dlkernels.use_backend(backend):
        y_plain = _bn(x, *cuda[1:4], act, 0.0, None)
        y = _bn(x, *cuda[1:4], act, p, seed)
        assert torch.equal(y, F.dropout(y_plain, p, seed=seed))
        assert torch.equal((y == 0).cpu(), (y_plain == 0).cpu() | ~keep)
    got = _run(backend, cuda[0], layout, *cuda[1:4], cuda[4], act, p, seed)
    ref = _run("reference", x0, layout, w0, b0, pw0, g, act, p, seed)
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype in (torch.float16, torch.bfloat16) else {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(got[0].cpu(), ref[0], **tol)
    for a, r in zip(got[1], ref[1], strict=True):
        torch.testing.assert_close(a.cpu(), r, **tol)
    if dtype in (torch.float32, torch.float64):
        plain = _run(backend, cuda[0], layout, *cuda[1:4], F.dropout(cuda[4], p, seed=seed), act, 0.0, None)[1]
        for a, e in zip(got[1], plain, strict=True):
            assert torch.equal(a, e)

"""Dropout family: functional forms and modules on every backend against the reference (the masks
must be identical, docs/dropout.md), torch's semantics (scale, eval, p = 0 and 1, errors), seeds,
layouts, threads, gradients, compile, checkpoint and the bytes saved for backward. The Philox
stream itself (known answers, statistics) is tested in tests/test_philox.py."""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as TF
from conftest import DTYPES, backend_params

import dlkernels
import dlkernels.functional as F
import dlkernels.nn as dnn


def _seed(*key) -> int:
    return zlib.crc32(repr(key).encode())


def _x(shape, dtype=torch.float32, key="x") -> torch.Tensor:
    g = torch.Generator().manual_seed(_seed(key, shape))
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return x.to(memory_format=torch.channels_last)
    if layout == "strided":  # the same values in a non-dense view
        big = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
        big[..., ::2] = x
        return big[..., ::2]
    return x


# name -> (call(x, w, seed) -> outputs, has weight)
FUNCS = {
    "dropout": lambda x, w, s: F.dropout(x, 0.3, seed=s),
    "dropout2d": lambda x, w, s: F.dropout2d(x, 0.5, seed=s),
    "leaky_relu_dropout": lambda x, w, s: F.leaky_relu_dropout(x, 0.1, 0.2, seed=s),
    "prelu_dropout": lambda x, w, s: F.prelu_dropout(x, w, 0.5, seed=s),
}


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("name", list(FUNCS))
def test_matches_reference_bit_for_bit(backend, dtype, layout, name):
    """Outputs and every gradient equal the reference's exactly (same mask, same arithmetic)."""
    x0 = _x((3, 5, 7, 6), dtype, key=name)
    w0 = torch.rand(5, generator=torch.Generator().manual_seed(1)).to(dtype)
    g = _x((3, 5, 7, 6), dtype, key="g")
    seed = _seed(name, str(dtype), layout)

    def run(which):
        x = _layout(x0, layout).requires_grad_()
        w = w0.clone().requires_grad_()
        with dlkernels.use_backend(which):
            y = FUNCS[name](x, w, seed)
            grads = torch.autograd.grad(y, (x, w), g, allow_unused=True)
        return [y, *(t for t in grads if t is not None)]

    ours, want = run(backend), run("reference")
    if name == "prelu_dropout":  # the weight gradient is a sum: its order differs between backends
        tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)
        torch.testing.assert_close(ours.pop(), want.pop(), rtol=tol, atol=tol)
    for a, b in zip(ours, want, strict=True):
        assert torch.equal(a, b), (a - b).abs().max()


@pytest.mark.parametrize("backend", backend_params())
def test_mask_ignores_layout_and_threads(backend):
    x = _x((4, 6, 5, 3))
    seed = _seed("layout")
    with dlkernels.use_backend(backend):
        want = F.dropout(x, 0.5, seed=seed)
        for layout in ("channels_last", "strided"):
            assert torch.equal(F.dropout(_layout(x, layout), 0.5, seed=seed), want), layout
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = F.dropout(x, 0.5, seed=seed)
        finally:
            torch.set_num_threads(threads)
    assert torch.equal(one, want)


def test_semantics_like_torch():
    x = _x((8, 16, 9))
    y = F.dropout(x, 0.25, seed=1)
    kept = y != 0
    # kept elements scaled by 1/(1-p), dropped ones zero, and the drop rate near p
    torch.testing.assert_close(y[kept], x[kept] / 0.75, rtol=1e-6, atol=0)
    assert 0.15 < 1 - kept.float().mean().item() < 0.35
    assert F.dropout(x, 0.5, training=False) is x  # torch returns the input itself
    assert F.dropout(x, 0.0) is x
    assert torch.equal(F.dropout(x, 1.0), torch.zeros_like(x))
    inf = torch.tensor([float("inf")] * 8)
    assert F.dropout(inf, 1.0).isnan().all()  # as torch: inf * 0
    e = torch.empty(0, 3)
    assert F.dropout(e, 0.5).shape == (0, 3)


def test_seeds_generators_and_fresh_masks():
    x = torch.ones(64, 64)
    torch.manual_seed(5)
    a, b = F.dropout(x, 0.5), F.dropout(x, 0.5)
    assert not torch.equal(a, b)  # successive calls draw fresh seeds
    torch.manual_seed(5)
    assert torch.equal(F.dropout(x, 0.5), a)
    g = torch.Generator().manual_seed(7)
    c = F.dropout(x, 0.5, generator=g)
    assert torch.equal(F.dropout(x, 0.5, generator=torch.Generator().manual_seed(7)), c)
    assert torch.equal(F.dropout(x, 0.5, seed=2**64 - 1), F.dropout(x, 0.5, seed=-1))  # modulo 2^64
    assert not torch.equal(F.dropout(x, 0.5, seed=1), F.dropout(x, 0.5, seed=2))


def test_channel_dropout_drops_whole_channels():
    x = torch.ones(6, 8, 5, 4) + _x((6, 8, 5, 4)).abs()
    y = F.dropout2d(x, 0.5, seed=3)
    per_channel = (y == 0).flatten(2)
    assert torch.equal(per_channel.all(-1), per_channel.any(-1))  # all or nothing per (n, c)
    y3 = F.dropout3d(torch.ones(6, 3, 2, 2), 0.5, seed=3)  # unbatched: (C, D, H, W)
    assert torch.equal((y3 == 0).flatten(1).all(-1), (y3 == 0).flatten(1).any(-1))
    y1 = F.dropout1d(torch.ones(7, 9), 0.5, seed=4)  # unbatched (C, L)
    assert y1.shape == (7, 9) and torch.equal((y1 == 0).all(-1), (y1 == 0).any(-1))


def test_gradient_is_mask_times_scale():
    x = _x((5, 7, 3)).requires_grad_()
    y = F.dropout(x, 0.4, seed=9)
    (gx,) = torch.autograd.grad(y.sum(), x)
    m = torch.where(y != 0, 1 / 0.6, 0.0).float()
    torch.testing.assert_close(gx, m, rtol=1e-6, atol=0)


def test_eager_equals_compiled():
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), dnn.LeakyReLUDropout(0.1, 0.3), dnn.Dropout(0.2))
    x = _x((8, 16))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.manual_seed(11)
    y = model(x)
    torch.manual_seed(11)
    y_c = compiled(x)
    assert torch.equal(y, y_c)


def test_checkpoint_recomputes_the_same_mask():
    from torch.utils.checkpoint import checkpoint

    lin = torch.nn.Linear(12, 12)
    x = _x((6, 12)).requires_grad_()

    def block(t):
        return F.dropout(lin(t), 0.5)

    torch.manual_seed(3)
    y = checkpoint(block, x, use_reentrant=False)
    (g_ckpt,) = torch.autograd.grad(y.sum(), x)
    torch.manual_seed(3)
    (g,) = torch.autograd.grad(block(x).sum(), x)
    assert torch.equal(g_ckpt, g)


def test_nothing_per_element_saved_for_backward():
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    x = _x((32, 32)).requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.dropout(x, 0.5, seed=1)
    assert saved == [1]  # the seed only
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.leaky_relu_dropout(x, 0.1, 0.5, seed=1)
    assert saved == [x.numel(), 1]  # the input (as leaky_relu alone) and the seed, no mask


def test_gradcheck_float64():
    x = _x((3, 4, 5), torch.float64).requires_grad_()
    w = torch.rand(4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: F.dropout(t, 0.3, seed=1), (x,))
    torch.autograd.gradcheck(lambda t: F.leaky_relu_dropout(t, 0.1, 0.3, seed=2), (x,))
    torch.autograd.gradgradcheck(lambda t: F.leaky_relu_dropout(t, 0.1, 0.3, seed=2), (x,))
    torch.autograd.gradcheck(lambda t, u: F.prelu_dropout(t, u, 0.3, seed=3), (x, w))


@pytest.mark.parametrize("backend", backend_params())
def test_opcheck(backend):
    ops = torch.ops.dlkernels
    x = _x((2, 3, 4, 5)).requires_grad_()
    w = torch.rand(3, requires_grad=True)
    seed = torch.tensor(123, dtype=torch.int64)
    cases = [
        (ops.dropout.default, (x, 0.3, seed, False)),
        (ops.dropout.default, (x.detach().to(memory_format=torch.channels_last), 0.5, seed, True)),
        (ops.leaky_relu_dropout.default, (x, 0.1, 0.2, seed)),
        (ops.leaky_relu_dropout_backward.default, (x.detach(), x.detach(), 0.1, 0.2, seed)),
        (ops.prelu_dropout.default, (x, w, 0.5, seed)),
        (ops.prelu_dropout_backward.default, (x.detach(), x.detach(), w.detach(), 0.5, seed)),
    ]
    with dlkernels.use_backend(backend):
        for op, args in cases:
            torch.library.opcheck(op, args)


def test_modules_are_drop_ins():
    for ours, theirs in ((dnn.Dropout(0.2), torch.nn.Dropout(0.2)), (dnn.Dropout2d(0.3), torch.nn.Dropout2d(0.3))):
        assert repr(ours) == repr(theirs)
        ours.eval()
        x = _x((2, 3, 4, 4))
        assert torch.equal(ours(x), x)
    p = dnn.PReLUDropout(4, 0.1, p=0.3)
    torch_p = torch.nn.PReLU(4, 0.2)
    torch_p.load_state_dict(p.state_dict())
    p.load_state_dict(torch_p.state_dict())
    p.eval()
    x = _x((2, 4, 3))
    torch.testing.assert_close(p(x), torch_p(x))
    act = dnn.LeakyReLUDropout(0.2, 0.5).eval()
    torch.testing.assert_close(act(x), TF.leaky_relu(x, 0.2))


def test_inplace():
    x = _x((4, 9))
    ref = F.dropout(x, 0.5, seed=4)
    y = x.clone()
    out = F.dropout(y, 0.5, inplace=True, seed=4)
    assert out is y and torch.equal(y, ref)
    leaf = _x((3,)).requires_grad_()
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        F.dropout(leaf, 0.5, inplace=True)


def test_bad_input():
    x = torch.ones(3, 4)
    with pytest.raises(ValueError, match="between 0 and 1, but got 1.5"):
        F.dropout(x, 1.5)
    with pytest.raises(ValueError, match="between 0 and 1"):
        F.dropout2d(x[None], -0.1)
    with pytest.raises(TypeError, match="must be a number"):
        F.dropout(x, "0.5")
    with pytest.raises(RuntimeError, match="can't be cast to the desired output type Long"):
        F.dropout(torch.ones(3, dtype=torch.long), 0.5)
    with pytest.raises(RuntimeError, match="Bool"):
        F.leaky_relu_dropout(torch.ones(3, dtype=torch.bool), 0.1, 0.5)
    with pytest.raises(TypeError, match="seed must be an int"):
        F.dropout(x, 0.5, seed=1.5)
    with pytest.raises(RuntimeError, match="Expected 2D or 3D input"):
        F.dropout1d(torch.ones(2, 3, 4, 5), 0.5)
    with pytest.raises(TypeError, match="must be Tensor"):
        F.dropout([1.0], 0.5)
    with pytest.raises(ValueError, match="between 0 and 1"):
        dnn.LeakyReLUDropout(p=2.0)

"""The dropout stream of docs/dropout.md: Philox4x32-10 against Random123's known answers, the
reference against a plain-Python reading of the doc, the Triton kernels bit for bit against the
reference (every function, dtype and layout, per channel too), and the statistics of the masks.

The Triton tests run on CPU tensors under TRITON_INTERPRET=1, on CUDA tensors where a GPU is
visible, and skip otherwise. Seeds come from zlib.crc32 (stable across runs), never hash().
"""

from __future__ import annotations

import math
import os
import zlib

import pytest
import torch
from conftest import DTYPES, SEEDS, backend_params, seed_of
from conftest import PHILOX_KAT as KAT
from conftest import PHILOX_KAT_IDS as KAT_IDS
from conftest import make_layout as make

import dlkernels.reference.dropout as R

M32 = 0xFFFFFFFF
TRITON_DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET", "0") == "1" else "cuda"
TRITON = [p for p in backend_params(TRITON_DEVICE) if p.id == "triton"]


def triton_module():
    import triton_ops.dropout as T

    return T


def philox_py(counter, key):
    """Philox4x32-10 word by word with Python ints, as docs/dropout.md states it."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & M32, (p0 >> 32) ^ c3 ^ k1, p0 & M32
    return c0, c1, c2, c3


def word_py(i: int, seed: int) -> int:
    """The doc's word of logical index i."""
    s = seed % 2**64
    q = i // 4
    return philox_py((q & M32, q >> 32, 0, 0), (s & M32, s >> 32))[i % 4]


def assert_same(ours: torch.Tensor, ref: torch.Tensor, layout_of: torch.Tensor | None = None) -> None:
    """Bit-equal values (NaN where NaN) and dtype; ours in torch.empty_like(layout_of)'s layout."""
    ours = ours.cpu()
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=0, atol=0, equal_nan=True)
    if layout_of is not None and ours.numel() > 1:
        assert ours.stride() == torch.empty_like(layout_of).stride()


def to_triton(*ts: torch.Tensor):
    return tuple(t.to(TRITON_DEVICE) for t in ts)


# --- Philox known answers -----------------------------------------------------------------


@pytest.mark.parametrize("counter,key,out", KAT, ids=KAT_IDS)
def test_kat_python(counter, key, out):
    assert philox_py(counter, key) == out


@pytest.mark.parametrize("counter,key,out", KAT, ids=KAT_IDS)
def test_kat_reference(counter, key, out):
    got = R.philox4x32_10(torch.tensor([counter, counter]), key)
    assert got.dtype == torch.int64 and got.shape == (2, 4)
    assert got.tolist() == [list(out)] * 2


@pytest.mark.parametrize("backend", TRITON)
def test_kat_triton(backend):
    T = triton_module()
    for counter, key, out in KAT:
        (c,) = to_triton(torch.tensor([counter, counter, counter]))
        assert T.philox4x32_10(c, key).cpu().tolist() == [list(out)] * 3


def test_reference_philox_random_words():
    """The 16-bit-limb products of the reference against Python's exact integers."""
    gen = torch.Generator().manual_seed(zlib.crc32(b"philox words"))
    counters = torch.randint(0, 2**32, (64, 4), generator=gen, dtype=torch.int64)
    counters[0] = M32  # products at their largest
    keys = torch.randint(0, 2**32, (8, 2), generator=gen, dtype=torch.int64).tolist()
    for key in keys:
        got = R.philox4x32_10(counters, tuple(key)).tolist()
        assert got == [list(philox_py(c, key)) for c in counters.tolist()]


@pytest.mark.parametrize("seed", SEEDS)
def test_reference_bits_follow_the_doc(seed):
    x = torch.empty(3, 7)
    got = R.dropout_bits(x, seed)
    assert got.dtype == torch.int64 and got.shape == x.shape and got.is_contiguous()
    assert got.flatten().tolist() == [word_py(i, seed) for i in range(21)]


def test_reference_threshold_and_seed_key():
    assert R.threshold(0.0) == 0 and R.threshold(0.5) == 2**31
    assert R.threshold(math.nextafter(1.0, 0.0)) == 2**32 - 1
    assert R.threshold(1e-300) == 0
    assert R.seed_key(-1) == (M32, M32) and R.seed_key(2**32 + 5) == (5, 1) and R.seed_key(-(2**63)) == (0, 2**31)
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError):
            R.threshold(bad)


# --- Triton against the reference, bit for bit --------------------------------------------

BITS_CASES = [
    ((3, 5, 7), "contiguous"),
    ((1,), "contiguous"),
    ((0, 4), "contiguous"),
    ((3, 347), "contiguous"),  # more than one block
    ((2, 3, 5, 7), "channels_last"),
    ((4, 6, 5), "strided"),
]


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("shape,layout", BITS_CASES, ids=str)
def test_bits_triton(backend, shape, layout):
    T = triton_module()
    x = make(shape, torch.float32, layout)
    for seed in SEEDS:
        (xt,) = to_triton(x)
        got = T.dropout_bits(xt, seed)
        assert got.dtype == torch.int64 and got.shape == x.shape and got.is_contiguous()
        assert torch.equal(got.cpu(), R.dropout_bits(x, seed)), seed


# shapes and layouts of the elementwise tests: row-major memory, channels_last (the index map's
# three dims), non-dense input, 5-d channels_last_3d and a 5-d permutation (contiguous fallback)
CASES = [
    ((1030,), "contiguous"),
    ((37, 5), "contiguous"),
    ((37, 5), "strided"),
    ((2, 3, 5, 7), "contiguous"),
    ((2, 3, 5, 7), "channels_last"),
    ((1, 3, 5, 7), "channels_last"),
    ((2, 3, 4, 5, 7), "channels_last_3d"),
    ((2, 3, 4, 5, 7), "permuted"),
]
CASE_IDS = [f"{'x'.join(map(str, s))}-{lay}" for s, lay in CASES]


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", CASES, ids=CASE_IDS)
def test_dropout_triton(backend, dtype, shape, layout):
    T = triton_module()
    x = make(shape, dtype, layout)
    (xt,) = to_triton(x)
    for per_channel in (False, True) if len(shape) >= 2 else (False,):
        for p in (0.3, 0.5):
            seed = seed_of(shape, layout, per_channel, p)
            assert_same(T.dropout(xt, p, seed, per_channel), R.dropout(x, p, seed, per_channel), x)


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", CASES[2:6], ids=CASE_IDS[2:6])
def test_leaky_relu_dropout_triton(backend, dtype, shape, layout):
    T = triton_module()
    x, g = make(shape, dtype, layout), make(shape, dtype, "contiguous", "grad")
    xt, gt = to_triton(x, g)
    p, seed = 0.3, seed_of("leaky", shape, layout)
    for slope in (0.01, -0.3):
        assert_same(T.leaky_relu_dropout(xt, slope, p, seed), R.leaky_relu_dropout(x, slope, p, seed), x)
        ref = R.leaky_relu_dropout_backward(g, x, slope, p, seed)
        assert_same(T.leaky_relu_dropout_backward(gt, xt, slope, p, seed), ref, x)


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", CASES[1:], ids=CASE_IDS[1:])
@pytest.mark.parametrize("channels", ["C", "1"])
def test_prelu_dropout_triton(backend, dtype, shape, layout, channels):
    T = triton_module()
    x, g = make(shape, dtype, layout), make(shape, dtype, "contiguous", "grad")
    c = shape[1] if channels == "C" else 1
    w = (torch.linspace(-0.2, 0.4, c, dtype=torch.float64)).to(dtype)
    xt, gt, wt = to_triton(x, g, w)
    p, seed = 0.3, seed_of("prelu", shape, layout, channels)
    assert_same(T.prelu_dropout(xt, wt, p, seed), R.prelu_dropout(x, w, p, seed), x)
    gi, gw = T.prelu_dropout_backward(gt, xt, wt, p, seed)
    gi_ref, gw_ref = R.prelu_dropout_backward(g, x, w, p, seed)
    assert_same(gi, gi_ref, x)
    # grad_weight is a sum: the kernels add in another order than torch's sum
    assert gw.shape == w.shape and gw.dtype == w.dtype
    torch.testing.assert_close(gw.cpu(), gw_ref)


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels", ["C", "1"])
def test_prelu_dropout_grad_weight_exact(backend, dtype, channels):
    """With p = 0.5 (multiplier 2) and values on a coarse binary grid, every partial sum is
    exact, so grad_weight is bit-equal whatever the order of the additions."""
    T = triton_module()
    gen = torch.Generator().manual_seed(zlib.crc32(repr(("grid", dtype, channels)).encode()))
    x = (torch.randint(-16, 17, (3, 4, 9, 11), generator=gen) / 8).to(dtype).to(memory_format=torch.channels_last)
    g = (torch.randint(-16, 17, (3, 4, 9, 11), generator=gen) / 8).to(dtype)
    w = torch.tensor([0.25, -0.5, 0.125, 1.0][: 4 if channels == "C" else 1], dtype=dtype)
    xt, gt, wt = to_triton(x, g, w)
    seed = seed_of("grid", channels)
    gi, gw = T.prelu_dropout_backward(gt, xt, wt, 0.5, seed)
    gi_ref, gw_ref = R.prelu_dropout_backward(g, x, w, 0.5, seed)
    assert_same(gi, gi_ref, x)
    assert_same(gw, gw_ref)


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # inf * 0 under the interpreter
@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_special_values_triton(backend, dtype):
    """inf and NaN: a dropped one gives NaN (x * 0), as in torch; signed zeros and the largest
    values (which overflow to inf when scaled in float16/bfloat16) round the same way."""
    fin = torch.finfo(dtype)
    vals = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0, fin.max, -fin.max, fin.tiny, 1.0],
                        dtype=dtype).repeat(30)  # fmt: skip
    w = torch.tensor([0.5], dtype=dtype)
    (vt, wt) = to_triton(vals, w)
    T = triton_module()
    seed = seed_of("special", dtype)
    assert_same(T.dropout(vt, 0.5, seed, False), R.dropout(vals, 0.5, seed, False))
    assert_same(T.leaky_relu_dropout(vt, 0.1, 0.5, seed), R.leaky_relu_dropout(vals, 0.1, 0.5, seed))
    assert_same(T.prelu_dropout(vt, wt, 0.5, seed), R.prelu_dropout(vals, w, 0.5, seed))
    ref = R.leaky_relu_dropout_backward(vals, vals, 0.1, 0.5, seed)
    assert_same(T.leaky_relu_dropout_backward(vt, vt, 0.1, 0.5, seed), ref)
    ref = R.prelu_dropout_backward(vals, vals, w, 0.5, seed)[0]
    assert_same(T.prelu_dropout_backward(vt, vt, wt, 0.5, seed)[0], ref)
    y = R.dropout(vals, 0.5, seed, False)
    dropped = R.dropout_bits(vals, seed) < 2**31
    assert y[dropped & vals.isinf()].isnan().all()


@pytest.mark.parametrize("backend", TRITON)
def test_wide_indexing_triton(backend, monkeypatch):
    """The int64 index path (tensors of 2**31 elements and more), forced on small tensors."""
    T = triton_module()
    monkeypatch.setattr(T, "_INT32_LIMIT", 0)
    seed, p = seed_of("wide"), 0.3
    for layout in ("contiguous", "channels_last"):
        x, g = make((2, 3, 5, 7), torch.float32, layout), make((2, 3, 5, 7), torch.float32, "contiguous", "grad")
        w = torch.tensor([0.1, -0.2, 0.3])
        xt, gt, wt = to_triton(x, g, w)
        assert torch.equal(T.dropout_bits(xt, seed).cpu(), R.dropout_bits(x, seed))
        for per_channel in (False, True):
            assert_same(T.dropout(xt, p, seed, per_channel), R.dropout(x, p, seed, per_channel), x)
        ref = R.leaky_relu_dropout_backward(g, x, 0.1, p, seed)
        assert_same(T.leaky_relu_dropout_backward(gt, xt, 0.1, p, seed), ref)
        for wc in (w, w[:1]):
            (wct,) = to_triton(wc)
            assert_same(T.prelu_dropout(xt, wct, p, seed), R.prelu_dropout(x, wc, p, seed))
            ref = R.prelu_dropout_backward(g, x, wc, p, seed)[0]
            assert_same(T.prelu_dropout_backward(gt, xt, wct, p, seed)[0], ref)


@pytest.mark.parametrize("backend", TRITON)
def test_edge_cases_triton(backend):
    T = triton_module()
    for shape in [(0,), (0, 3), (2, 0, 4)]:
        (x,) = to_triton(torch.empty(shape))
        assert T.dropout(x, 0.3, 5, len(shape) > 1).shape == shape
        assert T.leaky_relu_dropout_backward(x, x, 0.1, 0.3, 5).shape == shape
        gi, gw = T.prelu_dropout_backward(x, x, torch.ones(1, device=x.device), 0.3, 5)
        assert gi.shape == shape and gw.tolist() == [0.0]
    (x,) = to_triton(make((3, 5), torch.float32, "contiguous"))
    assert torch.equal(T.dropout(x, 0.0, 5, False), x)
    with pytest.raises(ValueError):
        T.dropout(x, 1.0, 5, False)
    # a 0-d tensor (logical index 0), and a gradient in another layout than x
    x0 = torch.tensor(2.5)
    assert_same(T.dropout(*to_triton(x0), 0.3, 7, False), R.dropout(x0, 0.3, 7, False))
    x, g = make((2, 3, 5, 7), torch.float32, "channels_last"), make((2, 3, 5, 7), torch.float32, "strided", "grad")
    w = torch.tensor([0.1, -0.2, 0.3])
    xt, gt, wt = to_triton(x, g, w)
    seed = seed_of("grad layout")
    ref = R.leaky_relu_dropout_backward(g, x, 0.1, 0.3, seed)
    assert_same(T.leaky_relu_dropout_backward(gt, xt, 0.1, 0.3, seed), ref, x)
    assert_same(T.prelu_dropout_backward(gt, xt, wt, 0.3, seed)[0], R.prelu_dropout_backward(g, x, w, 0.3, seed)[0], x)
    assert_same(T.dropout(gt, 0.3, seed, True), R.dropout(g, 0.3, seed, True), g)


# --- semantics of the reference ------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_is_x_times_m(dtype):
    x = make((4, 5, 6), dtype, "contiguous")
    p, seed = 0.3, seed_of("semantics", dtype)
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    keep = R.dropout_bits(x, seed) >= math.floor(p * 2**32)
    m = keep.to(cd) * torch.tensor(1 / (1 - p), dtype=cd)
    assert_same(R.dropout(x, p, seed, False), (x.to(cd) * m).to(dtype))
    # the backward is the same function of the gradient; a leaky slope of 1 is plain dropout
    assert_same(R.leaky_relu_dropout_backward(x, x.abs(), 0.5, p, seed), (x.to(cd) * m).to(dtype))
    assert_same(R.leaky_relu_dropout(x, 1.0, p, seed), R.dropout(x, p, seed, False))
    # fused activations: act(x) * m in the compute type
    xc = x.to(cd)
    ref = (torch.where(xc > 0, xc, xc * torch.tensor(0.2, dtype=cd)) * m).to(dtype)
    assert_same(R.leaky_relu_dropout(x, 0.2, p, seed), ref)
    assert_same(R.prelu_dropout(x, torch.tensor([0.2], dtype=dtype), p, seed),
                (torch.where(xc > 0, xc, xc * torch.tensor([0.2], dtype=dtype).to(cd)) * m).to(dtype))  # fmt: skip


def test_reference_per_channel():
    x = make((3, 4, 5, 6), torch.float32, "channels_last") + 10  # no zeros
    p, seed = 0.5, seed_of("per channel")
    y = R.dropout(x, p, seed, True)
    assert y.stride() == x.stride()
    keep = R.dropout_bits(torch.empty(3, 4), seed) >= 2**31
    assert 0 < keep.sum() < keep.numel()
    assert torch.equal((y != 0).all(3).all(2), keep) and torch.equal((y != 0).any(3).any(2), keep)
    # a 2-d input is the same as elementwise dropout (index n * C + c)
    x2 = make((7, 9), torch.float32, "contiguous")
    assert_same(R.dropout(x2, p, seed, True), R.dropout(x2, p, seed, False))


def test_reference_logical_index_ignores_layout():
    x = make((2, 3, 5, 7), torch.float32, "contiguous")
    p, seed = 0.4, seed_of("layout")
    ref = R.dropout(x, p, seed, False)
    for y in (x.to(memory_format=torch.channels_last), x.transpose(0, 3).contiguous().transpose(0, 3)):
        torch.testing.assert_close(R.dropout(y, p, seed, False), ref, rtol=0, atol=0)


# --- statistics of the reference stream ----------------------------------------------------

N_STAT = 2**20


@pytest.mark.parametrize("p", [0.2, 0.5, 1e-3, 0.999])
def test_drop_rate(p):
    x = torch.ones(N_STAT)
    y = R.dropout(x, p, seed_of("rate", p), False)
    dropped = (y == 0).double().mean().item()
    sigma = math.sqrt(p * (1 - p) / N_STAT)
    assert abs(dropped - p) < 6 * sigma, (dropped, p, sigma)
    assert torch.equal(y[y != 0], torch.full_like(y[y != 0], torch.tensor(1 / (1 - p), dtype=torch.float32).item()))


@pytest.fixture(scope="module")
def uniform() -> torch.Tensor:
    """N_STAT words of one seed, as float64 in [0, 1)."""
    return R.dropout_bits(torch.empty(N_STAT), seed_of("stats")).double() / 2**32


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.corrcoef(torch.stack((a, b)))[0, 1].item()


def test_words_uniform(uniform):
    assert abs(uniform.mean().item() - 0.5) < 6 * math.sqrt(1 / 12 / N_STAT)
    hist = torch.histc(uniform.float(), bins=16, min=0, max=1) / N_STAT
    assert (hist - 1 / 16).abs().max().item() < 6 * math.sqrt((1 / 16) * (15 / 16) / N_STAT)


def test_neighbours_uncorrelated(uniform):
    bound = 6 / math.sqrt(N_STAT)
    for lag in (1, 2, 3, 4, 5, 1024):  # within a Philox block, neighbouring blocks, far
        assert abs(corr(uniform[:-lag], uniform[lag:])) < bound, lag
    c = torch.corrcoef(uniform.reshape(-1, 4).T)  # the four words of a block
    assert (c - torch.eye(4, dtype=c.dtype)).abs().max().item() < 6 / math.sqrt(N_STAT / 4)


def test_seeds_give_different_masks():
    n = N_STAT // 4
    x = torch.ones(n)
    seed = seed_of("mask")
    a = R.dropout(x, 0.5, seed, False) == 0
    for other_seed in (seed + 1, seed ^ 2**32):  # the key's low word, its high word
        b = R.dropout(x, 0.5, other_seed, False) == 0
        assert abs((a != b).double().mean().item() - 0.5) < 6 * math.sqrt(0.25 / n)
        assert abs(corr(a.double(), b.double())) < 6 / math.sqrt(n)

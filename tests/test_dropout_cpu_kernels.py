"""The C++ CPU dropout kernels (dlkernels._C.cpu, csrc/cpu/dropout.cpp) against docs/dropout.md:
Philox4x32-10's known answers, bit-for-bit equality with the reference (dlkernels/reference/
dropout.py) for every function, dtype and layout, independence of the thread count, drop rates,
special values and argument checks.

Seeds and inputs come from zlib.crc32 of the case (stable across runs), never hash().
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from conftest import PHILOX_KAT as KAT
from conftest import PHILOX_KAT_IDS as KAT_IDS
from conftest import SEEDS, seed_of
from conftest import make_layout as make

from dlkernels import _backend

pytestmark = pytest.mark.skipif(_backend._C is None, reason="dlkernels._C is not built")

R = pytest.importorskip("dlkernels.reference.dropout")
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16, torch.bfloat16: torch.int16}
M32 = 0xFFFFFFFF


def cpu():
    return _backend._C.cpu


def assert_same(ours: torch.Tensor, ref: torch.Tensor, layout_of: torch.Tensor | None = None) -> None:
    """Same dtype, shape and bits (NaN where NaN, whatever its payload); ours in
    torch.empty_like(layout_of)'s memory layout."""
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    if layout_of is not None and ours.numel() > 1:
        assert ours.stride() == torch.empty_like(layout_of).stride()
    nan = ours.isnan()
    assert torch.equal(nan, ref.isnan())
    a = ours.contiguous().view(BITS[ours.dtype])[~nan]
    b = ref.contiguous().view(BITS[ref.dtype])[~nan]
    assert torch.equal(a, b), f"{(a != b).sum().item()} of {a.numel()} elements differ"


# --- Philox4x32-10 ------------------------------------------------------------------------


@pytest.mark.parametrize("counter,key,out", KAT, ids=KAT_IDS)
def test_kat(counter, key, out):
    got = cpu().philox4x32_10(torch.tensor([counter] * 37), *key)  # 37: vector body and tail
    assert got.dtype == torch.int64 and got.shape == (37, 4)
    assert got.tolist() == [list(out)] * 37


def test_philox_random_counters_match_reference():
    gen = torch.Generator().manual_seed(zlib.crc32(b"cpu philox counters"))
    counters = torch.randint(0, 2**32, (3001, 4), generator=gen, dtype=torch.int64)
    counters[0] = M32
    for key in torch.randint(0, 2**32, (4, 2), generator=gen, dtype=torch.int64).tolist():
        assert torch.equal(cpu().philox4x32_10(counters, *key), R.philox4x32_10(counters, tuple(key)))
    # a batch of counters [..., 4], and only the low 32 bits of words and keys count
    c3 = counters[:24].reshape(2, 3, 4, 4)
    assert torch.equal(cpu().philox4x32_10(c3, 5, 7), R.philox4x32_10(c3, (5, 7)))
    assert torch.equal(cpu().philox4x32_10(counters + 2**40, 5 + 2**33, -1), R.philox4x32_10(counters, (5, M32)))


def test_philox_bad_counters():
    with pytest.raises(RuntimeError, match="int64"):
        cpu().philox4x32_10(torch.zeros(3, 4, dtype=torch.int32), 0, 0)
    with pytest.raises(RuntimeError, match="shape"):
        cpu().philox4x32_10(torch.zeros(3, 5, dtype=torch.int64), 0, 0)
    assert cpu().philox4x32_10(torch.zeros(0, 4, dtype=torch.int64), 0, 0).shape == (0, 4)


# --- dropout_bits -------------------------------------------------------------------------

BITS_SHAPES = [(3, 7), (1,), (0, 4), (5, 37), (3, 5, 7), (70001,), (2, 3, 4, 5)]


@pytest.mark.parametrize("shape", BITS_SHAPES, ids=str)
def test_bits(shape):
    x = torch.empty(shape)
    for seed in SEEDS:
        got = cpu().dropout_bits(x, seed)
        assert got.dtype == torch.int64 and got.shape == x.shape and got.is_contiguous()
        assert torch.equal(got, R.dropout_bits(x, seed)), seed


def test_bits_ignore_layout_and_dtype():
    x = make((2, 3, 5, 7), torch.float16, "channels_last")
    seed = seed_of("bits layout")
    assert torch.equal(cpu().dropout_bits(x, seed), R.dropout_bits(torch.empty(2, 3, 5, 7), seed))


# --- the ops against the reference, bit for bit -------------------------------------------

# row-major memory (odd sizes, empty, one element, several chunks), channels_last (4-d and 5-d),
# non-dense input, a 5-d permutation, and a layout deeper than the index map (contiguous fallback)
CASES = [
    ((3, 5, 7), "contiguous"),
    ((2, 3, 4, 5), "contiguous"),
    ((1,), "contiguous"),
    ((0, 3), "contiguous"),
    ((70001,), "contiguous"),
    ((2, 3, 5, 7), "channels_last"),
    ((1, 3, 5, 7), "channels_last"),
    ((5, 37), "strided"),
    ((4, 6, 5), "strided"),
    ((2, 3, 4, 5, 7), "channels_last_3d"),
    ((2, 3, 4, 5, 7), "permuted"),
    ((2, 3, 2, 3, 2, 3, 2, 3, 2, 3), "deep"),
]
CASE_IDS = [f"{'x'.join(map(str, s))}-{lay}" for s, lay in CASES]
PS = [0.3, 0.5, 1e-3, 0.9]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", CASES, ids=CASE_IDS)
def test_dropout(dtype, shape, layout):
    x = make(shape, dtype, layout)
    for per_channel in (False, True) if len(shape) >= 2 else (False,):
        for p in PS:
            seed = seed_of("dropout", shape, layout, per_channel, p)
            assert_same(cpu().dropout(x, p, seed, per_channel), R.dropout(x, p, seed, per_channel), x)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", CASES, ids=CASE_IDS)
def test_leaky_relu_dropout(dtype, shape, layout):
    x, g = make(shape, dtype, layout), make(shape, dtype, "contiguous", "grad")
    for p, slope in ((0.3, 0.01), (0.5, -0.3), (0.9, 2.0)):
        seed = seed_of("leaky", shape, layout, p)
        assert_same(cpu().leaky_relu_dropout(x, slope, p, seed), R.leaky_relu_dropout(x, slope, p, seed), x)
        ref = R.leaky_relu_dropout_backward(g, x, slope, p, seed)
        assert_same(cpu().leaky_relu_dropout_backward(g, x, slope, p, seed), ref, x)


# PReLU: rows of one slope (inner >= 64), [C, inner] tiles (inner < 64, channels_last), one slope
PRELU_CASES = CASES + [
    ((2, 3, 9, 8), "contiguous"),
    ((3, 4, 70), "contiguous"),
    ((2, 5, 9, 8), "channels_last"),
    ((6, 5), "contiguous"),
    ((3, 4, 70), "strided"),
]
PRELU_IDS = [f"{'x'.join(map(str, s))}-{lay}" for s, lay in PRELU_CASES]


def prelu_weight(shape, dtype, channels: str) -> torch.Tensor:
    c = shape[1] if channels == "C" and len(shape) > 1 else 1
    return torch.linspace(-0.2, 0.4, c, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", PRELU_CASES, ids=PRELU_IDS)
@pytest.mark.parametrize("channels", ["C", "1"])
def test_prelu_dropout(dtype, shape, layout, channels):
    x, g = make(shape, dtype, layout), make(shape, dtype, "contiguous", "grad")
    w = prelu_weight(shape, dtype, channels)
    for p in (0.3, 0.9):
        seed = seed_of("prelu", shape, layout, channels, p)
        assert_same(cpu().prelu_dropout(x, w, p, seed), R.prelu_dropout(x, w, p, seed), x)
        gi, gw = cpu().prelu_dropout_backward(g, x, w, p, seed)
        gi_ref, gw_ref = R.prelu_dropout_backward(g, x, w, p, seed)
        assert_same(gi, gi_ref, x)
        # grad_weight is a sum: added in another order than torch's sum
        assert gw.shape == w.shape and gw.dtype == w.dtype
        torch.testing.assert_close(gw, gw_ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("channels", ["C", "1"])
def test_prelu_dropout_grad_weight_exact(dtype, layout, channels):
    """With p = 0.5 (multiplier 2) and values on a coarse binary grid every partial sum is exact,
    so grad_weight is bit-equal whatever the order of the additions."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr(("grid", str(dtype), layout, channels)).encode()))
    x = (torch.randint(-16, 17, (3, 4, 9, 11), generator=gen) / 8).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    g = (torch.randint(-16, 17, (3, 4, 9, 11), generator=gen) / 8).to(dtype)
    w = torch.tensor([0.25, -0.5, 0.125, 1.0][: 4 if channels == "C" else 1], dtype=dtype)
    seed = seed_of("grid", layout, channels)
    gi, gw = cpu().prelu_dropout_backward(g, x, w, 0.5, seed)
    gi_ref, gw_ref = R.prelu_dropout_backward(g, x, w, 0.5, seed)
    assert_same(gi, gi_ref, x)
    assert_same(gw, gw_ref)


def test_per_channel_masks_whole_channels():
    x = make((3, 4, 5, 6), torch.float32, "channels_last").abs() + 1  # no zeros
    seed = seed_of("per channel")
    y = cpu().dropout(x, 0.5, seed, True)
    keep = R.dropout_bits(torch.empty(3, 4), seed) >= 2**31
    assert 0 < keep.sum() < keep.numel()
    assert torch.equal((y != 0).all(3).all(2), keep) and torch.equal((y != 0).any(3).any(2), keep)
    x2 = make((7, 9), torch.float32, "contiguous")  # 2-d: per channel is elementwise
    assert_same(cpu().dropout(x2, 0.5, seed, True), cpu().dropout(x2, 0.5, seed, False))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_special_values(dtype):
    """A dropped inf or NaN gives NaN (x * 0, as torch); signed zeros and the largest values
    (inf once scaled, in float16/bfloat16) round as the reference."""
    fin = torch.finfo(dtype)
    vals = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0, fin.max, -fin.max, fin.tiny, 1.0],
                        dtype=dtype).repeat(30)  # fmt: skip
    w = torch.tensor([0.5], dtype=dtype)
    seed = seed_of("special", str(dtype))
    assert_same(cpu().dropout(vals, 0.5, seed, False), R.dropout(vals, 0.5, seed, False))
    assert_same(cpu().leaky_relu_dropout(vals, 0.1, 0.5, seed), R.leaky_relu_dropout(vals, 0.1, 0.5, seed))
    assert_same(cpu().prelu_dropout(vals, w, 0.5, seed), R.prelu_dropout(vals, w, 0.5, seed))
    ref = R.leaky_relu_dropout_backward(vals, vals, 0.1, 0.5, seed)
    assert_same(cpu().leaky_relu_dropout_backward(vals, vals, 0.1, 0.5, seed), ref)
    gi, gw = cpu().prelu_dropout_backward(vals, vals, w, 0.5, seed)
    gi_ref, gw_ref = R.prelu_dropout_backward(vals, vals, w, 0.5, seed)
    assert_same(gi, gi_ref)
    assert gw.isnan().all() and gw_ref.isnan().all()
    y = cpu().dropout(vals, 0.5, seed, False)
    dropped = R.dropout_bits(vals, seed) < 2**31
    assert y[dropped & vals.isinf()].isnan().all()


# --- thread count, statistics, empty input, bad input --------------------------------------


def test_one_and_two_threads_agree():
    """Fixed chunks and fixed reduction pieces: the same bits with 1 and 2 threads, on inputs of
    several chunks (PReLU's weight gradient along rows, per chunk, and per [C, inner] tile)."""
    x = make((4, 8, 40, 50), torch.float32, "contiguous")
    g = make((4, 8, 40, 50), torch.float32, "contiguous", "grad")
    xc = x.to(memory_format=torch.channels_last)
    wc, w1 = prelu_weight(x.shape, x.dtype, "C"), prelu_weight(x.shape, x.dtype, "1")
    seed = seed_of("threads")

    def run():
        out = [
            cpu().dropout_bits(x, seed),
            cpu().philox4x32_10(cpu().dropout_bits(x, seed)[0, 0, :4].reshape(-1, 4), 1, 2),
        ]
        for t in (x, xc):
            out += [
                cpu().dropout(t, 0.3, seed, False),
                cpu().dropout(t, 0.3, seed, True),
                cpu().leaky_relu_dropout(t, 0.1, 0.3, seed),
                cpu().leaky_relu_dropout_backward(g, t, 0.1, 0.3, seed),
            ]
            for w in (wc, w1):
                out += [cpu().prelu_dropout(t, w, 0.3, seed), *cpu().prelu_dropout_backward(g, t, w, 0.3, seed)]
        return out

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two = run()
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two, strict=True):
        if a.is_floating_point():
            assert_same(a, b)
        else:
            assert torch.equal(a, b)
        assert a.stride() == b.stride()


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 1e-3])
def test_drop_rate(p):
    n = 2**20
    y = cpu().dropout(torch.ones(n), p, seed_of("rate", p), False)
    dropped = (y == 0).double().mean().item()
    assert abs(dropped - p) < 6 * math.sqrt(p * (1 - p) / n), (dropped, p)
    scale = torch.tensor(1 / (1 - p), dtype=torch.float32)
    assert torch.equal(y[y != 0], scale.expand(int((y != 0).sum())))


def test_empty():
    for shape in [(0,), (0, 3), (2, 0, 4), (2, 3, 0)]:
        x = torch.empty(shape)
        assert cpu().dropout(x, 0.3, 5, len(shape) > 1).shape == shape
        assert cpu().leaky_relu_dropout(x, 0.1, 0.3, 5).shape == shape
        assert cpu().leaky_relu_dropout_backward(x, x, 0.1, 0.3, 5).shape == shape
        assert cpu().prelu_dropout(x, torch.ones(1), 0.3, 5).shape == shape
        gi, gw = cpu().prelu_dropout_backward(x, x, torch.ones(1), 0.3, 5)
        assert gi.shape == shape and gw.tolist() == [0.0]
        assert cpu().dropout_bits(x, 5).shape == shape


def test_bad_arguments():
    x = torch.randn(2, 3, 4)
    with pytest.raises(RuntimeError, match="float32, float64, float16 or bfloat16"):
        cpu().dropout(x.to(torch.int32), 0.3, 1, False)
    for p in (1.0, -0.1, float("nan"), 1.5):
        with pytest.raises(RuntimeError, match=r"\[0, 1\)"):
            cpu().dropout(x, p, 1, False)
    with pytest.raises(RuntimeError, match="at least 2 dims"):
        cpu().dropout(torch.randn(5), 0.3, 1, True)
    with pytest.raises(RuntimeError, match="grad must match"):
        cpu().leaky_relu_dropout_backward(torch.randn(2, 3), x, 0.1, 0.3, 1)
    with pytest.raises(RuntimeError, match="grad must match"):
        cpu().prelu_dropout_backward(x.double(), x, torch.ones(1), 0.3, 1)
    with pytest.raises(RuntimeError, match="Mismatch of parameter numbers"):
        cpu().prelu_dropout(x, torch.ones(4), 0.3, 1)
    with pytest.raises(RuntimeError, match="Type promoting"):
        cpu().prelu_dropout(x, torch.ones(3, dtype=torch.float64), 0.3, 1)

"""Dropout (alone and fused with Leaky ReLU / PReLU) from the Philox4x32-10 stream, in Triton.

The contract is docs/dropout.md and its executable form dlkernels/reference/dropout.py; these
kernels match it bit for bit. No mask is stored: every kernel recomputes an element's 32-bit word
from the seed and the element's logical index (its row-major position in x's shape).

Layout (as in the activation family): a non-dense ``x`` is first copied into
``torch.empty_like(x)``, ``grad`` is put in ``x``'s layout, outputs are ``empty_like``. Kernels
walk flat memory order (coalesced on any dense layout) and map a memory position to its logical
index with the tensor's dims sorted by stride and coalesced (_index_map: one dim when memory order
is row-major, three for channels_last, two for per-channel NCHW), at most _MAXD of them (other
layouts are computed on a contiguous copy). When memory order is row-major (NDIM = 0) a block of
BLOCK consecutive elements needs BLOCK / 4 Philox evaluations, interleaved; otherwise each element
evaluates the Philox of its own index and keeps one of the four words. Per-channel dropout reads
the words of its (N, C) grid, computed first by _dropout_bits_kernel.

Seeds go in as two 32-bit halves (k0, k1) and the threshold t = floor(p * 2^32), all as int32
bit patterns reinterpreted as uint32 in the kernels (and never specialized by the JIT). The
multiplier 1/(1-p) and the slope go in as fp64 and are rounded once to the compute type (float32
for float16/bfloat16/float32, float64 for float64).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from dlkernels.reference.dropout import seed_key, threshold

from ._aot import AotSpec
from ._common import channel_partials, channels, dense, like, on_device, split_program, to_compute, weight_grad

BLOCK = 1024  # elements per program (a multiple of 4: four elements share one Philox evaluation)
_MAXD = 4  # coalesced dims the kernels' index map takes
# C * SPLIT programs aimed at by the PReLU backward (as in the activation family)
_TARGET_PROGRAMS = 2048
# Index math is int32 below this numel (with margin for the backward's loop counter)
_INT32_LIMIT = 2**31 - 2**22
_NO_SPECIALIZE = ["k0", "k1", "thr"]  # seeds and thresholds: one compilation for all values

# activation codes of the fused forward
_NONE: tl.constexpr = tl.constexpr(0)
_LEAKY: tl.constexpr = tl.constexpr(1)
_PRELU: tl.constexpr = tl.constexpr(2)


@triton.jit
def _philox(c0, c1, c2, c3, k0, k1):
    # Philox4x32-10 of uint32 counter words (c0, c1, c2, c3) under the uint32 key (k0, k1).
    # The integer constants are >= 2**31, so triton types them uint32: wrapping arithmetic.
    for r in tl.static_range(10):
        if r > 0:
            k0 = k0 + 0x9E3779B9
            k1 = k1 + 0xBB67AE85
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


@triton.jit
def _u32(v):
    # an int32 argument holding a uint32 bit pattern
    return tl.cast(v, tl.uint32, bitcast=True)


@triton.jit
def _philox_of(q, k0, k1, WIDE: tl.constexpr):
    # the four words of counter (q mod 2**32, q div 2**32, 0, 0), q >= 0 (int32, or int64 if WIDE)
    zero = tl.zeros(q.shape, tl.uint32)
    hi = zero
    if WIDE:
        hi = (q >> 32).to(tl.uint32)
    return _philox(q.to(tl.uint32), hi, zero, zero, k0, k1)


@triton.jit
def _block_words(b, k0, k1, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    # the words of logical indices b * BLOCK + [0, BLOCK): BLOCK / 4 evaluations, interleaved
    # (join(join(r0, r2), join(r1, r3)) is [BLOCK / 4, 2, 2]; flat, it is r0 r1 r2 r3 per counter)
    q = b * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
    r0, r1, r2, r3 = _philox_of(q, k0, k1, WIDE)
    return tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [BLOCK])


@triton.jit
def _element_words(i, k0, k1, WIDE: tl.constexpr):
    # the word of each logical index i: word i % 4 of counter i // 4
    r0, r1, r2, r3 = _philox_of(i >> 2, k0, k1, WIDE)
    j = i & 3
    return tl.where(j == 0, r0, tl.where(j == 1, r1, tl.where(j == 2, r2, r3)))


@triton.jit
def _logical(o, s0, s1, s2, w0, w1, w2, w3, NDIM: tl.constexpr):
    # The logical index of memory position o: o's coordinates along the NDIM coalesced dims
    # (innermost first; s* their sizes, the outermost one's not needed) dotted with the dims'
    # weights w* (their row-major strides in x's shape, or in the (N, C) grid per channel).
    if NDIM == 1:
        i = o * w0
    else:
        q = o // s0
        i = (o - q * s0) * w0
        if NDIM == 2:
            i += q * w1
        else:
            q2 = q // s1
            i += (q - q2 * s1) * w1
            if NDIM == 3:
                i += q2 * w2
            else:
                q3 = q2 // s2
                i += (q2 - q3 * s2) * w2 + q3 * w3
    return i


@triton.jit
def _words(o, b, bits_ptr, mask, k0, k1, s0, s1, s2, w0, w1, w2, w3,
           BLOCK: tl.constexpr, NDIM: tl.constexpr, PERCH: tl.constexpr, WIDE: tl.constexpr):  # fmt: skip
    # The words of memory positions o = b * BLOCK + [0, BLOCK) when NDIM == 0 (memory order is
    # row-major order), else of arbitrary positions o: read from bits (the (N, C) grid's words)
    # per channel, computed per element otherwise.
    if NDIM == 0:
        word = _block_words(b, k0, k1, BLOCK, WIDE)
    else:
        i = _logical(o, s0, s1, s2, w0, w1, w2, w3, NDIM)
        if PERCH:
            word = tl.load(bits_ptr + i, mask=mask, other=0).to(tl.uint32)
        else:
            word = _element_words(i, k0, k1, WIDE)
    return word


@triton.jit
def _multiplier(word, thr, scale, ty: tl.constexpr):
    # 1/(1-p) (rounded once to ty) where the word is >= t, else 0
    return tl.where(word >= _u32(thr), tl.full([], scale, ty), tl.zeros([], ty))


@triton.jit
def _round_to(y, ty: tl.constexpr):
    # y (float32 or float64) rounded to nearest even in ty. bfloat16 by hand, as torch does it
    # (NaN to 0x7FC0): the interpreter's float32 -> bfloat16 cast does not round to nearest even,
    # and this is exact on GPUs too.
    if ty == tl.bfloat16:
        u = y.to(tl.uint32, bitcast=True)
        u = tl.where(y != y, 0x7FC00000, u + 0x7FFF + ((u >> 16) & 1))
        return (u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return y.to(ty)


@triton.jit
def _flat_words(bits_ptr, n, k0, k1, s0, s1, s2, w0, w1, w2, w3,
                BLOCK: tl.constexpr, NDIM: tl.constexpr, PERCH: tl.constexpr, WIDE: tl.constexpr):  # fmt: skip
    # (offs, mask, word) of program b of a flat walk: memory positions b * BLOCK + [0, BLOCK),
    # those below n, and their words (see _words); k0, k1 are the kernels' int32 seed halves
    b = tl.program_id(0)
    if WIDE:
        b = b.to(tl.int64)
    offs = b * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    word = _words(offs, b, bits_ptr, mask, _u32(k0), _u32(k1), s0, s1, s2, w0, w1, w2, w3, BLOCK, NDIM, PERCH, WIDE)
    return offs, mask, word


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _dropout_bits_kernel(out_ptr, n, k0, k1, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    # out[i] = the word of logical index i (zero-extended into int64)
    b = tl.program_id(0)
    if WIDE:
        b = b.to(tl.int64)
    offs = b * BLOCK + tl.arange(0, BLOCK)
    word = _block_words(b, _u32(k0), _u32(k1), BLOCK, WIDE)
    tl.store(out_ptr + offs, word.to(out_ptr.dtype.element_ty), mask=offs < n)


@triton.jit(do_not_specialize=["k0", "k1"])
def _philox_kernel(c_ptr, out_ptr, n, k0, k1, BLOCK: tl.constexpr):
    # Philox4x32-10 of n counters (int64 [n, 4] of 32-bit words) into int64 [n, 4] (for tests)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    c0 = tl.load(c_ptr + 4 * offs, mask=mask, other=0).to(tl.uint32)
    c1 = tl.load(c_ptr + 4 * offs + 1, mask=mask, other=0).to(tl.uint32)
    c2 = tl.load(c_ptr + 4 * offs + 2, mask=mask, other=0).to(tl.uint32)
    c3 = tl.load(c_ptr + 4 * offs + 3, mask=mask, other=0).to(tl.uint32)
    r0, r1, r2, r3 = _philox(c0, c1, c2, c3, _u32(k0), _u32(k1))
    tl.store(out_ptr + 4 * offs, r0.to(tl.int64), mask=mask)
    tl.store(out_ptr + 4 * offs + 1, r1.to(tl.int64), mask=mask)
    tl.store(out_ptr + 4 * offs + 2, r2.to(tl.int64), mask=mask)
    tl.store(out_ptr + 4 * offs + 3, r3.to(tl.int64), mask=mask)


# scale and slope are annotated fp64 so the kernels see the exact values (the JIT would pass a
# Python float as fp32); tl.full rounds them once to the compute type.
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _dropout_fwd_kernel(
    x_ptr, w_ptr, bits_ptr, y_ptr, n, k0, k1, thr, scale: tl.float64, slope: tl.float64,
    inner, C, s0, s1, s2, w0, w1, w2, w3,
    BLOCK: tl.constexpr, ACT: tl.constexpr, NDIM: tl.constexpr, PERCH: tl.constexpr, WIDE: tl.constexpr,
):  # fmt: skip
    # y = act(x) * m on dense memory; for PReLU memory is [outer, C, inner] (channel (o // inner) % C)
    offs, mask, word = _flat_words(bits_ptr, n, k0, k1, s0, s1, s2, w0, w1, w2, w3, BLOCK, NDIM, PERCH, WIDE)
    x = to_compute(tl.load(x_ptr + offs, mask=mask))
    if ACT == _LEAKY:
        x = tl.where(x > 0, x, x * tl.full([], slope, x.dtype))
    elif ACT == _PRELU:
        w = to_compute(tl.load(w_ptr + (offs // inner) % C))  # in range even where masked
        x = tl.where(x > 0, x, x * w)
    y = x * _multiplier(word, thr, scale, x.dtype)
    tl.store(y_ptr + offs, _round_to(y, y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _dropout_leaky_bwd_kernel(
    g_ptr, x_ptr, gi_ptr, n, k0, k1, thr, scale: tl.float64, slope: tl.float64,
    s0, s1, s2, w0, w1, w2, w3, BLOCK: tl.constexpr, NDIM: tl.constexpr, WIDE: tl.constexpr,
):  # fmt: skip
    # d = g * m; gi = d where x > 0 else d * slope
    offs, mask, word = _flat_words(x_ptr, n, k0, k1, s0, s1, s2, w0, w1, w2, w3, BLOCK, NDIM, False, WIDE)
    x = tl.load(x_ptr + offs, mask=mask)
    g = to_compute(tl.load(g_ptr + offs, mask=mask))
    d = g * _multiplier(word, thr, scale, g.dtype)
    gi = tl.where(x > 0, d, d * tl.full([], slope, d.dtype))
    tl.store(gi_ptr + offs, _round_to(gi, gi_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _dropout_prelu_bwd_kernel(
    g_ptr, x_ptr, w_ptr, gi_ptr, part_ptr, m, inner, C, k0, k1, thr, scale: tl.float64,
    s0, s1, s2, w0, w1, w2, w3, BLOCK: tl.constexpr, NDIM: tl.constexpr, WIDE: tl.constexpr,
):  # fmt: skip
    # Memory is [outer, C, inner] and m = outer * inner. Program (c, s) takes blocks s, s + SPLIT,
    # ... of channel c's m positions: it writes grad_input there and one partial sum of the
    # weight gradient to part[c, s] (a fixed order, no atomics). NDIM == 0 only with one slope
    # (C = inner = 1), where position p is memory position and logical index p.
    # c == program_id(0); % C folds it to 0 when the JIT makes C = 1 a constant
    c, s, split = split_program(tl.program_id(0) % C, WIDE)
    k0 = _u32(k0)
    k1 = _u32(k1)
    acc_ty = part_ptr.dtype.element_ty
    w = tl.load(w_ptr + c).to(acc_ty)
    acc = tl.zeros([BLOCK], dtype=acc_ty)
    for start in range(s * BLOCK, m, split * BLOCK):
        p = start + tl.arange(0, BLOCK)
        mask = p < m
        row = p // inner
        o = (row * C + c) * inner + (p - row * inner)
        word = _words(o, start // BLOCK, x_ptr, mask, k0, k1, s0, s1, s2, w0, w1, w2, w3, BLOCK, NDIM, False, WIDE)
        x = tl.load(x_ptr + o, mask=mask, other=0).to(acc_ty)
        g = tl.load(g_ptr + o, mask=mask, other=0).to(acc_ty)
        d = g * _multiplier(word, thr, scale, acc_ty)
        pos = x > 0
        tl.store(gi_ptr + o, _round_to(tl.where(pos, d, d * w), gi_ptr.dtype.element_ty), mask=mask)
        acc += tl.where(pos, 0.0, x * d)
    tl.store(part_ptr + c * split + s, tl.sum(acc, axis=0))


# ---------------------------------------------------------------------------------------------
# launchers


def _i32(v: int) -> int:
    """A uint32 as the int32 with its bit pattern."""
    return v - 2**32 if v >= 2**31 else v


def _seed_args(seed: int) -> tuple[int, int]:
    k0, k1 = seed_key(seed)
    return _i32(k0), _i32(k1)


def _grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, BLOCK),)


def _index_map(xd: torch.Tensor, per_channel: bool) -> list[tuple[int, int]]:
    """(size, weight) of the dims of dense xd, innermost first, coalesced: the logical index of
    the element at memory coordinates (k_d) is sum k_d * weight_d. The weights are the row-major
    strides of xd's shape, or (C, 1, 0, ...) per channel (index n * C + c)."""
    if per_channel:
        weights = [xd.size(1), 1] + [0] * (xd.dim() - 2)
    else:
        weights = [math.prod(xd.shape[d + 1 :]) for d in range(xd.dim())]
    dims = sorted((st, sz, w) for sz, st, w in zip(xd.shape, xd.stride(), weights, strict=True) if sz != 1)[::-1]
    merged: list[tuple[int, int]] = []
    for _, sz, w in dims:  # outermost first
        if merged and merged[-1][1] == w * sz:  # the outer dim continues this one
            merged[-1] = (merged[-1][0] * sz, w)
        else:
            merged.append((sz, w))
    return merged[::-1]


def _map_args(dims: list[tuple[int, int]]) -> tuple[list[int], int]:
    """(s0, s1, s2, w0, w1, w2, w3) for the kernels and NDIM (0: memory order is row-major)."""
    if len(dims) <= 1 and all(w == 1 for _, w in dims):
        return [1, 1, 1, 0, 0, 0, 0], 0
    sizes = [sz for sz, _ in dims[:3]] + [1] * (3 - min(3, len(dims)))
    weights = [w for _, w in dims] + [0] * (_MAXD - len(dims))
    return sizes + weights, len(dims)


def _threshold_arg(p: float) -> int:
    """t = floor(p * 2**32) as the int32 with its bit pattern (ValueError unless 0 <= p < 1)."""
    return _i32(threshold(p))


def _bits(shape, seed: int, device: torch.device) -> torch.Tensor:
    out = torch.empty(shape, dtype=torch.int64, device=device)
    n = out.numel()
    if n:
        with on_device(out):
            _dropout_bits_kernel[_grid(n)](out, n, *_seed_args(seed), BLOCK=BLOCK, WIDE=n > _INT32_LIMIT)
    return out


def dropout_bits(x: torch.Tensor, seed: int) -> torch.Tensor:
    """The word of every element of x: int64, x's shape, contiguous, on x's device."""
    return _bits(x.shape, seed, x.device)


def philox4x32_10(counter: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
    """Philox4x32-10 of int64 ``counter[..., 4]`` (32-bit words) under ``key``: int64 [..., 4]."""
    c = counter.to(torch.int64).contiguous()
    out = torch.empty_like(c)
    n = c.numel() // 4
    if n:
        with on_device(c):
            _philox_kernel[_grid(n)](c, out, n, _i32(key[0] & 0xFFFFFFFF), _i32(key[1] & 0xFFFFFFFF), BLOCK=BLOCK)
    return out


def _on_contiguous(fn, x: torch.Tensor, *tensors: torch.Tensor):
    """fn on contiguous copies (layouts the index map cannot take), its first result put back
    into torch.empty_like(x)'s layout."""
    out = fn(x.contiguous(), *(t.contiguous() for t in tensors))
    if isinstance(out, tuple):
        return (torch.empty_like(x).copy_(out[0]), *out[1:])
    return torch.empty_like(x).copy_(out)


def _dense_mapped(x: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, list[int], int] | None:
    """(dense x, index-map arguments, NDIM) of non-empty x, or None where x's layout coalesces to
    more dims than the kernels' index map takes: the caller reruns on contiguous copies."""
    xd = dense(x)
    dims = _index_map(xd, per_channel)
    if len(dims) > _MAXD:
        return None
    margs, ndim = _map_args(dims)
    return xd, margs, ndim


def _forward(x: torch.Tensor, act: int, weight: torch.Tensor | None, slope: float, p: float, seed: int,
             per_channel: bool = False) -> torch.Tensor:  # fmt: skip
    thr = _threshold_arg(p)
    if per_channel and x.dim() < 2:
        raise ValueError("per-channel dropout needs an input of at least 2 dims (N, C, ...)")
    if x.numel() == 0:
        return torch.empty_like(x)
    mapped = _dense_mapped(x, per_channel)
    if mapped is None:
        return _on_contiguous(lambda xc: _forward(xc, act, weight, slope, p, seed, per_channel), x)
    xd, margs, ndim = mapped
    if per_channel and ndim > 0:  # the words of the (N, C) grid
        bits = _bits(xd.shape[:2], seed, xd.device)
    else:
        bits = torch.empty(1, dtype=torch.int64, device=x.device)  # unused
    c, inner = channels(xd, weight) if act == 2 else (1, 1)
    w = weight.contiguous() if act == 2 else xd  # unused unless PReLU
    y = torch.empty_like(xd)
    n = xd.numel()
    with on_device(xd):
        _dropout_fwd_kernel[_grid(n)](
            xd, w, bits, y, n, *_seed_args(seed), thr, 1.0 / (1.0 - p), float(slope), inner, c, *margs,
            BLOCK=BLOCK, ACT=act, NDIM=ndim, PERCH=per_channel and ndim > 0, WIDE=n > _INT32_LIMIT,
        )  # fmt: skip
    return y


def dropout(x: torch.Tensor, p: float, seed: int, per_channel: bool) -> torch.Tensor:
    """y = x * m (also the backward, applied to the gradient); per_channel: one mask value per
    (n, c) of dims 0 and 1, shared by the rest of the channel."""
    return _forward(x, 0, None, 0.0, p, seed, per_channel)


def leaky_relu_dropout(x: torch.Tensor, negative_slope: float, p: float, seed: int) -> torch.Tensor:
    """y = leaky_relu(x) * m, in the compute type."""
    return _forward(x, 1, None, negative_slope, p, seed)


def prelu_dropout(x: torch.Tensor, weight: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """y = prelu(x, weight) * m, in the compute type."""
    return _forward(x, 2, weight, 0.0, p, seed)


def leaky_relu_dropout_backward(grad: torch.Tensor, x: torch.Tensor, negative_slope: float, p: float,
                                seed: int) -> torch.Tensor:  # fmt: skip
    """d = grad * m; grad_input = d where x > 0 else d * negative_slope."""
    thr = _threshold_arg(p)
    if x.numel() == 0:
        return torch.empty_like(x)
    mapped = _dense_mapped(x, False)
    if mapped is None:
        return _on_contiguous(lambda xc, gc: leaky_relu_dropout_backward(gc, xc, negative_slope, p, seed), x, grad)
    xd, margs, ndim = mapped
    gd = like(grad, xd)
    gi = torch.empty_like(xd)
    n = xd.numel()
    with on_device(xd):
        _dropout_leaky_bwd_kernel[_grid(n)](
            gd, xd, gi, n, *_seed_args(seed), thr, 1.0 / (1.0 - p), float(negative_slope), *margs,
            BLOCK=BLOCK, NDIM=ndim, WIDE=n > _INT32_LIMIT,
        )  # fmt: skip
    return gi


def prelu_dropout_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, p: float,
                           seed: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(grad_input, grad_weight): d = grad * m; grad_input = d where x > 0 else d * weight[c];
    grad_weight[c] sums x * d over channel c's elements with x <= 0, accumulated in float32
    (float64 for float64) and returned in weight's shape and dtype."""
    thr = _threshold_arg(p)
    if x.numel() == 0:
        return torch.empty_like(x), torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
    mapped = _dense_mapped(x, False)
    if mapped is None:
        return _on_contiguous(lambda xc, gc: prelu_dropout_backward(gc, xc, weight, p, seed), x, grad)
    xd, margs, ndim = mapped
    gd = like(grad, xd)
    gi = torch.empty_like(xd)
    c, inner = channels(xd, weight)
    if ndim == 0 and c > 1:  # row-major, but a channel's blocks are not aligned runs of indices
        margs, ndim = [1, 1, 1, 1, 0, 0, 0], 1
    n = xd.numel()
    m, part = channel_partials(xd, c, BLOCK, _TARGET_PROGRAMS)
    with on_device(xd):
        _dropout_prelu_bwd_kernel[(c, part.shape[1])](
            gd, xd, weight.contiguous(), gi, part, m, inner, c, *_seed_args(seed), thr, 1.0 / (1.0 - p), *margs,
            BLOCK=BLOCK, NDIM=ndim, WIDE=n > _INT32_LIMIT,
        )  # fmt: skip
    return gi, weight_grad(part, weight)


# ---------------------------------------------------------------------------------------------
# ahead-of-time specializations

# index-map variants: memory order row-major (one shared Philox per four elements), channels_last
# (three coalesced dims), per-channel NCHW (two dims, words read from the (N, C) grid)
_MAPS = {
    "flat": {"NDIM": 0, "s0": 1, "s1": 1, "s2": 1},
    "cl": {"NDIM": 3, "s2": 1, "w1": 1},
    "perch": {"NDIM": 2, "s1": 1, "s2": 1, "w1": 1},
    "nchw": {"NDIM": 1, "s0": 1, "s1": 1, "s2": 1, "w0": 1},  # the PReLU backward's row-major case
}


def _spec(kernel, dt: str, variant: str, act: int | None = None, wide: bool = False) -> AotSpec:
    # Types by naming convention: bits_ptr int64, part_ptr the accumulation type, other pointers
    # dt (16-byte aligned); scale and slope fp64; n and m divisible by 16 (i64 when wide); other
    # integers i32. Arguments the host passes as 1 are the JIT's constants.
    consts = {"BLOCK": BLOCK, "WIDE": int(wide), **_MAPS[variant]}
    if "ACT" in kernel.arg_names:
        consts["ACT"] = act
    if "PERCH" in kernel.arg_names:
        consts["PERCH"] = int(variant == "perch")
    if kernel is _dropout_fwd_kernel and act != 2:
        consts.update({"C": 1, "inner": 1})  # unused
    if "inner" in kernel.arg_names and variant == "cl":
        consts["inner"] = 1  # channels_last PReLU
    if kernel is _dropout_prelu_bwd_kernel and variant == "flat":
        consts.update({"C": 1, "inner": 1})  # one slope
    consts = {k: v for k, v in consts.items() if k in kernel.arg_names}
    types = {
        "bits_ptr": "*i64:16",
        "part_ptr": "*fp64:16" if dt == "fp64" else "*fp32:16",
        "scale": "fp64",
        "slope": "fp64",
        "n": "i64:16" if wide else "i32:16",
        "m": "i64:16" if wide else "i32:16",
    }
    sig = {a: types.get(a, f"*{dt}:16" if a.endswith("_ptr") else "i32") for a in kernel.arg_names if a not in consts}
    name = kernel.__name__.strip("_").removesuffix("_kernel")
    tags = [dt, variant, *([f"act{act}"] if act is not None else []), *(["wide"] if wide else [])]
    return AotSpec(f"{name}[{','.join(tags)}]", kernel, sig, consts)


def _bits_spec(wide: bool = False) -> AotSpec:
    consts = {"BLOCK": BLOCK, "WIDE": int(wide)}
    sig = {"out_ptr": "*i64:16", "n": "i64:16" if wide else "i32:16", "k0": "i32", "k1": "i32"}
    return AotSpec(f"dropout_bits[{'wide' if wide else 'i64'}]", _dropout_bits_kernel, sig, consts)


AOT_SPECS: list[AotSpec] = [
    _bits_spec(),
    _bits_spec(wide=True),
    *(
        spec
        for dt in ("fp32", "bf16")
        for spec in (
            *(_spec(_dropout_fwd_kernel, dt, v, 0) for v in ("flat", "cl", "perch")),
            _spec(_dropout_fwd_kernel, dt, "flat", 1),
            _spec(_dropout_fwd_kernel, dt, "flat", 2),
            _spec(_dropout_fwd_kernel, dt, "cl", 2),
            _spec(_dropout_leaky_bwd_kernel, dt, "flat"),
            _spec(_dropout_leaky_bwd_kernel, dt, "cl"),
            *(_spec(_dropout_prelu_bwd_kernel, dt, v) for v in ("flat", "nchw", "cl")),
        )
    ),
    *(_spec(k, "fp64", "flat", a) for k, a in ((_dropout_fwd_kernel, 1), (_dropout_leaky_bwd_kernel, None))),
    _spec(_dropout_prelu_bwd_kernel, "fp64", "nchw"),
    _spec(_dropout_fwd_kernel, "fp32", "flat", 0, wide=True),
    _spec(_dropout_fwd_kernel, "fp32", "cl", 0, wide=True),
    _spec(_dropout_prelu_bwd_kernel, "fp32", "cl", wide=True),
]

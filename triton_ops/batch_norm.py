"""Batch normalization fused with an activation in Triton: statistics, forward and the two
backward passes. The contract and the exact math are dlkernels/reference/batch_norm.py.

Layout (as in the activation family): a non-dense ``x`` is first copied into
``torch.empty_like(x)``, ``grad`` is put in ``x``'s layout, outputs are ``empty_like``; dense
inputs are never copied. Memory is then [outer, C, inner] with inner = x.stride(1). Every kernel
runs on a grid (channel blocks, SPLIT): program (cb, s) owns channels cb * BLOCK_C + [0, BLOCK_C)
and position tiles s, s + SPLIT, ... of the m = outer * inner positions of a channel, so
per-channel parameters load once per program. NCHW-like input (inner > 1) uses BLOCK_C = 1 and
runs of positions; channels_last and 2-D input (inner = 1) use [rows, C-block] tiles, each row a
contiguous stretch of channels, so reductions read memory coalesced in both layouts.
Reductions write partials [k, C, SPLIT] that torch combines (tiny tensors): a fixed order, no
atomics, deterministic. Statistics keep per-lane Welford moments, merged with Chan's formula.
Math runs in float32 for float16/bfloat16/float32 and in float64 for float64.

Dropout after the activation (DROP, docs/dropout.md): each element maps its memory offset to
its logical index (triton_ops/dropout.py's index map: NDIM = 0 when memory order is row-major)
and evaluates the Philox of that index, keeping one of the four words. The forward stores
``round(round(act(z)) * m)``, bit for bit the dropout kernels applied to the stored y; the
backward passes regenerate the mask and use ``grad * m``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dlkernels._dtypes import compute_dtype
from dlkernels.reference.batch_norm import (
    ACT_LEAKY_RELU,
    ACT_NONE,
    ACT_PRELU,
    ACT_RELU,
    compose_backward,
    compose_eval,
    compose_train,
)

from ._aot import AotSpec
from ._common import dense, divider, fast_divmod, like, on_device, split_program
from .dropout import (
    _MAXD,
    _element_words,
    _index_map,
    _logical,
    _map_args,
    _multiplier,
    _round_to,
    _seed_args,
    _threshold_arg,
    _u32,
    dropout,
)

# the codes as compile-time constants of the kernels (dlkernels/codes.py)
_NONE: tl.constexpr = tl.constexpr(ACT_NONE)
_RELU: tl.constexpr = tl.constexpr(ACT_RELU)
_PRELU: tl.constexpr = tl.constexpr(ACT_PRELU)
BLOCK = 1024  # elements per tile
_MAX_BLOCK_C = 64  # channels per channels_last tile: 64 contiguous values of a row
# (channel blocks) * SPLIT programs aimed at: about one full wave of 4-warp programs on a
# 132-SM GPU, each streaming several tiles.
_TARGET_PROGRAMS = 2048


@triton.jit
def _program(BLOCK_C: tl.constexpr, WIDE: tl.constexpr):
    # (channels, s, SPLIT) of program (channel block, s)
    cb, s, split = split_program(tl.program_id(0), WIDE)
    return cb * BLOCK_C + tl.arange(0, BLOCK_C), s, split


@triton.jit
def _tile(start, cols, m, C, inner, inner_m, inner_s, BLOCK_P: tl.constexpr, CL: tl.constexpr, WIDE: tl.constexpr):
    # Offsets and mask of the [BLOCK_P, BLOCK_C] tile of positions start + [0, BLOCK_P).
    p = start + tl.arange(0, BLOCK_P)
    if CL:  # inner == 1: rows of C contiguous channels
        offs = p[:, None] * C + cols[None, :]
    else:
        row, col = fast_divmod(p, inner, inner_m, inner_s, WIDE)
        offs = (row[:, None] * C + cols[None, :]) * inner + col[:, None]
    return offs, (p < m)[:, None] & (cols < C)[None, :]


@triton.jit
def _cload(ptr, cols, C):
    # per-channel values as a [1, BLOCK_C] row (0 past the last channel)
    return tl.load(ptr + cols, mask=cols < C, other=0)[None, :]


@triton.jit
def _slopes(pw_ptr, cols, C, slope, acc_ty: tl.constexpr, BLOCK_C: tl.constexpr, ACT: tl.constexpr):
    # the leaky slope (rounded once to the compute type), or the channels' PReLU slopes
    sl = tl.full([1, BLOCK_C], slope, acc_ty)
    if ACT == _PRELU:
        sl = _cload(pw_ptr, cols, C)
    return sl


@triton.jit
def _params(mean_ptr, invstd_ptr, w_ptr, b_ptr, pw_ptr, cols, C, slope, acc_ty: tl.constexpr, BLOCK_C: tl.constexpr,
            ACT: tl.constexpr):  # fmt: skip
    # the per-channel values of the forward and backward passes: mean, invstd, weight, bias, slopes
    mean, invstd = _cload(mean_ptr, cols, C), _cload(invstd_ptr, cols, C)
    w, b = _cload(w_ptr, cols, C), _cload(b_ptr, cols, C)
    return mean, invstd, w, b, _slopes(pw_ptr, cols, C, slope, acc_ty, BLOCK_C, ACT)


@triton.jit
def _store_part(part_ptr, k, v, cols, s, split, C):
    # part[k, c, s] = v[c] of a [K, C, SPLIT] partials tensor, for the program's channels
    # (plane + (cols * split + s): the grouping of the inline stores, which keeps the same code)
    tl.store(part_ptr + k * (C * split) + (cols * split + s), v, mask=cols < C)


@triton.jit
def _act_fwd(z, sl, ACT: tl.constexpr):
    if ACT == _RELU:
        z = tl.where(z < 0, 0.0, z)  # NaN stays NaN, as torch.relu
    elif ACT != _NONE:  # leaky ReLU or PReLU: one slope per channel (sl)
        z = tl.where(z > 0, z, z * sl)
    return z


@triton.jit
def _act_bwd(g, z, sl, ACT: tl.constexpr):
    if ACT == _RELU:
        g = tl.where(z <= 0, 0.0, g)
    elif ACT != _NONE:  # leaky ReLU or PReLU: one slope per channel (sl)
        g = tl.where(z > 0, g, g * sl)
    return g


@triton.jit
def _drop_mult(offs, k0, k1, thr, scale, s0, s1, s2, w0, w1, w2, w3, acc_ty: tl.constexpr, NDIM: tl.constexpr,
               WIDE: tl.constexpr):  # fmt: skip
    # the dropout multiplier of each memory offset: the word of its logical index against thr
    if NDIM == 0:  # memory order is row-major order
        i = offs
    else:
        i = _logical(offs, s0, s1, s2, w0, w1, w2, w3, NDIM)
    return _multiplier(_element_words(i, _u32(k0), _u32(k1), WIDE), thr, scale, acc_ty)


@triton.jit
def _chan(mean_a, m2_a, n_a, mean_b, m2_b, n_b):
    # Chan et al.'s merge of (mean, M2, count); n_b / max(n, 1) is 0 when both are empty
    n = n_a + n_b
    ratio = n_b / tl.maximum(n, 1.0)
    delta = mean_b - mean_a
    return mean_a + delta * ratio, m2_a + m2_b + delta * delta * n_a * ratio, n


@triton.jit
def _stats_kernel(
    x_ptr, shift_ptr, part_ptr, m, C, inner, inner_m, inner_s,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, CL: tl.constexpr, WIDE: tl.constexpr,
):  # fmt: skip
    # part: [4, C, SPLIT] float64 of (count, mean - shift, M2, sum of the non-finite values). Each
    # lane keeps Welford moments of its own positions, shifted by one value of the channel so that a
    # large mean costs no precision; a lane active in iteration k has seen exactly k + 1 values (a lane drops out only
    # past the end, for good), so one scalar reciprocal per iteration replaces a division. The
    # lanes merge in float64: a float32 merge tree adds a few ulp to the mean, and that error is
    # systematic per channel (the backward multiplies it by mean(grad)).
    cols, s, split = _program(BLOCK_C, WIDE)
    acc_ty = shift_ptr.dtype.element_ty
    shift = _cload(shift_ptr, cols, C)
    mean = tl.zeros([BLOCK_P, BLOCK_C], acc_ty)
    m2 = tl.zeros([BLOCK_P, BLOCK_C], acc_ty)
    cnt = tl.zeros([BLOCK_P, BLOCK_C], acc_ty)
    bad = tl.zeros([BLOCK_P, BLOCK_C], acc_ty)
    k = tl.full([], 1.0, acc_ty)
    for start in range(s * BLOCK_P, m, split * BLOCK_P):
        offs, mask = _tile(start, cols, m, C, inner, inner_m, inner_s, BLOCK_P, CL, WIDE)
        x = tl.load(x_ptr + offs, mask=mask, other=0).to(acc_ty) - shift
        # +-inf/NaN are summed apart (inf + finite = inf, as torch's mean) and count as 0 in the
        # Welford update, whose inf - inf would make the mean NaN
        finite = x - x == 0
        bad += tl.where(finite, 0.0, x)
        x = tl.where(finite, x, 0.0)
        delta = tl.where(mask, x - mean, 0.0)
        mean += delta * (1.0 / k)
        m2 += delta * (x - mean)
        cnt += mask.to(acc_ty)
        k += 1.0
    f64 = tl.float64
    mean_c, m2_c, n_c = tl.reduce((mean.to(f64), m2.to(f64), cnt.to(f64)), 0, _chan)
    _store_part(part_ptr, 0, n_c, cols, s, split, C)
    _store_part(part_ptr, 1, mean_c, cols, s, split, C)
    _store_part(part_ptr, 2, m2_c, cols, s, split, C)
    _store_part(part_ptr, 3, tl.sum(bad.to(f64), 0), cols, s, split, C)


# `slope` and the dropout `scale` are annotated fp64 so the kernels see the exact values (see
# activation.py); the seed halves and the threshold are uint32 bit patterns in int32 arguments,
# never specialized (one compilation for every seed).
_NO_SPECIALIZE = ["k0", "k1", "thr"]


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _fwd_kernel(
    x_ptr, y_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, pw_ptr, m, C, inner, inner_m, inner_s, slope: tl.float64,
    k0, k1, thr, scale: tl.float64, s0, s1, s2, w0, w1, w2, w3,
    ACT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, CL: tl.constexpr, WIDE: tl.constexpr,
    DROP: tl.constexpr, NDIM: tl.constexpr,
):  # fmt: skip
    cols, s, split = _program(BLOCK_C, WIDE)
    acc_ty = mean_ptr.dtype.element_ty
    mean, invstd, w, b, sl = _params(mean_ptr, invstd_ptr, w_ptr, b_ptr, pw_ptr, cols, C, slope, acc_ty, BLOCK_C, ACT)
    for start in range(s * BLOCK_P, m, split * BLOCK_P):
        offs, mask = _tile(start, cols, m, C, inner, inner_m, inner_s, BLOCK_P, CL, WIDE)
        x = tl.load(x_ptr + offs, mask=mask).to(acc_ty)
        # the reference's order, (x - mean) first: exact for inputs with a large mean
        z = (x - mean) * invstd * w + b
        y = _act_fwd(z, sl, ACT)
        if DROP:  # y as stored without dropout, then the dropout kernels' product and rounding
            y = y.to(y_ptr.dtype.element_ty).to(acc_ty)
            y *= _drop_mult(offs, k0, k1, thr, scale, s0, s1, s2, w0, w1, w2, w3, acc_ty, NDIM, WIDE)
            tl.store(y_ptr + offs, _round_to(y, y_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _bwd_reduce_kernel(
    g_ptr, x_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, pw_ptr, part_ptr, m, C, inner, inner_m, inner_s,
    slope: tl.float64, k0, k1, thr, scale: tl.float64, s0, s1, s2, w0, w1, w2, w3,
    ACT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, CL: tl.constexpr, WIDE: tl.constexpr,
    DROP: tl.constexpr, NDIM: tl.constexpr,
):  # fmt: skip
    # part: [3, C, SPLIT] of (sum dz, sum dz * xhat, PReLU slope gradient)
    cols, s, split = _program(BLOCK_C, WIDE)
    acc_ty = part_ptr.dtype.element_ty
    mean, invstd, w, b, sl = _params(mean_ptr, invstd_ptr, w_ptr, b_ptr, pw_ptr, cols, C, slope, acc_ty, BLOCK_C, ACT)
    s_dz = tl.zeros([BLOCK_P, BLOCK_C], acc_ty)
    s_dzx = tl.zeros([BLOCK_P, BLOCK_C], acc_ty)
    s_pw = tl.zeros([BLOCK_P, BLOCK_C], acc_ty)
    for start in range(s * BLOCK_P, m, split * BLOCK_P):
        offs, mask = _tile(start, cols, m, C, inner, inner_m, inner_s, BLOCK_P, CL, WIDE)
        x = tl.load(x_ptr + offs, mask=mask, other=0).to(acc_ty)
        g = tl.load(g_ptr + offs, mask=mask, other=0).to(acc_ty)
        if DROP:  # dL/dy * m, the mask regenerated
            g *= _drop_mult(offs, k0, k1, thr, scale, s0, s1, s2, w0, w1, w2, w3, acc_ty, NDIM, WIDE)
        xhat = (x - mean) * invstd
        z = xhat * w + b
        dz = _act_bwd(g, z, sl, ACT)
        # where(mask, ...): masked lanes must add 0 even when invstd is inf
        s_dz += tl.where(mask, dz, 0.0)
        s_dzx += tl.where(mask, dz * xhat, 0.0)
        if ACT == _PRELU:
            s_pw += tl.where(mask & ~(z > 0), z * g, 0.0)
    _store_part(part_ptr, 0, tl.sum(s_dz, 0), cols, s, split, C)
    _store_part(part_ptr, 1, tl.sum(s_dzx, 0), cols, s, split, C)
    if ACT == _PRELU:
        _store_part(part_ptr, 2, tl.sum(s_pw, 0), cols, s, split, C)


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _bwd_elemt_kernel(
    g_ptr, x_ptr, gi_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, pw_ptr, a_ptr, q_ptr, m, C, inner, inner_m, inner_s,
    slope: tl.float64, k0, k1, thr, scale: tl.float64, s0, s1, s2, w0, w1, w2, w3,
    ACT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, CL: tl.constexpr, WIDE: tl.constexpr,
    DROP: tl.constexpr, NDIM: tl.constexpr,
):  # fmt: skip
    # a = sum_dz / count, q = sum_dz_xhat / count (per channel)
    cols, s, split = _program(BLOCK_C, WIDE)
    acc_ty = mean_ptr.dtype.element_ty
    mean, invstd, w, b, sl = _params(mean_ptr, invstd_ptr, w_ptr, b_ptr, pw_ptr, cols, C, slope, acc_ty, BLOCK_C, ACT)
    a, q = _cload(a_ptr, cols, C), _cload(q_ptr, cols, C)
    k = w * invstd
    for start in range(s * BLOCK_P, m, split * BLOCK_P):
        offs, mask = _tile(start, cols, m, C, inner, inner_m, inner_s, BLOCK_P, CL, WIDE)
        x = tl.load(x_ptr + offs, mask=mask).to(acc_ty)
        g = tl.load(g_ptr + offs, mask=mask).to(acc_ty)
        if DROP:
            g *= _drop_mult(offs, k0, k1, thr, scale, s0, s1, s2, w0, w1, w2, w3, acc_ty, NDIM, WIDE)
        xhat = (x - mean) * invstd
        dz = _act_bwd(g, xhat * w + b, sl, ACT)
        stat = tl.where(q == 0, 0.0, xhat * q)  # 0 in eval even at an infinite x (not 0 * inf), as torch
        tl.store(gi_ptr + offs, (k * (dz - a - stat)).to(gi_ptr.dtype.element_ty), mask=mask)




def _cvec(t: torch.Tensor | None, x: torch.Tensor, fill: float) -> torch.Tensor:
    # a per-channel tensor (or its default) as a contiguous [C] tensor of the compute type;
    # a single PReLU slope is repeated
    c = x.shape[1]
    if t is None:
        return torch.full((c,), fill, dtype=compute_dtype(x), device=x.device)
    return t.to(compute_dtype(x)).reshape(-1).expand(c).contiguous()


def _cvecs(x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, weight: torch.Tensor | None,
           bias: torch.Tensor | None, prelu_weight: torch.Tensor | None, act: int) -> tuple[torch.Tensor, ...]:
    """The kernels' (mean, invstd, weight, bias, PReLU slopes) arguments as _cvec tensors; without
    PReLU the slopes pointer is never read and mean stands in for it."""
    mean_v = _cvec(mean, x, 0.0)
    pw = _cvec(prelu_weight, x, 0.25) if act == ACT_PRELU else mean_v
    return mean_v, _cvec(invstd, x, 1.0), _cvec(weight, x, 1.0), _cvec(bias, x, 0.0), pw


# The dropout arguments of a launch without dropout (unused: DROP is off).
_NO_DROP: tuple[tuple, dict] = ((0, 0, 0, 1.0, 1, 1, 1, 0, 0, 0, 0), {"DROP": False, "NDIM": 0})


def _drop_args(xd: torch.Tensor, p: float, seed: int) -> tuple[tuple, dict]:
    """(runtime arguments, constexprs) of dropout p after the activation over dense xd (p = 0: none):
    seed halves, threshold, scale and xd's index map (docs/dropout.md)."""
    if p == 0:
        return _NO_DROP
    thr = _threshold_arg(p)
    margs, ndim = _map_args(_index_map(xd, False))
    return (*_seed_args(seed), thr, 1.0 / (1.0 - p), *margs), {"DROP": True, "NDIM": ndim}


def _separate_dropout(xd: torch.Tensor, p: float) -> bool:
    """Dropout on a layout of more coalesced dims than the kernels' index map takes (a permuted
    tensor of 5+ dims) runs as the dropout family's pass of its own, which handles any layout: on
    the output (forward) or on grad (backward; fp16/bf16 grad * m then rounds to the storage type).
    Batch norm itself runs on x's layout as without dropout: the forward stays bit for bit
    dropout(batch_norm_act(x))."""
    return p != 0 and len(_index_map(xd, False)) > _MAXD


def _geometry(xd: torch.Tensor) -> tuple[tuple[int, int], tuple[int, ...], dict]:
    """(grid, (m, C, inner, inner_m, inner_s), constexprs) of dense xd."""
    n, c = xd.numel(), xd.shape[1]
    inner = xd.stride(1) if c > 1 else n  # one channel: any split of memory is [1, 1, n]
    m = n // c
    cl = inner == 1
    block_c = min(triton.next_power_of_2(c), _MAX_BLOCK_C) if cl else 1
    block_p = BLOCK // block_c
    cblocks = triton.cdiv(c, block_c)
    split = min(triton.cdiv(m, block_p), max(1, _TARGET_PROGRAMS // cblocks))
    # int64 indexing when an offset, even of a masked lane or the loop counter past the end,
    # could pass int32
    wide = n + (block_p + inner) * c + split * block_p >= 2**31
    consts = {"BLOCK_P": block_p, "BLOCK_C": block_c, "CL": cl, "WIDE": wide}
    return (cblocks, split), (m, c, *divider(inner)), consts


def batch_norm_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (dim 1) mean and biased variance, float32 (float64 for float64 x), shape [C]."""
    acc, c = compute_dtype(x), x.shape[1]
    if x.numel() == 0:
        nan = torch.full((c,), float("nan"), dtype=acc, device=x.device)
        return nan, nan.clone()
    xd = dense(x)
    grid, args, consts = _geometry(xd)
    part = torch.empty((4, c, grid[1]), dtype=torch.float64, device=x.device)
    # the shift: each channel's first value in memory (offset c * inner), 0 where it is not finite
    shift = xd.as_strided((c,), (args[2],)).to(acc)
    shift = torch.where(shift.isfinite(), shift, 0).contiguous()
    with on_device(xd):
        _stats_kernel[grid](xd, shift, part, *args, **consts)
    # Chan's merge of the SPLIT partials in closed form, in float64 (tiny tensors)
    n, mu, m2, bad = part.unbind(0)
    total = n.sum(1)
    mean = (n * mu).sum(1) / total
    var = (m2.sum(1) + (n * (mu - mean[:, None]) ** 2).sum(1)) / total
    bad = bad.sum(1)  # 0, or the channel's +-inf / NaN: the mean takes it, the variance is NaN
    return (mean + shift.double() + bad).to(acc), (var + bad * 0).to(acc)


def batch_norm_act_forward(
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    prelu_weight: torch.Tensor | None,
    act: int,
    slope: float,
    p: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """y = act((x - mean) * invstd * weight + bias), laid out as empty_like(x), in x's dtype; then,
    for p > 0, dropout of y (bit for bit triton_ops.dropout.dropout of the y above)."""
    if x.numel() == 0:
        return torch.empty_like(x)
    xd = dense(x)
    if _separate_dropout(xd, p):
        return dropout(batch_norm_act_forward(xd, mean, invstd, weight, bias, prelu_weight, act, slope), p, seed, False)
    y = torch.empty_like(xd)
    grid, args, consts = _geometry(xd)
    dargs, dconsts = _drop_args(xd, p, seed)
    params = _cvecs(x, mean, invstd, weight, bias, prelu_weight, act)
    with on_device(xd):
        _fwd_kernel[grid](xd, y, *params, *args, float(slope), *dargs, ACT=int(act), **consts, **dconsts)
    return y


def batch_norm_act_backward_reduce(
    grad: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    prelu_weight: torch.Tensor | None,
    act: int,
    slope: float,
    p: float = 0.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum_dz, sum_dz_xhat, grad_prelu) in one pass; dz = act'(z) * grad with z recomputed (grad * m
    for p > 0). grad_prelu has prelu_weight's shape and dtype, or is an empty float tensor unless act
    is prelu."""
    acc, c = compute_dtype(x), x.shape[1]
    prelu = act == ACT_PRELU
    if x.numel() == 0:
        sums = torch.zeros((3, c), dtype=acc, device=x.device)
    elif _separate_dropout(dense(x), p):
        return batch_norm_act_backward_reduce(dropout(grad, p, seed, False), x, mean, invstd, weight, bias,
                                              prelu_weight, act, slope)
    else:
        xd = dense(x)
        gd = like(grad, xd)
        grid, args, consts = _geometry(xd)
        dargs, dconsts = _drop_args(xd, p, seed)
        part = (torch.zeros if prelu else torch.empty)((3, c, grid[1]), dtype=acc, device=x.device)
        params = _cvecs(x, mean, invstd, weight, bias, prelu_weight, act)
        with on_device(xd):
            _bwd_reduce_kernel[grid](
                gd, xd, *params, part, *args, float(slope), *dargs, ACT=int(act), **consts, **dconsts
            )
        sums = part.sum(2)
    if prelu:
        gp = sums[2].sum() if prelu_weight.numel() == 1 else sums[2]
        grad_prelu = gp.to(prelu_weight.dtype).reshape(prelu_weight.shape)
    else:
        grad_prelu = torch.empty(0, dtype=acc, device=x.device)
    return sums[0], sums[1], grad_prelu


def batch_norm_act_backward_elemt(
    grad: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    prelu_weight: torch.Tensor | None,
    sum_dz: torch.Tensor,
    sum_dz_xhat: torch.Tensor,
    count: int,
    act: int,
    slope: float,
    p: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """grad_input = weight * invstd * (dz - sum_dz / count - xhat * sum_dz_xhat / count), dz from
    grad * m for p > 0."""
    if x.numel() == 0:
        return torch.empty_like(x)
    xd = dense(x)
    if _separate_dropout(xd, p):
        return batch_norm_act_backward_elemt(dropout(grad, p, seed, False), xd, mean, invstd, weight, bias,
                                             prelu_weight, sum_dz, sum_dz_xhat, count, act, slope)
    gd = like(grad, xd)
    gi = torch.empty_like(xd)
    grid, args, consts = _geometry(xd)
    dargs, dconsts = _drop_args(xd, p, seed)
    params = _cvecs(x, mean, invstd, weight, bias, prelu_weight, act)
    a, q = _cvec(sum_dz, x, 0.0) / count, _cvec(sum_dz_xhat, x, 0.0) / count
    with on_device(xd):
        _bwd_elemt_kernel[grid](
            gd, xd, gi, *params, a, q, *args, float(slope), *dargs, ACT=int(act), **consts, **dconsts
        )
    return gi


batch_norm_act_train = compose_train(batch_norm_stats, batch_norm_act_forward)
batch_norm_act_eval = compose_eval(batch_norm_act_forward)
batch_norm_act_backward = compose_backward(batch_norm_act_backward_reduce, batch_norm_act_backward_elemt)

# The two tile shapes _geometry picks (channels_last shown with 64-channel tiles, where the JIT
# makes constants of inner = 1 and its multiplier).
_LAYOUTS = {
    "nchw": ({"BLOCK_P": BLOCK, "BLOCK_C": 1, "CL": 0}, {}),
    "cl": ({"BLOCK_P": BLOCK // _MAX_BLOCK_C, "BLOCK_C": _MAX_BLOCK_C, "CL": 1}, {"inner": 1, "inner_m": 1}),
}
_DATA_PTRS = ("x_ptr", "y_ptr", "g_ptr", "gi_ptr")
# Dropout variants: none (the map's sizes passed as 1, the JIT's constants), memory order
# row-major (NCHW: the logical index is the offset), channels_last (three coalesced dims; s2 and
# the weight-1 dim's w1 as the host passes them for NCHW-shaped 4-D input).
_DROPS = {
    None: {"DROP": 0, "NDIM": 0, "s0": 1, "s1": 1, "s2": 1},
    "flat": {"DROP": 1, "NDIM": 0, "s0": 1, "s1": 1, "s2": 1},
    "cl": {"DROP": 1, "NDIM": 3, "s2": 1, "w1": 1},
}


def _spec(kernel, dt: str, layout: str, act: int | None = None, wide: bool = False, drop: str | None = None) -> AotSpec:
    # Types by naming convention: x/y/g/gi pointers are dt, other pointers (per-channel values,
    # partials) the accumulation type; slope and scale fp64; m divisible by 16 (i64 when wide);
    # ints i32 (the seed halves and threshold too: uint32 bit patterns).
    consts = {**_LAYOUTS[layout][0], "WIDE": int(wide)}
    consts.update({k: v for k, v in _LAYOUTS[layout][1].items() if k in kernel.arg_names})
    if "ACT" in kernel.arg_names:
        consts["ACT"] = act
    if "DROP" in kernel.arg_names:
        consts.update(_DROPS[drop])
    acc = "fp64" if dt == "fp64" else "fp32"
    types = {"slope": "fp64", "scale": "fp64", "m": "i64:16" if wide else "i32:16"}
    if kernel is _stats_kernel:
        types["part_ptr"] = "*fp64:16"  # merged in float64, see the kernel
    sig = {
        a: types.get(a, f"*{dt if a in _DATA_PTRS else acc}:16" if a.endswith("_ptr") else "i32")
        for a in kernel.arg_names
        if a not in consts
    }
    name = kernel.__name__.strip("_").removesuffix("_kernel")
    tags = [dt, layout, *([f"act{act}"] if act is not None else []), *(["wide"] if wide else []),
            *([f"drop-{drop}"] if drop else [])]
    return AotSpec(f"bn_{name}[{','.join(tags)}]", kernel, sig, consts)


AOT_SPECS: list[AotSpec] = [
    *(
        spec
        for dt in ("fp32", "bf16")
        for layout in _LAYOUTS
        for spec in (
            _spec(_stats_kernel, dt, layout),
            _spec(_fwd_kernel, dt, layout, ACT_PRELU),
            _spec(_bwd_reduce_kernel, dt, layout, ACT_PRELU),
            _spec(_bwd_elemt_kernel, dt, layout, ACT_PRELU),
        )
    ),
    _spec(_stats_kernel, "fp64", "nchw"),
    *(_spec(k, "fp64", "nchw", ACT_PRELU) for k in (_fwd_kernel, _bwd_reduce_kernel, _bwd_elemt_kernel)),
    *(_spec(k, "bf16", "nchw", ACT_RELU) for k in (_fwd_kernel, _bwd_reduce_kernel, _bwd_elemt_kernel)),
    _spec(_stats_kernel, "fp32", "nchw", wide=True),
    _spec(_bwd_reduce_kernel, "fp32", "cl", ACT_LEAKY_RELU, wide=True),
    # dropout after the activation: NCHW and channels_last, fp32 and bf16, PReLU (the largest)
    *(
        _spec(k, dt, layout, ACT_PRELU, drop="flat" if layout == "nchw" else "cl")
        for dt in ("fp32", "bf16")
        for layout in _LAYOUTS
        for k in (_fwd_kernel, _bwd_reduce_kernel, _bwd_elemt_kernel)
    ),
    _spec(_fwd_kernel, "fp64", "nchw", ACT_LEAKY_RELU, drop="flat"),
    _spec(_bwd_elemt_kernel, "fp32", "cl", ACT_LEAKY_RELU, wide=True, drop="cl"),
]

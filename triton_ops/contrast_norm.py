"""Global contrast normalization in Triton: forward and backward launchers (the contract is
dlkernels/reference/contrast_norm.py).

Layout (the same as the C++ backend): example i is the dense block [i * M, (i + 1) * M) of x's
memory (contiguous or channels_last; anything else is copied to contiguous first); outputs are
``torch.empty_like`` of that x, grad is read in its layout. Math runs in float32 for
float16/bfloat16/float32 and in float64 for float64.

Forward: ``_gcn_partial_kernel`` (grid N x SPLIT) merges the moments (count, mean, M2) of its
blocks with Chan's formula, ``_gcn_stats_kernel`` (grid N) merges an example's SPLIT partials and
computes (a, inv, w, b), ``_gcn_apply_kernel`` writes y. Backward: ``_gcn_bwd_partial_kernel``
sums g and g * (x - a) per (example, split); ``_gcn_bwd_apply_kernel`` adds an example's
partials and writes grad_input. Fixed orders, no atomics: deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dlkernels.reference.contrast_norm import blocked

from ._aot import AotSpec
from ._common import like, on_device

BLOCK = 1024
# N * SPLIT programs aimed at by the reductions: about one wave of 4-warp programs on a 132-SM GPU.
_TARGET_PROGRAMS = 2048
_INT32_LIMIT = 2**31 - 2**22
_STYLES = {"book": 0, "pylearn2_std": 1, "pylearn2_l2": 2}


@triton.jit
def _gcn_partial_kernel(x_ptr, part_ptr, M, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    # program (i, s): blocks s, s + SPLIT, ... of example i; part[i, s] = (count, mean, M2)
    i = tl.program_id(0)
    s = tl.program_id(1)
    split = tl.num_programs(1)
    if WIDE:
        i = i.to(tl.int64)
        s = s.to(tl.int64)
    acc_ty = part_ptr.dtype.element_ty
    base = x_ptr + i * M
    shift = tl.load(base).to(acc_ty)  # about the first value: a constant example is exactly (value, 0)
    n = tl.full([], 0, acc_ty)
    mean = tl.full([], 0, acc_ty)
    m2 = tl.full([], 0, acc_ty)
    for start in range(s * BLOCK, M, split * BLOCK):
        p = start + tl.arange(0, BLOCK)
        mask = p < M
        v = tl.where(mask, tl.load(base + p, mask=mask, other=0).to(acc_ty) - shift, 0)
        cnt = tl.minimum(M - start, BLOCK).to(acc_ty)
        bm = tl.sum(v, axis=0) / cnt
        d = tl.where(mask, v - bm, 0)
        bq = tl.sum(d * d, axis=0)
        total = n + cnt
        delta = bm - mean
        mean = mean + delta * (cnt / total)
        m2 = m2 + bq + delta * delta * (n * (cnt / total))
        n = total
    out = part_ptr + (i * split + s) * 3
    tl.store(out, n)
    tl.store(out + 1, mean)
    tl.store(out + 2, m2)


@triton.jit
def _gcn_stats_kernel(x_ptr, part_ptr, stats_ptr, M, SPLIT, scale: tl.float64, lam: tl.float64, eps: tl.float64,
                      STYLE: tl.constexpr, SUBTRACT: tl.constexpr, SPLIT_P2: tl.constexpr):
    # merges example i's SPLIT partials, writes stats[i] = (mean, inv, w) (see gcn_coef in
    # csrc/common/contrast_norm.h)
    i = tl.program_id(0).to(tl.int64)
    acc_ty = stats_ptr.dtype.element_ty
    k = tl.arange(0, SPLIT_P2)
    mask = k < SPLIT
    src = part_ptr + (i * SPLIT + k) * 3
    n = tl.load(src, mask=mask, other=0)
    mu = tl.load(src + 1, mask=mask, other=0)
    q = tl.load(src + 2, mask=mask, other=0)
    total = tl.sum(n, axis=0)
    mean = tl.sum(n * mu, axis=0) / total
    d = mu - mean
    m2 = tl.sum(q + n * d * d, axis=0)
    mean = mean + tl.load(x_ptr + i * M).to(acc_ty)  # the partials are about the first value
    centre = mean
    if not SUBTRACT:
        if STYLE != 1:  # sum of squares about 0 (pylearn2_std keeps its variance about the mean)
            m2 = m2 + total * mean * mean
            centre = tl.full([], 0, acc_ty)
        mean = tl.full([], 0, acc_ty)
    scale_ = tl.full([], scale, acc_ty)
    lam_ = tl.full([], lam, acc_ty)
    eps_ = tl.full([], eps, acc_ty)
    m = tl.full([], M, acc_ty)
    if STYLE == 0:
        div = m
    elif STYLE == 1:
        div = tl.maximum(m - 1, 1)
    else:
        div = tl.full([], 1, acc_ty)
    sd = tl.sqrt(lam_ + m2 / div)
    zero = tl.full([], 0, acc_ty)
    if STYLE == 0:
        smooth = ~(sd <= eps_)
        const = tl.where(eps_ > 0, scale_ / eps_, zero)
    else:
        smooth = ~(sd / scale_ < eps_)
        const = tl.full([], 1, acc_ty)
    inv_s = scale_ / sd
    inv = tl.where(smooth, inv_s, const)
    w = tl.where(smooth, inv_s / (div * sd * sd), zero)
    null = smooth & (sd == 0)
    inv = tl.where(null, zero, inv)
    w = tl.where(null, zero, w)
    out = stats_ptr + i * 4
    tl.store(out, mean)
    tl.store(out + 1, inv)
    tl.store(out + 2, w)
    tl.store(out + 3, centre)


@triton.jit
def _gcn_apply_kernel(x_ptr, stats_ptr, y_ptr, M, NBLK, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    pid = tl.program_id(0)
    if WIDE:
        pid = pid.to(tl.int64)
    i = pid // NBLK
    p = (pid - i * NBLK) * BLOCK + tl.arange(0, BLOCK)
    mask = p < M
    acc_ty = stats_ptr.dtype.element_ty
    mean = tl.load(stats_ptr + i * 4)
    inv = tl.load(stats_ptr + i * 4 + 1)
    off = i * M + p
    x = tl.load(x_ptr + off, mask=mask).to(acc_ty)
    tl.store(y_ptr + off, ((x - mean) * inv).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gcn_bwd_partial_kernel(g_ptr, x_ptr, stats_ptr, part_ptr, M, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    # part[i, s] = (sum(g), sum(g * (x - a))) over blocks s, s + SPLIT, ... of example i
    i = tl.program_id(0)
    s = tl.program_id(1)
    split = tl.num_programs(1)
    if WIDE:
        i = i.to(tl.int64)
        s = s.to(tl.int64)
    acc_ty = part_ptr.dtype.element_ty
    mean = tl.load(stats_ptr + i * 4)
    a0 = tl.zeros([BLOCK], dtype=acc_ty)
    a1 = tl.zeros([BLOCK], dtype=acc_ty)
    for start in range(s * BLOCK, M, split * BLOCK):
        p = start + tl.arange(0, BLOCK)
        mask = p < M
        off = i * M + p
        g = tl.load(g_ptr + off, mask=mask, other=0).to(acc_ty)
        x = tl.load(x_ptr + off, mask=mask, other=0).to(acc_ty)
        a0 += g
        a1 += g * tl.where(mask, x - mean, 0)
    out = part_ptr + (i * split + s) * 2
    tl.store(out, tl.sum(a0, axis=0))
    tl.store(out + 1, tl.sum(a1, axis=0))


@triton.jit
def _gcn_bwd_apply_kernel(g_ptr, x_ptr, stats_ptr, part_ptr, gi_ptr, M, NBLK, SPLIT, SUBTRACT: tl.constexpr,
                          SPLIT_P2: tl.constexpr, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    pid = tl.program_id(0)
    if WIDE:
        pid = pid.to(tl.int64)
    i = pid // NBLK
    acc_ty = stats_ptr.dtype.element_ty
    k = tl.arange(0, SPLIT_P2)
    mask_k = k < SPLIT
    sg = tl.sum(tl.load(part_ptr + (i * SPLIT + k) * 2, mask=mask_k, other=0), axis=0)
    sgc = tl.sum(tl.load(part_ptr + (i * SPLIT + k) * 2 + 1, mask=mask_k, other=0), axis=0)
    centre = tl.load(stats_ptr + i * 4 + 3)
    inv = tl.load(stats_ptr + i * 4 + 1)
    kc = tl.load(stats_ptr + i * 4 + 2) * sgc
    if SUBTRACT:
        mg = sg / tl.full([], M, acc_ty)
    else:
        mg = tl.full([], 0, acc_ty)
    p = (pid - i * NBLK) * BLOCK + tl.arange(0, BLOCK)
    mask = p < M
    off = i * M + p
    g = tl.load(g_ptr + off, mask=mask).to(acc_ty)
    x = tl.load(x_ptr + off, mask=mask).to(acc_ty)
    gi = (g - mg) * inv - (x - centre) * kc
    tl.store(gi_ptr + off, gi.to(gi_ptr.dtype.element_ty), mask=mask)


def _prepare(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 0:
        raise ValueError("global_contrast_norm: input must have a batch dim, got a 0-d tensor")
    return x if blocked(x) else x.contiguous()


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _split(n: int, m: int) -> int:
    return max(1, min(triton.cdiv(m, BLOCK), _TARGET_PROGRAMS // max(n, 1)))


def global_contrast_norm(x: torch.Tensor, scale: float, lam: float, eps: float, style: str,
                         subtract_mean: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if style not in _STYLES:
        raise ValueError(f"global_contrast_norm: unknown style {style!r}")
    xd = _prepare(x)
    n = xd.shape[0]
    m = xd.numel() // n if n else 0
    y = torch.empty_like(xd)
    stats = torch.zeros((n, 4), dtype=_acc_dtype(x), device=x.device)
    if n == 0 or m == 0:
        return y, stats
    split = _split(n, m)
    wide = xd.numel() > _INT32_LIMIT
    part = torch.empty((n, split, 3), dtype=stats.dtype, device=x.device)
    nblk = triton.cdiv(m, BLOCK)
    with on_device(xd):
        _gcn_partial_kernel[(n, split)](xd, part, m, BLOCK=BLOCK, WIDE=wide)
        _gcn_stats_kernel[(n,)](xd, part, stats, m, split, float(scale), float(lam), float(eps), STYLE=_STYLES[style],
                                SUBTRACT=bool(subtract_mean), SPLIT_P2=triton.next_power_of_2(split))
        _gcn_apply_kernel[(n * nblk,)](xd, stats, y, m, nblk, BLOCK=BLOCK, WIDE=wide)
    return y, stats


def global_contrast_norm_backward(grad: torch.Tensor, x: torch.Tensor, stats: torch.Tensor,
                                  subtract_mean: bool) -> torch.Tensor:
    xd = _prepare(x)
    gd = like(grad, xd)
    n = xd.shape[0]
    m = xd.numel() // n if n else 0
    gi = torch.empty_like(xd)
    if n == 0 or m == 0:
        return gi
    stats = stats.contiguous()
    split = _split(n, m)
    wide = xd.numel() > _INT32_LIMIT
    part = torch.empty((n, split, 2), dtype=stats.dtype, device=x.device)
    nblk = triton.cdiv(m, BLOCK)
    with on_device(xd):
        _gcn_bwd_partial_kernel[(n, split)](gd, xd, stats, part, m, BLOCK=BLOCK, WIDE=wide)
        _gcn_bwd_apply_kernel[(n * nblk,)](gd, xd, stats, part, gi, m, nblk, split, SUBTRACT=bool(subtract_mean),
                                           SPLIT_P2=triton.next_power_of_2(split), BLOCK=BLOCK, WIDE=wide)
    return gi


def _spec(kernel, dt: str, variant: str = "", **consts) -> AotSpec:
    # *_ptr: 16-byte aligned tensors of dt (stats/part in the accumulation type); scale/lam/eps
    # fp64; M "i32:16" (a multiple of 16, as 224x224 images), other integers i32. "odd": M not a
    # multiple of 16; "wide": int64 indexing.
    acc = "fp64" if dt == "fp64" else "fp32"
    consts = {"BLOCK": BLOCK, "WIDE": int(variant == "wide"), **consts}
    consts = {k: v for k, v in consts.items() if k in kernel.arg_names}
    types = {"part_ptr": f"*{acc}:16", "stats_ptr": f"*{acc}:16", "scale": "fp64", "lam": "fp64", "eps": "fp64",
             "M": "i32" if variant == "odd" else "i32:16"}
    sig = {a: types.get(a, f"*{dt}:16" if a.endswith("_ptr") else "i32") for a in kernel.arg_names if a not in consts}
    name = kernel.__name__.strip("_").removesuffix("_kernel")
    tag = ",".join(filter(None, (dt, variant, *(f"{k}={v}" for k, v in consts.items() if k not in ("BLOCK", "WIDE")))))
    return AotSpec(f"{name}[{tag}]", kernel, sig, consts)


_ELEMENTWISE = (_gcn_partial_kernel, _gcn_apply_kernel, _gcn_bwd_partial_kernel)
AOT_SPECS: list[AotSpec] = [
    *(_spec(k, dt) for dt in ("fp32", "bf16", "fp64") for k in _ELEMENTWISE),
    *(_spec(_gcn_bwd_apply_kernel, dt, SUBTRACT=1, SPLIT_P2=16) for dt in ("fp32", "bf16", "fp64")),
    _spec(_gcn_bwd_apply_kernel, "fp32", SUBTRACT=0, SPLIT_P2=16),
    *(_spec(_gcn_stats_kernel, "fp32", STYLE=s, SUBTRACT=1, SPLIT_P2=16) for s in (0, 1, 2)),
    _spec(_gcn_stats_kernel, "bf16", STYLE=0, SUBTRACT=1, SPLIT_P2=16),
    _spec(_gcn_stats_kernel, "fp32", STYLE=0, SUBTRACT=0, SPLIT_P2=64),
    _spec(_gcn_stats_kernel, "fp64", STYLE=0, SUBTRACT=1, SPLIT_P2=16),
    *(_spec(k, "fp32", "odd") for k in _ELEMENTWISE),
    *(_spec(k, "fp32", "wide") for k in _ELEMENTWISE),
    _spec(_gcn_bwd_apply_kernel, "fp32", "wide", SUBTRACT=1, SPLIT_P2=16),
]

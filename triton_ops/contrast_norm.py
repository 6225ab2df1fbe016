"""Global and local contrast normalization in Triton: forward and backward launchers (the
contract is dlkernels/reference/contrast_norm.py).

GCN:

Layout (the same as the C++ backend): example i is the dense block [i * M, (i + 1) * M) of x's
memory (contiguous or channels_last; anything else is copied to contiguous first); outputs are
``torch.empty_like`` of that x, grad is read in its layout. Math runs in float32 for
float16/bfloat16/float32 and in float64 for float64.

Forward: ``_gcn_partial_kernel`` (grid N x SPLIT) merges the moments (count, mean, M2) of its
blocks with Chan's formula, ``_gcn_stats_kernel`` (grid N) merges an example's SPLIT partials and
computes (a, inv, w, b), ``_gcn_apply_kernel`` writes y. Backward: ``_gcn_bwd_partial_kernel``
sums g and g * (x - a) per (example, split); ``_gcn_bwd_apply_kernel`` adds an example's
partials and writes grad_input. Fixed orders, no atomics: deterministic.

LCN: x is read through its strides (any layout; the output is ``empty_like`` of the x the
launcher takes). The statistics live in float32 (float64) planes (N * CS, H, W), CS = C per
channel or 1 across channels. ``_lcn_row_kernel`` is the pass along W of a source it computes on
the fly (MODE 0: x minus the plane's first value; 1: v^2; 2: the backward's gq / Z; 3: the channel
sum of gv / Z; across channels MODE 0/1 average the channels), ``_lcn_col_kernel`` the pass along
H (with 1/zr and sqrt for the forward statistics), ``_lcn_mean_kernel`` a plane's mean (lecun's c
and its gradient). Forward: row(0), col -> M, row(1), col+sqrt -> S, [mean -> c], out. Backward:
the forward's statistics again (nothing is saved), ``_lcn_bwd_gs_kernel`` (gradient of s, and
lecun's part for c), [mean], row(2), col -> R, ``_lcn_bwd_gv_kernel`` (gv), row(3), col -> U,
``_lcn_bwd_out_kernel``. Fixed orders, no atomics: deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dlkernels.codes import LcnDivisor
from dlkernels.reference.contrast_norm import blocked, gaussian_window, inverse_normalizer, lcn_layout

from ._aot import AotSpec
from ._common import like, on_device, split_program

BLOCK = 1024
# N * SPLIT programs aimed at by the reductions: about one wave of 4-warp programs on a 132-SM GPU.
_TARGET_PROGRAMS = 2048
_INT32_LIMIT = 2**31 - 2**22
_STYLES = {"book": 0, "pylearn2_std": 1, "pylearn2_l2": 2}


@triton.jit
def _gcn_partial_kernel(x_ptr, part_ptr, M, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    # program (i, s): blocks s, s + SPLIT, ... of example i; part[i, s] = (count, mean, M2)
    i, s, split = split_program(tl.program_id(0), WIDE)
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
    i, s, split = split_program(tl.program_id(0), WIDE)
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



# ---- local contrast normalization ----

@triton.jit
def _lcn_coef(s, c, eps, LECUN: tl.constexpr):
    # (inv, on_s, on_c): lcn_coef of csrc/common/contrast_norm.h
    if LECUN:
        swin = ~(s < c)
    else:
        swin = tl.zeros_like(s) == 0  # NaN s too
    t = tl.where(swin, s, c)
    smooth = ~(t <= eps)
    d = tl.where(smooth, t, eps)
    inv = tl.where(d == 0, 0.0, 1.0 / tl.where(d == 0, 1.0, d))  # no 1/0 computed (the interpreter warns)
    return inv.to(s.dtype), smooth & swin, smooth & (~swin)


@triton.jit
def _lcn_row(H, WIDE: tl.constexpr):
    # (pid, q, h) of a program of a row pass: program_id(0) = pid = q * H + h, q a plane or channel
    pid = tl.program_id(0)
    if WIDE:
        pid = pid.to(tl.int64)
    q = pid // H
    return pid, q, pid - q * H


@triton.jit
def _lcn_plane(C, CS, H, ACROSS: tl.constexpr, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    # A statistics pass's program (ph, jb), ph = p * H + h: (ph, p, h, n, c0, nc, j) for its BLOCK
    # columns j of row h of statistics plane p = n * CS + cs, made of channels c0 .. c0 + nc - 1
    ph, p, h = _lcn_row(H, WIDE)
    n = p // CS
    if ACROSS:
        c0 = 0
        nc = C
    else:
        c0 = p - n * CS
        nc = 1
    return ph, p, h, n, c0, nc, tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _lcn_row_kernel(src_ptr, aux_ptr, vec_ptr, out_ptr, w_ptr, izr_ptr, izc_ptr, C, CS, H, W, RW,
                    s_n, s_c, s_h, s_w, MODE: tl.constexpr, ACROSS: tl.constexpr, BLOCK: tl.constexpr,
                    WIDE: tl.constexpr):
    # program (p * H + h, jb): out[p, h, j] = sum_k w[k] src[p, h, j + k - RW] (zero outside) for
    # BLOCK columns j of statistics plane p = n * CS + cs; src per MODE (see the module docstring)
    ph, p, h, n, c0, nc, j = _lcn_plane(C, CS, H, ACROSS, BLOCK, WIDE)
    acc_ty = out_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK], dtype=acc_ty)
    for k in range(0, 2 * RW + 1):
        jj = j + (k - RW)
        mask = (jj >= 0) & (jj < W)
        val = tl.zeros([BLOCK], dtype=acc_ty)
        if MODE < 2:
            shift = tl.load(vec_ptr + p)
            if MODE == 1:
                m = tl.load(aux_ptr + ph * W + jj, mask=mask, other=0)
            for c in range(c0, c0 + nc):
                d = tl.load(src_ptr + n * s_n + c * s_c + h * s_h + jj * s_w, mask=mask, other=0).to(acc_ty) - shift
                if MODE == 1:
                    d = d - m
                    d = d * d
                val += d
            if ACROSS:
                val = val / C
        elif MODE == 2:
            gs = tl.load(src_ptr + ph * W + jj, mask=mask, other=0)
            sd = tl.load(aux_ptr + ph * W + jj, mask=mask, other=0)
            gq = tl.where(sd > 0, (gs + tl.load(vec_ptr + p)) / (2 * tl.where(sd > 0, sd, 1)), 0)
            val = gq * tl.load(izr_ptr + h) * tl.load(izc_ptr + jj, mask=mask, other=0)
        else:
            for c in range(c0, c0 + nc):
                val += tl.load(src_ptr + n * s_n + c * s_c + h * s_h + jj * s_w, mask=mask, other=0)
            val = val * tl.load(izr_ptr + h) * tl.load(izc_ptr + jj, mask=mask, other=0)
        acc += tl.load(w_ptr + k) * tl.where(mask, val, 0)
    if MODE < 2:
        acc = acc * tl.load(izc_ptr + j, mask=j < W, other=1)
    tl.store(out_ptr + ph * W + j, acc, mask=j < W)


@triton.jit
def _lcn_col_kernel(t_ptr, out_ptr, w_ptr, izr_ptr, H, W, RH, NORM: tl.constexpr, SQRT: tl.constexpr,
                    BLOCK: tl.constexpr, WIDE: tl.constexpr):
    # program (p * H + h, jb): out[p, h, j] = sum_k w[k] t[p, h + k - RH, j] (zero outside),
    # NORM: times 1/zr(h); SQRT: its square root
    ph, p, h = _lcn_row(H, WIDE)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = j < W
    acc = tl.zeros([BLOCK], dtype=out_ptr.dtype.element_ty)
    for k in range(0, 2 * RH + 1):
        hh = h + (k - RH)
        ok = (hh >= 0) & (hh < H)
        acc += tl.load(w_ptr + k) * tl.load(t_ptr + (p * H + hh) * W + j, mask=mask & ok, other=0)
    if NORM:
        acc = acc * tl.load(izr_ptr + h)
    if SQRT:
        acc = tl.sqrt(acc)
    tl.store(out_ptr + ph * W + j, acc, mask=mask)


@triton.jit
def _lcn_mean_kernel(src_ptr, out_ptr, HW, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    # out[p] = the mean of plane p (HW values), in a fixed order
    p = tl.program_id(0)
    if WIDE:
        p = p.to(tl.int64)
    acc = tl.zeros([BLOCK], dtype=out_ptr.dtype.element_ty)
    for start in range(0, HW, BLOCK):
        q = start + tl.arange(0, BLOCK)
        acc += tl.load(src_ptr + p * HW + q, mask=q < HW, other=0)
    tl.store(out_ptr + p, tl.sum(acc, axis=0) / HW)


@triton.jit
def _lcn_elem(C, H, W, ACROSS: tl.constexpr, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    # An elementwise pass's program (pid, jb), pid = (n * C + c) * H + h: (pid, n, c, h, p, j,
    # mask) for its BLOCK columns j of row h of channel (n, c); p: its statistics plane
    pid, nc, h = _lcn_row(H, WIDE)
    n = nc // C
    c = nc - n * C
    if ACROSS:
        p = n
    else:
        p = nc
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    return pid, n, c, h, p, j, j < W


@triton.jit
def _lcn_stats(m_ptr, s_ptr, cm_ptr, st, p, mask, eps, LECUN: tl.constexpr):
    # the local mean m at statistics offsets st of plane p, and lcn_coef's (inv, on_s, on_c) there
    m = tl.load(m_ptr + st, mask=mask, other=0)
    sd = tl.load(s_ptr + st, mask=mask, other=1)
    inv, on_s, on_c = _lcn_coef(sd, tl.load(cm_ptr + p), tl.full([], eps, m_ptr.dtype.element_ty), LECUN)
    return m, inv, on_s, on_c


@triton.jit
def _lcn_out_kernel(x_ptr, y_ptr, m_ptr, s_ptr, cm_ptr, shift_ptr, eps: tl.float64, C, CS, H, W,
                    sx_n, sx_c, sx_h, sx_w, sy_n, sy_c, sy_h, sy_w, ACROSS: tl.constexpr, LECUN: tl.constexpr,
                    BLOCK: tl.constexpr, WIDE: tl.constexpr):
    # y = (x - shift - m) * inv for BLOCK columns of row h of channel (n, c)
    _, n, c, h, p, j, mask = _lcn_elem(C, H, W, ACROSS, BLOCK, WIDE)
    acc_ty = m_ptr.dtype.element_ty
    m, inv, _, _ = _lcn_stats(m_ptr, s_ptr, cm_ptr, (p * H + h) * W + j, p, mask, eps, LECUN)
    x = tl.load(x_ptr + n * sx_n + c * sx_c + h * sx_h + j * sx_w, mask=mask, other=0).to(acc_ty)
    y = (x - tl.load(shift_ptr + p) - m) * inv
    tl.store(y_ptr + n * sy_n + c * sy_c + h * sy_h + j * sy_w, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lcn_bwd_gs_kernel(g_ptr, x_ptr, m_ptr, s_ptr, cm_ptr, shift_ptr, gs_ptr, ct_ptr, eps: tl.float64, C, CS, H, W,
                       sx_n, sx_c, sx_h, sx_w, sg_n, sg_c, sg_h, sg_w, ACROSS: tl.constexpr, LECUN: tl.constexpr,
                       BLOCK: tl.constexpr, WIDE: tl.constexpr):
    # per statistic: gd = sum over its channels of -g v inv^2; gs = gd where s is the divisor,
    # ct = gd where lecun's c is
    ph, p, h, n, c0, nc, j = _lcn_plane(C, CS, H, ACROSS, BLOCK, WIDE)
    acc_ty = m_ptr.dtype.element_ty
    mask = j < W
    st = ph * W + j
    m, inv, on_s, on_c = _lcn_stats(m_ptr, s_ptr, cm_ptr, st, p, mask, eps, LECUN)
    shift = tl.load(shift_ptr + p)
    gd = tl.zeros([BLOCK], dtype=acc_ty)
    for c in range(c0, c0 + nc):
        x = tl.load(x_ptr + n * sx_n + c * sx_c + h * sx_h + j * sx_w, mask=mask, other=0).to(acc_ty)
        g = tl.load(g_ptr + n * sg_n + c * sg_c + h * sg_h + j * sg_w, mask=mask, other=0).to(acc_ty)
        gd += -g * (x - shift - m) * inv * inv
    tl.store(gs_ptr + st, tl.where(on_s, gd, 0), mask=mask)
    tl.store(ct_ptr + st, tl.where(on_c, gd, 0), mask=mask)


@triton.jit
def _lcn_bwd_gv_kernel(g_ptr, x_ptr, m_ptr, s_ptr, cm_ptr, shift_ptr, r_ptr, gv_ptr, eps: tl.float64, C, CS, H, W,
                       sx_n, sx_c, sx_h, sx_w, sg_n, sg_c, sg_h, sg_w, ACROSS: tl.constexpr, LECUN: tl.constexpr,
                       BLOCK: tl.constexpr, WIDE: tl.constexpr):
    # gv = g inv + f2 v R (f2 = 2, or 2 / C across channels) into the contiguous (N, C, H, W) gv
    pid, n, c, h, p, j, mask = _lcn_elem(C, H, W, ACROSS, BLOCK, WIDE)
    acc_ty = m_ptr.dtype.element_ty
    st = (p * H + h) * W + j
    m, inv, _, _ = _lcn_stats(m_ptr, s_ptr, cm_ptr, st, p, mask, eps, LECUN)
    r = tl.load(r_ptr + st, mask=mask, other=0)
    x = tl.load(x_ptr + n * sx_n + c * sx_c + h * sx_h + j * sx_w, mask=mask, other=0).to(acc_ty)
    g = tl.load(g_ptr + n * sg_n + c * sg_c + h * sg_h + j * sg_w, mask=mask, other=0).to(acc_ty)
    if ACROSS:
        f2 = 2 / C.to(acc_ty)  # in the compute type (an int32 C would give a float32 quotient)
    else:
        f2 = 2.0
    gv = g * inv + f2 * (x - tl.load(shift_ptr + p) - m) * r
    tl.store(gv_ptr + pid * W + j, gv, mask=mask)


@triton.jit
def _lcn_bwd_out_kernel(gv_ptr, u_ptr, gx_ptr, C, CS, H, W, so_n, so_c, so_h, so_w, ACROSS: tl.constexpr,
                        BLOCK: tl.constexpr, WIDE: tl.constexpr):
    # grad_input = gv - f U (f = 1, or 1 / C across channels)
    pid, n, c, h, p, j, mask = _lcn_elem(C, H, W, ACROSS, BLOCK, WIDE)
    u = tl.load(u_ptr + (p * H + h) * W + j, mask=mask, other=0)
    if ACROSS:
        u = u / C
    gx = tl.load(gv_ptr + pid * W + j, mask=mask, other=0) - u
    tl.store(gx_ptr + n * so_n + c * so_c + h * so_h + j * so_w, gx.to(gx_ptr.dtype.element_ty), mask=mask)


def _lcn_prepare(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 4:
        raise ValueError(f"local_contrast_norm: input must be 4-d (N, C, H, W), got {x.dim()}-d")
    return x if lcn_layout(x) else x.contiguous()


class _LcnState:
    """A call's windows, shapes and the forward statistics M, S (and lecun's per-plane mean c)."""

    def __init__(self, x: torch.Tensor, kernel_size: int, sigma: float, eps: float, divisor: str, across: bool):
        if divisor not in _DIVISORS:
            raise ValueError(f"local_contrast_norm: unknown divisor {divisor!r}")
        if kernel_size < 1 or kernel_size % 2 == 0 or sigma < 0 or eps < 0:
            raise ValueError("local_contrast_norm: kernel_size must be odd and >= 1, sigma and eps >= 0")
        self.x = x
        self.n, self.c, self.h, self.w = x.shape
        self.across, self.lecun, self.eps = bool(across), _DIVISORS[divisor] == LcnDivisor.LECUN, float(eps)
        self.cs = 1 if across else self.c
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        dev = x.device
        ww, wh = gaussian_window(kernel_size, sigma, self.w), gaussian_window(kernel_size, sigma, self.h)
        self.rw, self.rh = len(ww) // 2, len(wh) // 2
        self.ww, self.wh = (torch.tensor(v, dtype=acc, device=dev) for v in (ww, wh))
        self.izc = torch.tensor(inverse_normalizer(ww, self.w), dtype=acc, device=dev)
        self.izr = torch.tensor(inverse_normalizer(wh, self.h), dtype=acc, device=dev)
        # the first value of each statistics plane (per channel, or per example across channels)
        first = x[:, :1, 0, 0] if across else x[:, :, 0, 0]
        self.shift = first.to(acc).reshape(-1).contiguous()
        planes = self.n * self.cs
        self.block = max(16, min(1024, triton.next_power_of_2(self.w)))
        self.wide = max(x.numel(), planes * self.h * self.w) > _INT32_LIMIT
        self.stat_grid = (planes * self.h, triton.cdiv(self.w, self.block))
        self.elem_grid = (self.n * self.c * self.h, triton.cdiv(self.w, self.block))
        self.t = torch.empty((planes, self.h, self.w), dtype=acc, device=dev)
        self.m, self.s = torch.empty_like(self.t), torch.empty_like(self.t)
        self.cm = torch.zeros(planes, dtype=acc, device=dev)
        k = dict(BLOCK=self.block, WIDE=self.wide)
        xs = x.stride()
        self._row(x, self.t, self.t, mode=0, strides=xs)
        _lcn_col_kernel[self.stat_grid](self.t, self.m, self.wh, self.izr, self.h, self.w, self.rh, NORM=True,
                                        SQRT=False, **k)
        self._row(x, self.m, self.t, mode=1, strides=xs)
        _lcn_col_kernel[self.stat_grid](self.t, self.s, self.wh, self.izr, self.h, self.w, self.rh, NORM=True,
                                        SQRT=True, **k)
        if self.lecun:
            self.mean(self.s, self.cm)

    def _row(self, src, aux, out, mode: int, strides=(0, 0, 0, 0), vec=None) -> None:
        vec = self.shift if vec is None else vec
        _lcn_row_kernel[self.stat_grid](src, aux, vec, out, self.ww, self.izr, self.izc, self.c, self.cs, self.h,
                                        self.w, self.rw, *strides, MODE=mode, ACROSS=self.across, BLOCK=self.block,
                                        WIDE=self.wide)

    def mean(self, src: torch.Tensor, out: torch.Tensor) -> None:
        hw = self.h * self.w
        _lcn_mean_kernel[(out.numel(),)](src, out, hw, BLOCK=max(16, min(1024, triton.next_power_of_2(hw))),
                                         WIDE=self.wide)


_DIVISORS = {d.name.lower(): d for d in LcnDivisor}


def local_contrast_norm(x: torch.Tensor, kernel_size: int, sigma: float, eps: float, divisor: str,
                        across_channels: bool) -> torch.Tensor:
    xd = _lcn_prepare(x)
    y = torch.empty_like(xd)
    if xd.numel() == 0:
        return y
    with on_device(xd):
        st = _LcnState(xd, kernel_size, sigma, eps, divisor, across_channels)
        _lcn_out_kernel[st.elem_grid](xd, y, st.m, st.s, st.cm, st.shift, st.eps, st.c, st.cs, st.h, st.w,
                                      *xd.stride(), *y.stride(), ACROSS=st.across, LECUN=st.lecun, BLOCK=st.block,
                                      WIDE=st.wide)
    return y


def local_contrast_norm_backward(grad: torch.Tensor, x: torch.Tensor, kernel_size: int, sigma: float, eps: float,
                                 divisor: str, across_channels: bool) -> torch.Tensor:
    xd = _lcn_prepare(x)
    if grad.shape != xd.shape or grad.dtype != xd.dtype:
        raise ValueError("local_contrast_norm_backward: grad_output must match input in shape and dtype")
    grad = like(grad, xd)  # dense as x: the int32 offsets of x cover it too
    gi = torch.empty_like(xd)
    if xd.numel() == 0:
        return gi
    with on_device(xd):
        st = _LcnState(xd, kernel_size, sigma, eps, divisor, across_channels)
        k = dict(ACROSS=st.across, BLOCK=st.block, WIDE=st.wide)
        gs, ct = torch.empty_like(st.t), torch.empty_like(st.t)
        _lcn_bwd_gs_kernel[st.stat_grid](grad, xd, st.m, st.s, st.cm, st.shift, gs, ct, st.eps, st.c, st.cs, st.h,
                                         st.w, *xd.stride(), *grad.stride(), LECUN=st.lecun, **k)
        gc = torch.zeros_like(st.cm)
        if st.lecun:
            st.mean(ct, gc)  # c's gradient, spread evenly over the plane: / (H W)
        st._row(gs, st.s, st.t, mode=2, vec=gc)
        r = ct  # ct is no longer needed: R = A^T gq
        _lcn_col_kernel[st.stat_grid](st.t, r, st.wh, st.izr, st.h, st.w, st.rh, NORM=False, SQRT=False,
                                      BLOCK=st.block, WIDE=st.wide)
        gv = torch.empty(xd.shape, dtype=st.t.dtype, device=xd.device)
        _lcn_bwd_gv_kernel[st.elem_grid](grad, xd, st.m, st.s, st.cm, st.shift, r, gv, st.eps, st.c, st.cs, st.h,
                                         st.w, *xd.stride(), *grad.stride(), LECUN=st.lecun, **k)
        st._row(gv, gv, st.t, mode=3, strides=gv.stride())
        u = gs  # gs is no longer needed: U = A^T(channel sum of gv)
        _lcn_col_kernel[st.stat_grid](st.t, u, st.wh, st.izr, st.h, st.w, st.rh, NORM=False, SQRT=False,
                                      BLOCK=st.block, WIDE=st.wide)
        _lcn_bwd_out_kernel[st.elem_grid](gv, u, gi, st.c, st.cs, st.h, st.w, *gi.stride(), **k)
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


def _lcn_spec(kernel, dt: str, variant: str = "", **consts) -> AotSpec:
    # x/y/g/gx (and the row pass's src in MODE 0/1) are dt storage, every other pointer the
    # accumulation type; eps fp64; integers i32 ("wide": int64 indexing).
    acc = "fp64" if dt == "fp64" else "fp32"
    consts = {"BLOCK": 256, "WIDE": int(variant == "wide"), **consts}
    storage = {"x_ptr", "y_ptr", "g_ptr", "gx_ptr"} | ({"src_ptr"} if consts.get("MODE", 2) < 2 else set())
    sig = {a: (f"*{dt}:16" if a in storage else f"*{acc}:16") if a.endswith("_ptr") else "fp64" if a == "eps" else "i32"
           for a in kernel.arg_names if a not in consts}
    name = kernel.__name__.strip("_").removesuffix("_kernel")
    tag = ",".join(filter(None, (dt, variant, *(f"{k}={v}" for k, v in consts.items() if k not in ("BLOCK", "WIDE")))))
    return AotSpec(f"{name}[{tag}]", kernel, sig, consts)


AOT_SPECS += [
    *(_lcn_spec(_lcn_row_kernel, "fp32", MODE=m, ACROSS=a) for m in range(4) for a in (0, 1)),
    *(_lcn_spec(_lcn_row_kernel, dt, MODE=1, ACROSS=0) for dt in ("bf16", "fp64")),
    _lcn_spec(_lcn_row_kernel, "fp32", "wide", MODE=1, ACROSS=0),
    *(_lcn_spec(_lcn_col_kernel, "fp32", NORM=nm, SQRT=sq) for nm, sq in ((1, 0), (1, 1), (0, 0))),
    _lcn_spec(_lcn_col_kernel, "fp64", NORM=1, SQRT=1),
    *(_lcn_spec(_lcn_mean_kernel, dt) for dt in ("fp32", "fp64")),
    *(_lcn_spec(_lcn_out_kernel, "fp32", ACROSS=a, LECUN=lc) for a in (0, 1) for lc in (0, 1)),
    *(_lcn_spec(k, "fp32", ACROSS=a, LECUN=a) for k in (_lcn_bwd_gs_kernel, _lcn_bwd_gv_kernel) for a in (0, 1)),
    *(_lcn_spec(k, dt, ACROSS=0, LECUN=1) for k in (_lcn_out_kernel, _lcn_bwd_gs_kernel, _lcn_bwd_gv_kernel)
      for dt in ("bf16", "fp64")),
    *(_lcn_spec(_lcn_bwd_out_kernel, dt, ACROSS=a) for dt, a in (("fp32", 0), ("fp32", 1), ("bf16", 0))),
    _lcn_spec(_lcn_out_kernel, "fp32", "wide", ACROSS=0, LECUN=0),
]

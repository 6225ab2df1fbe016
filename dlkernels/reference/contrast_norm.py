"""Contrast normalization in plain torch: the spec of the contrast_norm kernels. Two ops:
global contrast normalization (GCN, per example) and local contrast normalization (LCN, per
location, over a Gaussian window).

GCN. Per example, with ``c = x - mean(x)`` (``c = x`` when ``subtract_mean=False``) over the example's
M elements:

- ``style="book"`` (Deep Learning book, eq. 12.3): ``y = scale * c / max(eps, sqrt(lam + mean(c^2)))``;
- ``style="pylearn2_std"``: ``d = sqrt(lam + var(c, ddof=1)) / scale`` (ddof=0 when M == 1),
  ``d = 1 where d < eps``, ``y = c / d``; var is about the mean, also with ``subtract_mean=False``
  (as pylearn2's ``X.var``);
- ``style="pylearn2_l2"``: the same with ``d = sqrt(lam + sum(c^2)) / scale``.

``gcn`` is that definition written with differentiable torch ops (the float64 reference of the
tests, and the "torch eager" contender of the benchmark).

Backend contract (every backend module of the family has these functions, same arguments). ``x``
is (N, ...): example i is ``x[i]``, and the kernels take x with each example one dense block of
memory (contiguous, channels_last, ...: ``blocked(x)``; the ops layer brings any other layout or
``dims`` to that by permuting and reshaping to a contiguous (N, M)):

- ``global_contrast_norm(x, scale, lam, eps, style, subtract_mean) -> (y, stats)``: y in x's dtype,
  laid out as ``empty_like(x)`` (contiguous when x is not blocked); stats (N, 4) float32
  (float64 for float64 x): per example ``(a, inv, w, b)`` with ``y = (x - a) * inv``: a is the subtracted mean (0 when
  ``subtract_mean=False``), b the centre of the sum of squares m2 = sum((x - b)^2) the divisor
  depends on (the mean for pylearn2_std, else a); means are computed about the example's first
  value, so a constant example's mean is exactly its value and c = 0. With
  ``s = sqrt(lam + m2 / D)`` (D = M for book, max(M - 1, 1) for pylearn2_std, 1 for pylearn2_l2):
  ``inv = scale / s`` and ``w = inv / (D s^2)`` where the divisor depends on s; where max() or the
  pylearn2 replacement picks the constant branch, ``inv`` is that constant (scale / eps, or 1) and
  ``w = 0``; where the divisor is 0 (eps = lam = 0 and c = 0: 0/0) ``inv = w = 0``, so the output
  and the gradient are 0, never NaN.
- ``global_contrast_norm_backward(grad, x, stats, subtract_mean) -> grad_input``:
  ``inv * (g - mean(g)) - (x - b) * w * sum(g * (x - a))`` (without ``- mean(g)`` when not
  subtracting the mean), laid out as x (grad is read in x's layout).

LCN. For NCHW x and the normalized Gaussian window G of odd size ``kernel_size`` = 2r + 1
(``w[k] ~ exp(-k^2 / (2 sigma^2))``, k = -r..r; sigma = 0 is the one-tap window), applied per
(H, W) plane with zero padding and renormalized by the weight that falls inside the image,
``(G u)(i, j) = (K u)(i, j) / Z(i, j)`` with K the zero-padded separable convolution by w (x) w and
``Z = K 1 = zr(i) zc(j)``:

- ``v = x - G x``, ``s = sqrt(G (v^2))``,
- ``divisor="local"``: ``y = v / max(eps, s)``;
- ``divisor="lecun"``: ``y = v / max(eps, max(c, s))`` with c the mean of s over the (H, W) plane
  (per example and channel);
- ``across_channels=True``: the local mean and variance are also over all channels of the example,
  each with weight 1/C: ``m = G mean_c(x)``, ``v_c = x_c - m``, ``s = sqrt(G mean_c(v_c^2))``,
  shared by the channels at a location (and c is per example).

All means are taken about the plane's (example's, across channels) first value, a no-op in exact
arithmetic that makes a constant image exactly 0. ``lcn`` writes it with differentiable torch ops.

Backend contract: x is 4-d, contiguous (NCHW) or channels_last (the ops layer copies any other
layout to contiguous); outputs are ``empty_like(x)``.

- ``local_contrast_norm(x, kernel_size, sigma, eps, divisor, across_channels) -> y``: where the
  divisor is 0 (eps = 0 and s = 0, so v = 0) y = 0, never NaN.
- ``local_contrast_norm_backward(grad, x, kernel_size, sigma, eps, divisor, across_channels) ->
  grad_input``. G is the linear map ``A = Z^-1 K`` (K symmetric), whose adjoint is
  ``A^T g = K (g / Z)``. With d = the divisor, ``inv = 1/d`` (0 where d = 0), ``gd = -g v inv^2``
  (summed over channels when across_channels), ``gs = gd`` where d = s, plus (lecun) the sum of gd
  where d = c spread evenly, ``gs += sum / (H W)``, ``gq = gs / (2 s)`` (0 where s = 0):
  ``gv = g inv + (2/C') v A^T gq`` and ``grad_input = gv - (1/C') A^T sum_c(gv)`` (C' = C and the
  sum over channels when across_channels, else C' = 1 and no sum). Where max() picks eps, d has
  no gradient; at a tie of s and c the gradient goes to s. Nothing is saved by the forward: the
  kernels recompute G x and s from x (two separable passes each: cheaper than storing and
  reloading two image-sized tensors).

Reduced-precision x computes in float32; float64 in float64.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as tF
from torch import Tensor

from dlkernels._dtypes import compute_dtype
from dlkernels._layout import is_dense
from dlkernels.codes import LcnDivisor

STYLES = ("book", "pylearn2_std", "pylearn2_l2")
DIVISORS = tuple(d.name.lower() for d in LcnDivisor)  # ("local", "lecun")


def blocked(x: Tensor) -> bool:
    """Each example x[i] is one dense block of memory (any dim order inside it), so the kernels
    can walk it linearly: x is non-overlapping and dense with dim 0 outermost."""
    if x.dim() == 0 or not is_dense(x):
        return False
    n = x.shape[0]
    return n <= 1 or x.numel() == 0 or x.stride(0) == x.numel() // n


def m2_divisor(style: str, m: int) -> int:
    """D: var = m2 / D (book: mean of squares; pylearn2_std: ddof=1, 0 for one element; l2: sum)."""
    return {"book": m, "pylearn2_std": max(m - 1, 1), "pylearn2_l2": 1}[style]


def coefficients(m2: Tensor, m: int, scale: float, lam: float, eps: float, style: str) -> tuple[Tensor, Tensor]:
    """(inv, w) from the per-example sums of squares m2 (float64), as the contract above."""
    d = float(m2_divisor(style, m))
    s = torch.sqrt(lam + m2 / d)
    zero = torch.zeros_like(s)
    smooth_inv = scale / s
    smooth_w = smooth_inv / (d * s * s)
    if style == "book":
        # ~(s <= eps) keeps NaN in the smooth branch (NaN input -> NaN output)
        smooth = ~(s <= eps)
        const = torch.full_like(s, scale / eps) if eps > 0 else zero
    else:
        smooth = ~(s / scale < eps)
        const = torch.ones_like(s)
    inv = torch.where(smooth, smooth_inv, const)
    w = torch.where(smooth, smooth_w, zero)
    # 0/0: the divisor is 0 (only with eps = lam = 0 and c = 0)
    null = smooth & (s == 0)
    return torch.where(null, zero, inv), torch.where(null, zero, w)


def _out_like(x: Tensor) -> Tensor:
    """The kernels' output layout: x's when blocked, else contiguous."""
    return torch.empty_like(x) if blocked(x) else torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _dims(x: Tensor) -> list[int]:
    return list(range(1, x.dim()))


def global_contrast_norm(x: Tensor, scale: float, lam: float, eps: float, style: str,
                         subtract_mean: bool) -> tuple[Tensor, Tensor]:
    cd = compute_dtype(x)
    n = x.shape[0]
    m = x.numel() // n if n else 0
    xc = x.to(cd).reshape(n, m)
    # about each example's first value: a constant example has exactly its value as mean (c = 0)
    shift = xc[:, :1]
    mean = shift + (xc - shift).mean(1, keepdim=True) if m else xc.new_zeros(n, 1)
    a = mean if subtract_mean else torch.zeros_like(mean)
    b = mean if subtract_mean or style == "pylearn2_std" else a
    m2 = ((xc - b) ** 2).sum(1, keepdim=True).double()
    inv, w = coefficients(m2, m, scale, lam, eps, style)
    inv, w = inv.to(cd), w.to(cd)
    y = _out_like(x)
    y.copy_(((xc - a) * inv).reshape(x.shape))
    return y, torch.cat([a, inv, w, b], 1)


def global_contrast_norm_backward(grad: Tensor, x: Tensor, stats: Tensor, subtract_mean: bool) -> Tensor:
    cd = compute_dtype(x)
    n = x.shape[0]
    m = x.numel() // n if n else 0
    xc, g = x.to(cd).reshape(n, m), grad.to(cd).reshape(n, m)
    a, inv, w, b = stats[:, 0:1], stats[:, 1:2], stats[:, 2:3], stats[:, 3:4]
    gm = g - g.mean(1, keepdim=True) if subtract_mean and m else g
    gi = inv * gm - (xc - b) * (w * (g * (xc - a)).sum(1, keepdim=True))
    out = _out_like(x)
    out.copy_(gi.reshape(x.shape))
    return out


def gcn(x: Tensor, scale: float = 1.0, lam: float = 0.0, eps: float = 1e-8, style: str = "book",
        subtract_mean: bool = True, dims: list[int] | None = None) -> Tensor:
    """The issue's formulas with differentiable torch ops, over ``dims`` (default: all but dim 0).
    Its gradient is torch's autograd of the formula (NaN at 0/0, unlike the kernels)."""
    dims = _dims(x) if dims is None else list(dims)
    if not dims:  # 1-d x: one element per example (torch would read [] as "every dim")
        return gcn(x.unsqueeze(-1), scale, lam, eps, style, subtract_mean, [x.dim()]).squeeze(-1)
    cd = compute_dtype(x)
    xc = x.to(cd)
    m = math.prod(x.shape[d] for d in dims)
    c = xc - xc.mean(dims, keepdim=True) if subtract_mean else xc
    if style == "pylearn2_std":  # var about the mean (pylearn2's X.var), also of an uncentered c
        sq = ((c - c.mean(dims, keepdim=True)) ** 2).sum(dims, keepdim=True)
    else:
        sq = (c * c).sum(dims, keepdim=True)
    if style == "book":
        y = scale * c / torch.clamp(torch.sqrt(lam + sq / m), min=eps)
    else:
        d = torch.sqrt(lam + sq / m2_divisor(style, m)) / scale
        d = torch.where(d < eps, torch.ones_like(d), d)
        y = c / d
    return y.to(x.dtype)


# ---- local contrast normalization ----

def gaussian_window(kernel_size: int, sigma: float, size: int | None = None) -> list[float]:
    """The 1-D window: ``exp(-0.5 (k / sigma)^2)`` for k = -r..r (r = kernel_size // 2), normalized
    to sum 1, in float64; sigma = 0 gives the one-tap window. With ``size``, only the taps that can
    reach inside an image of that size (|k| < size) are kept, normalized among themselves: the
    others only ever meet zero padding, and the renormalized window G does not depend on the
    window's total weight."""
    r = kernel_size // 2
    if size is not None:
        r = min(r, max(size - 1, 0))
    if sigma == 0:
        return [1.0 if k == 0 else 0.0 for k in range(-r, r + 1)]
    g = [math.exp(-0.5 * (k / sigma) ** 2) for k in range(-r, r + 1)]  # k / sigma: no 0/0 for tiny sigma
    total = sum(g)
    return [v / total for v in g]


def inverse_normalizer(w: list[float], size: int) -> list[float]:
    """1 / z(i) along an axis of ``size`` for the window w (odd length): z(i) is the window's weight
    inside the axis at i (Z(i, j) = zr(i) zc(j)); exactly 1 where the window is whole. The
    Triton and CUDA launchers use it; the reference computes Z as the blur of a ones image."""
    r = len(w) // 2
    out = []
    for i in range(size):
        if r <= i < size - r:
            out.append(1.0)
        else:
            out.append(1.0 / sum(w[k + r] for k in range(-r, r + 1) if 0 <= i + k < size))
    return out


def lcn_layout(x: Tensor) -> str | None:
    """"nchw" or "nhwc" (channels_last): the layouts the kernels take; None for any other."""
    if x.is_contiguous():
        return "nchw"
    if x.is_contiguous(memory_format=torch.channels_last):
        return "nhwc"
    return None


def _blur(u: Tensor, wh: list[float], ww: list[float]) -> Tensor:
    """K u: each (H, W) plane of u (N, C, H, W) convolved with wh (x) ww (odd lengths, symmetric),
    zero padding: a pass along W, then one along H, each a weighted sum of shifted slices of the
    zero-padded planes (torch.compile fuses a pass into one loop; conv2d with one channel is
    several times slower here, eager and compiled)."""
    h, w = u.shape[2], u.shape[3]
    rw, rh = len(ww) // 2, len(wh) // 2
    p = tF.pad(u, (rw, rw))
    u = sum(wk * p[..., k:k + w] for k, wk in enumerate(ww))
    p = tF.pad(u, (0, 0, rh, rh))
    return sum(wk * p[..., k:k + h, :] for k, wk in enumerate(wh))


def _windows(x: Tensor, kernel_size: int, sigma: float, dtype: torch.dtype) -> tuple[list[float], list[float], Tensor]:
    """(wh, ww, Z): the windows along H and W and the renormalization Z = K 1, shape (1, 1, H, W)."""
    h, w = x.shape[2], x.shape[3]
    wh, ww = gaussian_window(kernel_size, sigma, h), gaussian_window(kernel_size, sigma, w)
    z = _blur(torch.ones(1, 1, h, w, dtype=dtype, device=x.device), wh, ww)
    return wh, ww, z


def _shifted(xc: Tensor, across_channels: bool) -> Tensor:
    """x minus its first value per plane (per example when across channels): no change in exact
    arithmetic, and a constant image gives v = 0 exactly."""
    shift = xc[:, :1, :1, :1] if across_channels else xc[:, :, :1, :1]
    return xc - shift.detach()


def lcn(x: Tensor, kernel_size: int = 9, sigma: float = 2.0, eps: float = 1e-4, divisor: str = "local",
        across_channels: bool = False) -> Tensor:
    """The issue's formulas with differentiable torch ops (the float64 reference of the tests and
    the "torch eager" contender of the benchmark). Its gradient is torch's autograd of the formula
    (NaN at s = 0, unlike the kernels)."""
    if x.numel() == 0:
        return x.clone()
    cd = compute_dtype(x)
    wh, ww, z = _windows(x, kernel_size, sigma, cd)

    def g(u: Tensor) -> Tensor:  # the renormalized Gaussian window
        return _blur(u, wh, ww) / z

    xs = _shifted(x.to(cd), across_channels)
    if across_channels:
        v = xs - g(xs.mean(1, keepdim=True))
        s = torch.sqrt(g((v * v).mean(1, keepdim=True)))
    else:
        v = xs - g(xs)
        s = torch.sqrt(g(v * v))
    if divisor == "lecun":
        s = torch.maximum(s, s.mean((2, 3), keepdim=True))
    return (v / torch.clamp(s, min=eps)).to(x.dtype)


def lcn_coefficients(s: Tensor, c: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(inv, a_s, a_c) per location, as csrc/common/contrast_norm.h's lcn_coef: d = max(eps, s) or
    max(eps, max(c, s)) (c: the plane's mean of s, lecun); inv = 1/d (0 where d = 0); a_s / a_c:
    the divisor is s / c (not eps). NaN stays in the s branch."""
    swin = torch.ones_like(s, dtype=torch.bool) if c is None else ~(s < c)
    t = s if c is None else torch.where(swin, s, c)
    smooth = ~(t <= eps)
    d = torch.where(smooth, t, torch.full_like(t, eps))
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    return inv, smooth & swin, smooth & ~swin


def _lcn_state(x: Tensor, kernel_size: int, sigma: float, eps: float, divisor: str, across_channels: bool):
    cd = compute_dtype(x)
    wh, ww, z = _windows(x, kernel_size, sigma, cd)
    xs = _shifted(x.to(cd), across_channels)
    m = _blur(xs.mean(1, keepdim=True) if across_channels else xs, wh, ww) / z
    v = xs - m
    v2 = v * v
    s = torch.sqrt(_blur(v2.mean(1, keepdim=True) if across_channels else v2, wh, ww) / z)
    c = s.mean((2, 3), keepdim=True) if divisor == "lecun" else None
    inv, a_s, a_c = lcn_coefficients(s, c, eps)
    return (wh, ww, z), v, s, inv, a_s, a_c


def _lcn_out(x: Tensor) -> Tensor:
    return torch.empty_like(x) if lcn_layout(x) else torch.empty(x.shape, dtype=x.dtype, device=x.device)


def local_contrast_norm(x: Tensor, kernel_size: int, sigma: float, eps: float, divisor: str,
                        across_channels: bool) -> Tensor:
    if divisor not in DIVISORS:
        raise ValueError(f"local_contrast_norm: unknown divisor {divisor!r}")
    y = _lcn_out(x)
    if x.numel() == 0:
        return y
    _, v, _, inv, _, _ = _lcn_state(x, kernel_size, sigma, eps, divisor, across_channels)
    return y.copy_(v * inv)


def local_contrast_norm_backward(grad: Tensor, x: Tensor, kernel_size: int, sigma: float, eps: float,
                                 divisor: str, across_channels: bool) -> Tensor:
    out = _lcn_out(x)
    if x.numel() == 0:
        return out
    (wh, ww, z), v, s, inv, a_s, a_c = _lcn_state(x, kernel_size, sigma, eps, divisor, across_channels)
    g = grad.to(v.dtype)
    f = 1.0 / x.shape[1] if across_channels else 1.0  # the channel mean's weight

    def adjoint(u: Tensor) -> Tensor:  # A^T u = K (u / Z)
        return _blur(u / z, wh, ww)

    gd = -g * v * inv * inv
    if across_channels:
        gd = gd.sum(1, keepdim=True)
    zero = torch.zeros_like(gd)
    gs = torch.where(a_s, gd, zero)
    if divisor == "lecun":
        gs = gs + torch.where(a_c, gd, zero).sum((2, 3), keepdim=True) / (x.shape[2] * x.shape[3])
    gq = torch.where(s > 0, gs / (2 * s), zero)
    gv = g * inv + 2 * f * v * adjoint(gq)
    gx = gv - f * adjoint(gv.sum(1, keepdim=True) if across_channels else gv)
    return out.copy_(gx)

"""Global contrast normalization (GCN) in plain torch: the spec of the contrast_norm kernels.

Per example, with ``c = x - mean(x)`` (``c = x`` when ``subtract_mean=False``) over the example's
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

Reduced-precision x computes in float32; float64 in float64.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dlkernels._dtypes import compute_dtype
from dlkernels._layout import is_dense

STYLES = ("book", "pylearn2_std", "pylearn2_l2")


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

"""Custom ops of the contrast_norm family: global (GCN) and local (LCN) contrast normalization.

- ``global_contrast_norm(x, scale, lam, eps, style, subtract_mean) -> (y, stats)``: per-example
  statistics (one read of x) and the normalize pass (one read, one write); autograd. Example i is
  x[i]; x has each example in one dense block of memory (see reference.blocked).
- ``global_contrast_norm_backward(grad, x, stats, subtract_mean) -> grad_input``: one reduction
  pass over (grad, x) for the two per-example sums, one elementwise pass.

- ``local_contrast_norm(x, kernel_size, sigma, eps, divisor, across_channels) -> y``: NCHW x,
  contiguous or channels_last (anything else is copied to contiguous here); autograd saves only x.
- ``local_contrast_norm_backward(grad, x, kernel_size, sigma, eps, divisor, across_channels) ->
  grad_input``: recomputes the local statistics from x, then the adjoint passes.

GCN layouts: ``dims=None`` on a tensor whose examples are dense blocks (contiguous, channels_last) is
the fast path, run in place in memory and returning the input's layout. Any other layout, and
any other ``dims``, is brought to that form here, in the ops layer, by permuting the reduced dims
last and reshaping to a contiguous (N, M) (a copy unless that is a view), then back.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from dlkernels._backend import impl, use_backend
from dlkernels._dtypes import FLOAT_DTYPES, compute_dtype
from dlkernels.ops import _checks
from dlkernels.ops._op import custom_op
from dlkernels.reference.contrast_norm import DIVISORS, STYLES, blocked, lcn_layout

_FAMILY = "contrast_norm"
FUNCTIONAL = ("global_contrast_norm", "local_contrast_norm")


def _like_kernel(x: Tensor) -> Tensor:
    # what the kernels return: x's layout when its examples are dense blocks, else contiguous
    return torch.empty_like(x) if blocked(x) else torch.empty(x.shape, dtype=x.dtype, device=x.device)


# ---- forward ----

@custom_op("dlkernels::global_contrast_norm", mutates_args=())
def _gcn(x: Tensor, scale: float, lam: float, eps: float, style: str, subtract_mean: bool) -> tuple[Tensor, Tensor]:
    return impl(_FAMILY, "global_contrast_norm", x.device)(x, scale, lam, eps, style, subtract_mean)


@_gcn.register_fake
def _(x, scale, lam, eps, style, subtract_mean):
    return _like_kernel(x), x.new_empty((x.shape[0], 4), dtype=compute_dtype(x))


@custom_op("dlkernels::global_contrast_norm_backward", mutates_args=())
def _gcn_backward(grad: Tensor, x: Tensor, stats: Tensor, subtract_mean: bool) -> Tensor:
    return impl(_FAMILY, "global_contrast_norm_backward", x.device)(grad, x, stats, subtract_mean)


@_gcn_backward.register_fake
def _(grad, x, stats, subtract_mean):
    return _like_kernel(x)


def _setup(ctx, inputs, output) -> None:
    x, subtract_mean = inputs[0], inputs[-1]
    _, stats = output
    ctx.save_for_backward(x, stats)
    ctx.subtract_mean = subtract_mean
    ctx.mark_non_differentiable(stats)


def _backward(ctx, grad: Tensor, _grad_stats: Tensor | None):
    x, stats = ctx.saved_tensors
    return _gcn_backward(grad, x, stats, ctx.subtract_mean), None, None, None, None, None


_gcn.register_autograd(_backward, setup_context=_setup)


# ---- the functional form ----

def _number(name: str, position: int, value: object, nonnegative: bool, fn: str = "global_contrast_norm") -> float:
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, Tensor)):
        raise TypeError(f"{fn}(): argument '{name}' (position {position}) must be a real number, "
                        f"not {type(value).__name__}")
    v = _checks.number_arg(fn, name, position, value)
    if v != v or abs(v) == math.inf:  # not math.isfinite: dynamo cannot trace it
        raise ValueError(f"{fn}(): argument '{name}' must be finite, got {v}")
    if nonnegative and v < 0:
        raise ValueError(f"{fn}(): argument '{name}' must be >= 0, got {v}")
    return v


def _reduced_dims(x: Tensor, dims: int | Sequence[int] | None) -> list[int]:
    nd = x.dim()
    if dims is None:
        return list(range(1, nd))
    if isinstance(dims, int) and not isinstance(dims, bool):
        dims = [dims]
    if isinstance(dims, (str, bytes)) or not isinstance(dims, Sequence) or \
            not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        raise TypeError(f"global_contrast_norm(): argument 'dims' must be None, an int or a sequence of ints, "
                        f"got {dims!r}")
    if not dims:
        raise ValueError("global_contrast_norm(): argument 'dims' must name at least one dim (or be None)")
    out = []
    for d in dims:
        if not -nd <= d < nd:
            raise IndexError(f"global_contrast_norm(): dims entry {d} is out of range for a {nd}-d input")
        if d % nd in out:
            raise ValueError(f"global_contrast_norm(): dim {d % nd} appears more than once in 'dims'")
        out.append(d % nd)
    return sorted(out)


def global_contrast_norm(input: Tensor, scale: float = 1.0, lam: float = 0.0, eps: float = 1e-8, *,
                         style: str = "book", subtract_mean: bool = True,
                         dims: int | Sequence[int] | None = None) -> Tensor:
    """Global contrast normalization of each example of ``input``.

    The statistics are per example, over every dim but the batch dim 0 (``dims=None``), or over
    ``dims`` (the examples are then the index tuples of the other dims). With
    ``c = x - mean(x)`` (or ``c = x`` when ``subtract_mean=False``):

    - ``style="book"`` (Goodfellow, Bengio, Courville, *Deep Learning*, eq. 12.3)::

          y = scale * c / max(eps, sqrt(lam + mean(c ** 2)))

      The book's two recommended settings: ``lam=0, eps=1e-8`` for closely cropped images (a
      nearly constant image is not blown up, eps only guards the division), and ``lam=10,
      eps=0`` for small random crops (lam regularizes the estimate of the contrast), e.g.
      ``global_contrast_norm(x, 1.0, 0.0, 1e-8)`` and ``global_contrast_norm(x, 1.0, 10.0, 0.0)``.
    - ``style="pylearn2_std"`` (pylearn2's ``global_contrast_normalize(use_std=True)``, with
      ``sqrt_bias=lam``, ``min_divisor=eps``)::

          d = sqrt(lam + var(c, ddof=1)) / scale      (ddof=0 for a single element; var is
                                                       about the mean even when c = x)
          d = 1 where d < eps
          y = c / d

    - ``style="pylearn2_l2"``: the same with ``d = sqrt(lam + sum(c ** 2)) / scale``.

    Where ``max`` or the replacement picks the constant branch (e.g. a constant image), output
    and gradient are those of that branch: finite. With ``eps=0`` and ``lam=0`` a constant image
    is 0/0: its output and gradient are 0, never NaN. Float16/bfloat16 compute in float32,
    float64 in float64.
    """
    _checks.tensor_arg("global_contrast_norm", "input", 1, input)
    if input.dtype not in FLOAT_DTYPES:
        raise TypeError(f"global_contrast_norm(): argument 'input' must be a float32, float64, float16 or bfloat16 "
                        f"tensor, got {input.dtype} (convert it with .float(); dlkernels.nn.GlobalContrastNorm "
                        "converts integer images)")
    if input.dim() == 0:
        raise ValueError("global_contrast_norm(): argument 'input' must have at least one dim (the batch dim), "
                         "got a 0-d tensor")
    scale = _number("scale", 2, scale, nonnegative=False)
    lam = _number("lam", 3, lam, nonnegative=True)
    eps = _number("eps", 4, eps, nonnegative=True)
    if not isinstance(style, str) or style not in STYLES:
        raise ValueError(f"global_contrast_norm(): argument 'style' must be one of {STYLES}, got {style!r}")
    if not isinstance(subtract_mean, bool):
        raise TypeError(f"global_contrast_norm(): argument 'subtract_mean' must be a bool, got "
                        f"{type(subtract_mean).__name__}")
    red = _reduced_dims(input, dims)
    nd = input.dim()
    keep = [d for d in range(nd) if d not in red]
    if keep == [0]:
        # the fast path: examples along dim 0
        x = input if blocked(input) else input.contiguous()
        return _gcn(x, scale, lam, eps, style, subtract_mean)[0]
    perm = keep + red
    xp = input.permute(perm)
    k = 1
    for d in keep:  # (a loop: dynamo cannot trace math.prod of a generator)
        k *= input.shape[d]
    x2 = xp.reshape(k, -1)
    x2 = x2 if blocked(x2) else x2.contiguous()
    y2 = _gcn(x2, scale, lam, eps, style, subtract_mean)[0]
    inverse = [perm.index(d) for d in range(nd)]
    return y2.reshape(xp.shape).permute(inverse)


# ---- local contrast normalization ----

def _lcn_like(x: Tensor) -> Tensor:
    # what the kernels return: x's layout when contiguous or channels_last, else contiguous
    return torch.empty_like(x) if lcn_layout(x) else torch.empty(x.shape, dtype=x.dtype, device=x.device)


@custom_op("dlkernels::local_contrast_norm", mutates_args=())
def _lcn(x: Tensor, kernel_size: int, sigma: float, eps: float, divisor: str, across_channels: bool) -> Tensor:
    return impl(_FAMILY, "local_contrast_norm", x.device)(x, kernel_size, sigma, eps, divisor, across_channels)


@_lcn.register_fake
def _(x, kernel_size, sigma, eps, divisor, across_channels):
    return _lcn_like(x)


@custom_op("dlkernels::local_contrast_norm_backward", mutates_args=())
def _lcn_backward(grad: Tensor, x: Tensor, kernel_size: int, sigma: float, eps: float, divisor: str,
                  across_channels: bool) -> Tensor:
    return impl(_FAMILY, "local_contrast_norm_backward", x.device)(grad, x, kernel_size, sigma, eps, divisor,
                                                                    across_channels)


@_lcn_backward.register_fake
def _(grad, x, kernel_size, sigma, eps, divisor, across_channels):
    return _lcn_like(x)


def _lcn_setup(ctx, inputs, output) -> None:
    # only x: the backward recomputes the local mean and deviation (see reference.contrast_norm)
    ctx.save_for_backward(inputs[0])
    ctx.args = tuple(inputs[1:])


def _lcn_bwd(ctx, grad: Tensor):
    (x,) = ctx.saved_tensors
    return _lcn_backward(grad, x, *ctx.args), None, None, None, None, None


_lcn.register_autograd(_lcn_bwd, setup_context=_lcn_setup)


def local_contrast_norm(input: Tensor, kernel_size: int = 9, sigma: float = 2.0, eps: float = 1e-4, *,
                        divisor: str = "local", across_channels: bool = False) -> Tensor:
    """Local contrast normalization of NCHW ``input`` with a normalized Gaussian window G of odd
    size ``kernel_size`` and standard deviation ``sigma`` (in pixels; 0: a one-pixel window)::

        v = x - G * x
        s = sqrt(G * v^2)
        y = v / max(eps, s)                                divisor="local"
        y = v / max(eps, max(mean of s over the image, s)) divisor="lecun"

    G is applied to each (H, W) plane with zero padding and renormalized by the weight that falls
    inside the image (so the window is a weighted mean everywhere and a constant image gives
    zeros), as two separable 1-D passes; the window may be larger than the image. With
    ``across_channels=True`` the local mean and variance are also taken over all channels of the
    example (each channel weighted 1/C), so the channels at a location share them, and lecun's
    mean of s is per example instead of per (example, channel).

    ``divisor="lecun"`` is the divisor of Jarrett, Kavukcuoglu, Ranzato and LeCun (2009), and the
    method of pylearn2's ``LeCunLCN``, which it does **not** reproduce: pylearn2 divides by
    a window over the raw ``x^2`` (not the centred ``v^2``), crops a 'full' convolution without
    renormalizing the border (the image's border is pulled towards 0), and, through a ``return``
    inside its channel loop, normalizes only the first channel. dlkernels follows the definition
    above (the Deep Learning book's, sec. 12.2.1.1) instead: each of those three is a departure
    from it, and the last is a bug (details: docs/contrast_norm.md).

    Where max() picks eps, no gradient flows through s there (where it picks lecun's mean, the
    gradient goes to the mean, so to every s of the image); at a tie of s and the mean, to s; with
    ``eps=0`` a flat neighbourhood (s = 0, so v = 0) gives 0, not 0/0. Float16/bfloat16 compute in
    float32, float64 in float64. Contiguous and channels_last input keep their layout.
    """
    fn = "local_contrast_norm"
    _checks.tensor_arg(fn, "input", 1, input)
    if input.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}(): argument 'input' must be a float32, float64, float16 or bfloat16 tensor, got "
                        f"{input.dtype} (convert it with .float(); dlkernels.nn.LocalContrastNorm converts integer "
                        "images)")
    if input.dim() != 4:
        raise ValueError(f"{fn}(): argument 'input' must be 4-d (N, C, H, W), got a {input.dim()}-d tensor "
                         "(dlkernels.nn.LocalContrastNorm also takes one (C, H, W) image)")
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, numbers.Integral):
        raise TypeError(f"{fn}(): argument 'kernel_size' (position 2) must be an int, not {type(kernel_size).__name__}")
    kernel_size = int(kernel_size)
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"{fn}(): argument 'kernel_size' must be odd and >= 1, got {kernel_size}")
    sigma = _number("sigma", 3, sigma, nonnegative=True, fn=fn)
    eps = _number("eps", 4, eps, nonnegative=True, fn=fn)
    if not isinstance(divisor, str) or divisor not in DIVISORS:
        raise ValueError(f"{fn}(): argument 'divisor' must be one of {DIVISORS}, got {divisor!r}")
    if not isinstance(across_channels, bool):
        raise TypeError(f"{fn}(): argument 'across_channels' must be a bool, got {type(across_channels).__name__}")
    x = input if lcn_layout(input) else input.contiguous()
    return _lcn(x, kernel_size, sigma, eps, divisor, across_channels)


# ---- `python -m dlkernels` ----

def self_check(device: torch.device) -> float:
    """Max abs difference to the reference over GCN (every style) and LCN (both divisors, per
    channel and across), forward and backward."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 5, 7, 11, generator=gen) * 2 + 1).to(device)
    g = torch.randn(x.shape, generator=gen).to(device)

    def run() -> list[Tensor]:
        out = []
        for style, lam, sub in (("book", 0.0, True), ("book", 10.0, False), ("pylearn2_std", 0.5, True),
                                ("pylearn2_l2", 0.0, True)):
            xr = x.clone().requires_grad_()
            y = global_contrast_norm(xr, 2.0, lam, 1e-8, style=style, subtract_mean=sub)
            (gx,) = torch.autograd.grad(y, xr, g)
            out += [y, gx]
        xr = x.to(memory_format=torch.channels_last).requires_grad_()
        y = global_contrast_norm(xr, dims=(1, 3))
        out += [y, *torch.autograd.grad(y, xr, g)]
        for divisor, across, xl in (("local", False, x), ("lecun", True, x.to(memory_format=torch.channels_last))):
            xr = xl.clone().requires_grad_()
            y = local_contrast_norm(xr, 5, 1.5, 1e-4, divisor=divisor, across_channels=across)
            out += [y, *torch.autograd.grad(y, xr, g)]
        return out

    got = run()
    with use_backend("reference"):
        want = run()
    return max((a - b).abs().max().item() for a, b in zip(got, want, strict=True))

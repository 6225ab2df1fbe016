"""Custom ops of the contrast_norm family: global contrast normalization (GCN).

- ``global_contrast_norm(x, scale, lam, eps, style, subtract_mean) -> (y, stats)``: per-example
  statistics (one read of x) and the normalize pass (one read, one write); autograd. Example i is
  x[i]; x has each example in one dense block of memory (see reference.blocked).
- ``global_contrast_norm_backward(grad, x, stats, subtract_mean) -> grad_input``: one reduction
  pass over (grad, x) for the two per-example sums, one elementwise pass.

Layouts: ``dims=None`` on a tensor whose examples are dense blocks (contiguous, channels_last) is
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
from dlkernels.reference.contrast_norm import STYLES, blocked

_FAMILY = "contrast_norm"
FUNCTIONAL = ("global_contrast_norm",)


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

def _number(name: str, position: int, value: object, nonnegative: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, Tensor)):
        raise TypeError(f"global_contrast_norm(): argument '{name}' (position {position}) must be a real number, "
                        f"not {type(value).__name__}")
    v = _checks.number_arg("global_contrast_norm", name, position, value)
    if v != v or abs(v) == math.inf:  # not math.isfinite: dynamo cannot trace it
        raise ValueError(f"global_contrast_norm(): argument '{name}' must be finite, got {v}")
    if nonnegative and v < 0:
        raise ValueError(f"global_contrast_norm(): argument '{name}' must be >= 0, got {v}")
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


# ---- `python -m dlkernels` ----

def self_check(device: torch.device) -> float:
    """Max abs difference to the reference over GCN forward and backward, every style."""
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
        return out

    got = run()
    with use_backend("reference"):
        want = run()
    return max((a - b).abs().max().item() for a, b in zip(got, want, strict=True))

"""Custom ops of the dropout family: dropout that stores no mask (docs/dropout.md).

The mask is a pure function of a 64-bit seed and each element's logical index (Philox4x32-10), so
the backward regenerates it from the seed instead of saving it. The ops that draw take the seed as
an optional 0-d int64 tensor and return the seed they used: when none is given they draw one from
torch's default CPU generator *inside* the op, so the draw happens when the op runs (eagerly or in
a compiled graph alike: same seeds in the same order) and ``torch.utils.checkpoint``, which
restores the CPU generator, recomputes the same mask. They are tagged nondeterministic_seeded so a
compiler never merges two calls.

- ``dropout(x, p, seed, per_channel) -> (y, seed)``; its backward is the same op on the gradient.
- ``leaky_relu_dropout(x, slope, p, seed) -> (y, seed)`` and its backward op.
- ``prelu_dropout(x, weight, p, seed) -> (y, seed)`` and its backward op.
p = 0, p = 1, eval and empty inputs are handled here, before the ops (the kernels see 0 < p < 1).
"""

from __future__ import annotations

import numbers
import warnings

import torch
from torch import Tensor

from dlkernels._backend import impl, use_backend
from dlkernels.ops import _checks
from dlkernels.ops._op import custom_op
from dlkernels.ops.activation import _check_prelu, leaky_relu, prelu

_FAMILY = "dropout"
FUNCTIONAL = ("dropout", "dropout1d", "dropout2d", "dropout3d", "leaky_relu_dropout", "prelu_dropout")
_SEEDED = (torch.Tag.nondeterministic_seeded,)


def _kernel(name: str, x: Tensor):
    return impl(_FAMILY, name, x.device)


def _draw(generator: torch.Generator | None = None) -> Tensor:
    """One 64-bit draw (the full int64 range) from ``generator`` or torch's default CPU generator."""
    return torch.empty((), dtype=torch.int64).random_(-(2**63), None, generator=generator)


def _seed_used(seed: Tensor | None) -> Tensor:
    return _draw() if seed is None else seed.clone()  # an op never returns its input


def _seed_fake(*args) -> Tensor:
    return torch.empty((), dtype=torch.int64)


# ---- dropout ----

@custom_op("dlkernels::dropout", tags=_SEEDED)
def _dropout(x: Tensor, p: float, seed: Tensor | None, per_channel: bool) -> tuple[Tensor, Tensor]:
    s = _seed_used(seed)
    return _kernel("dropout", x)(x, p, int(s), per_channel), s


@_dropout.register_fake
def _(x: Tensor, p: float, seed: Tensor | None, per_channel: bool) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), _seed_fake()


def _dropout_setup(ctx, inputs, output) -> None:
    ctx.p, ctx.per_channel = inputs[1], inputs[3]
    ctx.save_for_backward(output[1])


def _dropout_bwd(ctx, grad: Tensor, _grad_seed):
    (seed,) = ctx.saved_tensors
    return _dropout(grad, ctx.p, seed, ctx.per_channel)[0], None, None, None


_dropout.register_autograd(_dropout_bwd, setup_context=_dropout_setup)


# ---- leaky ReLU + dropout ----

@custom_op("dlkernels::leaky_relu_dropout", tags=_SEEDED)
def _leaky_relu_dropout(x: Tensor, negative_slope: float, p: float, seed: Tensor | None) -> tuple[Tensor, Tensor]:
    s = _seed_used(seed)
    return _kernel("leaky_relu_dropout", x)(x, negative_slope, p, int(s)), s


@_leaky_relu_dropout.register_fake
def _(x: Tensor, negative_slope: float, p: float, seed: Tensor | None) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), _seed_fake()


@custom_op("dlkernels::leaky_relu_dropout_backward")
def _leaky_relu_dropout_backward(grad: Tensor, x: Tensor, negative_slope: float, p: float, seed: Tensor) -> Tensor:
    return _kernel("leaky_relu_dropout_backward", x)(grad, x, negative_slope, p, int(seed))


@_leaky_relu_dropout_backward.register_fake
def _(grad: Tensor, x: Tensor, negative_slope: float, p: float, seed: Tensor) -> Tensor:
    return torch.empty_like(x)


def _leaky_setup(ctx, inputs, output) -> None:
    ctx.slope, ctx.p = inputs[-3], inputs[-2]
    seed = output[1] if isinstance(output, tuple) else inputs[-1]
    ctx.save_for_backward(inputs[-4], seed)


def _leaky_bwd(ctx, grad: Tensor, _grad_seed):
    x, seed = ctx.saved_tensors
    return _leaky_relu_dropout_backward(grad, x, ctx.slope, ctx.p, seed), None, None, None


_leaky_relu_dropout.register_autograd(_leaky_bwd, setup_context=_leaky_setup)


# The backward is linear in grad, so its own gradient (double backward) is the same op.
def _leaky_bwd_bwd(ctx, gg: Tensor):
    x, seed = ctx.saved_tensors
    return _leaky_relu_dropout_backward(gg, x, ctx.slope, ctx.p, seed), None, None, None, None


_leaky_relu_dropout_backward.register_autograd(_leaky_bwd_bwd, setup_context=_leaky_setup)


# ---- PReLU + dropout ----

@custom_op("dlkernels::prelu_dropout", tags=_SEEDED)
def _prelu_dropout(x: Tensor, weight: Tensor, p: float, seed: Tensor | None) -> tuple[Tensor, Tensor]:
    s = _seed_used(seed)
    return _kernel("prelu_dropout", x)(x, weight, p, int(s)), s


@_prelu_dropout.register_fake
def _(x: Tensor, weight: Tensor, p: float, seed: Tensor | None) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), _seed_fake()


@custom_op("dlkernels::prelu_dropout_backward")
def _prelu_dropout_backward(grad: Tensor, x: Tensor, weight: Tensor, p: float, seed: Tensor) -> tuple[Tensor, Tensor]:
    return _kernel("prelu_dropout_backward", x)(grad, x, weight, p, int(seed))


@_prelu_dropout_backward.register_fake
def _(grad: Tensor, x: Tensor, weight: Tensor, p: float, seed: Tensor) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), torch.empty_like(weight, memory_format=torch.contiguous_format)


def _prelu_setup(ctx, inputs, output) -> None:
    ctx.p = inputs[2]
    ctx.save_for_backward(inputs[0], inputs[1], output[1])


def _prelu_bwd(ctx, grad: Tensor, _grad_seed):
    x, weight, seed = ctx.saved_tensors
    gx, gw = _prelu_dropout_backward(grad, x, weight, ctx.p, seed)
    return (gx if ctx.needs_input_grad[0] else None), (gw if ctx.needs_input_grad[1] else None), None, None


_prelu_dropout.register_autograd(_prelu_bwd, setup_context=_prelu_setup)


# ---- public functions (torch.nn.functional's signatures, plus generator= and seed=) ----

def _check_p(p: object) -> float:
    if isinstance(p, Tensor) and p.dim() == 0:
        p = p.item()
    if not isinstance(p, numbers.Real) or isinstance(p, bool):
        raise TypeError(f"dropout probability must be a number, got {type(p).__name__}")
    if p < 0.0 or p > 1.0:  # torch's message
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    return float(p)


def _seed_arg(seed: int | None, generator: torch.Generator | None) -> Tensor | None:
    """The seed as a 0-d int64 tensor (its two's-complement bit pattern), or None: the op draws."""
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"dropout: seed must be an int, got {type(seed).__name__}")
        if generator is not None:
            raise ValueError("dropout: give seed or generator, not both")
        s = int(seed) % 2**64
        return torch.tensor(s - 2**64 if s >= 2**63 else s, dtype=torch.int64)
    if generator is not None:
        if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
            raise TypeError(f"dropout: generator must be a CPU torch.Generator, got {generator!r}")
        return _draw(generator)
    return None


def _check_input(fn: str, input: Tensor, inplace: bool) -> None:
    _checks.tensor_arg(fn, "input", 1, input)
    if input.dtype not in _checks.FLOAT_DTYPES:  # torch's error for an integer or bool input
        raise RuntimeError(f"result type Float can't be cast to the desired output type "
                           f"{_checks.scalar_type_name(input.dtype)}")
    if inplace and input.is_leaf and input.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("a leaf Variable that requires grad is being used in an in-place operation.")


def _finish(input: Tensor, y: Tensor, inplace: bool) -> Tensor:
    # The kernels write a new tensor; inplace=True copies it back (one extra pass), as a user of
    # inplace expects the input overwritten. Autograd sees the copy_, so gradients stay right.
    return input.copy_(y) if inplace else y


def _dropout_any(fn: str, input: Tensor, p: object, training: bool, inplace: bool, per_channel: bool,
                 generator: torch.Generator | None, seed: int | None) -> Tensor:
    p = _check_p(p)
    _check_input(fn, input, inplace)
    s = _seed_arg(seed, generator)
    if p == 0.0 or not training or input.numel() == 0:
        return input  # torch returns the input itself
    if p == 1.0:  # torch: input * 0 (a NaN or inf stays NaN)
        return input.mul_(0.0) if inplace else input * input.new_zeros(())
    return _finish(input, _dropout(input, p, s, per_channel)[0], inplace)


def dropout(input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False, *,
            generator: torch.Generator | None = None, seed: int | None = None) -> Tensor:
    """torch.nn.functional.dropout whose mask is Philox4x32-10 of (seed, element index): the same
    on every backend, layout and thread count for a seed, and regenerated, not saved, for the
    backward. ``seed`` (an int) or ``generator`` (a CPU torch.Generator, one 64-bit draw) fixes
    it; by default one value is drawn from torch's default CPU generator per call."""
    return _dropout_any("dropout", input, p, training, inplace, False, generator, seed)


def _feature_dropout(fn: str, input: Tensor, p: object, training: bool, inplace: bool, unbatched: bool,
                     generator: torch.Generator | None, seed: int | None) -> Tensor:
    """One draw per (sample, channel) of the (N, C, ...) input; ``unbatched``: it lacks N."""
    x = input.unsqueeze(0) if unbatched else input
    if x.dim() < 2:  # torch's feature dropout needs a channel dim
        raise RuntimeError("Feature dropout requires at least 2 dimensions in the input")
    y = _dropout_any(fn, x, p, training, inplace, True, generator, seed)
    if y is x:
        return input
    if unbatched:
        return input if inplace else y.squeeze(0)
    return y


def dropout1d(input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False, *,
              generator: torch.Generator | None = None, seed: int | None = None) -> Tensor:
    """torch.nn.functional.dropout1d (input (N, C, L) or (C, L)): whole channels dropped."""
    _check_p(p)
    _checks.tensor_arg("dropout1d", "input", 1, input)
    if input.dim() not in (2, 3):
        raise RuntimeError(
            f"dropout1d: Expected 2D or 3D input, but received a {input.dim()}D input. Note that dropout1d exists to "
            "provide channel-wise dropout on inputs with 1 spatial dimension, a channel dimension, and an optional "
            "batch dimension (i.e. 2D or 3D inputs).")
    return _feature_dropout("dropout1d", input, p, training, inplace, input.dim() == 2, generator, seed)


def dropout2d(input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False, *,
              generator: torch.Generator | None = None, seed: int | None = None) -> Tensor:
    """torch.nn.functional.dropout2d (input (N, C, H, W)); as torch, a 3-D input is taken as (N, C, L)."""
    _check_p(p)
    _checks.tensor_arg("dropout2d", "input", 1, input)
    if input.dim() not in (3, 4):
        warnings.warn(
            f"dropout2d: Received a {input.dim()}-D input to dropout2d, which is deprecated and will result in an "
            "error in a future release. To retain the behavior and silence this warning, please use dropout "
            "instead. Note that dropout2d exists to provide channel-wise dropout on inputs with 2 spatial "
            "dimensions, a channel dimension, and an optional batch dimension (i.e. 3D or 4D inputs).",
            stacklevel=2)
    if input.dim() == 3:
        warnings.warn(
            "dropout2d: Received a 3D input to dropout2d and assuming that channel-wise 1D dropout behavior is "
            "desired - input is interpreted as shape (N, C, L), where C is the channel dim. This behavior will "
            "change in a future release to interpret the input as one without a batch dimension, i.e. shape "
            "(C, H, W). To maintain the 1D channel-wise dropout behavior, please switch to using dropout1d "
            "instead.", stacklevel=2)
    return _feature_dropout("dropout2d", input, p, training, inplace, False, generator, seed)


def dropout3d(input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False, *,
              generator: torch.Generator | None = None, seed: int | None = None) -> Tensor:
    """torch.nn.functional.dropout3d (input (N, C, D, H, W) or (C, D, H, W))."""
    _check_p(p)
    _checks.tensor_arg("dropout3d", "input", 1, input)
    if input.dim() not in (4, 5):
        warnings.warn(
            f"dropout3d: Received a {input.dim()}-D input to dropout3d, which is deprecated and will result in an "
            "error in a future release. To retain the behavior and silence this warning, please use dropout "
            "instead. Note that dropout3d exists to provide channel-wise dropout on inputs with 3 spatial "
            "dimensions, a channel dimension, and an optional batch dimension (i.e. 4D or 5D inputs).",
            stacklevel=2)
    return _feature_dropout("dropout3d", input, p, training, inplace, input.dim() != 5, generator, seed)


def leaky_relu_dropout(input: Tensor, negative_slope: float = 0.01, p: float = 0.5, training: bool = True, *,
                       generator: torch.Generator | None = None, seed: int | None = None) -> Tensor:
    """``dropout(leaky_relu(input, negative_slope), p, training)`` in one pass; the backward
    regenerates the mask and saves only the input (as leaky_relu alone does)."""
    p = _check_p(p)
    _check_input("leaky_relu_dropout", input, False)
    slope = _checks.number_arg("leaky_relu_dropout", "negative_slope", 2, negative_slope)
    s = _seed_arg(seed, generator)
    if p == 0.0 or not training or input.numel() == 0:
        return leaky_relu(input, slope)
    if p == 1.0:
        return leaky_relu(input, slope) * input.new_zeros(())
    return _leaky_relu_dropout(input, slope, p, s)[0]


def prelu_dropout(input: Tensor, weight: Tensor, p: float = 0.5, training: bool = True, *,
                  generator: torch.Generator | None = None, seed: int | None = None) -> Tensor:
    """``dropout(prelu(input, weight), p, training)`` in one pass (weight: 1 or C slopes)."""
    p = _check_p(p)
    _check_input("prelu_dropout", input, False)
    _check_prelu(input, weight)
    s = _seed_arg(seed, generator)
    if p == 0.0 or not training or input.numel() == 0:
        return prelu(input, weight)
    if p == 1.0:
        return prelu(input, weight) * input.new_zeros(())
    return _prelu_dropout(input, weight, p, s)[0]


# ---- `python -m dlkernels` ----

def self_check(device: torch.device) -> float:
    """Max abs difference to the reference over dropout, dropout2d and the fused leaky ReLU and
    PReLU variants, forward and backward, at a fixed seed (the masks must match exactly)."""
    from dlkernels import functional  # imports this module: import at call time

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, 11, generator=gen).to(device)
    w = torch.rand(5, generator=gen).to(device)
    g = torch.randn(x.shape, generator=gen).to(device)

    def run() -> list[Tensor]:
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        ys = [functional.dropout(xr, 0.3, seed=1), functional.dropout2d(xr, 0.5, seed=2),
              functional.leaky_relu_dropout(xr.to(memory_format=torch.channels_last), 0.1, 0.2, seed=3),
              functional.prelu_dropout(xr, wr, 0.5, seed=4)]
        return [*ys, *torch.autograd.grad(ys, (xr, wr), [g] * len(ys))]

    got = run()
    with use_backend("reference"):
        want = run()
    return max((a - b).abs().max().item() for a, b in zip(got, want, strict=True))

"""Custom ops of the activation family: leaky ReLU (functional and in-place) and PReLU.

``leaky_relu`` and ``prelu`` are functional ops with autograd; their backward ops are ops too,
so opcheck and torch.compile see every kernel. In-place leaky ReLU is a mutating op without
autograd, wrapped in an autograd.Function that marks the input dirty (torch.library cannot put
autograd on a mutating op).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dlkernels._backend import impl, use_backend
from dlkernels.ops import _checks
from dlkernels.ops._op import _is_compiling, custom_op, eager_entry

_FAMILY = "activation"
FUNCTIONAL = ("leaky_relu", "prelu")

_INPLACE_NEGATIVE_SLOPE = (
    "In-place leakyReLu backward calculation is triggered with a negative slope which is not "
    "supported. This is caused by calling in-place forward function with a negative slope, please "
    "call out-of-place version instead. File an issue at https://github.com/pytorch/pytorch if you "
    "do require supporting in-place leakRelu backward calculation with negative slope"
)


# The eager fast path of the public functions (plain CPU calls in one C++ call; csrc/eager/activation.cpp)
_eager_leaky_relu = eager_entry("leaky_relu")
_eager_prelu = eager_entry("prelu")


# ---- leaky ReLU ----

@custom_op("dlkernels::leaky_relu", mutates_args=())
def _leaky_relu(x: Tensor, negative_slope: float) -> Tensor:
    return impl(_FAMILY, "leaky_relu", x.device)(x, negative_slope)


@_leaky_relu.register_fake
def _(x: Tensor, negative_slope: float) -> Tensor:
    return torch.empty_like(x)


@custom_op("dlkernels::leaky_relu_backward", mutates_args=())
def _leaky_relu_backward(grad: Tensor, x: Tensor, negative_slope: float) -> Tensor:
    return impl(_FAMILY, "leaky_relu_backward", x.device)(grad, x, negative_slope)


@_leaky_relu_backward.register_fake
def _(grad: Tensor, x: Tensor, negative_slope: float) -> Tensor:
    return torch.empty_like(x)


def _leaky_setup(ctx, inputs, output) -> None:
    # Both leaky ops end with (..., x, negative_slope).
    ctx.save_for_backward(inputs[-2])
    ctx.negative_slope = inputs[-1]


def _leaky_relu_bwd(ctx, grad: Tensor):
    (x,) = ctx.saved_tensors
    return _leaky_relu_backward(grad, x, ctx.negative_slope), None


_leaky_relu.register_autograd(_leaky_relu_bwd, setup_context=_leaky_setup)


# The backward is linear in grad, so its own gradient (double backward) is the same op.
def _leaky_relu_bwd_bwd(ctx, gg: Tensor):
    (x,) = ctx.saved_tensors
    return _leaky_relu_backward(gg, x, ctx.negative_slope), None, None


_leaky_relu_backward.register_autograd(_leaky_relu_bwd_bwd, setup_context=_leaky_setup)


@custom_op("dlkernels::leaky_relu_", mutates_args=("x",))
def _leaky_relu_inplace(x: Tensor, negative_slope: float) -> None:
    impl(_FAMILY, "leaky_relu_", x.device)(x, negative_slope)


@_leaky_relu_inplace.register_fake
def _(x: Tensor, negative_slope: float) -> None:
    return None


class _LeakyReLUInplace(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, negative_slope: float) -> Tensor:
        _leaky_relu_inplace(x, negative_slope)
        ctx.mark_dirty(x)
        # For slope >= 0 the sign of the output is the sign of the input, so the output suffices.
        ctx.save_for_backward(x)
        ctx.negative_slope = negative_slope
        return x

    @staticmethod
    def backward(ctx, grad: Tensor):
        if ctx.negative_slope < 0:
            raise RuntimeError(_INPLACE_NEGATIVE_SLOPE)
        (y,) = ctx.saved_tensors
        return _leaky_relu_backward(grad, y, ctx.negative_slope), None


def leaky_relu(input: Tensor, negative_slope: float = 0.01, inplace: bool = False) -> Tensor:
    """``max(0, x) + negative_slope * min(0, x)``, as torch.nn.functional.leaky_relu.

    With ``inplace=True`` the input is overwritten and returned; as in torch, backward through an
    in-place call with a negative slope raises (the input's sign can no longer be recovered).
    """
    if not inplace and not _is_compiling():
        y = _eager_leaky_relu(input, negative_slope)
        if y is not None:
            return y
    _checks.tensor_arg("leaky_relu", "input", 1, input)
    slope = _checks.number_arg("leaky_relu", "negative_slope", 2, negative_slope)
    _checks.float_dtype("leaky_relu", input)
    if inplace:
        if input.is_leaf and input.requires_grad and torch.is_grad_enabled():
            # torch's own wording (autograd.Function would say "has been used").
            raise RuntimeError("a leaf Variable that requires grad is being used in an in-place operation.")
        return _LeakyReLUInplace.apply(input, slope)
    return _leaky_relu(input, slope)


# ---- PReLU ----

@custom_op("dlkernels::prelu", mutates_args=())
def _prelu(x: Tensor, weight: Tensor) -> Tensor:
    return impl(_FAMILY, "prelu", x.device)(x, weight)


@_prelu.register_fake
def _(x: Tensor, weight: Tensor) -> Tensor:
    return torch.empty_like(x)


@custom_op("dlkernels::prelu_backward", mutates_args=())
def _prelu_backward(grad: Tensor, x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    return impl(_FAMILY, "prelu_backward", x.device)(grad, x, weight)


@_prelu_backward.register_fake
def _(grad: Tensor, x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), torch.empty_like(weight, memory_format=torch.contiguous_format)


def _prelu_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _prelu_bwd(ctx, grad: Tensor):
    x, weight = ctx.saved_tensors
    grad_input, grad_weight = _prelu_backward(grad, x, weight)
    return (
        grad_input if ctx.needs_input_grad[0] else None,
        grad_weight if ctx.needs_input_grad[1] else None,
    )


_prelu.register_autograd(_prelu_bwd, setup_context=_prelu_setup)


def _check_prelu(input: Tensor, weight: Tensor) -> None:
    """torch.nn.functional.prelu's checks, in torch's order and with its messages."""
    _checks.tensor_arg("prelu", "input", 1, input)
    _checks.tensor_arg("prelu", "weight", 2, weight)
    if input.dtype != weight.dtype:
        raise RuntimeError(
            "prelu: Type promoting not supported. Got "
            f"{_checks.scalar_type_name(input.dtype)} and {_checks.scalar_type_name(weight.dtype)}"
        )
    if weight.numel() != 1:
        if input.dim() == 0:
            raise RuntimeError("Not allow zero-dim input tensor.")
        channels = input.shape[1] if input.dim() > 1 else 1
        if channels != weight.numel():
            raise RuntimeError(
                "Mismatch of parameter numbers and input channel size. Found parameter numbers = "
                f"{weight.numel()} and channel size = {channels}."
            )
    if weight.dim() > 1:
        raise RuntimeError(f"prelu: Expected `weight` to be a scalar or 1D tensor, but got: ndim = {weight.dim()}")
    _checks.same_device(input, weight)
    _checks.float_dtype("prelu", input)


def prelu(input: Tensor, weight: Tensor) -> Tensor:
    """``max(0, x) + weight[c] * min(0, x)`` with c the channel (dim 1), as torch's prelu.

    ``weight`` has one element (shared) or ``input.size(1)`` elements.
    """
    if not _is_compiling():
        y = _eager_prelu(input, weight)
        if y is not None:
            return y
    _check_prelu(input, weight)
    return _prelu(input, weight)


# ---- `python -m dlkernels` ----

def self_check(device: torch.device) -> float:
    """Max abs difference to the reference over leaky ReLU / PReLU forward and backward."""
    from dlkernels import functional  # imports this module: import at call time

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, 11, generator=gen).to(device)
    w = torch.rand(5, generator=gen).to(device)
    g = torch.randn(x.shape, generator=gen).to(device)

    def run() -> list[torch.Tensor]:
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        y1 = functional.leaky_relu(xr, 0.1)
        y2 = functional.prelu(xr.to(memory_format=torch.channels_last), wr)
        return [y1, y2, *torch.autograd.grad((y1, y2), (xr, wr), (g, g))]

    got = run()
    with use_backend("reference"):
        want = run()
    return max((a - b).abs().max().item() for a, b in zip(got, want, strict=True))

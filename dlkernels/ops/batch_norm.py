"""Custom ops of the batch_norm family: batch normalization fused with an activation.

- ``batch_norm_act_train(x, w, b, prelu_w, eps, act, slope) -> (y, mean, invstd, var)``: batch
  statistics (one read of x) and the normalize+activate pass (one read, one write); autograd.
- ``batch_norm_act_eval(x, running_mean, running_var, w, b, prelu_w, eps, act, slope) -> y``:
  one pass with scale and shift folded per channel; autograd (frozen-BN fine-tuning).
- ``batch_norm_act_backward(...) -> (grad_x, grad_w, grad_b, grad_prelu)``: one reduction pass
  over (grad, x) and one elementwise pass; the pre-activation is recomputed from x and the
  per-channel statistics, never saved.
Running statistics are updated by the caller with torch ops on [C]-sized buffers (the momentum
factor may be a tensor, so ``momentum=None`` does not break ``fullgraph``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dlkernels._backend import impl
from dlkernels.ops import _checks
from dlkernels.reference.batch_norm import ACT_LEAKY_RELU, ACT_NONE, ACT_PRELU, ACT_RELU

_FAMILY = "batch_norm"
ACTIVATIONS = {None: ACT_NONE, "relu": ACT_RELU, "leaky_relu": ACT_LEAKY_RELU, "prelu": ACT_PRELU}


def _acc(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _channel_empty(x: Tensor) -> Tensor:
    return x.new_empty(x.shape[1], dtype=_acc(x))


def kernels(name: str, x: Tensor):
    return impl(_FAMILY, name, x.device)


# ---- training forward ----

@torch.library.custom_op("dlkernels::batch_norm_act_train", mutates_args=())
def _train(x: Tensor, weight: Tensor | None, bias: Tensor | None, prelu_weight: Tensor | None, eps: float,
           act: int, slope: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return kernels("batch_norm_act_train", x)(x, weight, bias, prelu_weight, eps, act, slope)


@_train.register_fake
def _(x, weight, bias, prelu_weight, eps, act, slope):
    return torch.empty_like(x), _channel_empty(x), _channel_empty(x), _channel_empty(x)


def _train_setup(ctx, inputs, output) -> None:
    x, weight, bias, prelu_weight, _, act, slope = inputs
    _, mean, invstd, _ = output
    ctx.save_for_backward(x, weight, bias, prelu_weight, mean, invstd)
    ctx.act, ctx.slope, ctx.training = act, slope, True


def _input_grads(ctx, grad: Tensor, need: tuple[bool, bool, bool, bool]) -> list[Tensor | None]:
    """Gradients for (x, weight, bias, prelu_weight), None where not needed."""
    x, weight, bias, prelu_weight, mean, invstd = ctx.saved_tensors
    grads = _backward_op(grad, x, weight, bias, prelu_weight, mean, invstd, ctx.act, ctx.slope, ctx.training)
    return [g if n else None for g, n in zip(grads, need, strict=True)]


def _backward(ctx, grad: Tensor, *unused: Tensor):
    return (*_input_grads(ctx, grad, ctx.needs_input_grad[:4]), None, None, None)


_train.register_autograd(_backward, setup_context=_train_setup)


# ---- eval forward ----

@torch.library.custom_op("dlkernels::batch_norm_act_eval", mutates_args=())
def _eval(x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor | None, bias: Tensor | None,
          prelu_weight: Tensor | None, eps: float, act: int, slope: float) -> Tensor:
    mean, invstd = _eval_stats(x, running_mean, running_var, eps)
    return kernels("batch_norm_act_forward", x)(x, mean, invstd, weight, bias, prelu_weight, act, slope)


def _eval_stats(x: Tensor, running_mean: Tensor, running_var: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    # in the compute dtype, as torch: a small eps added to fp16 running_var would underflow
    return _as(running_mean, _acc(x)), torch.rsqrt(_as(running_var, _acc(x)) + eps)


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    # Tensor.to(same dtype) returns its input, which opcheck's schema test rejects inside an op.
    return t if t.dtype == dtype else t.to(dtype)


@_eval.register_fake
def _(x, running_mean, running_var, weight, bias, prelu_weight, eps, act, slope):
    return torch.empty_like(x)


def _eval_setup(ctx, inputs, output) -> None:
    x, running_mean, running_var, weight, bias, prelu_weight, eps, act, slope = inputs
    mean, invstd = _eval_stats(x, running_mean, running_var, eps)
    ctx.save_for_backward(x, weight, bias, prelu_weight, mean, invstd)
    ctx.act, ctx.slope, ctx.training = act, slope, False


def _eval_backward(ctx, grad: Tensor):
    n = ctx.needs_input_grad
    gx, gw, gb, gp = _input_grads(ctx, grad, (n[0], n[3], n[4], n[5]))
    return gx, None, None, gw, gb, gp, None, None, None


_eval.register_autograd(_eval_backward, setup_context=_eval_setup)


# ---- backward ----

@torch.library.custom_op("dlkernels::batch_norm_act_backward", mutates_args=())
def _backward_op(grad: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, prelu_weight: Tensor | None,
                 mean: Tensor, invstd: Tensor, act: int, slope: float,
                 training: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    gx, sum_dz, sum_dz_xhat, grad_prelu = kernels("batch_norm_act_backward", x)(
        grad, x, mean, invstd, weight, bias, prelu_weight, act, slope, training)
    # Copies: a backend may return both sums as rows of one buffer, and op outputs may not alias.
    gw = sum_dz_xhat.to(weight.dtype, copy=True) if weight is not None else sum_dz_xhat.new_empty(0)
    gb = sum_dz.to(bias.dtype, copy=True) if bias is not None else sum_dz.new_empty(0)
    return gx, gw, gb, grad_prelu


@_backward_op.register_fake
def _(grad, x, weight, bias, prelu_weight, mean, invstd, act, slope, training):
    gw = torch.empty_like(weight) if weight is not None else x.new_empty(0, dtype=_acc(x))
    gb = torch.empty_like(bias) if bias is not None else x.new_empty(0, dtype=_acc(x))
    gp = torch.empty_like(prelu_weight) if act == ACT_PRELU else x.new_empty(0, dtype=_acc(x))
    return torch.empty_like(x), gw, gb, gp


# ---- public entry: torch's checks, then the ops, then the running statistics ----

_REDUCED = (torch.float16, torch.bfloat16)


def _check_dtypes(input: Tensor, params: list[Tensor | None]) -> None:
    """torch's CPU rule: parameters share the input's dtype, or are all float32 for fp16/bf16 input."""
    dtypes = {p.dtype for p in params if p is not None}
    if not dtypes or dtypes == {input.dtype}:
        return
    if input.dtype in _REDUCED and dtypes == {torch.float32}:
        return
    if input.dtype == torch.float64 and dtypes == {torch.float32}:
        raise RuntimeError("mixed dtype (CPU): all inputs must share same datatype.")
    raise RuntimeError("mixed dtype (CPU): expect parameter to have scalar type of Float")


def _check(input, running_mean, running_var, weight, bias, training, eps, activation, prelu_weight,
           local_batch: bool = True) -> None:
    """torch's checks; ``local_batch=False`` leaves the batch-size check to the caller (SyncBatchNorm
    checks the total over all ranks)."""
    _checks.tensor_arg("batch_norm", "input", 1, input)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    if training:
        size = input.shape
        prods = size[0] if input.dim() > 0 else 1
        for d in size[2:]:
            prods *= d
        if prods == 1 and local_batch:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")
        if eps <= 0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    elif eps < 0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    elif running_mean is None and input.numel() > 0:  # torch returns an empty input as it is
        raise RuntimeError("running_mean must be defined in evaluation mode")
    if input.dim() < 2:
        raise ValueError(f"dlkernels batch_norm: input needs a channel dimension (dim 1), got {input.dim()}-d input")
    channels = input.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
                    ("bias", bias)):
        if t is not None and t.numel() != channels:
            raise RuntimeError(f"{name} should contain {channels} elements not {t.numel()}")
    if activation == "prelu":
        if prelu_weight is None:
            raise ValueError("activation='prelu' needs prelu_weight")
        if prelu_weight.numel() not in (1, channels):
            raise RuntimeError(
                "Mismatch of parameter numbers and input channel size. Found parameter numbers = "
                f"{prelu_weight.numel()} and channel size = {channels}.")
    for t in (running_mean, running_var, weight, bias, prelu_weight):
        if t is not None:
            _checks.same_device(t, input)
    if input.dtype not in _checks.FLOAT_DTYPES:
        raise NotImplementedError(f"\"batch_norm\" not implemented for '{_checks.scalar_type_name(input.dtype)}'")
    _check_dtypes(input, [running_mean, running_var, weight, bias])


def batch_norm_act(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                   weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
                   momentum: float | Tensor = 0.1, eps: float = 1e-5, activation: str | None = "leaky_relu",
                   negative_slope: float = 0.01, prelu_weight: Tensor | None = None) -> Tensor:
    _check(input, running_mean, running_var, weight, bias, training, eps, activation, prelu_weight)
    act = ACTIVATIONS[activation]
    slope = _checks.number_arg("batch_norm_act", "negative_slope", 10, negative_slope)
    prelu = prelu_weight if act == ACT_PRELU else None
    if not training:
        if running_mean is None:  # an empty input (checked above): as torch, an empty output
            return input.clone()
        return _eval(input, running_mean, running_var, weight, bias, prelu, eps, act, slope)
    y, mean, _, var = _train(input, weight, bias, prelu, eps, act, slope)
    if running_mean is not None and input.numel() > 0:  # an empty batch leaves them as they are, as torch
        update_running_stats(running_mean, running_var, mean, var, input.numel() // input.shape[1], momentum)
    return y


def update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, count: int,
                         momentum: float | Tensor) -> None:
    """torch's update, ``momentum * batch + (1 - momentum) * running`` (the running variance takes the
    unbiased batch variance). Not as a lerp: for momentum >= 0.5 lerp computes end - (end - start) * (1 - w),
    which turns an overflowed (inf) batch variance into inf - inf = NaN where torch keeps inf."""
    with torch.no_grad():
        unbiased = var * (count / max(count - 1, 1))
        if running_mean.dtype in _REDUCED:  # in float32, as torch: a large variance overflows fp16 before * momentum
            for buf, stat in ((running_mean, mean), (running_var, unbiased)):
                buf.copy_(stat * momentum + buf.float() * (1 - momentum))
        elif isinstance(momentum, Tensor):  # momentum=None's cumulative factor
            running_mean.copy_(mean * momentum + running_mean * (1 - momentum))
            running_var.copy_(unbiased * momentum + running_var * (1 - momentum))
        else:  # foreach ops for both buffers: on small inputs these ops cost more than the kernels
            bufs = [running_mean, running_var]
            torch._foreach_mul_(bufs, 1.0 - momentum)
            torch._foreach_add_(bufs, [mean.to(running_mean.dtype), unbiased.to(running_var.dtype)], alpha=momentum)

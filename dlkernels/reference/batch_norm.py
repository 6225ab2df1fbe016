"""Batch normalization fused with an activation, in plain torch: the spec of the batch_norm
kernels. Channels are dim 1; statistics are over every other dim.

Backend contract (every backend module of the family has these functions, same arguments):
- ``batch_norm_stats(x) -> (mean, var)``: per-channel mean and biased variance, float32
  (float64 for float64 x), shape [C].
- ``batch_norm_act_forward(x, mean, invstd, weight, bias, prelu_weight, act, slope) -> y``:
  ``y = act((x - mean) * invstd * weight + bias)`` in x's dtype, laid out as empty_like(x).
- ``batch_norm_act_backward_reduce(grad, x, mean, invstd, weight, bias, prelu_weight, act, slope)
  -> (sum_dz, sum_dz_xhat, grad_prelu)``: with z the pre-activation (recomputed, never saved) and
  dz = act'(z) * grad: per-channel sums of dz and dz * xhat (float32/float64), and the PReLU slope
  gradient (prelu_weight's shape and dtype; an empty tensor unless act is prelu).
- ``batch_norm_act_backward_elemt(grad, x, mean, invstd, weight, bias, prelu_weight, sum_dz,
  sum_dz_xhat, count, act, slope) -> grad_input``:
  ``weight * invstd * (dz - sum_dz / count - xhat * sum_dz_xhat / count)``; eval mode passes zero
  sums, which leaves ``dz * weight * invstd``.
- ``batch_norm_act_eval(x, running_mean, running_var, weight, bias, prelu_weight, eps, act, slope) -> y``:
  the eval forward, with torch's statistics (mean and ``rsqrt(running_var + eps)`` in the compute
  type); ``compose_eval`` builds it from the forward (the CPU computes them in its call).
- ``batch_norm_act_train(x, weight, bias, prelu_weight, eps, act, slope) -> (y, mean, invstd, var)``:
  the training forward whole (statistics, ``invstd = rsqrt(var + eps)``, forward), so a backend
  may schedule its two passes together (the CPU runs them per channel, the second from cache).
- ``batch_norm_act_backward(grad, x, mean, invstd, weight, bias, prelu_weight, act, slope, training)
  -> (grad_input, sum_dz, sum_dz_xhat, grad_prelu)``: reduce then elemt; ``training=False`` (eval)
  passes zero sums to elemt. ``compose_train`` / ``compose_backward`` build both from the four above.
weight/bias may be None (1 and 0); they and mean/invstd/prelu_weight may be float32 for fp16/bf16 x.
act: ACT_NONE, ACT_RELU, ACT_LEAKY_RELU (slope = negative_slope), ACT_PRELU (prelu_weight: 1 or C
slopes). Reduced-precision x computes in float32; float64 in float64.

Dropout after the activation: every function but ``batch_norm_stats`` takes ``p=0.0, seed=0`` last
(p = 0: none; else 0 < p < 1, docs/dropout.md). The forward gives exactly
``dropout(batch_norm_act_forward(...), p, seed)``: y rounded to x's dtype, then times the mask of
each element's logical index, rounded again. The backward passes take ``dL/dy * m`` (the mask
regenerated from the seed, in the compute type) where they took ``dL/dy``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from dlkernels._dtypes import compute_dtype
from dlkernels.codes import Activation
from dlkernels.reference import dropout as _dropout

ACT_NONE, ACT_RELU = int(Activation.NONE), int(Activation.RELU)
ACT_LEAKY_RELU, ACT_PRELU = int(Activation.LEAKY_RELU), int(Activation.PRELU)




def _per_channel(t: Tensor | None, x: Tensor, default: float) -> Tensor:
    """A [C] (or 1-element) tensor shaped to broadcast over x's channel dim, in compute dtype."""
    if t is None:
        return torch.tensor(default, dtype=compute_dtype(x), device=x.device)
    shape = [1] * x.dim()
    shape[1] = -1
    return t.to(compute_dtype(x)).reshape(shape) if t.numel() > 1 or x.dim() > 1 else t.to(compute_dtype(x)).reshape(())


def _dims(x: Tensor) -> list[int]:
    return [d for d in range(x.dim()) if d != 1]


def batch_norm_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    if x.numel() == 0:  # NaN, as var_mean of nothing, without its warning
        nan = torch.full((x.shape[1],), float("nan"), dtype=compute_dtype(x), device=x.device)
        return nan, nan.clone()
    xa = x.to(compute_dtype(x))
    # two passes, as torch's batch norm: var_mean's Welford update turns an inf into a NaN mean, and
    # torch.var loses ~1e3 ulps of float64 variance when |mean| / std is 1e7
    mean = xa.mean(_dims(x))
    return mean, ((xa - _per_channel(mean, x, 0.0)) ** 2).mean(_dims(x))


def _pre_activation(x, mean, invstd, weight, bias) -> tuple[Tensor, Tensor]:
    xhat = (x.to(compute_dtype(x)) - _per_channel(mean, x, 0.0)) * _per_channel(invstd, x, 1.0)
    return xhat, xhat * _per_channel(weight, x, 1.0) + _per_channel(bias, x, 0.0)


def _activate(z: Tensor, x: Tensor, prelu_weight, act: int, slope: float) -> Tensor:
    if act == ACT_RELU:
        return torch.where(z < 0, torch.zeros_like(z), z)
    if act == ACT_LEAKY_RELU:
        return torch.where(z > 0, z, z * slope)
    if act == ACT_PRELU:
        return torch.where(z > 0, z, z * _per_channel(prelu_weight, x, 0.25))
    return z


def batch_norm_act_forward(x, mean, invstd, weight, bias, prelu_weight, act: int, slope: float, p: float = 0.0,
                           seed: int = 0) -> Tensor:
    _, z = _pre_activation(x, mean, invstd, weight, bias)
    y = _activate(z, x, prelu_weight, act, slope).to(x.dtype)
    return _dropout.dropout(y, p, seed, False) if p > 0 else y


def _dropped(grad: Tensor, x: Tensor, p: float, seed: int) -> Tensor:
    """grad in the compute type, times the dropout mask when p > 0."""
    g = grad.to(compute_dtype(x))
    return g * _dropout._multiplier(x, p, seed) if p > 0 else g


def _act_backward(grad: Tensor, z: Tensor, x: Tensor, prelu_weight, act: int, slope: float) -> Tensor:
    g = grad.to(compute_dtype(x))
    if act == ACT_RELU:
        return torch.where(z <= 0, torch.zeros_like(g), g)
    if act == ACT_LEAKY_RELU:
        return torch.where(z > 0, g, g * slope)
    if act == ACT_PRELU:
        return torch.where(z > 0, g, g * _per_channel(prelu_weight, x, 0.25))
    return g


def batch_norm_act_backward_reduce(grad, x, mean, invstd, weight, bias, prelu_weight, act: int, slope: float,
                                   p: float = 0.0, seed: int = 0):
    xhat, z = _pre_activation(x, mean, invstd, weight, bias)
    grad = _dropped(grad, x, p, seed)
    dz = _act_backward(grad, z, x, prelu_weight, act, slope)
    sum_dz, sum_dz_xhat = dz.sum(_dims(x)), (dz * xhat).sum(_dims(x))
    if act == ACT_PRELU:
        contrib = torch.where(z > 0, torch.zeros_like(z), z * grad.to(compute_dtype(x)))
        gp = contrib.sum() if prelu_weight.numel() == 1 else contrib.sum(_dims(x))
        grad_prelu = gp.to(prelu_weight.dtype).reshape(prelu_weight.shape)
    else:
        grad_prelu = torch.empty(0, dtype=compute_dtype(x), device=x.device)
    return sum_dz, sum_dz_xhat, grad_prelu


def batch_norm_act_backward_elemt(grad, x, mean, invstd, weight, bias, prelu_weight, sum_dz, sum_dz_xhat,
                                  count: int, act: int, slope: float, p: float = 0.0, seed: int = 0) -> Tensor:
    xhat, z = _pre_activation(x, mean, invstd, weight, bias)
    dz = _act_backward(_dropped(grad, x, p, seed), z, x, prelu_weight, act, slope)
    scale = _per_channel(weight, x, 1.0) * _per_channel(invstd, x, 1.0)
    q = _per_channel(sum_dz_xhat, x, 0.0) / count
    # the xhat term vanishes where its coefficient is 0 (eval), also at an infinite x: not 0 * inf = NaN
    stat = torch.where(q == 0, torch.zeros_like(xhat), xhat * q)
    gx = scale * (dz - _per_channel(sum_dz, x, 0.0) / count - stat)
    return gx.to(x.dtype)


def compose_train(stats: Callable, forward: Callable) -> Callable:
    """A backend's batch_norm_act_train from its batch_norm_stats and batch_norm_act_forward."""

    def batch_norm_act_train(x, weight, bias, prelu_weight, eps: float, act: int, slope: float, p: float = 0.0,
                             seed: int = 0):
        mean, var = stats(x)
        invstd = torch.rsqrt(var + eps)
        return forward(x, mean, invstd, weight, bias, prelu_weight, act, slope, p, seed), mean, invstd, var

    return batch_norm_act_train


def eval_stats(x, running_mean, running_var, eps: float):
    """torch's eval statistics: (mean, invstd) with the running mean and variance in the compute type and
    ``invstd = rsqrt(running_var + eps)`` there (a small eps added to an fp16 variance would underflow)."""
    c = compute_dtype(x)
    mean = running_mean if running_mean.dtype == c else running_mean.to(c)  # no .to(same): opcheck
    var = running_var if running_var.dtype == c else running_var.to(c)
    return mean, torch.rsqrt(var + eps)


def compose_eval(forward: Callable) -> Callable:
    """A backend's batch_norm_act_eval from its batch_norm_act_forward and ``eval_stats``."""

    def batch_norm_act_eval(x, running_mean, running_var, weight, bias, prelu_weight, eps: float, act: int,
                            slope: float):
        return forward(x, *eval_stats(x, running_mean, running_var, eps), weight, bias, prelu_weight, act, slope)

    return batch_norm_act_eval


def compose_backward(reduce: Callable, elemt: Callable) -> Callable:
    """A backend's batch_norm_act_backward from its backward_reduce and backward_elemt."""

    def batch_norm_act_backward(grad, x, mean, invstd, weight, bias, prelu_weight, act: int, slope: float,
                                training: bool, p: float = 0.0, seed: int = 0):
        sum_dz, sum_dz_xhat, grad_prelu = reduce(grad, x, mean, invstd, weight, bias, prelu_weight, act, slope, p,
                                                 seed)
        a, q = (sum_dz, sum_dz_xhat) if training else (torch.zeros_like(sum_dz), torch.zeros_like(sum_dz_xhat))
        count = max(1, x.numel() // max(1, x.shape[1]))
        gx = elemt(grad, x, mean, invstd, weight, bias, prelu_weight, a, q, count, act, slope, p, seed)
        return gx, sum_dz, sum_dz_xhat, grad_prelu

    return batch_norm_act_backward


batch_norm_act_train = compose_train(batch_norm_stats, batch_norm_act_forward)
batch_norm_act_eval = compose_eval(batch_norm_act_forward)
batch_norm_act_backward = compose_backward(batch_norm_act_backward_reduce, batch_norm_act_backward_elemt)

"""FusedAdam and FusedAdamW: torch.optim.Adam/AdamW with clipping and the update fused."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from dlkernels.ops import optim as ops
from dlkernels.optim._fused import _FusedOptimizer, scalar

_COMMON_DOC = r"""
    Exact update, per parameter ``p`` with gradient ``g`` at step ``t`` (torch's for-loop Adam,
    operation by operation; ``lr`` and the bias corrections computed in double precision)::

        g  = clamp(g / grad_scale, -clip_value, clip_value) * clip_coef   # see clipping below
        g  = -g                                     if maximize
        p  = p * (1 - lr * weight_decay)            if decoupled_weight_decay (AdamW)
        g  = g + weight_decay * p                   otherwise, if weight_decay != 0
        m  = lerp(m, g, 1 - beta1)                  # state "exp_avg"
        v  = v * beta2 + (1 - beta2) * g * g        # state "exp_avg_sq"
        vm = maximum(vm, v)                         if amsgrad  # state "max_exp_avg_sq"
        p  = p - lr / (1 - beta1**t) * m / (sqrt(vm if amsgrad else v) / sqrt(1 - beta2**t) + eps)

    Clipping is optimizer-wide: the norm is over every parameter of every group. First
    ``clip_grad_value_(clip_value)``, then ``clip_grad_norm_(max_grad_norm, norm_type)``:
    ``clip_coef = min(1, max_grad_norm / (total_norm + 1e-6))``. Gradients are never rewritten;
    the coefficient is applied inside the update. ``self.grad_norm`` holds ``total_norm`` (a 0-d
    tensor on the device, after value clipping and unscaling, before norm clipping).

    DTensor parameters (FSDP2 ``fully_shard``, or any DeviceMesh with Shard/Replicate placements):
    each rank updates its local shards; the norm spans all shards on all ranks (one all-reduce per
    step, on the device), so ``grad_norm``, the clipping and a skip on a non-finite value anywhere
    are the same on every rank. State is DTensors laid out as the parameters (torch's keys). All
    parameters must be DTensors on one DeviceMesh, or all plain tensors (ValueError otherwise).

    Arguments (those of torch.optim.Adam, with the same defaults, checks and messages):
        params: iterable of parameters or of dicts defining parameter groups.
        lr (float or 1-element Tensor): learning rate (a CUDA tensor is read once per step).
        betas (tuple[float, float]): coefficients of the running averages of g and g * g.
        eps (float): added to the denominator.
        weight_decay (float): L2 penalty (Adam) or decoupled decay coefficient (AdamW).
        amsgrad (bool): keep the maximum of the second moments (AMSGrad).
        maximize (bool): maximize the objective instead of minimizing it.
        decoupled_weight_decay (bool, Adam only): AdamW's decay.
        foreach, fused, capturable: accepted and stored in the param groups for compatibility;
            they change nothing (the step is always the fused kernel).
        differentiable: must be False (raises otherwise).
    Optimizer-wide arguments:
        max_grad_norm (float or None): clip by the global gradient norm (> 0).
        norm_type (float): order of that norm (> 0; ``float("inf")`` for the max).
        clip_value (float or None): clamp each gradient element to [-clip_value, clip_value] (> 0).
        on_nonfinite ("skip", "error", "propagate"): with a non-finite total norm, skip the step
            leaving parameters and state untouched (no host sync), raise RuntimeError (syncs), or
            do what torch does (NaN/inf flow into the parameters).
        state_dtype (torch.float32 or None): state dtype of float16/bfloat16 parameters;
            None keeps the parameter dtype (torch's behaviour). Other dtypes keep theirs.

    AMP: ``torch.amp.GradScaler.step(opt)`` hands over ``grad_scale``/``found_inf`` (as to torch's
    fused optimizers): gradients are unscaled inside the kernels, the norm is that of the unscaled
    gradients, and a step with ``found_inf`` is skipped on the device.
"""


class _AdamBase(_FusedOptimizer):
    _state_keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    _sparse_message = "Adam does not support sparse gradients, please consider SparseAdam instead"

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        state["step"] = self._new_step(p)
        state["exp_avg"] = self._new_state(p)
        state["exp_avg_sq"] = self._new_state(p)
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = self._new_state(p)

    def _fused_step(self, group, params, states, grads, grad_scale, coef, skip) -> None:
        st = states
        beta1, beta2 = group["betas"]
        ops.adam_step_(
            params, [s["exp_avg"] for s in st], [s["exp_avg_sq"] for s in st],
            [s["max_exp_avg_sq"] for s in st] if group["amsgrad"] else [], [s["step"] for s in st], grads,
            grad_scale, coef, skip, self._clip_arg(), scalar(group["lr"]), scalar(beta1), scalar(beta2),
            float(group["eps"]), float(group["weight_decay"]), bool(group["amsgrad"]), bool(group["maximize"]),
            bool(group["decoupled_weight_decay"]))


class FusedAdam(_AdamBase, torch.optim.Adam):
    __doc__ = "Adam with gradient clipping and the update fused in one kernel per step." + _COMMON_DOC

    def __init__(self, params: ParamsT, lr: float | Tensor = 1e-3,
                 betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0, amsgrad: bool = False, *, foreach: bool | None = None,
                 maximize: bool = False, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, decoupled_weight_decay: bool = False,
                 max_grad_norm: float | None = None, norm_type: float = 2.0, clip_value: float | None = None,
                 on_nonfinite: str = "skip", state_dtype: torch.dtype | None = torch.float32) -> None:
        torch.optim.Adam.__init__(self, params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                                  maximize=maximize, capturable=capturable, differentiable=differentiable,
                                  fused=fused, decoupled_weight_decay=decoupled_weight_decay)
        self._setup_fused(max_grad_norm, norm_type, clip_value, on_nonfinite, state_dtype, differentiable)


class FusedAdamW(_AdamBase, torch.optim.AdamW):
    __doc__ = ("AdamW (decoupled weight decay, default 1e-2) with gradient clipping and the update fused."
               + _COMMON_DOC)

    def __init__(self, params: ParamsT, lr: float | Tensor = 1e-3,
                 betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, max_grad_norm: float | None = None, norm_type: float = 2.0,
                 clip_value: float | None = None, on_nonfinite: str = "skip",
                 state_dtype: torch.dtype | None = torch.float32) -> None:
        torch.optim.AdamW.__init__(self, params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                                   foreach=foreach, capturable=capturable, differentiable=differentiable,
                                   fused=fused)
        self._setup_fused(max_grad_norm, norm_type, clip_value, on_nonfinite, state_dtype, differentiable)

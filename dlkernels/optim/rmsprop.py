"""FusedRMSprop: torch.optim.RMSprop with clipping and the update fused."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from dlkernels.ops import optim as ops
from dlkernels.optim._fused import _FusedOptimizer, scalar


class FusedRMSprop(_FusedOptimizer, torch.optim.RMSprop):
    r"""RMSprop with gradient clipping and the update fused in one kernel per step.

    Exact update, per parameter ``p`` with gradient ``g`` (torch's for-loop RMSprop, operation
    by operation)::

        g   = clamp(g / grad_scale, -clip_value, clip_value) * clip_coef   # see clipping below
        g   = -g                                   if maximize
        g   = g + weight_decay * p                 if weight_decay != 0
        v   = alpha * v + (1 - alpha) * g * g      # state "square_avg"
        if centered:
            ga  = lerp(ga, g, 1 - alpha)           # state "grad_avg"
            avg = sqrt(v - ga * ga) + eps
        else:
            avg = sqrt(v) + eps
        if momentum > 0:
            b = momentum * b + g / avg             # state "momentum_buffer"
            p = p - lr * b
        else:
            p = p - lr * g / avg

    Arguments (those of torch.optim.RMSprop, with the same defaults, checks and messages):
        params: iterable of parameters or of dicts defining parameter groups.
        lr (float or 1-element Tensor), alpha (float), eps (float), weight_decay (float),
        momentum (float), centered (bool), maximize (bool): as in the update above.
        foreach, capturable: accepted and stored for compatibility; they change nothing.
        differentiable: must be False (raises otherwise).
    Optimizer-wide arguments, clipping, AMP and state dtypes: as :class:`FusedAdam`
    (``max_grad_norm``, ``norm_type``, ``clip_value``, ``on_nonfinite``, ``state_dtype``;
    ``self.grad_norm``). The state keys are torch's: step, square_avg, momentum_buffer, grad_avg.
    """

    _state_keys = ("square_avg", "momentum_buffer", "grad_avg")
    _sparse_message = "RMSprop does not support sparse gradients"

    def __init__(self, params: ParamsT, lr: float | Tensor = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0, momentum: float = 0, centered: bool = False, capturable: bool = False,
                 foreach: bool | None = None, maximize: bool = False, differentiable: bool = False, *,
                 max_grad_norm: float | None = None, norm_type: float = 2.0, clip_value: float | None = None,
                 on_nonfinite: str = "skip", state_dtype: torch.dtype | None = torch.float32) -> None:
        torch.optim.RMSprop.__init__(self, params, lr, alpha, eps, weight_decay, momentum, centered,
                                     capturable, foreach, maximize, differentiable)
        self._setup_fused(max_grad_norm, norm_type, clip_value, on_nonfinite, state_dtype, differentiable)

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        state["step"] = self._new_step(p)
        state["square_avg"] = self._new_state(p)
        if group["momentum"] > 0:
            state["momentum_buffer"] = self._new_state(p)
        if group["centered"]:
            state["grad_avg"] = self._new_state(p)

    def _fused_step(self, group, params, states, grads, grad_scale, coef, skip) -> None:
        st = states
        momentum, centered = float(group["momentum"]), bool(group["centered"])
        ops.rmsprop_step_(
            params, [s["square_avg"] for s in st], [s["grad_avg"] for s in st] if centered else [],
            [s["momentum_buffer"] for s in st] if momentum > 0 else [], [s["step"] for s in st], grads,
            grad_scale, coef, skip, self._clip_arg(), scalar(group["lr"]), float(group["alpha"]),
            float(group["eps"]), float(group["weight_decay"]), momentum, centered, bool(group["maximize"]))

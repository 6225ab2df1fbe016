"""Custom ops of the optim family: the global gradient norm, and fused Adam/AdamW and RMSprop
steps that update lists of parameters and their state in place (mutating ops, no autograd).

Every tensor list of one step call shares a device, a parameter dtype and a state dtype
(dlkernels.optim groups them). The clip coefficient, GradScaler's scale and the skip flag are
0-d tensors read by the kernel, so a step never waits for the device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dlkernels._backend import impl, use_backend
from dlkernels.ops._op import custom_op

_FAMILY = "optim"


def _impl(name: str, device: torch.device):
    return impl(_FAMILY, name, device)


@custom_op("dlkernels::grad_norm", mutates_args=())
def grad_norm(grads: list[Tensor], norm_type: float, clip_value: float, grad_scale: Tensor | None) -> Tensor:
    """norm_type-norm of all gradients together, after unscaling (1/grad_scale) and clamping to
    [-clip_value, clip_value]; a 0-d float32 tensor (float64 when every gradient is float64)."""
    return _impl("grad_norm", grads[0].device)(grads, norm_type, clip_value, grad_scale)


@grad_norm.register_fake
def _(grads: list[Tensor], norm_type: float, clip_value: float, grad_scale: Tensor | None) -> Tensor:
    dtype = torch.float64 if all(g.dtype == torch.float64 for g in grads) else torch.float32
    return grads[0].new_empty((), dtype=dtype)


@custom_op(
    "dlkernels::adam_step_", mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps")
)
def adam_step_(params: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
               max_exp_avg_sqs: list[Tensor], steps: list[Tensor], grads: list[Tensor],
               grad_scale: Tensor | None, clip_coef: Tensor | None, skip: Tensor | None, clip_value: float,
               lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, amsgrad: bool,
               maximize: bool, decoupled_weight_decay: bool) -> None:
    """One Adam (decoupled_weight_decay: AdamW) step of every tensor in the lists."""
    if params:
        _impl("adam_step_", params[0].device)(
            params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, grads, grad_scale, clip_coef, skip,
            clip_value, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay)


@adam_step_.register_fake
def _(*args, **kwargs) -> None:
    return None


@custom_op(
    "dlkernels::rmsprop_step_", mutates_args=("params", "square_avgs", "grad_avgs", "momentum_buffers", "steps")
)
def rmsprop_step_(params: list[Tensor], square_avgs: list[Tensor], grad_avgs: list[Tensor],
                  momentum_buffers: list[Tensor], steps: list[Tensor], grads: list[Tensor],
                  grad_scale: Tensor | None, clip_coef: Tensor | None, skip: Tensor | None, clip_value: float,
                  lr: float, alpha: float, eps: float, weight_decay: float, momentum: float, centered: bool,
                  maximize: bool) -> None:
    """One RMSprop step of every tensor in the lists."""
    if params:
        _impl("rmsprop_step_", params[0].device)(
            params, square_avgs, grad_avgs, momentum_buffers, steps, grads, grad_scale, clip_coef, skip,
            clip_value, lr, alpha, eps, weight_decay, momentum, centered, maximize)


@rmsprop_step_.register_fake
def _(*args, **kwargs) -> None:
    return None


# ---- `python -m dlkernels` ----

def self_check(device: torch.device) -> float:
    """Max abs difference to the reference over 3 clipped FusedAdamW and FusedRMSprop steps."""
    from dlkernels.optim import FusedAdamW, FusedRMSprop  # built on this module

    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) for s in ((37,), (5, 7))]
    grads = [[torch.randn(p.shape, generator=gen) for p in init] for _ in range(3)]

    def run() -> list[torch.Tensor]:
        out = []
        for cls, kw in ((FusedAdamW, {"amsgrad": True}), (FusedRMSprop, {"momentum": 0.9, "centered": True})):
            ps = [torch.nn.Parameter(p.to(device)) for p in init]
            opt = cls(ps, lr=0.01, max_grad_norm=1.0, **kw)
            for gs in grads:
                for p, g in zip(ps, gs, strict=True):
                    p.grad = g.to(device)
                opt.step()
            out += [p.detach() for p in ps]
        return out

    got = run()
    with use_backend("reference"):
        want = run()
    return max((a - b).abs().max().item() for a, b in zip(got, want, strict=True))

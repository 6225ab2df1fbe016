"""Adam/AdamW/RMSprop steps and the global gradient norm in plain torch (the spec of the optim
kernels, and the fallback backend).

The update of each tensor is torch.optim's single-tensor formula, op by op, computed in float32
for float16/bfloat16 parameters (float64 for float64) and rounded once into the storage dtypes.
The step counter, the skip flag and the clip coefficient stay tensors, so nothing here reads a
value back to the host.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dlkernels._dtypes import compute_dtype


def _transform(g: Tensor, dt: torch.dtype, grad_scale: Tensor | None, clip_value: float,
               clip_coef: Tensor | None, maximize: bool) -> Tensor:
    """Unscale, clamp to [-clip_value, clip_value], times the norm clip coefficient, negate."""
    g = g.to(dt)
    if grad_scale is not None:
        g = g * (1.0 / grad_scale.double()).to(dt)
    g = g.clamp(-clip_value, clip_value)
    if clip_coef is not None:
        g = g * clip_coef.to(device=g.device, dtype=dt)
    return -g if maximize else g


def grad_norm(grads: list[Tensor], norm_type: float, clip_value: float, grad_scale: Tensor | None) -> Tensor:
    """Norm of all (unscaled, value-clipped) gradients together; float64 when all are float64."""
    out_dtype = torch.float64 if all(g.dtype == torch.float64 for g in grads) else torch.float32
    gs = [_transform(g, torch.float64, grad_scale, clip_value, None, False).flatten() for g in grads]
    return torch.linalg.vector_norm(torch.cat(gs), norm_type).to(out_dtype)


def _keep(skip: Tensor | None, old: Tensor, new: Tensor) -> Tensor:
    return new if skip is None else torch.where(skip.to(old.device) != 0, old, new)


def _advance(steps: list[Tensor], skip: Tensor | None) -> None:
    for s in steps:
        s.add_(1.0 if skip is None else (skip.to(s.device) == 0).to(s.dtype))


def adam_step_(params: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
               max_exp_avg_sqs: list[Tensor], steps: list[Tensor], grads: list[Tensor],
               grad_scale: Tensor | None, clip_coef: Tensor | None, skip: Tensor | None, clip_value: float,
               lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, amsgrad: bool,
               maximize: bool, decoupled_weight_decay: bool) -> None:
    _advance(steps, skip)
    for i, p in enumerate(params):
        dt = compute_dtype(p)
        step = steps[i].to(p.device, torch.float64)
        bc2_sqrt = (1 - beta2**step) ** 0.5
        neg_step_size = (-(lr / (1 - beta1**step))).to(dt)
        g = _transform(grads[i], dt, grad_scale, clip_value, clip_coef, maximize)
        pc, m, v = p.to(dt), exp_avgs[i].to(dt), exp_avg_sqs[i].to(dt)
        if weight_decay != 0:
            if decoupled_weight_decay:
                pc = pc * (1 - lr * weight_decay)
            else:
                g = g.add(pc, alpha=weight_decay)
        m = m.lerp(g, 1 - beta1)
        v = v.mul(beta2).addcmul_(g, g, value=1 - beta2)
        s = v
        if amsgrad:
            s = torch.maximum(max_exp_avg_sqs[i].to(dt), v)
            max_exp_avg_sqs[i].copy_(_keep(skip, max_exp_avg_sqs[i], s.to(max_exp_avg_sqs[i].dtype)))
        denom = (s.sqrt() / bc2_sqrt.to(dt)).add_(eps)
        pc = pc + neg_step_size * m / denom
        p.copy_(_keep(skip, p, pc.to(p.dtype)))
        exp_avgs[i].copy_(_keep(skip, exp_avgs[i], m.to(exp_avgs[i].dtype)))
        exp_avg_sqs[i].copy_(_keep(skip, exp_avg_sqs[i], v.to(exp_avg_sqs[i].dtype)))


def rmsprop_step_(params: list[Tensor], square_avgs: list[Tensor], grad_avgs: list[Tensor],
                  momentum_buffers: list[Tensor], steps: list[Tensor], grads: list[Tensor],
                  grad_scale: Tensor | None, clip_coef: Tensor | None, skip: Tensor | None, clip_value: float,
                  lr: float, alpha: float, eps: float, weight_decay: float, momentum: float, centered: bool,
                  maximize: bool) -> None:
    _advance(steps, skip)
    for i, p in enumerate(params):
        dt = compute_dtype(p)
        g = _transform(grads[i], dt, grad_scale, clip_value, clip_coef, maximize)
        pc, sq = p.to(dt), square_avgs[i].to(dt)
        if weight_decay != 0:
            g = g.add(pc, alpha=weight_decay)
        sq = sq.mul(alpha).addcmul_(g, g, value=1 - alpha)
        if centered:
            ga = grad_avgs[i].to(dt).lerp(g, 1 - alpha)
            avg = sq.addcmul(ga, ga, value=-1).sqrt_()
            grad_avgs[i].copy_(_keep(skip, grad_avgs[i], ga.to(grad_avgs[i].dtype)))
        else:
            avg = sq.sqrt()
        avg = avg.add_(eps)
        if momentum > 0:
            buf = momentum_buffers[i].to(dt).mul(momentum).addcdiv_(g, avg)
            momentum_buffers[i].copy_(_keep(skip, momentum_buffers[i], buf.to(momentum_buffers[i].dtype)))
            pc = pc.add(buf, alpha=-lr)
        else:
            pc = pc.addcdiv(g, avg, value=-lr)
        p.copy_(_keep(skip, p, pc.to(p.dtype)))
        square_avgs[i].copy_(_keep(skip, square_avgs[i], sq.to(square_avgs[i].dtype)))

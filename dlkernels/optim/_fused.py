"""What FusedAdam, FusedAdamW and FusedRMSprop share: optimizer-wide clipping settings, the
global gradient norm, GradScaler's grad_scale/found_inf protocol, state dtypes and loading."""

from __future__ import annotations

from collections.abc import Callable
from itertools import chain
from typing import Any

import torch
from torch import Tensor

from dlkernels._dtypes import FLOAT_DTYPES, REDUCED_DTYPES
from dlkernels._layout import is_dense
from dlkernels.ops import optim as ops

_NONFINITE = ("skip", "error", "propagate")


def _combine_norms(norms: list[Tensor], norm_type: float) -> Tensor:
    """One norm from per-device norms (on the first device)."""
    if len(norms) == 1:
        return norms[0]
    stacked = torch.stack([n.to(norms[0].device, torch.float64) for n in norms])
    return torch.linalg.vector_norm(stacked, norm_type).to(norms[0].dtype)


class _FusedOptimizer(torch.optim.Optimizer):
    """Mixin placed before a torch.optim class: that class keeps validation, defaults and
    param_group keys; this one replaces step() with fused kernels and keeps state precision."""

    # GradScaler then hands over grad_scale/found_inf instead of unscaling the gradients itself.
    _step_supports_amp_scaling = True
    _state_keys: tuple[str, ...] = ()
    _name = ""

    def _setup_fused(self, max_grad_norm: float | None, norm_type: float, clip_value: float | None,
                     on_nonfinite: str, state_dtype: torch.dtype | None, differentiable: bool) -> None:
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be a positive number or None, got {max_grad_norm}")
        if clip_value is not None and not clip_value > 0:
            raise ValueError(f"clip_value must be a positive number or None, got {clip_value}")
        if not float(norm_type) > 0:
            raise ValueError(f"norm_type must be positive (or inf), got {norm_type}")
        if on_nonfinite not in _NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {_NONFINITE}, got {on_nonfinite!r}")
        if state_dtype not in (None, torch.float32):
            raise ValueError(f"state_dtype must be torch.float32 or None, got {state_dtype}")
        if differentiable:
            raise RuntimeError(f"{type(self).__name__} does not support differentiable=True")
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.norm_type = float(norm_type)
        self.clip_value = None if clip_value is None else float(clip_value)
        self.on_nonfinite = on_nonfinite
        self.state_dtype = state_dtype
        self.grad_norm: Tensor | None = None

    # ---- state ----

    def _state_dtype_for(self, p: Tensor) -> torch.dtype:
        low = p.dtype in REDUCED_DTYPES
        return self.state_dtype if (low and self.state_dtype is not None) else p.dtype

    def _new_state(self, p: Tensor) -> Tensor:
        return torch.zeros_like(p, dtype=self._state_dtype_for(p), memory_format=torch.preserve_format)

    @staticmethod
    def _new_step(p: Tensor) -> Tensor:
        # CPU params: a CPU step, as torch. CUDA params: on the device, where the kernel can
        # leave it unchanged on a skipped step without a host sync (as torch's fused Adam).
        return torch.zeros((), dtype=torch.float32, device=p.device)

    def _check_param(self, p: Tensor) -> None:
        if p.grad.is_sparse:
            raise RuntimeError(self._sparse_message)
        if p.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{type(self).__name__}: parameters must be float32, float64, float16 or "
                            f"bfloat16, got {p.dtype}")
        if not (p.is_contiguous() or is_dense(p)):
            raise ValueError(f"{type(self).__name__}: parameters must be dense tensors (got a view with "
                             f"strides {p.stride()}); the fused kernels walk memory linearly")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loading, except that state tensors keep this optimizer's state dtype (torch casts
        them to the parameter dtype, which would round float32 state of float16 parameters) and
        the same memory layout as their parameter; steps become float32 on the parameter's device."""
        super().load_state_dict(state_dict)
        saved = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        mine = chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, p in zip(saved, mine, strict=True):
            for key, value in state_dict["state"].get(pid, {}).items():
                if key == "step":  # a number in old checkpoints
                    self.state[p][key] = torch.as_tensor(value).detach().to(p.device, torch.float32).clone()
                elif torch.is_tensor(value):
                    self.state[p][key] = torch.empty_like(p, dtype=self._state_dtype_for(p)).copy_(value)

    # ---- the step ----

    def _clip_and_skip(self, grads: list[Tensor]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """(grad_scale, clip coefficient, skip flag) as 0-d tensors; sets self.grad_norm."""
        grad_scale: Tensor | None = getattr(self, "grad_scale", None)
        found_inf: Tensor | None = getattr(self, "found_inf", None)
        clip_value = self.clip_value if self.clip_value is not None else float("inf")
        coef = skip = None
        if self.max_grad_norm is not None or self.on_nonfinite != "propagate":
            by_device: dict[torch.device, list[Tensor]] = {}
            for g in grads:
                by_device.setdefault(g.device, []).append(g)
            norms = [ops.grad_norm(gs, self.norm_type, clip_value,
                                   None if grad_scale is None else grad_scale.to(dev))
                     for dev, gs in by_device.items()]
            norm = _combine_norms(norms, self.norm_type)
            self.grad_norm = norm
            if self.max_grad_norm is not None:  # clip_grad_norm_'s coefficient
                coef = torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0)
            if self.on_nonfinite == "skip":
                skip = (~torch.isfinite(norm)).float()
            elif self.on_nonfinite == "error":
                overflow = found_inf is not None and bool(found_inf.item())  # GradScaler skips these
                if not overflow and not bool(torch.isfinite(norm)):
                    raise RuntimeError(
                        f"{type(self).__name__}: the total norm of order {self.norm_type} of the gradients is "
                        f"non-finite ({norm.item()}); the step was not taken (on_nonfinite='error')")
        if found_inf is not None:
            found = (found_inf != 0).float()
            skip = found if skip is None else torch.maximum(skip, found.to(skip.device))
        return grad_scale, coef, skip

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step for every parameter with a gradient; returns closure's loss (if given)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                self._check_param(p)
                if len(self.state[p]) == 0:
                    self._init_state(p, group)
            groups.append((group, params))
        grads = [p.grad for _, ps in groups for p in ps]
        if not grads:
            return loss
        grad_scale, coef, skip = self._clip_and_skip(grads)
        for group, params in groups:
            buckets: dict[tuple, list[Tensor]] = {}
            for p in params:  # one kernel call per (device, param dtype, state dtype)
                key = (p.device, p.dtype, self.state[p][self._state_keys[0]].dtype)
                buckets.setdefault(key, []).append(p)
            for (device, _, _), ps in buckets.items():
                def on(t: Tensor | None, device: torch.device = device) -> Tensor | None:
                    return None if t is None else t.to(device)
                self._fused_step(group, ps, [_grad_like(p) for p in ps], on(grad_scale), on(coef), on(skip))
        return loss

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def _fused_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                    grad_scale: Tensor | None, coef: Tensor | None, skip: Tensor | None) -> None:
        raise NotImplementedError

    def _clip_arg(self) -> float:
        return self.clip_value if self.clip_value is not None else float("inf")


def _grad_like(p: Tensor) -> Tensor:
    """p.grad in p's memory layout (the kernels walk p, grad and state in memory order)."""
    g = p.grad
    return g if g.stride() == p.stride() or p.numel() <= 1 else torch.empty_like(p).copy_(g)


def scalar(x: float | Tensor) -> float:
    """A float hyperparameter from a number or a 1-element tensor (a CUDA tensor syncs)."""
    return float(x.item()) if isinstance(x, Tensor) else float(x)

"""What FusedAdam, FusedAdamW and FusedRMSprop share: optimizer-wide clipping settings, the
global gradient norm, GradScaler's grad_scale/found_inf protocol, state dtypes and loading, and
DTensor parameters (FSDP2, DeviceMesh).

DTensors are handled here and nowhere below: parameters, gradients and state are unwrapped to
this rank's local shards before the kernels (which update them in place, so the DTensors see the
update), and the only communication of a step is one all-reduce of a few numbers for the global
gradient norm (`_global_norm`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from itertools import chain
from typing import Any

import torch
from torch import Tensor

from dlkernels._dtypes import FLOAT_DTYPES, REDUCED_DTYPES
from dlkernels._layout import is_dense
from dlkernels.ops import optim as ops

if torch.distributed.is_available():
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, distribute_tensor
else:  # builds without torch.distributed have no DTensor either
    dist = DTensor = distribute_tensor = None  # type: ignore[assignment]

_NONFINITE = ("skip", "error", "propagate")


def _is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def _local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (its storage: in-place updates reach the DTensor); t otherwise.
    (What DTensor.to_local() returns without autograd, minus its per-call cost.)"""
    return t._local_tensor if _is_dtensor(t) else t


def _counted(p: Tensor, coordinate: list[int]) -> bool:
    """Whether this rank's shard of DTensor p enters the summed norm. Each mesh dim on which p is
    replicated holds copies: only coordinate 0 along it counts them, so the all-reduced sum holds
    every element once (Shard dims split p, every coordinate counts)."""
    return all(c == 0 for c, pl in zip(coordinate, p.placements, strict=True) if pl.is_replicate())


def _all_reduce_over_mesh(buf: Tensor, op: Any, mesh: Any) -> None:
    """In-place all-reduce of buf over every rank of mesh (async on NCCL: no host sync)."""
    if buf.device.type != mesh.device_type:  # e.g. FSDP2's CPU offload on a CUDA (NCCL) mesh
        on_mesh = buf.to(mesh.device_type)
        _all_reduce_over_mesh(on_mesh, op, mesh)
        buf.copy_(on_mesh)
        return
    if mesh.ndim == 1:
        dist.all_reduce(buf, op, group=mesh.get_group())
    elif mesh.size() == dist.get_world_size():  # the mesh is the whole world: one collective
        dist.all_reduce(buf, op)
    else:  # a sub-mesh of several dims: reducing along each dim in turn reduces over all of them
        for d in range(mesh.ndim):
            dist.all_reduce(buf, op, group=mesh.get_group(d))


def _global_norm(local: Tensor, norm_type: float, found_inf: Tensor | None, mesh: Any,
                 dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """(global norm, global found_inf) from this rank's norm over its shards: ONE all-reduce of
    [sum of |g|^p (the max of |g| for the inf-norm), NaN flag, found_inf] over the mesh.

    NaN travels as a flag because a MAX reduction may keep or drop a NaN depending on operand
    order (gloo's std::max); inf needs no flag (sums and maxima keep it). found_inf rides along so
    that GradScaler's overflow on one rank skips the step on every rank."""
    inf_norm = math.isinf(norm_type)
    x = local.to(torch.float64)
    part = x if inf_norm else x.pow(norm_type)
    flag = torch.isnan(x).to(torch.float64)
    found = torch.zeros_like(x) if found_inf is None else (found_inf.to(x.device) != 0).to(torch.float64)
    buf = torch.stack([part, flag, found])
    _all_reduce_over_mesh(buf, dist.ReduceOp.MAX if inf_norm else dist.ReduceOp.SUM, mesh)
    total = buf[0] if inf_norm else buf[0].pow(1.0 / norm_type)
    total = torch.where(buf[1] > 0, torch.full_like(total, math.nan), total).to(dtype)
    return total, (None if found_inf is None else (buf[2] > 0).to(found_inf.dtype))


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
    _mesh: Any = None  # the DeviceMesh of DTensor parameters; None: plain tensors

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's, then the DTensor layout check (torch's __init__ adds its groups through here)."""
        super().add_param_group(param_group)
        try:
            self._mesh = self._check_layout()
        except ValueError:
            self.param_groups.pop()
            raise

    def _check_layout(self) -> Any:
        """The one DeviceMesh of all parameters (None: all plain tensors), or ValueError naming the
        parameter group. Raised when the optimizer is built, the same way on every rank, so no rank
        can be left waiting in the norm's collective for a rank that failed."""
        name = type(self).__name__
        mesh = first = None
        kinds: list[tuple[int, bool]] = []
        for i, group in enumerate(self.param_groups):
            is_d = [_is_dtensor(p) for p in group["params"]]
            if any(is_d) and not all(is_d):
                raise ValueError(
                    f"{name}: parameter group {i} mixes DTensor parameters (FSDP2 / DeviceMesh) and plain tensors "
                    f"(parameter {is_d.index(False)} is a plain tensor); shard every parameter of the optimizer "
                    "the same way, or give the plain ones an optimizer of their own")
            if is_d:  # an empty group goes with either kind
                kinds.append((i, is_d[0]))
            for j, p in enumerate(group["params"]):
                if not is_d[j]:
                    continue
                if any(pl.is_partial() for pl in p.placements):
                    raise ValueError(f"{name}: parameter group {i}, parameter {j} has placements {p.placements}; "
                                     "parameters must be Shard or Replicate (a Partial value is not the parameter)")
                if mesh is None:
                    mesh, first = p.device_mesh, (i, j)
                elif p.device_mesh != mesh:
                    raise ValueError(
                        f"{name}: parameter group {i}, parameter {j} lives on {p.device_mesh}, but parameter "
                        f"{first[1]} of group {first[0]} on {mesh}; all DTensor parameters of one optimizer must "
                        "share one DeviceMesh (the global gradient norm is one collective over it)")
        if len({d for _, d in kinds}) > 1:
            bad = next(i for i, d in kinds if d != kinds[0][1])
            raise ValueError(
                f"{name}: parameter group {bad} holds {'DTensor' if kinds[bad][1] else 'plain tensor'} parameters "
                f"and group {kinds[0][0]} {'DTensor' if kinds[0][1] else 'plain tensor'} ones; one optimizer takes "
                "either DTensors on one DeviceMesh or plain tensors (its gradient norm spans all of them)")
        return mesh

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

    # torch's Optimizer.__getstate__ keeps defaults, state and param_groups only: without these the
    # settings would be lost by copy.deepcopy and pickle, and step() would fail.
    _SETTINGS = ("max_grad_norm", "norm_type", "clip_value", "on_nonfinite", "state_dtype", "grad_norm")

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update({k: self.__dict__[k] for k in self._SETTINGS if k in self.__dict__})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._mesh = self._check_layout()  # a DeviceMesh is not pickled: found again from the parameters

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

    def _check_param(self, p: Tensor, grad: Tensor) -> None:
        """p and grad: plain tensors (a DTensor's local shard)."""
        if grad.is_sparse:
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
                    value = value.full_tensor() if _is_dtensor(value) else value  # 0-d: replicated, no comm
                    self.state[p][key] = torch.as_tensor(value).detach().to(p.device, torch.float32).clone()
                elif torch.is_tensor(value):
                    self.state[p][key] = torch.empty_like(p, dtype=self._state_dtype_for(p)).copy_(_as_like(value, p))

    # ---- the step ----

    def _clip_and_skip(self, grads: list[Tensor], mesh: Any = None, norm_dtype: torch.dtype | None = None,
                       norm_device: torch.device | None = None
                       ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """(grad_scale, clip coefficient, skip flag) as 0-d tensors; sets self.grad_norm.

        With a mesh (DTensor parameters), grads are this rank's counted shards (maybe none) and the
        norm, the non-finite check and found_inf become global through one all-reduce; the norm
        then has norm_dtype and, without local gradients, starts on norm_device."""
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
            if mesh is None:
                norm = _combine_norms(norms, self.norm_type)
            else:  # every rank takes part, even one without gradients: the others wait for it
                local = (_combine_norms(norms, self.norm_type) if norms
                         else torch.zeros((), dtype=norm_dtype, device=norm_device))
                norm, found_inf = _global_norm(local, self.norm_type, found_inf, mesh, norm_dtype)
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

    def _dtensor_grad(self, p: Tensor) -> Tensor:
        """p.grad of a DTensor p, with p's placements (FSDP2's are already; another layout, e.g. a
        Partial gradient, is redistributed: the same collective on every rank)."""
        g = p.grad
        if not _is_dtensor(g):
            raise TypeError(f"{type(self).__name__}: a DTensor parameter ({tuple(p.shape)}, {p.placements}) has a "
                            f"gradient of type {type(g).__name__}; it must be a DTensor too")
        return g if g.placements == p.placements else g.redistribute(p.device_mesh, p.placements)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step for every parameter with a gradient; returns closure's loss (if given)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        mesh = self._mesh
        coordinate = None
        if mesh is not None:
            coordinate = mesh.get_coordinate()
            if coordinate is None:  # this rank is outside the mesh: it holds nothing to update or reduce
                return loss
        # (group, [(p, p's tensor, gradient)]), plain tensors: this rank's shards of DTensors
        groups: list[tuple[dict[str, Any], list[tuple[Tensor, Tensor, Tensor]]]] = []
        counted: list[Tensor] = []  # the gradients in this rank's part of the global norm
        for group in self.param_groups:
            items = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if mesh is None:
                    item = (p, p, p.grad)
                else:
                    item = (p, _local(p), _local(self._dtensor_grad(p)))
                self._check_param(item[1], item[2])
                if len(self.state[p]) == 0:
                    self._init_state(p, group)
                items.append(item)
                if mesh is None or _counted(p, coordinate):
                    counted.append(item[2])
            groups.append((group, items))
        if mesh is None:
            if not counted:
                return loss
            grad_scale, coef, skip = self._clip_and_skip(counted)
        else:
            params = [p for g in self.param_groups for p in g["params"]]
            # the same on every rank (all hold the same parameters), whichever gradients a rank has
            dtype = torch.float64 if all(p.dtype == torch.float64 for p in params) else torch.float32
            grad_scale, coef, skip = self._clip_and_skip(counted, mesh, dtype, _local(params[0]).device)
        for group, items in groups:
            buckets: dict[tuple, list[tuple[Tensor, Tensor, Tensor]]] = {}
            for item in items:  # one kernel call per (device, param dtype, state dtype)
                p, t = item[0], item[1]
                key = (t.device, t.dtype, self.state[p][self._state_keys[0]].dtype)
                buckets.setdefault(key, []).append(item)
            for (device, _, _), its in buckets.items():
                def on(t: Tensor | None, device: torch.device = device) -> Tensor | None:
                    return None if t is None else t.to(device)
                states = ([self.state[p] for p, _, _ in its] if mesh is None
                          else [{k: _local(v) for k, v in self.state[p].items()} for p, _, _ in its])
                self._fused_step(group, [t for _, t, _ in its], states, [_grad_like(t, g) for _, t, g in its],
                                 on(grad_scale), on(coef), on(skip))
        return loss

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def _fused_step(self, group: dict[str, Any], params: list[Tensor], states: list[dict[str, Tensor]],
                    grads: list[Tensor], grad_scale: Tensor | None, coef: Tensor | None, skip: Tensor | None) -> None:
        """One kernel call; params, states and grads are plain tensors (DTensors' local shards)."""
        raise NotImplementedError

    def _clip_arg(self) -> float:
        return self.clip_value if self.clip_value is not None else float("inf")


def _grad_like(p: Tensor, g: Tensor) -> Tensor:
    """p's gradient g in p's memory layout (the kernels walk p, grad and state in memory order)."""
    return g if g.stride() == p.stride() or p.numel() <= 1 else torch.empty_like(p).copy_(g)


def _as_like(value: Tensor, p: Tensor) -> Tensor:
    """A loaded state tensor laid out as parameter p: for a DTensor p, a DTensor with p's placements
    (a plain full tensor, from an unsharded checkpoint, is cut to this rank's piece without
    communication); for a plain p, a plain tensor."""
    if not _is_dtensor(p):
        return value.full_tensor() if _is_dtensor(value) else value
    if not _is_dtensor(value):
        return distribute_tensor(value.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
    return value if value.placements == p.placements else value.redistribute(p.device_mesh, p.placements)


def scalar(x: float | Tensor) -> float:
    """A float hyperparameter from a number or a 1-element tensor (a CUDA tensor syncs)."""
    return float(x.item()) if isinstance(x, Tensor) else float(x)

"""Batch norm modules: drop-ins for torch's BatchNorm1d/2d/3d and SyncBatchNorm, and the fused
BatchNormAct1d/2d/3d (batch norm + ReLU / leaky ReLU / PReLU in one pass).

They subclass torch's modules, so constructor, buffers, state_dict keys (a torch checkpoint loads
unchanged, and back), repr and input-rank checks are torch's; ``forward`` runs dlkernels' kernels.
Differences from torch, on purpose: ``momentum=None`` uses a tensor factor (no graph break), and
SyncBatchNorm also runs on CPU tensors (gloo).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from dlkernels.nn._twins import register_chain, register_twin
from dlkernels.ops import batch_norm as _ops
from dlkernels.ops.dropout import _check_p

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d",
           "SyncBatchNorm"]


class _FusedForward:
    """torch's _BatchNorm.forward, calling the fused op; subclasses set the activation."""

    activation: str | None = None
    negative_slope: float = 0.01
    sync: bool = False
    process_group = None

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        factor: float | Tensor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative average, as a tensor (no host sync), in float64 as torch's
                factor = 1.0 / self.num_batches_tracked.to(torch.float64)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        running_mean = self.running_mean if use_running else None
        running_var = self.running_var if use_running else None
        if bn_training and self._sync_world() > 1:
            return _ops.sync_batch_norm_act(input, running_mean, running_var, self.weight, self.bias, factor, self.eps,
                                            self.activation, self.negative_slope, self._prelu_weight(),
                                            self.process_group or dist.group.WORLD, dropout=self._dropout_p())
        return _ops.batch_norm_act(input, running_mean, running_var, self.weight, self.bias, bn_training, factor,
                                   self.eps, self.activation, self.negative_slope, self._prelu_weight(),
                                   self._dropout_p())

    def _prelu_weight(self) -> Tensor | None:
        return getattr(self, "prelu_weight", None)  # a Parameter on BatchNormAct(activation="prelu")

    def _dropout_p(self) -> float:
        # BatchNormAct(dropout=p) drops in training mode only, as torch.nn.Dropout: an eval module
        # without running statistics still normalizes with batch statistics, but drops nothing
        return getattr(self, "dropout", 0.0) if self.training else 0.0

    def _sync_world(self) -> int:
        if not self.sync or not dist.is_available() or not dist.is_initialized():
            return 1
        return dist.get_world_size(self.process_group or dist.group.WORLD)


class BatchNorm1d(_FusedForward, torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d (2-D or 3-D input) on dlkernels kernels."""


class BatchNorm2d(_FusedForward, torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d (4-D input; NCHW or channels_last, no layout copy)."""


class BatchNorm3d(_FusedForward, torch.nn.BatchNorm3d):
    """torch.nn.BatchNorm3d (5-D input)."""


class SyncBatchNorm(_FusedForward, torch.nn.SyncBatchNorm):
    """torch.nn.SyncBatchNorm: statistics over all ranks of ``process_group`` (default: world),
    which may hold different batch sizes. Also runs on CPU tensors (gloo). Without an initialized
    process group it behaves as BatchNorm."""

    sync = True

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None, *,
                 bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, process_group, device, dtype,
                         bias=bias)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group=None) -> torch.nn.Module:
        """Replace every BatchNorm*D (torch's or ours) by a SyncBatchNorm with the same state;
        fused BatchNormAct modules keep their activation and get ``sync=True``."""
        if isinstance(module, _BatchNormAct):
            module.sync, module.process_group = True, process_group
            out = module
        elif isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
            out = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                      process_group, bias=getattr(module, "bias", None) is not None or not module.affine)
            if module.affine:
                with torch.no_grad():
                    out.weight = module.weight
                    out.bias = module.bias
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.training = module.training
            if hasattr(module, "qconfig"):
                out.qconfig = module.qconfig
        else:
            out = module
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return out


class _BatchNormAct(_FusedForward, torch.nn.modules.batchnorm._BatchNorm):
    # A module elsewhere in the model whose ``weight`` is the PReLU slope (set by ``adopt``, not registered
    # here, so the weight keeps its own state_dict key and appears once in parameters()).
    _prelu_owner: torch.nn.Module | None = None

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, activation: str | None = "leaky_relu",
                 negative_slope: float = 0.01, prelu_parameters: int = 1, prelu_init: float = 0.25,
                 dropout: float = 0.0, sync: bool = False, process_group=None, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        if activation not in _ops.ACTIVATIONS:
            raise ValueError(f"activation must be one of {list(_ops.ACTIVATIONS)}, got {activation!r}")
        self.activation, self.negative_slope = activation, float(negative_slope)
        # torch.nn.Dropout's check and message; the mask is drawn per call (default generator)
        self.dropout, self.sync, self.process_group = _check_p(dropout), sync, process_group
        if activation == "prelu":
            if prelu_parameters not in (1, num_features):
                raise ValueError(f"prelu_parameters must be 1 or num_features={num_features}, got {prelu_parameters}")
            self.prelu_weight = torch.nn.Parameter(
                torch.full((prelu_parameters,), float(prelu_init), device=device, dtype=dtype))
        else:
            self.register_parameter("prelu_weight", None)

    def _prelu_weight(self) -> Tensor | None:
        return self.prelu_weight if self._prelu_owner is None else self._prelu_owner.weight

    # Instance attributes ``adopt`` adds to a torch BatchNorm (``__init__``'s, less the registered prelu_weight).
    _ADOPTED = ("activation", "negative_slope", "dropout", "sync", "process_group", "_prelu_owner", "_adopted_from")

    @classmethod
    def adopt(cls, bn: torch.nn.modules.batchnorm._BatchNorm, activation: str | None,
              negative_slope: float = 0.01, prelu_owner: torch.nn.Module | None = None) -> None:
        """Turn the torch BatchNorm module ``bn`` into this class in place (dlkernels.fuse): same object,
        parameters, buffers, hooks and state_dict keys. For ``activation="prelu"`` the slopes are
        ``prelu_owner.weight``, read at every call and not registered here. ``release`` undoes it."""
        if activation not in _ops.ACTIVATIONS:
            raise ValueError(f"activation must be one of {list(_ops.ACTIVATIONS)}, got {activation!r}")
        if (activation == "prelu") != (prelu_owner is not None):
            raise ValueError("prelu_owner is needed with activation='prelu', and only then")
        if any(name in bn.__dict__ for name in cls._ADOPTED) or "prelu_weight" in bn._parameters:
            raise ValueError(f"{type(bn).__name__} already has BatchNormAct's attributes")
        adopted_from = type(bn)
        bn.__class__ = cls  # first: a layout mismatch raises TypeError before anything changed
        bn.__dict__.update(activation=activation, negative_slope=float(negative_slope), dropout=0.0, sync=False,
                           process_group=None, _prelu_owner=prelu_owner, _adopted_from=adopted_from)
        bn._parameters["prelu_weight"] = None

    def release(self) -> torch.nn.modules.batchnorm._BatchNorm:
        """Undo ``adopt``: back to the torch BatchNorm it was, same object and state."""
        cls = self.__dict__.get("_adopted_from")
        if cls is None:
            raise ValueError("release() undoes adopt(); this module was built as a BatchNormAct")
        for name in self._ADOPTED:
            del self.__dict__[name]
        del self._parameters["prelu_weight"]
        self.__class__ = cls
        return self

    def extra_repr(self) -> str:
        act = f"activation={self.activation!r}"
        if self.activation == "leaky_relu":
            act += f", negative_slope={self.negative_slope}"
        if self.activation == "prelu":
            act += f", prelu_parameters={self._prelu_weight().numel()}"
            if self._prelu_owner is not None:
                act += " (weight shared with a PReLU)"
        drop = f", dropout={self.dropout}" if self.dropout else ""
        return f"{super().extra_repr()}, {act}{drop}" + (", sync=True" if self.sync else "")


class BatchNormAct1d(_BatchNormAct):
    """BatchNorm1d + activation, fused. activation: None, "relu", "leaky_relu", "prelu"."""

    _check_input_dim = torch.nn.BatchNorm1d._check_input_dim


class BatchNormAct2d(_BatchNormAct):
    """BatchNorm2d + activation, fused (NCHW or channels_last)."""

    _check_input_dim = torch.nn.BatchNorm2d._check_input_dim


class BatchNormAct3d(_BatchNormAct):
    """BatchNorm3d + activation, fused."""

    _check_input_dim = torch.nn.BatchNorm3d._check_input_dim


for _torch_cls, _twin in ((torch.nn.BatchNorm1d, BatchNorm1d), (torch.nn.BatchNorm2d, BatchNorm2d),
                          (torch.nn.BatchNorm3d, BatchNorm3d), (torch.nn.SyncBatchNorm, SyncBatchNorm)):
    register_twin(_torch_cls, _twin)
for _torch_cls, _fused in ((torch.nn.BatchNorm1d, BatchNormAct1d), (torch.nn.BatchNorm2d, BatchNormAct2d),
                           (torch.nn.BatchNorm3d, BatchNormAct3d)):
    register_chain(_torch_cls, _fused)
del _torch_cls, _twin, _fused

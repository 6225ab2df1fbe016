"""Dropout modules whose mask is never stored (docs/dropout.md), and fused activation + dropout.

Dropout, Dropout1d/2d/3d subclass torch's modules (constructor, repr, state_dict: none), and
PReLUDropout subclasses torch.nn.PReLU (its ``weight`` parameter and state_dict key), so
checkpoints load both ways; ``forward`` runs dlkernels' kernels. Masks come from torch's default
CPU generator, one 64-bit draw per call, so ``torch.manual_seed`` makes them reproducible on every
backend and device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dlkernels import functional as F
from dlkernels.nn._twins import register_chain_dropout, register_twin

__all__ = ["Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "LeakyReLUDropout", "PReLUDropout"]


class Dropout(torch.nn.Dropout):
    """torch.nn.Dropout(p=0.5, inplace=False)."""

    def forward(self, input: Tensor) -> Tensor:
        return F.dropout(input, self.p, self.training, self.inplace)


class Dropout1d(torch.nn.Dropout1d):
    """torch.nn.Dropout1d: whole channels of (N, C, L) or (C, L) inputs."""

    def forward(self, input: Tensor) -> Tensor:
        return F.dropout1d(input, self.p, self.training, self.inplace)


class Dropout2d(torch.nn.Dropout2d):
    """torch.nn.Dropout2d: whole channels of (N, C, H, W) inputs."""

    def forward(self, input: Tensor) -> Tensor:
        return F.dropout2d(input, self.p, self.training, self.inplace)


class Dropout3d(torch.nn.Dropout3d):
    """torch.nn.Dropout3d: whole channels of (N, C, D, H, W) or (C, D, H, W) inputs."""

    def forward(self, input: Tensor) -> Tensor:
        return F.dropout3d(input, self.p, self.training, self.inplace)


class LeakyReLUDropout(torch.nn.Module):
    """``Dropout(p)(LeakyReLU(negative_slope)(x))`` in one pass; identity dropout in eval."""

    def __init__(self, negative_slope: float = 0.01, p: float = 0.5) -> None:
        super().__init__()
        if p < 0 or p > 1:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
        self.negative_slope, self.p = negative_slope, p

    def forward(self, input: Tensor) -> Tensor:
        return F.leaky_relu_dropout(input, self.negative_slope, self.p, self.training)

    def extra_repr(self) -> str:
        return f"negative_slope={self.negative_slope}, p={self.p}"


class PReLUDropout(torch.nn.PReLU):
    """``Dropout(p)(PReLU(num_parameters, init)(x))`` in one pass; the state_dict is PReLU's."""

    def __init__(self, num_parameters: int = 1, init: float = 0.25, p: float = 0.5, device=None, dtype=None) -> None:
        if p < 0 or p > 1:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
        super().__init__(num_parameters, init, device=device, dtype=dtype)
        self.p = p

    def forward(self, input: Tensor) -> Tensor:
        return F.prelu_dropout(input, self.weight, self.p, self.training)

    def extra_repr(self) -> str:
        return f"num_parameters={self.num_parameters}, p={self.p}"


for _torch_cls, _twin in ((torch.nn.Dropout, Dropout), (torch.nn.Dropout1d, Dropout1d), (torch.nn.Dropout2d, Dropout2d),
                          (torch.nn.Dropout3d, Dropout3d)):
    register_twin(_torch_cls, _twin)
del _torch_cls, _twin
register_chain_dropout(torch.nn.Dropout)  # elementwise: what a BatchNormAct(dropout=p) would apply

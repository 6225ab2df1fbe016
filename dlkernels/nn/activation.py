"""LeakyReLU and PReLU modules.

They subclass torch's modules, so the constructor, parameters, state_dict keys, repr and
isinstance checks are torch's own (a torch checkpoint loads unchanged, and back); only
``forward`` runs dlkernels' kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dlkernels import functional as F

__all__ = ["LeakyReLU", "PReLU"]


class LeakyReLU(torch.nn.LeakyReLU):
    """torch.nn.LeakyReLU(negative_slope=0.01, inplace=False) on dlkernels kernels."""

    def forward(self, input: Tensor) -> Tensor:
        return F.leaky_relu(input, self.negative_slope, self.inplace)


class PReLU(torch.nn.PReLU):
    """torch.nn.PReLU(num_parameters=1, init=0.25, device=None, dtype=None) on dlkernels kernels."""

    def forward(self, input: Tensor) -> Tensor:
        return F.prelu(input, self.weight)

"""LeakyReLU and PReLU modules.

They subclass torch's modules, so the constructor, parameters, state_dict keys, repr and
isinstance checks are torch's own (a torch checkpoint loads unchanged, and back); only
``forward`` runs dlkernels' kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dlkernels import functional as F
from dlkernels.nn._twins import register_chain_activation, register_twin

__all__ = ["LeakyReLU", "PReLU"]


class LeakyReLU(torch.nn.LeakyReLU):
    """torch.nn.LeakyReLU(negative_slope=0.01, inplace=False) on dlkernels kernels."""

    def forward(self, input: Tensor) -> Tensor:
        return F.leaky_relu(input, self.negative_slope, self.inplace)


class PReLU(torch.nn.PReLU):
    """torch.nn.PReLU(num_parameters=1, init=0.25, device=None, dtype=None) on dlkernels kernels."""

    def forward(self, input: Tensor) -> Tensor:
        return F.prelu(input, self.weight)


register_twin(torch.nn.LeakyReLU, LeakyReLU)
register_twin(torch.nn.PReLU, PReLU)


# What a fused BatchNormAct can take over after a BatchNorm (dlkernels.fuse): (activation, negative_slope),
# or why not. ReLU has no module of its own here: it only exists fused, as activation="relu".
def _relu_call(args: tuple, kwargs: dict) -> tuple[str, float] | str:
    extra = list(args[1:]) + list(kwargs.values())  # only F.relu's `inplace` may follow the input
    if len(extra) > 1 or any(not isinstance(v, bool) for v in extra):
        return "relu called with arguments other than a constant inplace flag"
    return ("relu", 0.0)


def _slope(value: object) -> tuple[str, float] | str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "negative_slope is computed at run time (not a constant number)"
    return ("leaky_relu", float(value))


def _leaky_relu_call(args: tuple, kwargs: dict) -> tuple[str, float] | str:
    slope = args[1] if len(args) > 1 else kwargs.get("negative_slope", 0.01)
    inplace = args[2] if len(args) > 2 else kwargs.get("inplace", False)
    if not isinstance(inplace, bool) or len(args) + len(kwargs) > 3:
        return "leaky_relu called with arguments it does not take"
    return _slope(slope)


register_chain_activation(torch.nn.ReLU, lambda m: ("relu", 0.0))
register_chain_activation(torch.nn.LeakyReLU, lambda m: _slope(m.negative_slope))
register_chain_activation(torch.nn.PReLU, lambda m: ("prelu", 0.0))  # the weight: the module's own
for _call in (torch.relu, torch.relu_, torch.nn.functional.relu, "relu", "relu_"):
    register_chain_activation(_call, _relu_call)
for _call in (torch.nn.functional.leaky_relu, torch.nn.functional.leaky_relu_):
    register_chain_activation(_call, _leaky_relu_call)
del _call

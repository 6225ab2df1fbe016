"""torch.nn.functional-style entry points, with torch's signatures, defaults and errors."""

from __future__ import annotations

from torch import Tensor

from dlkernels.ops import activation as _activation
from dlkernels.ops import batch_norm as _batch_norm

__all__ = ["batch_norm", "batch_norm_act", "leaky_relu", "prelu"]


def leaky_relu(input: Tensor, negative_slope: float = 0.01, inplace: bool = False) -> Tensor:
    """``max(0, x) + negative_slope * min(0, x)``, as torch.nn.functional.leaky_relu.

    With ``inplace=True`` the input is overwritten and returned; as in torch, backward through an
    in-place call with a negative slope raises (the input's sign can no longer be recovered).
    """
    return _activation.leaky_relu(input, negative_slope, inplace)


def prelu(input: Tensor, weight: Tensor) -> Tensor:
    """``max(0, x) + weight[c] * min(0, x)`` with c the channel (dim 1), as torch's prelu.

    ``weight`` has one element (shared) or ``input.size(1)`` elements.
    """
    return _activation.prelu(input, weight)


def batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None = None,
               bias: Tensor | None = None, training: bool = False, momentum: float | Tensor = 0.1,
               eps: float = 1e-5) -> Tensor:
    """torch.nn.functional.batch_norm: statistics over every dim but 1; in training the running
    statistics (if given) are updated in place with ``momentum`` (a float or a 0-d tensor)."""
    return _batch_norm.batch_norm_act(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                      activation=None)


def batch_norm_act(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                   weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
                   momentum: float | Tensor = 0.1, eps: float = 1e-5, activation: str | None = "leaky_relu",
                   negative_slope: float = 0.01, prelu_weight: Tensor | None = None) -> Tensor:
    """``activation(batch_norm(...))`` in one fused pass (two in training: statistics, then
    normalize+activate). activation: None, "relu", "leaky_relu" (negative_slope) or "prelu"
    (prelu_weight: 1 or C slopes). The backward recomputes the pre-activation instead of saving it."""
    return _batch_norm.batch_norm_act(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                      activation, negative_slope, prelu_weight)

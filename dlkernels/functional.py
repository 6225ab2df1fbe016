"""torch.nn.functional-style entry points, with torch's signatures, defaults and errors."""

from __future__ import annotations

from torch import Tensor

from dlkernels.ops import activation as _activation

__all__ = ["leaky_relu", "prelu"]


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

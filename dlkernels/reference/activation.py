"""Leaky ReLU and PReLU in plain torch (the spec of the activation kernels).

Reduced-precision inputs are computed in float32 and rounded once, as torch's CPU and CUDA
kernels do, so the reference is the best answer in the input dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dlkernels._dtypes import compute_dtype


def _slopes(x: Tensor, weight: Tensor) -> Tensor:
    """The PReLU weight shaped to broadcast over channel dim 1 (one slope: a 0-d tensor)."""
    w = weight.to(compute_dtype(x))
    if weight.numel() == 1:
        return w.reshape(())
    shape = [1] * x.dim()
    shape[1] = weight.numel()
    return w.reshape(shape)


def leaky_relu(x: Tensor, negative_slope: float) -> Tensor:
    xc = x.to(compute_dtype(x))
    return torch.where(xc > 0, xc, xc * negative_slope).to(x.dtype)


def leaky_relu_(x: Tensor, negative_slope: float) -> None:
    x.copy_(leaky_relu(x, negative_slope))


def leaky_relu_backward(grad: Tensor, x: Tensor, negative_slope: float) -> Tensor:
    g = grad.to(compute_dtype(x))
    return torch.where(x > 0, g, g * negative_slope).to(x.dtype)


def prelu(x: Tensor, weight: Tensor) -> Tensor:
    xc = x.to(compute_dtype(x))
    return torch.where(xc > 0, xc, xc * _slopes(x, weight)).to(x.dtype)


def prelu_backward(grad: Tensor, x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    xc, g = x.to(compute_dtype(x)), grad.to(compute_dtype(x))
    grad_input = torch.where(xc > 0, g, g * _slopes(x, weight)).to(x.dtype)
    contrib = torch.where(xc > 0, torch.zeros_like(g), xc * g)
    if weight.numel() == 1:
        grad_weight = contrib.sum()
    else:
        dims = [d for d in range(x.dim()) if d != 1]
        grad_weight = contrib.sum(dims)
    return grad_input, grad_weight.to(weight.dtype).reshape(weight.shape)

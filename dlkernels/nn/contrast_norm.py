"""GlobalContrastNorm: global contrast normalization as a module (no parameters, no buffers).

Beyond dlkernels.functional.global_contrast_norm, the module takes images as they come from a
data pipeline: one image without a batch dim (a 3-d C,H,W tensor) is a batch of one; integer
(e.g. uint8) tensors are converted to float32 keeping their values (no division by 255); numpy
arrays come back as numpy arrays (N,C,H,W batches, or one H,W,C image, the usual numpy layout).
``dims`` always counts the dims of the batched N,C,H,W tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from dlkernels import functional as F

__all__ = ["GlobalContrastNorm"]


class GlobalContrastNorm(torch.nn.Module):
    """GlobalContrastNorm(scale=1.0, lam=0.0, eps=1e-8, *, style="book", subtract_mean=True, dims=None).

    See dlkernels.functional.global_contrast_norm for the formulas of each ``style``. The Deep
    Learning book's settings: ``GlobalContrastNorm(1.0, 0.0, 1e-8)`` for closely cropped images,
    ``GlobalContrastNorm(1.0, 10.0, 0.0)`` for small random crops.
    """

    def __init__(self, scale: float = 1.0, lam: float = 0.0, eps: float = 1e-8, *, style: str = "book",
                 subtract_mean: bool = True, dims: int | Sequence[int] | None = None) -> None:
        super().__init__()
        # validated now (a bad argument fails at construction, naming it), on a tiny example
        F.global_contrast_norm(torch.zeros(1, 2), scale, lam, eps, style=style, subtract_mean=subtract_mean)
        self.scale, self.lam, self.eps = float(scale), float(lam), float(eps)
        self.style, self.subtract_mean = style, subtract_mean
        self.dims = dims if dims is None or isinstance(dims, int) else tuple(dims)

    def extra_repr(self) -> str:
        dims = "" if self.dims is None else f", dims={self.dims}"
        return (f"scale={self.scale}, lam={self.lam}, eps={self.eps}, style={self.style!r}, "
                f"subtract_mean={self.subtract_mean}{dims}")

    def forward(self, input: Any) -> Any:
        is_numpy = type(input).__module__ == "numpy" and type(input).__name__ == "ndarray"
        if is_numpy:
            # from_numpy shares memory; it cannot take negative strides (e.g. a flipped view)
            x = torch.from_numpy(input.copy() if any(st < 0 for st in input.strides) else input)
            if x.dim() == 3:  # one H,W,C image
                x = x.permute(2, 0, 1)
        elif isinstance(input, Tensor):
            x = input
        else:
            raise TypeError(f"GlobalContrastNorm: argument 'input' must be a tensor or a numpy array, not "
                            f"{type(input).__name__}")
        if x.dtype == torch.bool or x.is_complex():
            raise TypeError(f"GlobalContrastNorm: argument 'input' must hold real numbers, got {x.dtype}")
        if not x.is_floating_point():  # uint8 images (and other integers): values kept
            x = x.to(torch.float32)
        one = x.dim() == 3
        if one:
            x = x.unsqueeze(0)
        y = F.global_contrast_norm(x, self.scale, self.lam, self.eps, style=self.style,
                                   subtract_mean=self.subtract_mean, dims=self.dims)
        if one:
            y = y.squeeze(0)
        if is_numpy:
            if one:
                y = y.permute(1, 2, 0)
            return y.detach().contiguous().numpy()
        return y

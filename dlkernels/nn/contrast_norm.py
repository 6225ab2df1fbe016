"""GlobalContrastNorm and LocalContrastNorm: contrast normalization as modules (no parameters, no
buffers).

Beyond dlkernels.functional, the modules take images as they come from a data pipeline (a
``torchvision.transforms.v2.Compose``, DataLoader workers): one image without a batch dim (a 3-d
C,H,W tensor) is a batch of one; integer (e.g. uint8) tensors are converted to float32 keeping
their values (no division by 255); numpy arrays come back as numpy arrays (N,C,H,W batches, or one
H,W,C image, the usual numpy layout). GlobalContrastNorm's ``dims`` always counts the dims of the
batched N,C,H,W tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from dlkernels import functional as F

__all__ = ["GlobalContrastNorm", "LocalContrastNorm"]


def _apply_to_images(name: str, input: Any, fn: Callable[[Tensor], Tensor],
                     ranks: tuple[int, ...] | None = None) -> Any:
    """fn on the batched float tensor of ``input`` (a tensor or a numpy array; one 3-d image is a
    batch of one; integers become float32 with their values), returned as ``input`` came: a numpy
    array of the same layout, one image without its batch dim. ``ranks``: the accepted ranks."""
    is_numpy = type(input).__module__ == "numpy" and type(input).__name__ == "ndarray"
    if is_numpy:
        # from_numpy shares memory; it cannot take negative strides (e.g. a flipped view) and
        # warns on read-only arrays (e.g. decoded images, sklearn's sample images)
        copy = any(st < 0 for st in input.strides) or not input.flags.writeable
        x = torch.from_numpy(input.copy() if copy else input)
        if x.dim() == 3:  # one H,W,C image
            x = x.permute(2, 0, 1)
    elif isinstance(input, Tensor):
        x = input
    else:
        raise TypeError(f"{name}: argument 'input' must be a tensor or a numpy array, not {type(input).__name__}")
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{name}: argument 'input' must hold real numbers, got {x.dtype}")
    if ranks is not None and x.dim() not in ranks:
        raise ValueError(f"{name}: argument 'input' must be an (N, C, H, W) batch or one (C, H, W) image "
                         f"({'H, W, C' if is_numpy else 'C, H, W'} for a numpy image), got {x.dim()} dims")
    if not x.is_floating_point():  # uint8 images (and other integers): values kept
        x = x.to(torch.float32)
    one = x.dim() == 3
    if one:
        x = x.unsqueeze(0)
    y = fn(x)
    if one:
        y = y.squeeze(0)
    if is_numpy:
        if one:
            y = y.permute(1, 2, 0)
        return y.detach().contiguous().numpy()
    return y


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
        return _apply_to_images("GlobalContrastNorm", input, lambda x: F.global_contrast_norm(
            x, self.scale, self.lam, self.eps, style=self.style, subtract_mean=self.subtract_mean, dims=self.dims))


class LocalContrastNorm(torch.nn.Module):
    """LocalContrastNorm(kernel_size=9, sigma=2.0, eps=1e-4, *, divisor="local", across_channels=False).

    See dlkernels.functional.local_contrast_norm for the formulas (and how ``divisor="lecun"``
    differs from pylearn2's LeCunLCN). Takes (N, C, H, W) batches and single (C, H, W) images.
    """

    def __init__(self, kernel_size: int = 9, sigma: float = 2.0, eps: float = 1e-4, *, divisor: str = "local",
                 across_channels: bool = False) -> None:
        super().__init__()
        # validated now (a bad argument fails at construction, naming it), on a tiny image
        F.local_contrast_norm(torch.zeros(1, 1, 1, 1), kernel_size, sigma, eps, divisor=divisor,
                              across_channels=across_channels)
        self.kernel_size, self.sigma, self.eps = int(kernel_size), float(sigma), float(eps)
        self.divisor, self.across_channels = divisor, across_channels

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, sigma={self.sigma}, eps={self.eps}, divisor={self.divisor!r}, "
                f"across_channels={self.across_channels}")

    def forward(self, input: Any) -> Any:
        return _apply_to_images("LocalContrastNorm", input, lambda x: F.local_contrast_norm(
            x, self.kernel_size, self.sigma, self.eps, divisor=self.divisor, across_channels=self.across_channels),
            ranks=(3, 4))

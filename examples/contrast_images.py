"""Global and local contrast normalization of the sample images shipped with scikit-learn.

    python examples/contrast_images.py [--out examples/contrast_images.png] [--size 320]

Reads ``sklearn.datasets.load_sample_images()`` (two 427x640 photos stored in the scikit-learn
package: no download) and writes one PNG with a row per image: the original, then
dlkernels.nn.GlobalContrastNorm, LocalContrastNorm per channel and LocalContrastNorm across
channels, side by side. The modules take the H,W,C uint8 numpy images as they are (values kept,
no / 255) and return numpy images of the same layout. A normalized image has values around 0;
for display each is mapped to [0, 1] by x / (2 q) + 1/2, q = its 99th percentile of |x|.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import dlkernels

DEFAULT_OUT = Path(__file__).resolve().parent / "contrast_images.png"


def load_images(size: int | None) -> list[np.ndarray]:
    """The sample images as H,W,C uint8 arrays, the longer side scaled to ``size`` (None: as stored)."""
    from sklearn.datasets import load_sample_images

    images = []
    for img in load_sample_images().images:
        if size is not None and max(img.shape[:2]) != size:
            t = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float()  # (stored read-only)
            scale = size / max(img.shape[:2])
            hw = (max(1, round(img.shape[0] * scale)), max(1, round(img.shape[1] * scale)))
            t = torch.nn.functional.interpolate(t, size=hw, mode="bilinear", antialias=True, align_corners=False)
            img = t[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
        images.append(img)
    return images


def for_display(y: np.ndarray) -> np.ndarray:
    q = float(np.percentile(np.abs(y), 99)) or 1.0
    return np.clip(y / (2 * q) + 0.5, 0.0, 1.0)


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the PNG to write (default: %(default)s)")
    p.add_argument("--size", type=int, default=None, help="scale each image's longer side to this many pixels")
    p.add_argument("--kernel-size", type=int, default=9, help="LCN window size (odd)")
    p.add_argument("--sigma", type=float, default=2.0, help="LCN Gaussian standard deviation, in pixels")
    args = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = {
        "original": None,
        "GCN (lam=10, eps=0)": dlkernels.nn.GlobalContrastNorm(1.0, 10.0, 0.0),
        f"LCN per channel ({args.kernel_size}, sigma={args.sigma})":
            dlkernels.nn.LocalContrastNorm(args.kernel_size, args.sigma, 1e-4),
        "LCN across channels, lecun": dlkernels.nn.LocalContrastNorm(
            args.kernel_size, args.sigma, 1e-4, divisor="lecun", across_channels=True),
    }
    images = load_images(args.size)
    fig, axes = plt.subplots(len(images), len(columns), figsize=(4 * len(columns), 3.2 * len(images)),
                             squeeze=False)
    for row, img in zip(axes, images, strict=True):
        for ax, (title, module) in zip(row, columns.items(), strict=True):
            ax.imshow(img if module is None else for_display(module(img)))
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    plt.close(fig)
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()

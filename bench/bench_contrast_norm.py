"""Global contrast normalization (book style, lam=0, eps=1e-8), forward and forward+backward, against
the plain-torch reference formula (dlkernels.reference.contrast_norm.gcn: the "torch eager"
contender here) and torch.compile of it.

Minimum traffic (N elements of E bytes), counted as batch norm's: the forward reads x for the
per-example statistics, then reads x and writes y (a read pass of NE and a read-write pass of 2NE);
the backward reads grad and x for the two per-example sums, then reads them again and writes
grad_input (3NE read, 5NE read-write in all). An example that stays in cache between the two
passes (the CPU's per-example schedule) can beat this floor.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch

from bench.harness import DLK, EAGER, Case, forward_backward, with_compile

FULL_SHAPES = [(128, 3, 224, 224)]  # 77 MB float32
QUICK_SHAPES = [(4, 3, 13, 11)]


def _case(mode: str, shape: tuple[int, ...], device: str) -> Case:
    n, esize = math.prod(shape), 4
    name = f"gcn {mode} {'x'.join(map(str, shape))} f32"
    passes = {"fwd": {"read": n * esize, "copy": 2 * n * esize},
              "fwd+bwd": {"read": 3 * n * esize, "copy": 5 * n * esize}}[mode]

    def setup() -> dict[str, Any]:
        import dlkernels.functional as DF  # here, not at import: the package may be mid-build
        from dlkernels.reference.contrast_norm import gcn

        x = torch.rand(shape, device=device) * 255
        fns = with_compile({DLK: partial(DF.global_contrast_norm, scale=1.0, lam=0.0, eps=1e-8),
                            EAGER: partial(gcn, scale=1.0, lam=0.0, eps=1e-8)})
        if mode == "fwd":
            return {k: partial(f, x) for k, f in fns.items()}
        x.requires_grad_(True)
        g = torch.randn_like(x)
        return {k: forward_backward(f, [x], g, [x]) for k, f in fns.items()}

    return Case(name=name, setup=setup, min_bytes=0, pattern="copy", size_bytes=n * esize, device=device,
                passes=passes, params={"pass": mode, "shape": "x".join(map(str, shape)), "style": "book"})


def cases(quick: bool, device: str = "cpu") -> list[Case]:
    """GCN forward and forward+backward, small shapes when ``quick``."""
    shapes = QUICK_SHAPES if quick else FULL_SHAPES
    return [_case(mode, s, device) for s in shapes for mode in ("fwd", "fwd+bwd")]

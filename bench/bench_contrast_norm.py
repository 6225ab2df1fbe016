"""Global contrast normalization (book style, lam=0, eps=1e-8) and local contrast normalization
(kernel_size 9, sigma 2, eps 1e-4, per channel), forward and forward+backward, against the
plain-torch reference formulas (dlkernels.reference.contrast_norm.gcn and .lcn: the "torch eager"
contenders here; torch has no built-in) and torch.compile of them.

Minimum traffic (N elements of E bytes), counted as batch norm's: the forward reads x for the
per-example statistics, then reads x and writes y (a read pass of NE and a read-write pass of 2NE);
the backward reads grad and x for the two per-example sums, then reads them again and writes
grad_input (3NE read, 5NE read-write in all). An example that stays in cache between the two
passes (the CPU's per-example schedule) can beat this floor.

LCN's minimum traffic: each image plane read once and written once (its window statistics stay
in cache): the forward reads x and writes y (2NE read-write); the backward reads grad and x and
writes grad_input (2NE read-write and NE read).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from bench.harness import DLK, EAGER, Case, forward_backward, with_compile

FULL_SHAPES = [(128, 3, 224, 224)]  # 77 MB float32
QUICK_SHAPES = [(4, 3, 13, 11)]
LCN_FULL_SHAPES = [(32, 3, 224, 224)]  # 19 MB float32
LCN_QUICK_SHAPES = [(2, 3, 17, 13)]
LCN_ARGS = dict(kernel_size=9, sigma=2.0, eps=1e-4)


def _setup(mode: str, shape: tuple[int, ...], device: str,
           contenders: Callable[[], dict[str, Callable]]) -> Callable[[], dict[str, Any]]:
    """A case's setup: x of `shape` with values in [0, 255), the contenders (and torch.compile of
    them) on x ("fwd") or forward+backward through x. `contenders` is called in the setup: it
    imports dlkernels there, not at import, as the package may be mid-build."""

    def setup() -> dict[str, Any]:
        x = torch.rand(shape, device=device) * 255
        fns = with_compile(contenders())
        if mode == "fwd":
            return {k: partial(f, x) for k, f in fns.items()}
        x.requires_grad_(True)
        g = torch.randn_like(x)
        return {k: forward_backward(f, [x], g, [x]) for k, f in fns.items()}

    return setup


def _case(mode: str, shape: tuple[int, ...], device: str) -> Case:
    n, esize = math.prod(shape), 4
    name = f"gcn {mode} {'x'.join(map(str, shape))} f32"
    passes = {"fwd": {"read": n * esize, "copy": 2 * n * esize},
              "fwd+bwd": {"read": 3 * n * esize, "copy": 5 * n * esize}}[mode]

    def contenders() -> dict[str, Callable]:
        import dlkernels.functional as DF
        from dlkernels.reference.contrast_norm import gcn

        return {DLK: partial(DF.global_contrast_norm, scale=1.0, lam=0.0, eps=1e-8),
                EAGER: partial(gcn, scale=1.0, lam=0.0, eps=1e-8)}

    setup = _setup(mode, shape, device, contenders)
    return Case(name=name, setup=setup, min_bytes=0, pattern="copy", size_bytes=n * esize, device=device,
                passes=passes, params={"pass": mode, "shape": "x".join(map(str, shape)), "style": "book"})


def _lcn_case(mode: str, shape: tuple[int, ...], device: str) -> Case:
    n, esize = math.prod(shape), 4
    name = f"lcn {mode} {'x'.join(map(str, shape))} f32"
    passes = {"fwd": {"copy": 2 * n * esize}, "fwd+bwd": {"read": n * esize, "copy": 4 * n * esize}}[mode]

    def contenders() -> dict[str, Callable]:
        import dlkernels.functional as DF
        from dlkernels.reference.contrast_norm import lcn

        return {DLK: partial(DF.local_contrast_norm, **LCN_ARGS), EAGER: partial(lcn, **LCN_ARGS)}

    setup = _setup(mode, shape, device, contenders)
    return Case(name=name, setup=setup, min_bytes=0, pattern="copy", size_bytes=n * esize, device=device,
                passes=passes, params={"pass": mode, "shape": "x".join(map(str, shape)), "op": "lcn",
                                       "divisor": "local"})


def cases(quick: bool, device: str = "cpu") -> list[Case]:
    """GCN and LCN forward and forward+backward, small shapes when ``quick``."""
    shapes = QUICK_SHAPES if quick else FULL_SHAPES
    lcn_shapes = LCN_QUICK_SHAPES if quick else LCN_FULL_SHAPES
    return ([_case(mode, s, device) for s in shapes for mode in ("fwd", "fwd+bwd")]
            + [_lcn_case(mode, s, device) for s in lcn_shapes for mode in ("fwd", "fwd+bwd")])

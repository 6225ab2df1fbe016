"""Dropout (no stored mask, Philox4x32-10) alone and fused after leaky ReLU, forward and
forward+backward, against torch eager (F.dropout; F.leaky_relu then F.dropout) and torch.compile.

Minimum bytes (N elements of E bytes): forward reads x and writes y (2NE); the backward of
dropout reads grad and writes grad_input (2NE more); the fused leaky ReLU backward also reads x
(3NE more). The mask is regenerated, never stored or read: torch eager keeps one mask element per
input element for the backward.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from bench.harness import DLK, EAGER, Case, forward_backward, with_compile

P, SLOPE = 0.5, 0.01
FULL_SHAPES = [(64, 64, 56, 56), (32, 64, 16, 16)]  # 51 MB, 2 MB (in cache)
QUICK_SHAPES = [(4, 8, 12, 13)]


def _leaky_dropout_torch(x: torch.Tensor) -> torch.Tensor:
    return F.dropout(F.leaky_relu(x, SLOPE), P)


def _case(op: str, bwd: bool, shape: tuple[int, ...], device: str) -> Case:
    numel, esize = math.prod(shape), 4
    mode = "fwd+bwd" if bwd else "fwd"
    bwd_bytes = {"dropout": 2, "leaky_relu+dropout": 3}[op]

    def setup() -> dict[str, Any]:
        import dlkernels.functional as DF  # here, not at import: the package may be mid-build

        x = torch.randn(shape, device=device)
        if op == "dropout":
            fns = {DLK: partial(DF.dropout, p=P), EAGER: partial(F.dropout, p=P)}
        else:
            fns = {DLK: partial(DF.leaky_relu_dropout, negative_slope=SLOPE, p=P), EAGER: _leaky_dropout_torch}
        fns = with_compile(fns)
        if not bwd:
            return {k: partial(f, x) for k, f in fns.items()}
        x.requires_grad_(True)
        g = torch.randn_like(x)
        return {k: forward_backward(f, [x], g, [x]) for k, f in fns.items()}

    return Case(name=f"{op} {mode} {'x'.join(map(str, shape))} p={P}", setup=setup,
                min_bytes=(2 + (bwd_bytes if bwd else 0)) * numel * esize, pattern="copy", size_bytes=numel * esize,
                device=device, params={"op": op, "pass": mode, "shape": "x".join(map(str, shape)), "p": P})


def cases(quick: bool, device: str = "cpu") -> list[Case]:
    shapes = QUICK_SHAPES if quick else FULL_SHAPES
    return [_case(op, bwd, s, device) for op in ("dropout", "leaky_relu+dropout") for bwd in (False, True)
            for s in shapes]

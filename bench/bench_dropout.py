"""Dropout (no stored mask, Philox4x32-10) alone, fused after leaky ReLU, and fused after batch
norm + leaky ReLU (BatchNormAct2d(dropout=0.2)), forward and forward+backward, against torch eager
(F.dropout; F.leaky_relu then F.dropout; BatchNorm2d, LeakyReLU, Dropout modules) and
torch.compile.

Minimum bytes (N elements of E bytes): forward reads x and writes y (2NE); the backward of
dropout reads grad and writes grad_input (2NE more); the fused leaky ReLU backward also reads x
(3NE more). Batch norm's training forward reads x for the statistics, then reads x and writes y
(a read pass of NE, a read-write pass of 2NE); its backward reads grad and x for the per-channel
sums, then reads them again and writes grad_input (3NE read, 5NE read-write in all). The mask is
regenerated, never stored or read: torch eager keeps one mask element per input element for the
backward.
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


BN_P = 0.2
BN_SHAPE, BN_QUICK_SHAPE = (64, 64, 56, 56), (4, 8, 12, 13)


def _bn_case(bwd: bool, shape: tuple[int, ...], device: str) -> Case:
    n, esize = math.prod(shape), 4
    mode = "fwd+bwd" if bwd else "fwd"
    passes = {"read": 3 * n * esize, "copy": 5 * n * esize} if bwd else {"read": n * esize, "copy": 2 * n * esize}

    def setup() -> dict[str, Any]:
        import dlkernels.nn as dnn

        c = shape[1]
        ours = dnn.BatchNormAct2d(c, activation="leaky_relu", negative_slope=SLOPE, dropout=BN_P).to(device)
        theirs = torch.nn.Sequential(torch.nn.BatchNorm2d(c), torch.nn.LeakyReLU(SLOPE),
                                     torch.nn.Dropout(BN_P)).to(device)
        x = torch.randn(shape, device=device) * 2 + 1
        fns = with_compile({DLK: ours, EAGER: theirs})
        if not bwd:
            return {k: partial(f, x) for k, f in fns.items()}
        x.requires_grad_(True)
        g = torch.randn_like(x)
        leaves = [x, *ours.parameters(), *theirs.parameters()]
        return {k: forward_backward(f, [x], g, leaves) for k, f in fns.items()}

    return Case(name=f"bn+leaky_relu+dropout {mode} {'x'.join(map(str, shape))} p={BN_P}", setup=setup, min_bytes=0,
                pattern="copy", size_bytes=n * esize, device=device, passes=passes,
                params={"op": "bn+leaky_relu+dropout", "pass": mode, "shape": "x".join(map(str, shape)), "p": BN_P})


def cases(quick: bool, device: str = "cpu") -> list[Case]:
    shapes = QUICK_SHAPES if quick else FULL_SHAPES
    out = [_case(op, bwd, s, device) for op in ("dropout", "leaky_relu+dropout") for bwd in (False, True)
           for s in shapes]
    return out + [_bn_case(bwd, BN_QUICK_SHAPE if quick else BN_SHAPE, device) for bwd in (False, True)]

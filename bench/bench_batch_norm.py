"""Batch norm and fused batch norm + leaky ReLU: training forward, forward+backward, and eval,
NCHW and channels_last, against torch eager (BatchNorm2d then LeakyReLU) and torch.compile of it.

Minimum traffic (N elements of E bytes): training forward reads x for the statistics, then
reads x and writes y (a read pass of NE and a read-write pass of 2NE); the backward reads grad
and x for the per-channel sums, then reads them again and writes grad_input (3NE read, 5NE
read-write in all); eval reads x and writes y (2NE).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from bench.harness import DLK, EAGER, Case, forward_backward, with_compile

SLOPE = 0.01
FULL_SHAPES = [(64, 64, 56, 56), (256, 256, 14, 14), (16, 32, 16, 16)]  # 51 MB, 51 MB, 0.5 MB (in cache)
QUICK_SHAPES = [(4, 8, 5, 7)]


def _case(block: str, mode: str, shape: tuple[int, ...], layout: str, device: str) -> Case:
    n, esize = math.prod(shape), 4
    name = f"{block} {mode} {'x'.join(map(str, shape))}" + (" CL" if layout == "channels_last" else "")
    passes = {"fwd": {"read": n * esize, "copy": 2 * n * esize},
              "fwd+bwd": {"read": 3 * n * esize, "copy": 5 * n * esize},
              "eval": {"copy": 2 * n * esize}}[mode]

    def setup() -> dict[str, Any]:
        import dlkernels.nn as dnn

        c = shape[1]
        act = "leaky_relu" if block == "bn+leaky_relu" else None
        ours = dnn.BatchNormAct2d(c, activation=act, negative_slope=SLOPE).to(device)
        mods = [torch.nn.BatchNorm2d(c)] + ([torch.nn.LeakyReLU(SLOPE)] if act else [])
        theirs = torch.nn.Sequential(*mods).to(device)
        for m in (ours, theirs):
            m.train(mode != "eval")
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        x = torch.randn(shape, device=device).contiguous(memory_format=fmt) * 2 + 1
        fns = with_compile({DLK: ours, EAGER: theirs})
        if mode != "fwd+bwd":
            return {k: (lambda f=f: f(x)) for k, f in fns.items()}
        x.requires_grad_(True)
        g = torch.randn_like(x)
        leaves = [x, *ours.parameters(), *theirs.parameters()]
        return {k: forward_backward(f, [x], g, leaves) for k, f in fns.items()}

    return Case(name=name, setup=setup, min_bytes=0, pattern="copy", size_bytes=n * esize, device=device,
                passes=passes, params={"block": block, "pass": mode, "shape": "x".join(map(str, shape)),
                                       "layout": layout})


def cases(quick: bool, device: str = "cpu") -> list[Case]:
    shapes = QUICK_SHAPES if quick else FULL_SHAPES
    out = [_case("bn+leaky_relu", mode, s, lay, device)
           for s in shapes for mode in ("fwd", "fwd+bwd", "eval") for lay in ("nchw", "channels_last")]
    out += [_case("bn", mode, shapes[0], lay, device)
            for mode in ("fwd", "fwd+bwd") for lay in ("nchw", "channels_last")]
    return out

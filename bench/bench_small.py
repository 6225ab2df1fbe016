"""Per-call cost on small inputs: the op path's overhead (Python, dispatch, checks), not the
kernels. Run with one thread (``python -m bench --only small --threads 1``): with two, torch's own
small batch-norm calls wake its OpenMP threads and take milliseconds on these VMs.

Cases (float32): LeakyReLU and PReLU forward on 4x32x8x8; BatchNorm2d eval and training forward
on 4x32x8x8; BatchNormAct2d(leaky_relu) forward+backward against torch's BatchNorm2d +
LeakyReLU; BatchNorm1d training forward on 16x64. Compared with torch eager only (torch.compile's
guards cost more than these ops).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from bench.harness import DLK, EAGER, Case, forward_backward

SHAPE = (4, 32, 8, 8)


def _case(name: str, shape: tuple[int, ...], build, bwd: bool = False) -> Case:
    n = math.prod(shape)

    def setup() -> dict[str, Any]:
        x = torch.randn(shape)
        fns = build(shape[1])
        if not bwd:
            return {k: partial(f, x) for k, f in fns.items()}
        x.requires_grad_(True)
        g = torch.randn_like(x)
        leaves = [x] + [p for f in fns.values() if isinstance(f, torch.nn.Module) for p in f.parameters()]
        return {k: forward_backward(f, [x], g, leaves) for k, f in fns.items()}

    mode = "fwd+bwd" if bwd else "fwd"
    return Case(name=f"{name} {mode} {'x'.join(map(str, shape))}", setup=setup, min_bytes=(5 if bwd else 2) * n * 4,
                pattern="copy", size_bytes=n * 4,
                params={"op": name, "pass": mode, "shape": "x".join(map(str, shape))})


def _leaky(c: int) -> dict:
    import dlkernels.functional as DF

    return {DLK: partial(DF.leaky_relu, negative_slope=0.01), EAGER: partial(F.leaky_relu, negative_slope=0.01)}


def _prelu(c: int) -> dict:
    import dlkernels.functional as DF

    w = torch.rand(c) * 0.5
    return {DLK: partial(DF.prelu, weight=w), EAGER: partial(F.prelu, weight=w)}


def _bn(cls: str, training: bool, act: bool = False):
    def build(c: int) -> dict:
        import dlkernels.nn as dnn

        dim = cls[-2:]
        if act:
            ours = getattr(dnn, f"BatchNormAct{dim}")(c, activation="leaky_relu")
            theirs = torch.nn.Sequential(getattr(torch.nn, f"BatchNorm{dim}")(c), torch.nn.LeakyReLU(0.01))
        else:
            ours, theirs = getattr(dnn, cls)(c), getattr(torch.nn, cls)(c)
        ours.train(training), theirs.train(training)
        return {DLK: ours, EAGER: theirs}

    return build


def cases(quick: bool, device: str = "cpu") -> list[Case]:
    if device != "cpu":
        return []
    return [
        _case("leaky_relu", SHAPE, _leaky),
        _case("prelu", SHAPE, _prelu),
        _case("BatchNorm2d eval", SHAPE, _bn("BatchNorm2d", False)),
        _case("BatchNorm2d train", SHAPE, _bn("BatchNorm2d", True)),
        _case("BatchNormAct2d(leaky) train", SHAPE, _bn("BatchNorm2d", True, act=True), bwd=True),
        _case("BatchNorm1d train", (16, 64), _bn("BatchNorm1d", True)),
    ]

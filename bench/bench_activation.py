"""leaky_relu and prelu, forward and forward+backward, against torch eager and torch.compile.

Minimum bytes (E = element size, N = elements): forward reads x and writes y (2NE, a
read-and-write pattern); forward+backward adds reading grad_output and x and writing
grad_input (5NE). PReLU's weight gradient is reduced inside the same pass, so it adds only the
(negligible) C weights.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from bench.harness import DLK, EAGER, Case, forward_backward, with_compile

SLOPE = 0.01
FULL_SHAPES = [(64, 64, 56, 56), (256, 256, 14, 14), (32, 64, 16, 16)]  # 51 MB, 51 MB, 2 MB (in cache)
QUICK_SHAPES = [(4, 8, 12, 13)]  # odd sizes on purpose: exercises the SIMD tails


def _case(op: str, bwd: bool, shape: tuple[int, ...], device: str, dtype: torch.dtype = torch.float32,
          layout: str = "nchw") -> Case:
    numel, esize = math.prod(shape), dtype.itemsize
    mode = "fwd+bwd" if bwd else "fwd"
    short = {torch.float32: "f32", torch.bfloat16: "bf16"}[dtype]
    name = f"{op} {mode} {'x'.join(map(str, shape))} {short}" + (" CL" if layout == "channels_last" else "")

    def setup() -> dict[str, Any]:
        import dlkernels.functional as DF  # here, not at import: the package may be mid-build

        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
        leaves = [x]
        if op == "leaky_relu":
            fns = {DLK: partial(DF.leaky_relu, negative_slope=SLOPE),
                   EAGER: partial(F.leaky_relu, negative_slope=SLOPE)}
        else:
            w = torch.rand(shape[1], device=device, dtype=dtype) * 0.5
            leaves.append(w)
            fns = {DLK: partial(DF.prelu, weight=w), EAGER: partial(F.prelu, weight=w)}
        fns = with_compile(fns)
        if not bwd:
            return {k: partial(f, x) for k, f in fns.items()}
        for t in leaves:
            t.requires_grad_(True)
        g = torch.randn_like(x)
        return {k: forward_backward(f, [x], g, leaves) for k, f in fns.items()}

    return Case(name=name, setup=setup, min_bytes=(5 if bwd else 2) * numel * esize, pattern="copy",
                size_bytes=numel * esize, device=device,
                params={"op": op, "pass": mode, "shape": "x".join(map(str, shape)),
                        "dtype": str(dtype).removeprefix("torch."), "layout": layout})


def cases(quick: bool, device: str = "cpu") -> list[Case]:
    """Every activation case, small shapes when ``quick``."""
    shapes = QUICK_SHAPES if quick else FULL_SHAPES
    out = []
    for bwd in (False, True):
        out += [_case("leaky_relu", bwd, s, device) for s in shapes]
        out += [_case("prelu", bwd, s, device, layout=lay)
                for s in shapes for lay in ("nchw", "channels_last")]
    out.append(_case("leaky_relu", False, shapes[0], device, dtype=torch.bfloat16))
    return out

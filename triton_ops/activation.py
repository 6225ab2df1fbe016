"""Leaky ReLU and PReLU in Triton: forward, in-place and backward launchers.

Layout (the same as the C++ backend): outputs are ``torch.empty_like(x)``, which keeps the
strides of any non-overlapping and dense ``x`` (e.g. channels_last); any other ``x`` is first
copied into that layout, and ``grad`` into ``x``'s. Every kernel then walks flat memory order,
where the channel of position ``o`` is ``(o // x.stride(1)) % C``. Math runs in float32 for
float16/bfloat16/float32 and in float64 for float64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dlkernels._layout import is_dense as _is_dense

from ._aot import AotSpec
from ._common import (
    channel_partials,
    channels,
    dense,
    divider,
    fast_divmod,
    like,
    offsets,
    on_device,
    split_program,
    to_compute,
    weight_grad,
)

BLOCK = 1024
# C * SPLIT programs aimed at by the PReLU backward: about one full wave of 4-warp programs on
# a 132-SM GPU (16 resident per SM), each streaming several blocks.
_TARGET_PROGRAMS = 2048
# Index math is int32 below this numel (int32 div/mod is much cheaper than int64); the margin
# keeps the backward's loop counter (stepping up to SPLIT * BLOCK past the end) from overflowing.
_INT32_LIMIT = 2**31 - 2**22


# `slope` is annotated fp64 so float64 inputs see the exact slope (the JIT would pass a Python
# float as fp32); tl.full rounds it once to the compute type, also under the interpreter.
@triton.jit
def _leaky_relu_fwd_kernel(x_ptr, y_ptr, n, slope: tl.float64, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    offs = offsets(BLOCK, WIDE)
    mask = offs < n
    x = to_compute(tl.load(x_ptr + offs, mask=mask))
    y = tl.where(x > 0, x, x * tl.full([], slope, x.dtype))
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _leaky_relu_bwd_kernel(g_ptr, x_ptr, gi_ptr, n, slope: tl.float64, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    offs = offsets(BLOCK, WIDE)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    g = to_compute(tl.load(g_ptr + offs, mask=mask))
    gi = tl.where(x > 0, g, g * tl.full([], slope, g.dtype))
    tl.store(gi_ptr + offs, gi.to(gi_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _prelu_fwd_kernel(
    x_ptr, w_ptr, y_ptr, n, inner, inner_m, inner_s, C, C_m, C_s, BLOCK: tl.constexpr, WIDE: tl.constexpr
):
    # Memory is [outer, C, inner]: channel (o // inner) % C. inner_m/inner_s and C_m/C_s are
    # the multipliers and shifts from divider; a single slope launches with inner = C = 1.
    offs = offsets(BLOCK, WIDE)
    mask = offs < n
    q, _ = fast_divmod(offs, inner, inner_m, inner_s, WIDE)
    _, c = fast_divmod(q, C, C_m, C_s, WIDE)
    x = to_compute(tl.load(x_ptr + offs, mask=mask))
    w = to_compute(tl.load(w_ptr + c))  # c is in range even where masked
    y = tl.where(x > 0, x, w * x)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _prelu_bwd_kernel(
    g_ptr, x_ptr, w_ptr, gi_ptr, part_ptr, m, inner, inner_m, inner_s, C, BLOCK: tl.constexpr, WIDE: tl.constexpr
):
    # Memory is [outer, C, inner] and m = outer * inner. Program (c, s) takes blocks s, s + SPLIT,
    # ... of channel c's m positions: it writes grad_input there and one partial sum of the
    # weight gradient to part[c, s]. A fixed order and no atomics: deterministic.
    # c == program_id(0); % C folds it to 0 when the JIT makes C = 1 a constant
    c, s, split = split_program(tl.program_id(0) % C, WIDE)
    acc_ty = part_ptr.dtype.element_ty
    w = tl.load(w_ptr + c).to(acc_ty)
    acc = tl.zeros([BLOCK], dtype=acc_ty)
    for start in range(s * BLOCK, m, split * BLOCK):
        p = start + tl.arange(0, BLOCK)
        mask = p < m
        row, col = fast_divmod(p, inner, inner_m, inner_s, WIDE)
        o = (row * C + c) * inner + col  # int64 throughout when WIDE
        x = tl.load(x_ptr + o, mask=mask, other=0).to(acc_ty)
        g = tl.load(g_ptr + o, mask=mask, other=0).to(acc_ty)
        pos = x > 0
        tl.store(gi_ptr + o, tl.where(pos, g, w * g).to(gi_ptr.dtype.element_ty), mask=mask)
        acc += tl.where(pos, 0.0, x * g)
    tl.store(part_ptr + c * split + s, tl.sum(acc, axis=0))


def _grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, BLOCK),)


def _leaky_relu_into(out: torch.Tensor, xd: torch.Tensor, negative_slope: float) -> None:
    n = xd.numel()
    with on_device(xd):
        _leaky_relu_fwd_kernel[_grid(n)](xd, out, n, float(negative_slope), BLOCK=BLOCK, WIDE=n > _INT32_LIMIT)


def leaky_relu(x: torch.Tensor, negative_slope: float) -> torch.Tensor:
    """y = x if x > 0 else x * negative_slope."""
    if x.numel() == 0:
        return torch.empty_like(x)
    xd = dense(x)
    y = torch.empty_like(xd)
    _leaky_relu_into(y, xd, negative_slope)
    return y


def leaky_relu_(x: torch.Tensor, negative_slope: float) -> None:
    """In-place leaky_relu; a non-dense x is computed into a dense temporary and copied back."""
    if x.numel() == 0:
        return
    if _is_dense(x):
        _leaky_relu_into(x, x, negative_slope)
    else:
        x.copy_(leaky_relu(x, negative_slope))


def leaky_relu_backward(grad: torch.Tensor, x: torch.Tensor, negative_slope: float) -> torch.Tensor:
    """grad_input = grad if x > 0 else grad * negative_slope."""
    if x.numel() == 0:
        return torch.empty_like(x)
    xd = dense(x)
    gd = like(grad, xd)
    gi = torch.empty_like(xd)
    n = xd.numel()
    with on_device(xd):
        _leaky_relu_bwd_kernel[_grid(n)](gd, xd, gi, n, float(negative_slope), BLOCK=BLOCK, WIDE=n > _INT32_LIMIT)
    return gi


def prelu(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y = x if x > 0 else weight[c] * x, with c the index along dim 1 (one slope if numel 1)."""
    if x.numel() == 0:
        return torch.empty_like(x)
    xd = dense(x)
    y = torch.empty_like(xd)
    c, inner = channels(xd, weight)
    n = xd.numel()
    with on_device(xd):
        _prelu_fwd_kernel[_grid(n)](
            xd, weight.contiguous(), y, n, *divider(inner), *divider(c), BLOCK=BLOCK, WIDE=n > _INT32_LIMIT
        )
    return y


def prelu_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_input, grad_weight); grad_weight[c] sums (0 if x > 0 else x * grad) over channel c,
    accumulated in float32 (float64 for float64) and returned in weight's shape and dtype."""
    if x.numel() == 0:
        return torch.empty_like(x), torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
    xd = dense(x)
    gd = like(grad, xd)
    gi = torch.empty_like(xd)
    c, inner = channels(xd, weight)
    n = xd.numel()
    m, part = channel_partials(xd, c, BLOCK, _TARGET_PROGRAMS)
    with on_device(xd):
        _prelu_bwd_kernel[(c, part.shape[1])](
            gd, xd, weight.contiguous(), gi, part, m, *divider(inner), c, BLOCK=BLOCK, WIDE=n > _INT32_LIMIT
        )
    return gi, weight_grad(part, weight)


# Constants the JIT makes of integer arguments equal to 1 (a divider of 1 is (1, 1, 0)).
_VARIANT_CONSTS = {
    "one_slope": {"inner": 1, "inner_m": 1, "C": 1, "C_m": 1},
    "channels_last": {"inner": 1, "inner_m": 1},
}


def _spec(kernel, dt: str, variant: str = "") -> AotSpec:
    # Types by naming convention: *_ptr are 16-byte aligned tensors of dtype dt (partial sums in
    # the accumulation type), slope is fp64, other integers i32. Variants: "odd" (numel not a
    # multiple of 16: no vector loads), "wide" (int64 indexing), and those in _VARIANT_CONSTS.
    consts = {"BLOCK": BLOCK, "WIDE": int(variant == "wide")}
    consts.update({k: v for k, v in _VARIANT_CONSTS.get(variant, {}).items() if k in kernel.arg_names})
    size = {"odd": "i32", "wide": "i64:16"}.get(variant, "i32:16")
    types = {"part_ptr": "*fp64:16" if dt == "fp64" else "*fp32:16", "slope": "fp64", "n": size, "m": size}
    sig = {a: types.get(a, f"*{dt}:16" if a.endswith("_ptr") else "i32") for a in kernel.arg_names if a not in consts}
    name = kernel.__name__.strip("_").removesuffix("_kernel")
    return AotSpec(f"{name}[{','.join(filter(None, (dt, variant)))}]", kernel, sig, consts)


_KERNELS = (_leaky_relu_fwd_kernel, _leaky_relu_bwd_kernel, _prelu_fwd_kernel, _prelu_bwd_kernel)
AOT_SPECS: list[AotSpec] = [
    *(_spec(k, dt) for dt in ("fp32", "bf16", "fp64") for k in _KERNELS),
    # other specializations the JIT makes
    *(_spec(k, "bf16", "odd") for k in (_leaky_relu_fwd_kernel, _prelu_bwd_kernel)),
    *(_spec(k, "fp32", "wide") for k in (_leaky_relu_fwd_kernel, _prelu_fwd_kernel, _prelu_bwd_kernel)),
    *(_spec(k, "bf16", "one_slope") for k in (_prelu_fwd_kernel, _prelu_bwd_kernel)),
    _spec(_prelu_bwd_kernel, "bf16", "channels_last"),
]

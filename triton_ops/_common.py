"""Helpers shared by the Triton families: compute type, program offsets, fast integer division,
and the layout preparation every launcher does (the same rules as the C++ backend's csrc/prep.h)."""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from dlkernels._layout import is_dense


@triton.jit
def to_compute(v):
    # fp16/bf16/fp32 compute in fp32, fp64 in fp64
    return v.to(tl.float64) if v.dtype == tl.float64 else v.to(tl.float32)


@triton.jit
def offsets(BLOCK: tl.constexpr, WIDE: tl.constexpr):
    pid = tl.program_id(0)
    if WIDE:
        pid = pid.to(tl.int64)
    return pid * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def fast_divmod(n, d, magic, shift, WIDE: tl.constexpr):
    # (n // d, n % d) for n >= 0. Below 2**31 it uses a multiplier precomputed by divider
    # (PyTorch's IntDivider): ~4 instructions instead of ~15 for a division by a runtime int32,
    # which would otherwise dominate these memory-bound kernels.
    if WIDE:
        q = n // d
    else:
        u = n.to(tl.uint32)
        q = ((tl.umulhi(u, tl.cast(magic, tl.uint32)) + u) >> tl.cast(shift, tl.uint32)).to(tl.int32)
    return q, n - q * d


def dense(t: torch.Tensor) -> torch.Tensor:
    return t if is_dense(t) else torch.empty_like(t).copy_(t)


def like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    # t with ref's (dense) memory layout, so both walk the same flat order
    return t if t.stride() == ref.stride() else torch.empty_like(ref).copy_(t)


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    # triton launches on torch's current device; make that t's device
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def channels(xd: torch.Tensor, weight: torch.Tensor) -> tuple[int, int]:
    # (C, inner) of the [outer, C, inner] view of dense xd; a single slope is C = inner = 1
    c = weight.numel()
    return (c, xd.stride(1)) if c > 1 else (1, 1)


def divider(d: int) -> tuple[int, int, int]:
    # (d, multiplier, shift) with n // d == (umulhi(n, multiplier) + n) >> shift for
    # 0 <= n < 2**31 (PyTorch's IntDivider); d = 1 gives (1, 1, 0)
    shift = (d - 1).bit_length()
    return d, (2**32 * (2**shift - d)) // d + 1, shift

"""Helpers shared by the Triton families: compute type, program offsets, fast integer division,
the layout preparation every launcher does (the same rules as the C++ backend's csrc/prep.h), and
the split reductions' programs and partials."""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from dlkernels._dtypes import compute_dtype
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
def split_program(first, WIDE: tl.constexpr):
    # (first, s, SPLIT) of program (first, s) on a grid (..., SPLIT) whose programs stride over
    # the blocks s, s + SPLIT, ... of their slice; first is program_id(0) or a function of it.
    # int64 when WIDE, so that offsets computed from them cannot overflow.
    s = tl.program_id(1)
    if WIDE:
        first = first.to(tl.int64)
        s = s.to(tl.int64)
    return first, s, tl.num_programs(1)


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


def channel_partials(xd: torch.Tensor, c: int, block: int, target_programs: int) -> tuple[int, torch.Tensor]:
    """(m, part) of a per-channel reduction over dense xd as [outer, C, inner] (the PReLU
    backwards): m = outer * inner positions per channel, part an empty [C, SPLIT] tensor of the
    compute type for the programs' partial sums, SPLIT programs per channel of `block`-sized
    blocks, about `target_programs` in all."""
    m = xd.numel() // c
    split = min(triton.cdiv(m, block), max(1, target_programs // c))
    return m, torch.empty((c, split), dtype=compute_dtype(xd), device=xd.device)


def weight_grad(part: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # the [C, SPLIT] partials summed in a fixed order, in weight's shape and dtype
    return part.sum(1).to(weight.dtype).reshape(weight.shape)

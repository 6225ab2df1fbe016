"""Dropout from a counter-based stream, in plain torch (the spec of the dropout kernels).

docs/dropout.md is the contract; this module is its executable form. Nothing is stored between
the forward and the backward: whether an element is kept is a pure function of the 64-bit seed
and the element's logical index (its row-major position in the tensor's shape, whatever the
strides), so the backward recomputes the same mask.

- Philox4x32-10 (Random123's ``philox4x32_10``) maps counter ``(q mod 2^32, q div 2^32, 0, 0)``
  and key ``(seed mod 2^32, seed div 2^32)`` to four 32-bit words; element ``i`` takes word
  ``i mod 4`` of counter ``q = i div 4``.
- An element is dropped when its word is below ``t = floor(p * 2^32)``.
- Its multiplier ``m`` is ``1 / (1 - p)`` (computed in float64, rounded once to the compute type)
  when kept and 0 when dropped; the output is ``x * m`` in the compute type (float32 for
  float16/bfloat16/float32, float64 for float64), rounded to x's dtype.

Words are held in int64 tensors (torch has no uint32 arithmetic); every product below is exact.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dlkernels._dtypes import compute_dtype

MASK32 = 0xFFFFFFFF
PHILOX_M0 = 0xD2511F53  # multiplier of counter word 0
PHILOX_M1 = 0xCD9E8D57  # multiplier of counter word 2
PHILOX_W0 = 0x9E3779B9  # key bump of k0 (golden ratio)
PHILOX_W1 = 0xBB67AE85  # key bump of k1 (sqrt(3) - 1)
PHILOX_ROUNDS = 10


def seed_key(seed: int) -> tuple[int, int]:
    """(k0, k1): the low and high 32-bit halves of the seed taken modulo 2^64."""
    s = seed % 2**64
    return s & MASK32, s >> 32


def threshold(p: float) -> int:
    """t = floor(p * 2^32), exact in float64: elements whose word is below t are dropped."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1) here, got {p}")
    return int(p * 2**32)


def _mulhilo32(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """(high, low) 32-bit words of the 64-bit product a * b, for a 32-bit constant a and a tensor
    b of 32-bit words. a * b can reach 2^64 and overflow int64, so b is split in 16-bit halves:
    a * b = (a * b_hi) * 2^16 + a * b_lo, each partial product below 2^48."""
    b_lo, b_hi = b & 0xFFFF, b >> 16
    p_lo, p_hi = a * b_lo, a * b_hi
    t = p_lo + ((p_hi & 0xFFFF) << 16)  # the low 48 bits of the product, with carry
    return (p_hi >> 16) + (t >> 32), t & MASK32


def philox4x32_10(counter: Tensor, key: tuple[int, int]) -> Tensor:
    """Philox4x32-10 of int64 ``counter[..., 4]`` (32-bit words) under ``key = (k0, k1)``:
    int64 ``[..., 4]`` of 32-bit words."""
    c0, c1, c2, c3 = counter.to(torch.int64).unbind(-1)
    k0, k1 = key[0] & MASK32, key[1] & MASK32
    for r in range(PHILOX_ROUNDS):
        if r > 0:  # the key is bumped between rounds
            k0, k1 = (k0 + PHILOX_W0) & MASK32, (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo32(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return torch.stack((c0, c1, c2, c3), -1)


def _words(n: int, seed: int, device: torch.device) -> Tensor:
    """The 32-bit words of logical indices 0 .. n-1 (int64 [n])."""
    q = torch.arange((n + 3) // 4, dtype=torch.int64, device=device)
    zero = torch.zeros_like(q)
    counter = torch.stack((q & MASK32, q >> 32, zero, zero), -1)
    return philox4x32_10(counter, seed_key(seed)).reshape(-1)[:n]


def dropout_bits(x: Tensor, seed: int) -> Tensor:
    """The word of every element of x: int64, x's shape, contiguous, on x's device."""
    return _words(x.numel(), seed, x.device).reshape(x.shape)


def _multiplier(x: Tensor, p: float, seed: int, per_channel: bool = False) -> Tensor:
    """m in the compute type: 1/(1-p) (rounded once from float64) where kept, 0 where dropped.
    Shaped like x; per channel, shaped (N, C, 1, ...) to broadcast over x."""
    if per_channel:
        if x.dim() < 2:
            raise ValueError("per-channel dropout needs an input of at least 2 dims (N, C, ...)")
        words = _words(x.size(0) * x.size(1), seed, x.device).reshape(x.shape[:2] + (1,) * (x.dim() - 2))
    else:
        words = dropout_bits(x, seed)
    keep = words >= threshold(p)
    cd = compute_dtype(x)
    scale = torch.tensor(1.0 / (1.0 - p), dtype=cd, device=x.device)
    return torch.where(keep, scale, torch.zeros((), dtype=cd, device=x.device))


def _out(values: Tensor, like: Tensor) -> Tensor:
    """values rounded to like's dtype, in torch.empty_like(like)'s memory layout."""
    return torch.empty_like(like).copy_(values)


def dropout(x: Tensor, p: float, seed: int, per_channel: bool) -> Tensor:
    """y = x * m. Also the backward (applied to the gradient). per_channel: one mask value per
    (n, c) of dims 0 and 1, shared by the rest of the channel (dropout1d/2d/3d)."""
    return _out(x.to(compute_dtype(x)) * _multiplier(x, p, seed, per_channel), x)


def _slopes(x: Tensor, weight: Tensor) -> Tensor:
    """The PReLU weight in the compute type, shaped to broadcast over channel dim 1."""
    w = weight.to(compute_dtype(x))
    if weight.numel() == 1:
        return w.reshape(())
    return w.reshape([1, weight.numel()] + [1] * (x.dim() - 2))


def leaky_relu_dropout(x: Tensor, negative_slope: float, p: float, seed: int) -> Tensor:
    """y = leaky_relu(x) * m, all in the compute type."""
    xc = x.to(compute_dtype(x))
    slope = torch.tensor(negative_slope, dtype=xc.dtype, device=x.device)
    return _out(torch.where(xc > 0, xc, xc * slope) * _multiplier(x, p, seed), x)


def leaky_relu_dropout_backward(grad: Tensor, x: Tensor, negative_slope: float, p: float, seed: int) -> Tensor:
    """d = grad * m, then grad_x = d where x > 0 else d * negative_slope."""
    d = grad.to(compute_dtype(x)) * _multiplier(x, p, seed)
    slope = torch.tensor(negative_slope, dtype=d.dtype, device=x.device)
    return _out(torch.where(x > 0, d, d * slope), x)


def prelu_dropout(x: Tensor, weight: Tensor, p: float, seed: int) -> Tensor:
    """y = prelu(x, weight) * m, all in the compute type."""
    xc = x.to(compute_dtype(x))
    return _out(torch.where(xc > 0, xc, xc * _slopes(x, weight)) * _multiplier(x, p, seed), x)


def prelu_dropout_backward(grad: Tensor, x: Tensor, weight: Tensor, p: float, seed: int) -> tuple[Tensor, Tensor]:
    """d = grad * m; grad_x = d where x > 0 else d * weight[c]; grad_weight[c] = the sum of
    x * d over channel c's elements with x <= 0 (in the compute type, returned in weight's
    shape and dtype)."""
    xc = x.to(compute_dtype(x))
    d = grad.to(xc.dtype) * _multiplier(x, p, seed)
    grad_input = _out(torch.where(xc > 0, d, d * _slopes(x, weight)), x)
    contrib = torch.where(xc > 0, torch.zeros_like(d), xc * d)
    if weight.numel() == 1:
        grad_weight = contrib.sum()
    else:
        grad_weight = contrib.sum([dim for dim in range(x.dim()) if dim != 1])
    return grad_input, grad_weight.to(weight.dtype).reshape(weight.shape)

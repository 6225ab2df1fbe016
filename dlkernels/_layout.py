"""Memory-layout helpers shared by the Python-side backends (Triton launchers, optimizers)."""

from __future__ import annotations

from torch import Tensor


def is_dense(t: Tensor) -> bool:
    """Non-overlapping and dense: some permutation of the dims is contiguous (size-1 dims and
    their strides do not matter), so kernels can walk its memory linearly. torch has no public
    Tensor method for this."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride(), strict=True) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True

"""The floating dtypes every family accepts and the type they compute in (one definition)."""

from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
REDUCED_DTYPES = (torch.float16, torch.bfloat16)


def compute_dtype(t: Tensor) -> torch.dtype:
    """float64 for float64 tensors; float32 for float32, float16 and bfloat16 (their kernels
    accumulate and compute in float32, as torch's CPU and CUDA kernels do)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32

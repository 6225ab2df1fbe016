"""Drop-in replacements for torch.nn modules, backed by dlkernels kernels."""

from dlkernels.nn.activation import LeakyReLU, PReLU
from dlkernels.nn.batch_norm import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
    SyncBatchNorm,
)

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "LeakyReLU",
    "PReLU",
    "SyncBatchNorm",
]

"""Argument checks that reproduce torch's exception types and messages for the same call."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from dlkernels._dtypes import FLOAT_DTYPES

# c10's ScalarType names, as torch prints them in "not implemented for 'Long'".
_SCALAR_TYPE_NAMES = {
    torch.uint8: "Byte", torch.int8: "Char", torch.int16: "Short", torch.int32: "Int",
    torch.int64: "Long", torch.bool: "Bool", torch.float16: "Half", torch.float32: "Float",
    torch.float64: "Double", torch.bfloat16: "BFloat16", torch.complex32: "ComplexHalf",
    torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble",
}


def scalar_type_name(dtype: torch.dtype) -> str:
    return _SCALAR_TYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def tensor_arg(fn: str, name: str, position: int, value: object) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(
            f"{fn}(): argument '{name}' (position {position}) must be Tensor, not {type(value).__name__}"
        )


def number_arg(fn: str, name: str, position: int, value: object) -> float:
    """A torch Scalar argument as a float: numbers and 0-d tensors, as torch's parser accepts."""
    if isinstance(value, Tensor) and value.dim() == 0:
        value = value.item()
    if isinstance(value, complex):
        raise RuntimeError("value cannot be converted to type float without overflow")
    if not isinstance(value, numbers.Real):
        raise TypeError(
            f"{fn}(): argument '{name}' (position {position}) must be Number, not {type(value).__name__}"
        )
    return float(value)


def float_dtype(op: str, x: Tensor) -> None:
    """torch raises NotImplementedError from its dtype dispatch for non-float inputs."""
    if x.dtype not in FLOAT_DTYPES:
        raise NotImplementedError(f'"{op}_{x.device.type}" not implemented for \'{scalar_type_name(x.dtype)}\'')


def same_device(x: Tensor, other: Tensor) -> None:
    if x.device != other.device:
        raise RuntimeError(f"Tensor on device {x.device} is not on the expected device {other.device}!")

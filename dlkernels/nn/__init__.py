"""Drop-in replacements for torch.nn modules, backed by dlkernels kernels."""

from dlkernels.nn.activation import LeakyReLU, PReLU

__all__ = ["LeakyReLU", "PReLU"]

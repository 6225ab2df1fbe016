"""torch.library custom ops (schema, fake implementation, autograd), one module per family.
Each op body asks dlkernels._backend for the implementation, at call time."""

from dlkernels.ops import activation, batch_norm

__all__ = ["activation", "batch_norm"]

"""Fused optimizers: drop-in torch.optim.Adam, AdamW and RMSprop (subclasses of them, same
arguments, update rule, state keys and state_dict) with optimizer-wide gradient clipping and
the whole update in one kernel pass per parameter per step.

    opt = dlkernels.optim.FusedAdamW(model.parameters(), lr=1e-3, max_grad_norm=1.0)
"""

from dlkernels.optim.adam import FusedAdam, FusedAdamW
from dlkernels.optim.rmsprop import FusedRMSprop

__all__ = ["FusedAdam", "FusedAdamW", "FusedRMSprop"]

"""Which torch module each dlkernels module stands in for: tables that each family's file fills at
import (``dlkernels/nn/<family>.py``), and that ``dlkernels.fuse`` reads. No hand-kept list anywhere
else; dependency-free so any family can import it.

- ``TWINS``: torch class -> dlkernels drop-in. The drop-in subclasses the torch class and adds no
  state, so a module is swapped by setting its ``__class__`` (same object, parameters, buffers,
  hooks, state_dict keys).
- ``CHAINS``: torch BatchNorm class -> the fused BatchNormAct class of the same rank, which a
  ``BatchNorm -> activation`` chain becomes.
- ``CHAIN_ACT_MODULES`` / ``CHAIN_ACT_CALLS``: what counts as the activation of a chain, and how to
  read it: a module class -> ``reader(module)``; a function (``torch.relu``, ``F.leaky_relu``) or a
  Tensor method name (``"relu"``) -> ``reader(args, kwargs)`` of the call. A reader returns
  ``(activation, negative_slope)`` in BatchNormAct's terms, or a string saying why that call or
  module cannot be fused (e.g. a slope computed at run time).
- ``CHAIN_DROPOUTS``: dropout classes recognized right after a chain's activation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

ActRead = tuple[str, float] | str

TWINS: dict[type, type] = {}
CHAINS: dict[type, type] = {}
CHAIN_ACT_MODULES: dict[type, Callable[[Any], ActRead]] = {}
CHAIN_ACT_CALLS: dict[Callable[..., Any] | str, Callable[[tuple[Any, ...], dict[str, Any]], ActRead]] = {}
CHAIN_DROPOUTS: set[type] = set()


def register_twin(torch_cls: type, dlk_cls: type) -> None:
    """``dlk_cls`` is a 1:1 drop-in for ``torch_cls`` (a subclass adding no state)."""
    if not issubclass(dlk_cls, torch_cls):
        raise TypeError(f"{dlk_cls.__name__} must subclass {torch_cls.__name__} to be its twin")
    TWINS[torch_cls] = dlk_cls


def register_chain(torch_bn_cls: type, fused_cls: type) -> None:
    """A ``torch_bn_cls -> activation`` chain becomes ``fused_cls`` (a BatchNormAct class)."""
    CHAINS[torch_bn_cls] = fused_cls


def register_chain_activation(key: type | Callable[..., Any] | str, reader: Callable[..., ActRead]) -> None:
    """An activation a chain may end with: a module class (``reader(module)``), or a function or Tensor
    method name (``reader(args, kwargs)``, args as called, the input first)."""
    if isinstance(key, type):
        CHAIN_ACT_MODULES[key] = reader
    else:
        CHAIN_ACT_CALLS[key] = reader


def register_chain_dropout(torch_cls: type) -> None:
    """A dropout module class recognized right after a chain's activation."""
    CHAIN_DROPOUTS.add(torch_cls)

"""Drop-in replacements for torch.nn modules, backed by dlkernels kernels: the ``__all__`` of
every family's module here (dlkernels/nn/<family>.py), gathered by family."""

from __future__ import annotations

import importlib
import importlib.util

from dlkernels.ops import FAMILIES

__all__: list[str] = []
for _family in FAMILIES:
    if importlib.util.find_spec(f"{__name__}.{_family}") is None:  # a family without modules (optim)
        continue
    _module = importlib.import_module(f"{__name__}.{_family}")
    for _name in _module.__all__:
        globals()[_name] = getattr(_module, _name)
        __all__.append(_name)
__all__.sort()
del _family, _module, _name

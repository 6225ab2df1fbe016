"""torch.library custom ops (schema, fake implementation, autograd), one module per family.
Each op body asks dlkernels._backend for the implementation, at call time.

A family registers itself by existing: every public module here is a family. Its module lists
``FUNCTIONAL`` (names dlkernels.functional re-exports) and defines ``self_check(device)`` (the
max error against the reference, run by ``python -m dlkernels``); its modules, if any, are
``dlkernels/nn/<family>.py`` (re-exported by dlkernels.nn). See docs/DESIGN.md, "Adding a family".
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

FAMILIES: tuple[str, ...] = tuple(
    sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")))


def family_module(family: str) -> ModuleType:
    """dlkernels.ops.<family> (importing it registers its torch.ops.dlkernels ops)."""
    return importlib.import_module(f"{__name__}.{family}")


for _family in FAMILIES:
    family_module(_family)

__all__ = ["FAMILIES", "family_module"]

"""The one place that picks an implementation for an op.

Backends: ``cpu`` (C++ kernels in dlkernels._C.cpu), ``cuda`` (CUDA C++ in dlkernels._C.cuda),
``triton`` (triton_ops, on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1) and
``reference`` (plain torch, dlkernels/reference). Every backend module exposes the same function
names per family, so an op asks for ``impl("activation", "prelu", device)``.

Choice, first match wins: ``use_backend(...)`` context, the DLK_BACKEND environment variable,
then automatic by device: cpu -> cpu; cuda -> cuda, else triton; anything else -> reference.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.util
import os
import warnings
from collections.abc import Callable, Iterator
from types import ModuleType

import torch

BACKENDS = ("cpu", "cuda", "triton", "reference")

try:
    from dlkernels import _C  # type: ignore[attr-defined]

    _C_ERROR: str | None = None
except ImportError as e:  # a source checkout without a build, or a broken build
    _C = None
    _C_ERROR = str(e)
    warnings.warn(
        f"dlkernels: the compiled extension dlkernels._C is missing ({e}); every op falls back to "
        "the slow 'reference' backend. Build it with `pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )

# SIMD levels of the CPU kernels, lowest first; DLK_CPU_CAPABILITY=<level> (read by the extension
# when it loads, like torch's ATEN_CPU_CAPABILITY) runs a lower level than the CPU's best.
CPU_CAPABILITIES = ("default", "avx2", "avx512")


def _check_cpu_capability() -> None:
    """Warn when DLK_CPU_CAPABILITY could not be honoured (the extension then runs the CPU's best
    level, or, for a level above the CPU's, the best it has: never an illegal instruction)."""
    want = os.environ.get("DLK_CPU_CAPABILITY")
    if _C is None or want is None:
        return
    got, native = _C.cpu.capability(), _C.cpu.native_capability()
    if want not in CPU_CAPABILITIES:
        msg = f"is not one of {', '.join(CPU_CAPABILITIES)}"
    elif want != got:
        msg = f"is above what this CPU supports ({native})"
    else:
        return
    warnings.warn(f"dlkernels: DLK_CPU_CAPABILITY={want!r} {msg}; the CPU kernels run at {got}",
                  RuntimeWarning, stacklevel=2)


_check_cpu_capability()

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("dlk_backend", default=None)

# The eager fast path (csrc/eager/eager.h): C++ entries that run the cpu backend's kernels on plain
# CPU calls and return None otherwise. They take it only when this rule would pick "cpu" for CPU
# tensors (use_backend(None or "cpu"), else DLK_BACKEND unset, "auto" or "cpu"), which they read from
# this ContextVar and the environment themselves.
eager = getattr(_C, "eager", None)
if eager is not None:
    eager.set_backend_var(_override)


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot run here (the message says what is missing)."""


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def status() -> dict[str, tuple[bool, str]]:
    """For each backend: (usable on some device here, explanation)."""
    out: dict[str, tuple[bool, str]] = {}
    gpu = torch.cuda.is_available()
    if _C is None:
        out["cpu"] = (False, f"dlkernels._C is not built or failed to load: {_C_ERROR}")
    else:
        out["cpu"] = (True, f"C++ kernels, SIMD {_C.cpu.capability()} (CPU: {_C.cpu.native_capability()}), "
                                f"{torch.get_num_threads()} threads")
    if _C is None:
        out["cuda"] = (False, "dlkernels._C is not built")
    elif not _C.build_info["cuda"]:
        out["cuda"] = (False, "dlkernels._C was built without CUDA (DLK_CUDA=0, or no CUDA torch/toolkit)")
    elif not gpu:
        out["cuda"] = (False, f"built for {_C.build_info['cuda_arch_list']}, but no CUDA device is visible")
    else:
        out["cuda"] = (True, f"built for {_C.build_info['cuda_arch_list']}")
    if importlib.util.find_spec("triton") is None:
        out["triton"] = (False, "the triton package is not installed")
    elif gpu:
        out["triton"] = (True, "compiles for the visible CUDA device")
    elif _triton_interpreted():
        out["triton"] = (True, "runs on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1)")
    else:
        out["triton"] = (False, "installed, but no CUDA device; set TRITON_INTERPRET=1 to interpret on CPU")
    out["reference"] = (True, "plain torch")
    return out


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Run the ops inside the block on backend ``name`` (None: automatic)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown dlkernels backend {name!r}; choose one of {BACKENDS}")
    token = _override.set(name)
    try:
        yield
    finally:
        _override.reset(token)


def requested() -> str | None:
    """The backend asked for by use_backend or DLK_BACKEND, or None for automatic."""
    name = _override.get()
    if name is None:
        name = os.environ.get("DLK_BACKEND") or None
        if name is not None and name not in BACKENDS and name != "auto":
            raise ValueError(f"DLK_BACKEND={name!r} is not a dlkernels backend; choose one of {BACKENDS}")
        if name == "auto":
            name = None
    return name


def select(device: torch.device) -> str:
    """The backend that runs an op on tensors of ``device``; raises if the asked one cannot."""
    name = requested()
    if name is None:
        if device.type == "cpu":
            return "cpu" if _C is not None else "reference"
        if device.type == "cuda":
            if _C is not None and _C.build_info["cuda"]:
                return "cuda"
            return "triton" if importlib.util.find_spec("triton") is not None else "reference"
        return "reference"
    if name == "reference":
        return name
    if name == "cpu":
        if _C is None:
            raise BackendUnavailableError(
                f"dlkernels backend 'cpu' is unavailable: dlkernels._C failed to load ({_C_ERROR})"
            )
        if device.type != "cpu":
            raise BackendUnavailableError(f"dlkernels backend 'cpu' cannot run {device.type} tensors")
    elif name == "cuda":
        ok, why = status()["cuda"]
        if not ok:
            raise BackendUnavailableError(f"dlkernels backend 'cuda' is unavailable: {why}")
        if device.type != "cuda":
            raise BackendUnavailableError(f"dlkernels backend 'cuda' cannot run {device.type} tensors")
    elif name == "triton":
        ok, why = status()["triton"]
        if importlib.util.find_spec("triton") is None:
            raise BackendUnavailableError(f"dlkernels backend 'triton' is unavailable: {why}")
        if device.type == "cpu" and not _triton_interpreted():
            raise BackendUnavailableError(
                "dlkernels backend 'triton' cannot run CPU tensors unless TRITON_INTERPRET=1 is set "
                "before triton is imported"
            )
        if device.type not in ("cpu", "cuda"):
            raise BackendUnavailableError(f"dlkernels backend 'triton' cannot run {device.type} tensors")
    return name


def _module(backend: str, family: str) -> ModuleType:
    if backend in ("cpu", "cuda"):
        return getattr(_C, backend)
    if backend == "triton":
        return importlib.import_module(f"triton_ops.{family}")
    return importlib.import_module(f"dlkernels.reference.{family}")


def impl(family: str, name: str, device: torch.device) -> Callable:
    """The function ``name`` of ``family`` on the backend selected for ``device``.

    A family a backend has no kernels for (e.g. no Triton optimizers) raises when that backend
    was asked for by name; when it was only the automatic choice, the op runs on the reference,
    with a warning (once per backend and kernel) that names what is missing: never silently slow.
    """
    # Resolved once per (request, device type, kernel): ops call this on every call.
    key = (_override.get(), os.environ.get("DLK_BACKEND"), device.type, family, name)
    fn = _resolved.get(key)
    if fn is None:
        fn = _resolved[key] = _resolve(family, name, device)
    return fn


def _resolve(family: str, name: str, device: torch.device) -> Callable:
    backend = select(device)
    try:
        return getattr(_module(backend, family), name)
    except (ModuleNotFoundError, AttributeError) as e:
        if backend == "reference" or requested() == backend:
            raise BackendUnavailableError(f"dlkernels backend '{backend}' has no {family} kernel {name!r}") from e
        if (backend, family, name) not in _fallbacks_warned:
            _fallbacks_warned.add((backend, family, name))
            warnings.warn(f"dlkernels: backend '{backend}' (chosen for {device.type} tensors) has no {family} kernel "
                          f"{name!r}; it runs on the slow 'reference' backend (plain torch) instead",
                          RuntimeWarning, stacklevel=3)
        return getattr(_module("reference", family), name)


_fallbacks_warned: set[tuple[str, str, str]] = set()
_resolved: dict[tuple, Callable] = {}

"""CPU-side process settings that matter for kernel speed.

glibc's malloc serves every request above its mmap threshold with fresh pages from the OS and
unmaps them again on free. The threshold adapts upwards as blocks are freed, but never beyond
32 MiB on 64-bit systems, so in a training loop each activation or gradient tensor larger than
that (a 64x64x56x56 float32 tensor is 51 MB) pays one page fault per 4 KiB page on every step.
On the development machine a 51 MB elementwise op ran at about 5 GB/s into a new tensor and
about 33 GB/s into reused memory; the page faults cost more than the kernel.

`reuse_large_allocations()` changes glibc's settings so that freed large blocks stay in the heap
and are handed out again. It is deliberately a separate, explicit call: the effect is
process-wide (every allocation of every library in the process), sticky, and trades memory for
speed (the process keeps its peak heap instead of returning it to the OS).

This module only uses the standard library, so importing it has no side effects and does not
depend on torch or on the rest of dlkernels.
"""

from __future__ import annotations

import ctypes
import threading

__all__ = ["large_allocations_reused", "reuse_large_allocations"]

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4

_INT_MAX = 2**31 - 1  # mallopt takes a C int
# glibc's built-in values. The dynamic mmap threshold starts at 128 KiB and grows up to
# DEFAULT_MMAP_THRESHOLD_MAX (32 MiB with 8-byte longs); the trim threshold follows at twice it.
_DEFAULT_MMAP_MAX = 65536
_DYNAMIC_MMAP_THRESHOLD_MAX = 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long)

_lock = threading.Lock()
_reused = False


def _glibc() -> ctypes.CDLL:
    """The C library, if it is glibc and glibc's malloc is the one in use, else RuntimeError."""
    try:
        process = ctypes.CDLL(None)  # symbols as the process resolves them
        libc = ctypes.CDLL("libc.so.6")
    except (OSError, TypeError) as e:  # TypeError: CDLL(None) on Windows
        raise RuntimeError(f"dlkernels.cpu: the C library is not glibc (cannot load libc.so.6: {e})") from e
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        raise RuntimeError("dlkernels.cpu: the C library is not glibc (no gnu_get_libc_version/mallopt)")
    # An allocator preloaded in front of glibc (jemalloc, tcmalloc, ...) ignores glibc's mallopt.
    addr = ctypes.cast(process.malloc, ctypes.c_void_p).value
    if addr != ctypes.cast(libc.malloc, ctypes.c_void_p).value:
        raise RuntimeError(
            "dlkernels.cpu: malloc in this process is not glibc's (another allocator is preloaded), "
            "so glibc's mallopt settings would have no effect"
        )
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc


def _mallopt(libc: ctypes.CDLL, name: str, param: int, value: int) -> None:
    if libc.mallopt(param, value) != 1:
        raise RuntimeError(f"dlkernels.cpu: glibc mallopt({name}, {value}) failed (returned 0)")


def reuse_large_allocations(enabled: bool = True) -> None:
    """Make glibc's malloc keep and reuse large freed blocks (``enabled=True``), or stop doing so.

    Why: with glibc's defaults every block above the mmap threshold (at most 32 MiB) is mapped
    fresh from the OS and unmapped on free, so each large tensor pays page faults on first touch,
    typically several times the cost of the kernel that writes it. With reuse, a freed block
    goes back to the heap and the next tensor of similar size gets already-mapped memory.

    What it sets (checked on glibc 2.36 by timing ``torch.empty(50M floats).fill_()`` in a loop
    and a 51 MB out-of-place add; see bench/ for the effect on whole kernels):

    - ``M_MMAP_MAX = 0``: never serve a request with its own mmap, so large blocks come from the
      heap, where freed memory is reused. Raising ``M_MMAP_THRESHOLD`` instead is not portable:
      older glibc refuses values above 32 MiB.
    - ``M_TRIM_THRESHOLD = INT_MAX`` (about 2 GiB): do not give the free top of the heap back to
      the OS on free; otherwise a freed large block at the top is trimmed and faulted in again.

    Effect and cost: process-wide, for every library in the process, from this call on. The
    process keeps its peak heap (resident memory does not shrink after a large step);
    ``malloc_trim(0)`` from libc still releases it on demand. Setting any mallopt parameter
    switches off glibc's dynamic mmap threshold for good. Only the main arena is covered
    fully: threads other than the main one use their own arenas, in which blocks above 64 MiB are
    always mmapped; on CPU, autograd runs the backward pass on the calling thread, so a
    training loop in the main thread is covered. (The environment variable
    ``MALLOC_ARENA_MAX=1`` puts all threads on the main arena, at the cost of lock contention.)

    ``enabled=False`` undoes a previous ``enabled=True`` as far as mallopt allows: mmap is
    allowed again (``M_MMAP_MAX`` back to glibc's 65536), and since the dynamic threshold cannot
    be switched back on, the mmap and trim thresholds are set to the values it converges to in a
    long-running process (32 MiB and 64 MiB); then ``malloc_trim(0)`` returns the free memory
    the heap kept to the OS. If reuse was never enabled through this module it changes nothing,
    so glibc's untouched defaults stay in place.

    Raises RuntimeError when the C library is not glibc, when another allocator is preloaded in
    front of it, or when mallopt rejects a value.
    """
    global _reused
    with _lock:
        if not enabled and not _reused:
            return
        libc = _glibc()
        if enabled:
            _mallopt(libc, "M_TRIM_THRESHOLD", _M_TRIM_THRESHOLD, _INT_MAX)
            _mallopt(libc, "M_MMAP_MAX", _M_MMAP_MAX, 0)
        else:
            _mallopt(libc, "M_MMAP_MAX", _M_MMAP_MAX, _DEFAULT_MMAP_MAX)
            _mallopt(libc, "M_MMAP_THRESHOLD", _M_MMAP_THRESHOLD, _DYNAMIC_MMAP_THRESHOLD_MAX)
            _mallopt(libc, "M_TRIM_THRESHOLD", _M_TRIM_THRESHOLD, 2 * _DYNAMIC_MMAP_THRESHOLD_MAX)
            libc.malloc_trim(0)  # hand back the free memory that reuse kept
        _reused = enabled


def large_allocations_reused() -> bool:
    """Whether large-block reuse is currently on, as set through `reuse_large_allocations`.

    Settings made elsewhere (``MALLOC_*`` environment variables, other callers of mallopt) are
    not visible here: glibc offers no way to read them back.
    """
    return _reused

"""Handing the memory a large checkpoint used back to the operating system.

A checkpoint of many slots builds short-lived structures (its deltas, the
store's validated pairs and rows) of tens of megabytes, on the shard's event
loop thread and on its writer thread. Python gives them back to glibc malloc,
which keeps the freed pages resident: glibc returns memory on its own only
from the top of a heap, and past the first large block it frees, its dynamic
mmap threshold rises (up to 32 MB), so later large blocks come from the heaps
too. Each large checkpoint then left several megabytes resident for good,
which is most of what a shard's resident size grew by beyond its live state.

``malloc_trim(0)`` walks every arena and gives each whole free page back
(``madvise``): the pages are released, not hidden, and fault back in when
used again. It holds one arena's lock at a time while it walks, for a
millisecond or a few, so it runs after a checkpoint rather than per batch,
and on the writer thread so the event loop keeps serving meanwhile.

It cannot release the free top of a thread's heap, though (glibc trims only
the main heap's top), and the shard's state lives in thread heaps: Ray runs
the actor's event loop on a thread of its own, and the store writes on
another. A thread heap gives its top back only when a large block is freed
and the top exceeds the trim threshold, which the dynamic thresholds put at
twice the largest block freed so far (up to 64 MB). ``tune`` fixes the
thresholds instead, once per process: blocks of 1 MiB or more are mapped on
their own and unmapped when freed, and a heap top past 2 MiB is given back at
the next large free. This does not slow the ingest path: a shard's time per
batch is the same with and without it (docs/performance.md).
"""

from __future__ import annotations

import ctypes
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

# mallopt parameters (malloc.h) and the values tune() sets
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 20
TRIM_THRESHOLD = 2 << 20

# A checkpoint of this many slots makes a few megabytes of short-lived objects
# (~250 bytes a slot between the deltas, the checked pairs and the store's rows).
TRIM_SLOTS = 10_000
# Smaller checkpoints and ingest leave garbage too, if less: it is given back at
# most this often, so a shard's resident size follows its live state everywhere.
TRIM_SECONDS = 30.0


def _glibc() -> ctypes.CDLL | None:
    """The C library if it is glibc; None elsewhere (macOS, musl: nothing to tune or trim)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the symbols this process already has loaded
    except OSError:
        return None
    names = ("gnu_get_libc_version", "malloc_trim", "mallopt")
    return libc if all(hasattr(libc, name) for name in names) else None


def _function(name: str, argtypes: list[Any]) -> Any:
    """A glibc function as a ctypes callable (which releases the GIL), or None."""
    if _LIBC is None:
        return None
    function = getattr(_LIBC, name)
    function.argtypes = argtypes
    function.restype = ctypes.c_int
    return function


_LIBC = _glibc()
_TRIM = _function("malloc_trim", [ctypes.c_size_t])
_MALLOPT = _function("mallopt", [ctypes.c_int, ctypes.c_int])
_tuned = False


def available() -> bool:
    return _TRIM is not None


def tune() -> bool:
    """Fix this process's malloc thresholds (see the module docstring); once, idempotent.

    Answers whether they are set. Call it early, before the large allocations
    it should govern: it changes nothing about blocks already allocated.
    """
    global _tuned
    if not _tuned and _MALLOPT is not None:
        _tuned = bool(
            _MALLOPT(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
            and _MALLOPT(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        )
    return _tuned


def trim() -> float:
    """Give every free page of the malloc heaps back; answers the seconds it took.

    ctypes releases the GIL for the call, so other threads run meanwhile.
    """
    if _TRIM is None:
        return 0.0
    started = time.perf_counter()
    _TRIM(0)
    return time.perf_counter() - started


class TrimPolicy:
    """When to trim: after a large checkpoint, else at most every ``seconds``.

    The heaps belong to the process, not to a shard, so one policy serves every
    shard of a process (tests run several in one): ``PROCESS``.
    """

    def __init__(
        self,
        slots: int = TRIM_SLOTS,
        seconds: float = TRIM_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.slots = slots
        self.seconds = seconds
        self._clock = clock
        self._last = clock()
        self._lock = threading.Lock()

    def due(self, slots: int) -> bool:
        """Whether to trim after a checkpoint that wrote ``slots`` slots (then noted as done)."""
        with self._lock:
            now = self._clock()
            if slots >= self.slots or now - self._last >= self.seconds:
                self._last = now
                return True
        return False


PROCESS = TrimPolicy()

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
thresholds instead, once per process: a heap top past 2 MiB is given back at
the next large free.

Blocks below 32 MiB (the most glibc allows) come from the heaps rather than
from maps of their own. A checkpoint's temporaries are tens of megabytes, the
same every interval: mapped, each one's pages were faulted in and zeroed
anew at every checkpoint, which was a third of a wide checkpoint's time. From
the heaps, the next checkpoint reuses the pages the last one freed. So a
trim, which hands those pages back, waits until the shard is idle (an
interval without a batch) or ``TRIM_SECONDS`` have passed: a shard that is
ingesting keeps about one checkpoint's temporaries resident beside its
state, and one that stops gives them back within two intervals.
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
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 2 << 20

# While batches flow, what checkpoints freed is given back at most this often (the
# next checkpoint would fault it back in); at once when the shard is idle.
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
    """When to trim: once the shard is idle, else at most every ``seconds``, and only
    if checkpoints wrote something since the last trim (``wrote``).

    The heaps belong to the process, not to a shard, so one policy serves every
    shard of a process (tests run several in one): ``PROCESS``.
    """

    def __init__(
        self,
        seconds: float = TRIM_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.seconds = seconds
        self._clock = clock
        self._last = clock()
        self._written = 0  # slots checkpointed since the last trim
        self._lock = threading.Lock()

    def wrote(self, slots: int) -> None:
        """A checkpoint wrote ``slots`` slots (its temporaries are garbage now)."""
        with self._lock:
            self._written += slots

    def due(self, idle: bool) -> bool:
        """Whether to trim now (then noted as done); ``idle``: no batch this interval."""
        with self._lock:
            now = self._clock()
            if self._written and (idle or now - self._last >= self.seconds):
                self._last, self._written = now, 0
                return True
        return False


PROCESS = TrimPolicy()

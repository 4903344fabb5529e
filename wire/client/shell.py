"""What the threaded and the asyncio client share: ``ClientShell``.

The two clients differ only in how they move bytes and wait (a thread with a
lock and a selector, or tasks on an event loop). Their options, their view
of the core (``pending``, ``last_seq``, ``durable_seq``, ``stats``), sealing
on demand and the way errors reach the caller are the same, so they live
here once.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

from tally.client.core import (
    DEFAULT_BACKOFF,
    DEFAULT_MAX_BATCH_BYTES,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_MAX_PENDING,
    ProducerCore,
)
from tally.client.errors import BatchRejected, ClientClosed, ClientFailed
from tally.client.validation import SeriesCache
from tally.wire.frames import FrameDecoder, FrameError

__all__ = ["ClientShell"]


class ClientShell(ABC):
    """What both shells share: the options, the core, its read-only view, and the errors.

    ``__init__`` takes the clients' public signature, builds the core (with the
    default producer name) and then calls ``_init_shell`` for the shell's own
    I/O. A shell sets ``_guard``, the context manager that makes touching the
    core safe (a lock, or nothing on an event loop), ``_fail``, which records
    a fatal error and wakes whoever waits, and ``_wake``, which tells its I/O
    side that there are frames to send.
    """

    _guard: contextlib.AbstractContextManager[Any]

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8781,
        *,
        producer: str | None = None,
        token: str | None = None,
        batch_size: int = 50_000,
        linger: float | None = 0.05,
        timeout: float = 30.0,
        max_pending: int = DEFAULT_MAX_PENDING,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        backoff: tuple[float, float] = DEFAULT_BACKOFF,
        on_error: Callable[[BatchRejected], None] | None = None,
        fallbacks: Sequence[tuple[str, int]] = (),
        first_seq: int | None = None,
    ) -> None:
        self._core = ProducerCore(
            producer if producer is not None else f"python-{uuid.uuid4()}",
            token,
            batch_size=batch_size,
            linger=linger,
            timeout=timeout,
            max_pending=max_pending,
            max_batch_bytes=max_batch_bytes,
            max_in_flight=max_in_flight,
            backoff=backoff,
            first_seq=first_seq,
        )
        self.host = host
        self.port = port
        # Other gateways of the service (one per node): tried in turn when a
        # connection fails, so a lost node costs a reconnect, not the producer.
        self.addresses = [(host, port), *((str(h), int(p)) for h, p in fallbacks)]
        self.timeout = float(timeout)
        self._on_error = on_error
        self._series = SeriesCache()
        self._closing = False  # no more inc; close is flushing
        self._stop = False  # the I/O thread or task must exit
        self._fatal_seen = False  # the fatal error was raised to a caller at least once
        self._init_shell()

    def _next_address(self) -> None:
        """After a failed connection: the next gateway of ``addresses``, round robin."""
        at = self.addresses.index((self.host, self.port))
        self.host, self.port = self.addresses[(at + 1) % len(self.addresses)]

    @abstractmethod
    def _init_shell(self) -> None:
        """Set up the shell's I/O (and ``_guard``); called last by ``__init__``."""

    @abstractmethod
    def _fail(self, failure: ClientFailed) -> None:
        """Record a fatal error in the core and wake every waiter."""

    @abstractmethod
    def _wake(self) -> None:
        """Tell the I/O side that batches were sealed (frames to send, a new deadline)."""

    # -- public API ------------------------------------------------------------

    @property
    def producer(self) -> str:
        """The name the server deduplicates this client's seqs under."""
        return self._core.producer

    @property
    def pending(self) -> int:
        """Increments held: buffered, or sent and not yet durable."""
        with self._guard:
            return self._core.pending

    @property
    def last_seq(self) -> int:
        """The seq of the last sealed batch."""
        with self._guard:
            return self._core.last_seq

    @property
    def durable_seq(self) -> int:
        """The highest seq of this producer the server reported durable."""
        with self._guard:
            return self._core.durable_seq

    @property
    def first_seq(self) -> int:
        """The seq of this client's first batch (the ``first_seq`` option, or the clock's)."""
        return self._core.first_seq

    @property
    def stats(self) -> dict[str, int]:
        """Counters (batches, sends, resends, connections, reconnects, overloaded, rejected)."""
        with self._guard:
            core = self._core
            return {**core.stats, "pending": core.pending, "kept_batches": len(core.kept)}

    def seal(self, seq: int | None = None) -> int | None:
        """Seal the open batch now and start sending it; its seq, or None if nothing was open.

        ``flush`` seals too, and then waits. ``seq`` gives the batch that seq
        instead of the next one, for a caller that numbers its batches itself
        so that a seq always names the same increments (``tally import``: the
        byte offset where a chunk of the file ends). It must be above
        ``last_seq``; batches sealed later follow it. Such a caller also sets
        ``first_seq``, ``linger=None`` and a ``batch_size`` and
        ``max_batch_bytes`` its batches stay under, and checks ``stats
        ["batches"]`` to be sure that no batch was sealed but by ``seal``.
        Raises what ``flush`` raises before waiting (``ClientFailed``,
        ``ClientClosed``), and ``ValueError`` for a seq not above the last.
        """
        with self._guard:
            self._check(rejections=False)
            last = self._core.seal(seq)
        if last is not None:
            self._wake()
        return last

    def take_rejections(self) -> list[BatchRejected]:
        """Every ``BatchRejected`` queued so far, which then is not raised any more.

        For a caller that asks rather than waits to be raised at (or than
        registers ``on_error``). A refusal of seq ``s`` is queued before
        ``durable_seq`` can move past ``s``: read ``durable_seq`` first, then
        this, and no refusal at or below that seq can still arrive.
        """
        with self._guard:
            errors = list(self._core.rejections)
            self._core.rejections.clear()
            return errors

    # -- errors (under ``_guard``) -----------------------------------------------

    def _check(self, *, rejections: bool, closing_ok: bool = False) -> None:
        """Raise what the caller must hear about."""
        core = self._core
        if core.fatal is not None:
            self._fatal_seen = True
            raise core.fatal.with_traceback(None)
        if self._stop or (self._closing and not closing_ok):
            raise ClientClosed("the client is closed")
        if rejections and core.rejections:
            raise core.rejections.popleft()

    def _has_room(self) -> bool:
        return self._core.pending < self._core.max_pending

    def _describe_full(self) -> str:
        core = self._core
        return (f"inc: {core.pending} increments pending (max_pending={core.max_pending}); "
                "this increment was not buffered")

    def _digest(self, decoder: FrameDecoder, data: bytes) -> None:
        """Give the core each whole message in ``data``, until one is fatal (under ``_guard``)."""
        core = self._core
        try:
            messages = decoder.feed(data)
        except FrameError as exc:
            core.garbage(exc)  # raises _Broken, or records a fatal error
            return
        now = time.monotonic()
        for msg in messages:
            core.receive(msg, now)
            if core.fatal is not None:
                return

    def _take_rejections(self) -> list[BatchRejected]:
        """The queued rejections when ``on_error`` takes them, else none (they are raised)."""
        if self._on_error is None or not self._core.rejections:
            return []
        errors = list(self._core.rejections)
        self._core.rejections.clear()
        return errors

    def _deliver(self, errors: list[BatchRejected]) -> None:
        """Hand rejections to ``on_error`` (not under ``_guard``); a raising callback is fatal."""
        for error in errors:
            try:
                self._on_error(error)  # type: ignore[misc]
            except Exception as exc:
                failure = ClientFailed(f"on_error raised {exc!r}")
                failure.__cause__ = exc
                self._fail(failure)
                return

    def _raise_unseen_fatal(self) -> None:
        """After close: raise the fatal error if no caller has been told of it yet."""
        if self._core.fatal is not None and not self._fatal_seen:
            self._fatal_seen = True
            raise self._core.fatal.with_traceback(None)

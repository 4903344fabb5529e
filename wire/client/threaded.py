"""``TallyClient``: the synchronous, thread-safe client; one background I/O thread.

Callers' threads only validate, append to the open batch under a lock and,
when a batch was sealed or began, wake the I/O thread. That thread owns the
socket (non-blocking, driven by a selector, so it reads answers while it
writes large frames and neither side can stall the other), seals lingering
batches, reconnects and resends, all through the sans-I/O ``ProducerCore``.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from tally.client.errors import BatchRejected, Broken, ClientFailed, TallyTimeout
from tally.client.shell import ClientShell
from tally.client.validation import prepare_event, prepare_increment
from tally.wire.frames import FrameDecoder

__all__ = ["TallyClient"]

log = logging.getLogger("tally.client")


class TallyClient(ClientShell):
    """Thread-safe, batching, resending client; see the ``tally.client`` docstring.

    - ``producer``: the name the server deduplicates seqs under (default: a
      fresh ``python-<uuid4>``); never shared by two live clients.
    - ``token``: sent in ``hello``; a refusal raises ``Unauthorized``.
    - ``batch_size``, ``linger``, ``max_batch_bytes``: when a batch is sealed
      (increments, seconds after its first increment or None for never, frame
      bytes).
    - ``timeout``: seconds for connecting, for the oldest frame in flight to
      be answered (then the connection is dropped and everything resent), and
      the default wait of ``flush`` and of an ``inc`` held by ``max_pending``.
    - ``max_pending``: increments held (buffered plus not yet durable) before
      ``inc`` blocks. ``max_in_flight``: batches sent and not yet answered.
    - ``backoff``: (first delay, cap) in seconds for reconnects and for
      resending after ``overloaded``.
    - ``on_error``: receives ``BatchRejected`` errors on the I/O thread
      instead of having them raised from ``inc`` / ``flush``; it must not
      block, nor call ``flush``, ``close`` or ``abort``.
    - ``fallbacks``: ``(host, port)`` of the service's other gateways (one runs
      per node of a cluster); after a failed connection the next is tried.
    - ``first_seq``: the seq of the first batch (default: the clock in
      microseconds, see "Producers and seqs"); with ``seal(seq)``, for a
      producer that numbers its batches itself.

    One background thread owns the socket (non-blocking, driven by a selector,
    so it reads answers while it writes large frames and neither side can
    stall the other), seals lingering batches, reconnects and resends. Callers
    only touch the core under the lock.
    """

    def _init_shell(self) -> None:
        self._cond = threading.Condition()
        self._guard = self._cond
        # Rejections taken for on_error and not yet handed to it: flush waits for them,
        # so when it returns on_error has seen every refusal so far (and a raising
        # on_error has stopped the client), whichever thread ran first.
        self._delivering = 0
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._thread = threading.Thread(
            target=self._io_main, name=f"tally-client:{self._core.producer}", daemon=True
        )
        self._thread.start()

    def _fail(self, failure: ClientFailed) -> None:
        with self._cond:
            self._core.fail(failure)
            self._cond.notify_all()

    # -- public API ------------------------------------------------------------

    def __enter__(self) -> TallyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def inc(
        self,
        tenant: str,
        metric: str,
        value: int = 1,
        ts: int | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        """Count ``value`` for the series at ``ts`` (Unix seconds, default now).

        Returns once buffered. Raises ``TypeError`` / ``ValueError`` for an
        invalid increment, a queued ``BatchRejected`` (this increment is then
        not buffered), ``TallyTimeout`` when ``max_pending`` stays reached for
        ``timeout`` seconds, or the client's fatal error.
        """
        prepared = prepare_increment(self._series, tenant, metric, value, ts, tags, time.time())
        core = self._core
        with self._cond:
            self._check(rejections=True)
            if not self._has_room():
                self._wait(self._has_room, self.timeout, self._describe_full)
            wake = core.add(*prepared, time.monotonic())
        if wake:
            self._wake()

    def send_columnar(
        self, seq: int, series: bytes | list[bytes], index: Any, ts: Any, values: Any
    ) -> None:
        """Send a batch built whole by the caller, columnar, as seq ``seq``.

        ``series`` is the series table, its entries ``[tenant, metric, tags|nil]``
        validated by the caller (e.g. with ``SeriesCache``: the server refuses
        the whole batch otherwise): a list of msgpack-packed entries, which the
        client numbers once in the producer's series table and defines on each
        connection (the ``series`` op), so a frame carries none of them: what a
        producer over many series wants; or the packed table itself (bytes),
        which goes in the frame. ``index[k]`` is row ``k``'s entry in it, ``ts``
        and ``values`` its columns. The batch is kept and resent like a sealed one; ``seq`` must
        be above ``last_seq`` and no ``inc`` may be buffered (a producer that
        numbers its batches itself: ``first_seq``, ``linger=None``). Waits for
        room like ``inc`` and raises what it raises, or ``ValueError``.
        """
        core = self._core
        with self._cond:
            self._check(rejections=True)
            if not self._has_room():
                self._wait(self._has_room, self.timeout, self._describe_full)
            core.add_columnar(seq, series, index, ts, values)
        self._wake()

    def event(self, tenant: str, type: str, ts: int | None = None, **fields: Any) -> None:
        """Buffer one raw event (``ts`` Unix seconds, default now) for the server's rules.

        Batched, kept and resent like ``inc``, and raises what ``inc`` raises;
        the fields are the event's (``agent="ann", response_seconds=95``).
        """
        event, size = prepare_event(tenant, type, ts, fields, time.time())
        core = self._core
        with self._cond:
            self._check(rejections=True)
            if not self._has_room():
                self._wait(self._has_room, self.timeout, self._describe_full)
            wake = core.add_event(event, size, time.monotonic())
        if wake:
            self._wake()

    def flush(self, durable: bool = True, timeout: float | None = None) -> None:
        """Send what is buffered; wait until everything so far is durable (or acked).

        Raises ``TallyTimeout`` after ``timeout`` (default: the client's)
        seconds, with nothing dropped; then a queued ``BatchRejected``, if any.
        """
        core = self._core
        wait = self.timeout if timeout is None else timeout
        with self._cond:
            self._check(rejections=False, closing_ok=True)
            if core.seal() is not None:
                self._wake()
            upto = core.last_seq
            self._wait(lambda: core.settled(upto, durable) and not self._delivering, wait,
                       lambda: f"flush: {core.describe_wait(upto, durable)}")
            self._check(rejections=True, closing_ok=True)

    def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until the server has welcomed this client (the token and protocol accepted).

        Never needed: the client connects in the background and keeps what is
        buffered meanwhile. It is for a producer that wants a wrong token or a
        server that is not a tally wire endpoint to fail at start-up, from
        this call, rather than from whichever call follows the refusal.
        Raises ``Unauthorized``, ``ProtocolMismatch`` or ``ProducerConflict``,
        or ``TallyTimeout`` after ``timeout`` (default: the client's) seconds
        naming the last problem (e.g. the connection refused).
        """
        core = self._core
        with self._cond:
            self._wait(lambda: core.ready, self.timeout if timeout is None else timeout,
                       lambda: f"wait_connected: not connected; last problem: {core.last_error}")

    def close(self, timeout: float | None = None) -> None:
        """Flush (durable), then stop the I/O thread and close the socket.

        The client is closed even when the flush raises; the error is then
        raised, and whatever ``pending`` said was not confirmed durable.
        """
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._cond.notify_all()  # an inc waiting for room gives up
        try:
            if self._core.fatal is None:
                self.flush(durable=True, timeout=timeout)
        finally:
            with self._cond:
                self._stop = True
            self._wake()
            self._thread.join()
            self._wake_r.close()
            self._wake_w.close()
        self._raise_unseen_fatal()

    def abort(self) -> None:
        """Stop now, without sealing or waiting: what is not durable is dropped.

        As a crash of this process would: the open batch is never sealed or
        sent, and kept batches stop being resent (``pending`` said how many
        increments that leaves undelivered). For a caller that resends them
        itself under the same seqs (``tally import``) or gives up on them;
        every other caller wants ``close``. Raises nothing; later calls
        raise ``ClientClosed``.
        """
        with self._cond:
            if self._stop:
                return
            self._closing = self._stop = True
            self._cond.notify_all()  # an inc waiting for room gives up
        self._wake()
        self._thread.join()
        self._wake_r.close()
        self._wake_w.close()

    # -- waiting ---------------------------------------------------------------

    def _wait(
        self, ready: Callable[[], bool], timeout: float | None, describe: Callable[[], str]
    ) -> None:
        """Wait on the condition until ``ready``; fatal errors and close interrupt (lock held)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        closing_ok = self._closing
        while True:
            self._check(rejections=False, closing_ok=closing_ok)
            if ready():
                return
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TallyTimeout(describe())
            self._cond.wait(remaining)

    # -- the I/O thread --------------------------------------------------------

    def _wake(self) -> None:
        # A full socket buffer means a wake-up is already pending: that is enough.
        with contextlib.suppress(BlockingIOError):
            self._wake_w.send(b"\0")

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._wake_r.recv(4096):
                pass

    def _io_main(self) -> None:
        try:
            self._io_loop()
        except Exception as exc:
            failure = ClientFailed(f"the client's I/O thread died: {exc!r}")
            failure.__cause__ = exc
            log.exception("tally client I/O thread died")
            self._fail(failure)

    def _io_loop(self) -> None:
        core = self._core
        delay = 0.0
        while True:
            if not self._pause(delay):
                return
            try:
                sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
            except OSError as exc:
                with self._cond:
                    delay = core.disconnected(f"connect to {self.host}:{self.port}: {exc}")
                    self._cond.notify_all()
                self._next_address()
                continue
            try:
                self._serve(sock)
                return  # stopping, or fatal
            except (OSError, Broken) as exc:
                with self._cond:
                    delay = core.disconnected(f"connection to {self.host}:{self.port}: {exc}")
                    self._cond.notify_all()
                log.info("tally connection lost (%s); reconnecting in %.3f s", exc, delay)
                self._next_address()
            finally:
                sock.close()

    def _pause(self, delay: float) -> bool:
        """Sleep ``delay`` between connections, still sealing lingering batches.

        False when the client is stopping (or failed).
        """
        core = self._core
        end = time.monotonic() + delay
        while True:
            with self._cond:
                if self._stop or core.fatal is not None:
                    return False
                now = time.monotonic()
                if core.poll(now):
                    self._cond.notify_all()
                linger = core.linger_deadline()
            if now >= end:
                return True
            wait = end - now if linger is None else max(0.0, min(end, linger) - now)
            self._select_wake(wait)

    def _select_wake(self, timeout: float) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._wake_r, selectors.EVENT_READ)
            if sel.select(timeout):
                self._drain_wake()

    def _serve(self, sock: socket.socket) -> None:
        """Drive one connection until it breaks (raises) or the client stops (returns)."""
        core = self._core
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        decoder = FrameDecoder()
        out: deque[memoryview] = deque()
        with self._cond:
            out.append(memoryview(core.connection_made(time.monotonic())))
        with selectors.DefaultSelector() as sel:
            sel.register(self._wake_r, selectors.EVENT_READ)
            sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
            while True:
                with self._cond:
                    if self._stop or core.fatal is not None:
                        return
                    now = time.monotonic()
                    if core.poll(now):
                        self._cond.notify_all()
                    if core.timed_out(now):
                        raise Broken(f"no answer within {core.timeout} s")
                    out.extend(memoryview(f) for f in core.take_frames(now))
                    deadline = core.deadline()
                events = selectors.EVENT_READ | (selectors.EVENT_WRITE if out else 0)
                sel.modify(sock, events)
                wait = None if deadline is None else max(0.0, deadline - now)
                for key, mask in sel.select(wait):
                    if key.fileobj is self._wake_r:
                        self._drain_wake()
                        continue
                    if mask & selectors.EVENT_READ:
                        self._read(sock, decoder)
                    if mask & selectors.EVENT_WRITE:
                        _write(sock, out)

    def _read(self, sock: socket.socket, decoder: FrameDecoder) -> None:
        try:
            data = sock.recv(1 << 16)
        except BlockingIOError:
            return
        if not data:
            raise Broken("the server closed the connection")
        errors: list[BatchRejected] = []
        try:
            with self._cond:
                try:
                    self._digest(decoder, data)
                finally:
                    errors = self._take_rejections()
                    self._delivering += len(errors)
                    self._cond.notify_all()
        finally:
            if errors:
                try:
                    self._deliver(errors)  # also when the connection broke after a rejection
                finally:
                    with self._cond:
                        self._delivering -= len(errors)
                        self._cond.notify_all()


def _write(sock: socket.socket, out: deque[memoryview]) -> None:
    """Write as much of ``out`` as the socket takes without blocking."""
    while out:
        try:
            n = sock.send(out[0])
        except BlockingIOError:
            return
        if n < len(out[0]):
            out[0] = out[0][n:]
            return
        out.popleft()

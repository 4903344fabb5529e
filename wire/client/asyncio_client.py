"""``AsyncTallyClient``: the asyncio twin of ``TallyClient``, the same API with ``await``.

Everything about batching, seqs, resend, errors and backpressure is in the
``tally.client`` docstring and holds here word for word; only the shell
differs. One task per client owns the connection (connects with backoff,
writes frames, seals lingering batches, watches the answer timeout) and one
reader task per connection reads answers, so a large frame being written
never stops answers from being read. ``on_error`` is called on the event
loop and must not block.

The client belongs to the event loop that first uses it and is not
thread-safe. Use it as ``async with AsyncTallyClient(...) as tally:`` or
call ``await tally.close()``: a client dropped without closing leaves its
task pending and loses what was not durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from tally.client.errors import Broken, ClientFailed, TallyTimeout
from tally.client.shell import ClientShell
from tally.client.validation import prepare_event, prepare_increment
from tally.wire.frames import FrameDecoder

__all__ = ["AsyncTallyClient"]

log = logging.getLogger("tally.client")


class AsyncTallyClient(ClientShell):
    """Batching, resending client for asyncio; see ``tally.client`` for the contract."""

    def _init_shell(self) -> None:
        self._guard = contextlib.nullcontext()  # only the event loop touches the core
        # Replaced at every change, so a waiter holding the old one is woken
        # once and re-checks its condition (an asyncio.Condition without a lock).
        self._changed = asyncio.Event()
        self._wakeup = asyncio.Event()  # the I/O task has something new to do
        self._task: asyncio.Task[None] | None = None

    def _fail(self, failure: ClientFailed) -> None:
        self._core.fail(failure)
        self._notify()

    def _wake(self) -> None:
        self._wakeup.set()
        if self._core.kept:
            self.start()

    # -- public API ------------------------------------------------------------

    async def __aenter__(self) -> AsyncTallyClient:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def start(self) -> None:
        """Start the I/O task (``inc`` and ``async with`` do it); needs the running loop."""
        if self._task is None and not self._stop:
            self._task = asyncio.get_running_loop().create_task(
                self._io_main(), name=f"tally-client:{self._core.producer}"
            )

    async def inc(
        self,
        tenant: str,
        metric: str,
        value: int = 1,
        ts: int | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        """As ``TallyClient.inc``; awaits (up to ``timeout``) while ``max_pending`` is reached."""
        prepared = prepare_increment(self._series, tenant, metric, value, ts, tags, time.time())
        self._check(rejections=True)
        self.start()
        core = self._core
        if not self._has_room():
            await self._wait(self._has_room, self.timeout, self._describe_full)
        if core.add(*prepared, time.monotonic()):
            self._wakeup.set()

    async def event(self, tenant: str, type: str, ts: int | None = None, **fields: Any) -> None:
        """As ``TallyClient.event``; awaits (up to ``timeout``) while ``max_pending`` is reached."""
        event, size = prepare_event(tenant, type, ts, fields, time.time())
        self._check(rejections=True)
        self.start()
        if not self._has_room():
            await self._wait(self._has_room, self.timeout, self._describe_full)
        if self._core.add_event(event, size, time.monotonic()):
            self._wakeup.set()

    async def flush(self, durable: bool = True, timeout: float | None = None) -> None:
        """As ``TallyClient.flush``."""
        core = self._core
        self._check(rejections=False, closing_ok=True)
        if core.seal() is not None:
            self._wakeup.set()
        if core.kept:
            self.start()
        upto = core.last_seq
        await self._wait(lambda: core.settled(upto, durable),
                         self.timeout if timeout is None else timeout,
                         lambda: f"flush: {core.describe_wait(upto, durable)}")
        self._check(rejections=True, closing_ok=True)

    async def wait_connected(self, timeout: float | None = None) -> None:
        """As ``TallyClient.wait_connected``: until the server has welcomed this client."""
        core = self._core
        self.start()
        await self._wait(lambda: core.ready, self.timeout if timeout is None else timeout,
                         lambda: f"wait_connected: not connected; last problem: {core.last_error}")

    async def close(self, timeout: float | None = None) -> None:
        """As ``TallyClient.close``: flush (durable), stop, and raise what went wrong."""
        if self._closing:
            return
        self._closing = True
        self._notify()
        try:
            if self._core.fatal is None and self._core.pending:
                await self.flush(durable=True, timeout=timeout)
        finally:
            self._stop = True
            self._wakeup.set()
            if self._task is not None:
                await self._task  # _io_main records its errors; it raises nothing
        self._raise_unseen_fatal()

    async def abort(self) -> None:
        """As ``TallyClient.abort``: stop now, without sealing or waiting; raises nothing."""
        if self._stop:
            return
        self._closing = self._stop = True
        self._notify()
        self._wakeup.set()
        if self._task is not None:
            await self._task

    # -- waiting ---------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait(
        self, ready: Callable[[], bool], timeout: float | None, describe: Callable[[], str]
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        closing_ok = self._closing
        while True:
            self._check(rejections=False, closing_ok=closing_ok)
            if ready():
                return
            changed = self._changed
            if deadline is None:
                await changed.wait()
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TallyTimeout(describe())
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                continue  # the next round raises TallyTimeout, unless ready by now

    async def _sleep(self, seconds: float | None) -> None:
        """Until ``seconds`` pass or the wake-up event is set (cleared by the caller)."""
        if seconds is None:
            await self._wakeup.wait()
            return
        try:
            await asyncio.wait_for(self._wakeup.wait(), seconds)
        except TimeoutError:
            return  # slept the whole time: that is what was asked

    # -- the I/O task ----------------------------------------------------------

    async def _io_main(self) -> None:
        try:
            await self._io_loop()
        except Exception as exc:
            failure = ClientFailed(f"the client's I/O task died: {exc!r}")
            failure.__cause__ = exc
            log.exception("tally client I/O task died")
            self._fail(failure)

    async def _io_loop(self) -> None:
        core = self._core
        delay = 0.0
        while True:
            if not await self._pause(delay):
                return
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port), self.timeout
                )
            except (OSError, TimeoutError) as exc:
                delay = core.disconnected(f"connect to {self.host}:{self.port}: {exc!r}")
                self._notify()
                self._next_address()
                continue
            try:
                await self._serve(reader, writer)
                return  # stopping, or fatal
            except (OSError, TimeoutError, Broken) as exc:
                delay = core.disconnected(f"connection to {self.host}:{self.port}: {exc!r}")
                self._notify()
                log.info("tally connection lost (%r); reconnecting in %.3f s", exc, delay)
                self._next_address()
            finally:
                # abort, not close: close would first try to write what is still
                # buffered, and wait for a server that may have stopped reading.
                # Nothing buffered matters any more: it is kept and resent.
                writer.transport.abort()
                try:
                    await writer.wait_closed()
                except OSError as exc:  # the connection is already broken; nothing to do
                    log.debug("closing a broken tally connection: %r", exc)

    async def _pause(self, delay: float) -> bool:
        """Wait ``delay`` between connections, sealing lingering batches; False to stop."""
        core = self._core
        end = time.monotonic() + delay
        while True:
            if self._stop or core.fatal is not None:
                return False
            now = time.monotonic()
            if core.poll(now):
                self._notify()
            if now >= end:
                return True
            linger = core.linger_deadline()
            self._wakeup.clear()
            await self._sleep(end - now if linger is None else max(0.0, min(end, linger) - now))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Drive one connection until it breaks (raises) or the client stops (returns)."""
        core = self._core
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        writer.write(core.connection_made(time.monotonic()))
        read_task = asyncio.get_running_loop().create_task(self._read(reader))
        try:
            while True:
                if self._stop or core.fatal is not None:
                    return
                if read_task.done():
                    read_task.result()  # raises why the reader stopped
                    if core.fatal is None:
                        raise Broken("the reader stopped")
                    return
                now = time.monotonic()
                if core.poll(now):
                    self._notify()
                if core.timed_out(now):
                    raise Broken(f"no answer within {core.timeout} s")
                frames = core.take_frames(now)
                self._wakeup.clear()
                if frames:
                    writer.writelines(frames)
                    await asyncio.wait_for(writer.drain(), core.timeout)
                    continue
                deadline = core.deadline()
                await self._sleep(None if deadline is None else max(0.0, deadline - now))
        finally:
            if not read_task.done():
                read_task.cancel()
            await asyncio.wait({read_task})
            if not read_task.cancelled() and read_task.exception() is not None:
                # Already raised above, or secondary to why this connection ends.
                log.debug("tally reader ended: %r", read_task.exception())

    async def _read(self, reader: asyncio.StreamReader) -> None:
        core = self._core
        decoder = FrameDecoder()
        try:
            while True:
                data = await reader.read(1 << 16)
                if not data:
                    raise Broken("the server closed the connection")
                try:
                    self._digest(decoder, data)
                finally:
                    self._notify()
                    self._wakeup.set()  # answers free the in-flight window, or end a pause
                    self._deliver(self._take_rejections())
                if core.fatal is not None:
                    return
        finally:
            self._wakeup.set()

"""A socket read straight into buffers handed out as views: asyncio streams, fewer copies.

asyncio's ``StreamReader`` copies every byte three times after the kernel:
the transport's chunk into the reader's bytearray, a slice of that, and the
slice into the ``bytes`` a ``read`` returns, and a gateway streaming row frames
reads enough bytes for those copies to show in its profile.
``ChunkReader`` is a ``BufferedProtocol``: the kernel writes into a buffer
it owns, and ``read`` returns a view of everything received since the last
read. A buffer is never written again where it was handed out, so a view
stays valid for as long as its holder keeps it (a frame decoded while the
batch before it is applied): when its free tail runs short, the next
receive goes to another buffer. The one before is kept as a spare and taken
again once no view of it is left (fresh pages from the kernel, zeroed on
first touch, cost more than the copies saved), so a connection holds at most
two buffers, and none once it has been idle for ``IDLE_RELEASE`` seconds with
everything read (a thousand producers that sent a burst each would otherwise
keep 2 MB apiece).

The writing side is asyncio's own ``StreamWriter``, on this protocol's flow
control: ``pause_writing``/``resume_writing`` and the ``_drain_helper`` its
``drain`` awaits, as asyncio's ``FlowControlMixin`` has them. That mixin is an
``asyncio.Protocol``, and uvloop (a Ray actor's event loop) treats any
``Protocol`` as one that takes ``data_received``, never ``get_buffer``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections import deque
from collections.abc import Awaitable, Callable

import numpy as np

log = logging.getLogger("tally.stream")

MIN_FREE = 64 * 1024  # a buffer's tail shorter than this: the next receive takes a new one
IDLE_RELEASE = 2.0  # seconds a reader waits with nothing unread before it lets its buffers go
EMPTY = memoryview(b"")

Handler = Callable[["ChunkReader", asyncio.StreamWriter], Awaitable[None]]


class ChunkReader(asyncio.BufferedProtocol):
    """One connection's receiving side; ``read`` gives whatever arrived since the last.

    ``size`` is a buffer's size, and how much may wait unread before the
    socket is no longer read (the sender then waits: TCP's own backpressure).
    """

    def __init__(self, size: int, loop: asyncio.AbstractEventLoop,
                 handler: Handler | None = None) -> None:
        """``handler``: a server's, run as the connection's task with this and a writer."""
        self._loop = loop
        self._size = size
        self._handler = handler
        self._task: asyncio.Task[None] | None = None  # (the loop keeps only weak references)
        self._buf: np.ndarray | None = None
        self._spare: np.ndarray | None = None  # the buffer before, reused once unviewed
        self._start = self._end = 0  # unread bytes of _buf: [start, end)
        self._eof = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._closed: asyncio.Future[None] = self._loop.create_future()
        self.transport: asyncio.Transport | None = None
        self._paused_reading = False
        self._paused_writing = False
        self._drain_waiters: deque[asyncio.Future[None]] = deque()
        self._lost = False

    # ---- the protocol (called by the event loop) ----------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  (uvloop's is no subclass)
        if self._handler is not None:
            writer = asyncio.StreamWriter(transport, self, None, self._loop)  # type: ignore
            self._task = self._loop.create_task(self._handler(self, writer))
            self._task.add_done_callback(_handler_ended)

    def get_buffer(self, sizehint: int) -> memoryview:
        buf = self._buf
        if buf is None or len(buf) - self._end < MIN_FREE:
            unread = self._end - self._start
            new = self._take_spare(max(self._size, 2 * unread))
            if unread:
                new[:unread] = buf[self._start:self._end]  # type: ignore[index]
            self._spare, self._buf, self._start, self._end = buf, new, 0, unread
            buf = new
        return memoryview(buf)[self._end:]  # type: ignore[arg-type]

    def _take_spare(self, size: int) -> np.ndarray:
        spare, self._spare = self._spare, None
        # Referenced only here (and by getrefcount's argument): no view of it is left.
        if spare is not None and len(spare) >= size and sys.getrefcount(spare) == 2:
            return spare
        return np.empty(size, np.uint8)  # (uninitialised: the kernel writes what is read)

    def buffer_updated(self, nbytes: int) -> None:
        self._end += nbytes
        if self._end - self._start > self._size and not self._paused_reading:
            assert self.transport is not None
            self.transport.pause_reading()
            self._paused_reading = True
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return True  # keep the transport open: answers may still be written

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        for waiter in self._drain_waiters:
            if not waiter.done():
                if exc is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(exc)
        self._eof = True
        if exc is not None:
            self._error = exc
        self._wake()
        if not self._closed.done():
            self._closed.set_result(None)

    async def _drain_helper(self) -> None:
        """What ``StreamWriter.drain`` awaits: the transport's buffer below its high mark."""
        if self._lost:
            raise ConnectionResetError("Connection lost")
        if not self._paused_writing:
            return
        waiter = self._loop.create_future()
        self._drain_waiters.append(waiter)
        try:
            await waiter
        finally:
            self._drain_waiters.remove(waiter)

    def _get_close_waiter(self, stream: asyncio.StreamWriter) -> asyncio.Future[None]:
        return self._closed  # (StreamWriter.wait_closed)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # ---- the reading side ---------------------------------------------------

    def _release(self) -> None:
        """Idle with nothing unread: the buffers go (a view handed out keeps its own)."""
        if self._start == self._end:
            self._buf = self._spare = None
            self._start = self._end = 0

    async def read(self) -> memoryview:
        """Everything received since the last read, as a view nothing will overwrite; an
        empty view at the end of the stream. Raises the error that ended the connection
        (once all that arrived before it was read)."""
        while self._start == self._end:
            if self._error is not None:
                raise self._error
            if self._eof:
                return EMPTY
            self._waiter = self._loop.create_future()
            idle = self._loop.call_later(IDLE_RELEASE, self._release)
            try:
                await self._waiter
            finally:
                self._waiter = None
                idle.cancel()
        assert self._buf is not None
        view = memoryview(self._buf)[self._start:self._end]  # type: ignore[arg-type]
        self._start = self._end
        if self._paused_reading and self.transport is not None:
            self._paused_reading = False
            self.transport.resume_reading()
        return view


def _handler_ended(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error(json.dumps({"event": "error", "where": "connection handler",
                              "error": repr(task.exception())[:500]}))


async def start_server(handler: Handler, host: str | None, port: int, size: int,
                       reuse_port: bool | None = None) -> asyncio.Server:
    """``asyncio.start_server`` with ``ChunkReader`` readers of ``size``-byte buffers."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: ChunkReader(size, loop, handler), host, port,
                                    reuse_port=reuse_port)


async def open_connection(host: str, port: int, size: int
                          ) -> tuple[ChunkReader, asyncio.StreamWriter]:
    """``asyncio.open_connection`` with a ``ChunkReader``."""
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_connection(lambda: ChunkReader(size, loop),
                                                       host, port)
    return protocol, asyncio.StreamWriter(transport, protocol, None, loop)

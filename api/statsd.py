"""StatsD ingress: UDP and TCP listeners on one port, folding parsed lines into Service.ingest.

The parsing and folding are wire/statsd.py's (sans I/O); this shell moves bytes, flushes
rows and counts. StatsD's contract is at most once: UDP has no answer, and a
StatsD client neither numbers nor resends what it sends, so there is no
producer/seq here. A line is counted once it is applied to the shards (and
is then as durable as anything tally has acknowledged as ``received``); a
datagram the kernel dropped, a line refused, or lines buffered when the
gateway stops uncleanly are lost, and every refusal is counted by reason in
``tally_statsd_rejected_lines_total`` and logged (rate-limited).

Folding: each datagram is folded as it arrives (wire/statsd.py's
``StatsdFolder``: a distinct line is parsed once, then costs a lookup and an
add) into one sum per (series, UTC hour); a flusher task sends the window to
``Service.ingest`` every ``flush_interval`` seconds (or once it holds
``flush_rows`` rows), so one Ray call per shard carries every line of the
window. Each line was checked on its own by the parser, so a window is
refused only for what a single line cannot show (an hour's sum leaving
int64); the window is then replayed line by line, the line blamed refused
alone and the rest retried. The window is bounded (``max_pending`` rows):
beyond it lines are refused as ``overloaded`` rather than held without limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections import Counter as Tally
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tally.actors import logs
from tally.api.service import IngestError, Service
from tally.wire.batches import BadBatch, BadRow, KnownSeries, rows_batch
from tally.wire.statsd import (
    MAX_DATAGRAM,
    MAX_LINE,
    Rejection,
    StatsdFolder,
    StatsdParser,
    Window,
)
from tally.wire.vocabulary import ErrorCode

log = logging.getLogger("tally.statsd")
UDP_BUFFER = 8 * 1024 * 1024  # asked of the kernel; it caps it at net.core.rmem_max
UDP_BURST = 1024  # datagrams read per wake-up before other tasks get a turn
UDP_GATHER = 0.001  # seconds datagrams gather after a burst that emptied the socket
RECV_SIZE = MAX_DATAGRAM + 1  # one byte more than allowed, so an oversize one is seen as such
INGRESS = "statsd"


def _peer_name(peer: Any) -> str:
    """A UDP peer travels as its address tuple (formatted only when logged), TCP as a str."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"udp:{peer[0]}:{peer[1]}"
    return str(peer)


class RateLimitedLog:
    """At most one log line per reason per ``interval`` seconds, with the count in between.

    A client sending a malformed line a thousand times a second must not
    turn the gateway's log into a copy of its traffic. The counting is
    ``logs.Throttle``'s, which every other throttled line of the service uses.
    """

    def __init__(self, interval: float = 1.0, clock: Callable[[], float] = time.monotonic,
                 logger: logging.Logger = log) -> None:
        self.logger = logger
        self._throttle = logs.Throttle(interval, clock)

    def rejected(self, reason: str, message: str, peer: Any, line: int) -> bool:
        """Count one refusal; log it if this reason was quiet for ``interval``. True if logged."""
        left_out = self._throttle.admit(reason)
        if left_out is None:
            return False
        self.logger.warning(json.dumps({
            "event": "statsd_rejected", "reason": reason, "count": left_out + 1,
            "example": message, "peer": _peer_name(peer), "line": line,
        }))
        return True


@dataclass
class StatsdStats:
    """The listener's own counters (also in GatewayMetrics): what a test or bench reads."""

    datagrams: int = 0
    tcp_connections: int = 0
    lines: int = 0
    accepted_lines: int = 0
    rejected: Tally[str] = field(default_factory=Tally)
    batches: int = 0
    rcvbuf: int = 0  # bytes of UDP receive buffer the kernel granted (it reports twice the ask)

    def as_dict(self) -> dict[str, Any]:
        return {"datagrams": self.datagrams, "tcp_connections": self.tcp_connections,
                "lines": self.lines, "accepted_lines": self.accepted_lines,
                "rejected": dict(self.rejected), "batches": self.batches,
                "rcvbuf": self.rcvbuf}


class StatsdIngress:
    """The StatsD listeners of one gateway, and the window between them and Service.ingest."""

    def __init__(
        self, service: Service, default_tenant: str | None = None, *,
        flush_rows: int = 100_000, flush_interval: float = 0.1, max_pending: int = 2_000_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.service = service
        self.parser = StatsdParser(default_tenant)
        self.folder = StatsdFolder(self.parser, max_pending)
        self.flush_rows = flush_rows
        self.flush_interval = flush_interval
        self.clock = clock
        self.stats = StatsdStats()
        self.logs = RateLimitedLog()
        self.known = KnownSeries()
        self._line_no = 0  # lines get numbers, so a refused batch can name one
        self._wake = asyncio.Event()
        self._flushing = asyncio.Lock()  # one flush at a time: flush() waits for the timed one
        self._flusher: asyncio.Task | None = None
        self._closing = False
        self._udp: socket.socket | None = None
        self._receiver: asyncio.Task | None = None
        self._errors = logs.Throttle(1.0)  # receive-loop errors: logged at most once a second
        self._tcp: asyncio.Server | None = None
        self._tcp_tasks: set[asyncio.Task] = set()
        self.port = 0

    @property
    def max_pending(self) -> int:
        """Rows the window holds at most (a timer line is three); beyond, lines are refused
        as ``overloaded``."""
        return self.folder.max_rows

    @max_pending.setter
    def max_pending(self, rows: int) -> None:
        self.folder.max_rows = rows

    # ---- listening -----------------------------------------------------

    async def start(self, host: str, port: int) -> int:
        """Listen on ``port`` (0: a free one) for TCP and UDP both; returns the port."""
        loop = asyncio.get_running_loop()
        for _attempt in range(20 if port == 0 else 1):
            self._tcp = await asyncio.start_server(self._tcp_client, host, port)
            chosen = self._tcp.sockets[0].getsockname()[1]
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                                 socket.SOCK_DGRAM)
            try:
                self.stats.rcvbuf = udp_buffer(sock)
                sock.bind((host, chosen))
            except OSError:
                sock.close()
                self._tcp.close()
                await self._tcp.wait_closed()
                self._tcp = None
                if port != 0:
                    raise
                continue  # the free TCP port is taken for UDP: try another
            sock.setblocking(False)
            self._udp = sock
            self._receiver = loop.create_task(self._receive_udp(sock))
            self.port = chosen
            break
        else:
            raise OSError(f"no port free for both TCP and UDP on {host}")
        if self.stats.rcvbuf < 2 * UDP_BUFFER:
            log.info(json.dumps({
                "event": "statsd_rcvbuf", "asked": UDP_BUFFER, "granted": self.stats.rcvbuf,
                "why": "net.core.rmem_max caps SO_RCVBUF; raise it for bursts to fit"}))
        self._flusher = loop.create_task(self._flush_loop())
        return self.port

    async def stop(self) -> None:
        """Stop listening, then apply what is buffered."""
        if self._receiver is not None:
            self._receiver.cancel()  # (it only ever waits between bursts: none is cut short)
            with contextlib.suppress(asyncio.CancelledError):
                await self._receiver
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            for task in list(self._tcp_tasks):
                task.cancel()
            await asyncio.gather(*self._tcp_tasks, return_exceptions=True)
            await self._tcp.wait_closed()
        if self._flusher is not None:
            # not cancelled: a batch in flight in Service.ingest must finish, not vanish
            self._closing = True
            self._wake.set()
            await self._flusher
        await self.flush()

    async def _receive_udp(self, sock: socket.socket) -> None:
        """Drain the socket in bursts; between bursts let datagrams gather for UDP_GATHER.

        Not a DatagramProtocol, nor a reader called at every readiness: either
        wakes the loop for about one datagram when traffic is steady, and the
        wake-up (the selector, a task step, the failed read that ends a burst)
        then costs more than the datagram. A short pause after a burst that
        emptied the socket lets the next burst hold the datagrams of a whole
        millisecond, which the receive buffer (UDP_BUFFER) holds many times
        over. An idle socket is waited on, not polled.
        """
        loop = asyncio.get_running_loop()
        fd = sock.fileno()
        while True:
            try:
                read = self._drain_udp(sock)
            except Exception as e:  # the listener outlives any one datagram
                left_out = self._errors.admit("receive")
                if left_out is not None:
                    log.error(json.dumps({"event": "error", "where": "statsd receive",
                                          "error": repr(e), "count": left_out + 1}))
                read = 1
            if read == UDP_BURST:
                await asyncio.sleep(0)  # more waiting: other tasks get a turn first
            elif read:
                await asyncio.sleep(UDP_GATHER)
            else:
                ready = loop.create_future()

                def wake(ready: asyncio.Future = ready) -> None:
                    loop.remove_reader(fd)
                    ready.set_result(None)

                loop.add_reader(fd, wake)
                try:
                    await ready
                finally:
                    loop.remove_reader(fd)

    def _drain_udp(self, sock: socket.socket) -> int:
        """Read the datagrams waiting, up to UDP_BURST; returns how many.

        The loop body is the receive and the fold, nothing else: counting and
        logging wait for the end of the burst.
        """
        recv = sock.recvfrom
        fold = self.folder.fold
        clock = self.clock
        line_no = self._line_no
        datagrams = 0
        try:
            for _ in range(UDP_BURST):
                data, addr = recv(RECV_SIZE)
                datagrams += 1
                line_no += fold(data, clock(), line_no, True, addr)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as e:  # e.g. ICMP errors surfacing on the socket
            log.debug("statsd udp error: %r", e)
        self.stats.datagrams += datagrams
        self._folded(line_no)
        return datagrams

    def _folded(self, line_no: int) -> None:
        """After a fold: count its lines, record its refusals, wake the flusher if due."""
        self.stats.lines += line_no - self._line_no
        self._line_no = line_no
        if self.folder.refused:
            refused, self.folder.refused = self.folder.refused, []
            for r, peer in refused:
                self.logs.rejected(r.reason, r.message, peer, r.line)
            self._count(0, Tally(r.reason for r, _ in refused))
        if self.folder.rows >= self.flush_rows:
            self._wake.set()

    async def _tcp_client(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        """Newline-delimited lines; a line over MAX_LINE is refused and skipped to its end."""
        self._tcp_tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        self.stats.tcp_connections += 1
        peername = writer.get_extra_info("peername") or ("?", 0)
        peer = f"tcp:{peername[0]}:{peername[1]}"
        pending = b""
        skipping = False  # inside an over-long line: drop bytes up to its newline
        try:
            while True:
                chunk = await reader.read(1 << 16)
                if not chunk:
                    break
                data = pending + chunk
                cut = data.rfind(b"\n")
                if skipping:
                    if cut < 0:
                        pending = b""
                        continue
                    first = data.find(b"\n")
                    skipping = False
                    data, cut = data[first + 1:], cut - first - 1
                if cut >= 0:
                    self.received(data[:cut + 1], peer, datagram=False)
                    pending = data[cut + 1:]
                else:
                    pending = data
                if len(pending) > MAX_LINE:
                    self.folder.refused.append((Rejection(
                        self._line_no, "too_long", f"line over {MAX_LINE} bytes"), peer))
                    self._folded(self._line_no + 1)
                    pending, skipping = b"", True
            if pending and not skipping:
                self.received(pending, peer, datagram=False)  # a last line without its newline
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._tcp_tasks.discard(asyncio.current_task())  # type: ignore[arg-type]
            writer.close()

    # ---- folding -------------------------------------------------------

    def received(self, data: bytes, peer: Any, datagram: bool = True) -> None:
        """Fold a datagram (or complete TCP lines) into the window; refusals are counted and
        logged here, good lines wait for a flush."""
        self._folded(self._line_no + self.folder.fold(
            data, self.clock(), self._line_no, datagram, peer))

    def _count(self, accepted: int, rejected: Tally[str]) -> None:
        self.stats.accepted_lines += accepted
        self.stats.rejected.update(rejected)
        self.service.metrics.statsd_lines(accepted, dict(rejected))

    @staticmethod
    def _peer_of(peers: dict[int, Any], line: int) -> Any:
        """The peer of a line (for log lines only): the datagram that started at or before it."""
        starts = [k for k in peers if k <= line]
        return peers[max(starts)] if starts else "?"

    # ---- flushing ------------------------------------------------------

    async def _flush_loop(self) -> None:
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.flush_interval)
            self._wake.clear()
            try:
                await self.flush()
            except Exception as e:  # the listener outlives any one batch
                log.error(json.dumps({"event": "error", "where": "statsd flush",
                                      "error": repr(e)}))

    async def flush(self) -> int:
        """Apply every line received so far; returns the lines this call applied.

        A flush already in progress (the timed one) is waited for first, so
        that everything received before this call is applied when it returns.
        Never raises on bad lines. The window is taken at once, so lines that
        arrive while the shards answer fold into the next one: a flush never
        holds up receiving.
        """
        async with self._flushing:
            window = self.folder.take()
            if not window.lines:
                return 0
            try:
                batch = rows_batch(window.batch_rows(), self.clock(), self.known)
                await self.service.ingest(batch)
            except (BadRow, BadBatch):
                return await self._apply_lines(window)
            except IngestError as e:
                if e.code == ErrorCode.BAD_ROW:
                    return await self._apply_lines(window)
                _data, _now, first_line, _datagram, peer = window.received[0]
                self._lost(window.lines, e, peer, first_line)
                return 0
            self.stats.batches += 1
            self.service.metrics.batch_accepted(INGRESS, window.increments)
            self._count(window.lines, Tally())
            return window.lines

    def _lost(self, lines: int, e: IngestError, peer: Any, line: int) -> None:
        """Overloaded, a shard restarting: at most once, these lines are lost (and counted)."""
        self.service.metrics.batch_rejected(INGRESS, e.code, lines)
        self._count(0, Tally({ErrorCode.OVERLOADED: lines}))
        self.logs.rejected(ErrorCode.OVERLOADED, f"{lines} lines lost: {e.message}", peer, line)

    async def _apply_lines(self, window: Window) -> int:
        """A window whose folded batch was refused for a row (an hour's sum leaving int64):
        its lines, one row per line value again, so that the line to blame is refused alone
        and the rest retried, as if nothing had been folded."""
        rows, lines, peers = self.folder.replay(window)
        applied = 0
        while rows:
            now = self.clock()
            blamed: int | None = None
            try:
                batch = rows_batch(rows, now, self.known)
                await self.service.ingest(batch)
            except BadRow as e:
                blamed, message = e.row, e.message
            except BadBatch as e:  # pragma: no cover - the parser only makes 5-field rows
                blamed, message = 0, e.message
            except IngestError as e:
                if e.code == ErrorCode.BAD_ROW and e.row is not None:
                    blamed, message = e.row, e.message
                else:
                    self._lost(len(set(lines)), e, self._peer_of(peers, lines[0]), lines[0])
                    return applied
            if blamed is None:
                n = len(set(lines))
                applied += n
                self.stats.batches += 1
                self.service.metrics.batch_accepted(INGRESS, batch.increments)
                self._count(n, Tally())
                return applied
            # The blamed row's line goes, whole (a timer line is three rows); the rest is retried.
            line = lines[blamed]
            reason = "overflow" if "int64" in message else "malformed"
            self.logs.rejected(reason, message, self._peer_of(peers, line), line)
            self._count(0, Tally({reason: 1}))
            keep = [k for k, ln in enumerate(lines) if ln != line]
            rows, lines = [rows[k] for k in keep], [lines[k] for k in keep]
        return applied


def udp_buffer(sock: socket.socket, size: int = 0) -> int:
    """Ask for a ``size`` (default UDP_BUFFER) receive buffer; returns what the kernel granted.

    SO_RCVBUFFORCE passes net.core.rmem_max but needs CAP_NET_ADMIN; without it
    SO_RCVBUF is capped at rmem_max. Linux reports twice the size set (the
    other half is its bookkeeping), which is what is returned: what it holds.
    """
    size = size or UDP_BUFFER
    force = getattr(socket, "SO_RCVBUFFORCE", None)
    try:
        if force is None:
            raise PermissionError
        sock.setsockopt(socket.SOL_SOCKET, force, size)
    except PermissionError:  # no CAP_NET_ADMIN: the capped way
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
        except OSError as e:  # the default buffer still works; what it is gets logged
            log.warning(json.dumps({"event": "statsd_rcvbuf", "error": repr(e)}))
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)

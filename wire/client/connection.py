"""``Connection``: one frame, then its answer; no batching, no resend.

For tests, scripts and tools that want to see every answer of the server
(an ``ack`` with its ``rows``, an ``error`` with its ``code``), or a server
without durable acks. Producers that must not lose or double count
increments want ``TallyClient``.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from tally.client.core import checked_first_seq
from tally.client.errors import ServerError
from tally.wire.frames import PROTOCOL_VERSION, FrameDecoder, encode_frame

__all__ = ["Connection", "Row"]

Row = Sequence[Any]  # [tenant, metric, tags | None, ts, value]


class Connection:
    """A synchronous connection: one frame, then its answer.

    For tests and scripts that want to see every answer. It neither batches
    nor resends; ``TallyClient`` does. Server errors are raised as
    ``ServerError`` carrying the wire code, so callers can branch on it.

    The server skips a batch whose seq its producer already used (it answers
    ``ack`` and applies nothing: a resend). So with a producer name passed
    in, seqs start at the clock in microseconds, as ``TallyClient``'s do,
    above anything an earlier run under that name sent; without one, the
    producer is a fresh ``python-<uuid4>`` and seqs start at 1. ``first_seq``
    sets the first seq explicitly.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8781,
        *,
        producer: str | None = None,
        token: str | None = None,
        timeout: float = 30.0,
        first_seq: int | None = None,
    ) -> None:
        first_seq = checked_first_seq(1 if first_seq is None and producer is None else first_seq)
        if producer is None:
            producer = f"python-{uuid.uuid4()}"
        self.producer = producer
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.decoder = FrameDecoder()
        self.pending: list[dict[str, Any]] = []
        self.seq = first_seq - 1  # the last seq sent
        self.table_size = 0  # entries of this connection's series table (define_series)
        self.welcome = self.request(
            {"op": "hello", "v": PROTOCOL_VERSION, "token": token, "producer": producer}
        )

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def request(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Send one frame and return its answer; an error answer raises ServerError."""
        self.sock.sendall(encode_frame(msg))
        reply = self.receive()
        if reply.get("op") == "error":
            raise ServerError(reply)
        return reply

    def receive(self) -> dict[str, Any]:
        """The next message from the server (a ``durable`` frame arrives unasked)."""
        while not self.pending:
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("server closed the connection")
            self.pending.extend(self.decoder.feed(data))
        return self.pending.pop(0)

    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def send_rows(self, rows: Iterable[Row]) -> dict[str, Any]:
        """One row ``inc`` frame (``[tenant, metric, tags|None, ts, value]`` each); the ack."""
        return self.request({"op": "inc", "seq": self._next_seq(), "rows": [list(r) for r in rows]})

    def define_series(
        self, series: Sequence[tuple[str, str, dict[str, str] | None]]
    ) -> dict[str, Any]:
        """Append entries to this connection's series table (the ``series`` op); the
        ``defined`` answer. ``send_columnar(None, ...)`` then indexes the table: a wide
        producer names each series once per connection instead of in every frame."""
        reply = self.request({"op": "series", "base": self.table_size,
                              "series": [list(s) for s in series]})
        self.table_size = reply["count"]
        return reply

    def send_columnar(
        self,
        series: Sequence[tuple[str, str, dict[str, str] | None]] | None,
        index: Sequence[int] | np.ndarray,
        ts: Sequence[int] | np.ndarray,
        values: Sequence[int] | np.ndarray,
    ) -> dict[str, Any]:
        """One columnar ``inc`` frame: ``index[k]`` names row ``k``'s series (in
        ``series``, or in the connection's table when ``series`` is None); the ack."""
        msg: dict[str, Any] = {
            "op": "inc",
            "seq": self._next_seq(),
            "i": np.asarray(index, dtype="<u4").tobytes(),
            "ts": np.asarray(ts, dtype="<i8").tobytes(),
            "v": np.asarray(values, dtype="<i8").tobytes(),
        }
        if series is not None:
            msg["series"] = [list(s) for s in series]
        return self.request(msg)

    def send_events(self, events: Iterable[dict[str, Any]]) -> dict[str, Any]:
        """One ``event`` frame; the ack's ``rows`` counts the increments the rules made."""
        return self.request({"op": "event", "seq": self._next_seq(), "events": list(events)})

    def ping(self) -> dict[str, Any]:
        return self.request({"op": "ping"})

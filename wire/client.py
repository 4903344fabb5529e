"""A synchronous connection speaking wire protocol v1 over TCP.

It sends one batch and waits for its answer; applications that want
batching, linger and resend build on it. Server errors are raised as
``ServerError`` carrying the wire code, so callers can branch on it.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from wire.frames import FrameDecoder, encode_frame

Row = Sequence[Any]  # [tenant, metric, tags | None, ts, value]


class ServerError(Exception):
    def __init__(self, frame: dict[str, Any]) -> None:
        super().__init__(f"{frame.get('code')}: {frame.get('message')}")
        self.frame = frame
        self.code: str = frame.get("code", "")
        self.row: int | None = frame.get("row")


class Connection:
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8781,
        *,
        producer: str = "python",
        token: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.decoder = FrameDecoder()
        self.pending: list[dict[str, Any]] = []
        self.seq = 0
        self.welcome = self.request({"op": "hello", "v": 1, "token": token, "producer": producer})

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
        return self.request({"op": "inc", "seq": self._next_seq(), "rows": [list(r) for r in rows]})

    def send_columnar(
        self,
        series: Sequence[tuple[str, str, dict[str, str] | None]],
        index: Sequence[int] | np.ndarray,
        ts: Sequence[int] | np.ndarray,
        values: Sequence[int] | np.ndarray,
    ) -> dict[str, Any]:
        return self.request(
            {
                "op": "inc",
                "seq": self._next_seq(),
                "series": [list(s) for s in series],
                "i": np.asarray(index, dtype="<u4").tobytes(),
                "ts": np.asarray(ts, dtype="<i8").tobytes(),
                "v": np.asarray(values, dtype="<i8").tobytes(),
            }
        )

    def ping(self) -> dict[str, Any]:
        return self.request({"op": "ping"})

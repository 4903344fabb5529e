"""The TCP ingress for wire protocol v1: an asyncio shell around the codec.

Frames of one connection are handled one after another and answered in
order; different connections interleave on the event loop. Decoding and
validation are the sans-I/O parts in wire/; this module only moves bytes.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from api.ingest import build_batch, check_ack
from api.service import IngestError, Service
from wire.frames import (
    DEFAULT_MAX_FRAME,
    Events,
    FrameDecoder,
    FrameError,
    Hello,
    Inc,
    Ping,
    ProtocolError,
    encode_frame,
    parse_message,
)

log = logging.getLogger("tally.tcp")
READ_SIZE = 1 << 20


class Connection:
    """One client connection's protocol state; ``handle`` maps a message to its reply."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.hello: Hello | None = None
        self.close_after = False

    async def handle(self, msg: dict[str, Any]) -> dict[str, Any]:
        try:
            parsed = parse_message(msg)
            if self.hello is None:
                if not isinstance(parsed, Hello):
                    self.close_after = True
                    raise ProtocolError("bad_request", "the first frame must be hello")
                self.hello = parsed
                return {"op": "welcome", "v": 1}
            if isinstance(parsed, Ping):
                return {"op": "pong"}
            if isinstance(parsed, Hello):
                raise ProtocolError("bad_request", "hello was already received on this connection")
            if isinstance(parsed, Events):
                raise ProtocolError(
                    "bad_request",
                    "events are not available yet: no fan-out rules are loaded; send inc",
                    seq=parsed.seq,
                )
            assert isinstance(parsed, Inc)
            return await self.inc(parsed)
        except ProtocolError as e:
            return e.frame()

    async def inc(self, m: Inc) -> dict[str, Any]:
        try:
            check_ack(m.ack)
            batch = build_batch(m.rows, m.series, m.i, m.ts, m.v, self.service.clock())
            rows = await self.service.ingest(batch)
        except IngestError as e:
            frame: dict[str, Any] = {
                "op": "error", "seq": m.seq, "code": e.code, "message": e.message,
            }
            if e.row is not None:
                frame["row"] = e.row
            return frame
        return {"op": "ack", "seq": m.seq, "rows": rows}


class TcpServer:
    def __init__(self, service: Service, *, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.service = service
        self.max_frame = max_frame
        self.server: asyncio.base_events.Server | None = None
        self.connections = 0

    async def start(self, host: str, port: int) -> int:
        self.server = await asyncio.start_server(self._serve, host, port, limit=READ_SIZE)
        return self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = Connection(self.service)
        decoder = FrameDecoder(self.max_frame)
        try:
            while not conn.close_after:
                data = await reader.read(READ_SIZE)
                if not data:
                    break
                try:
                    messages, fatal = decoder.feed(data), None
                except FrameError as e:
                    messages, fatal = e.messages, e
                out = [encode_frame(await conn.handle(m)) for m in messages]
                if fatal is not None:
                    out.append(encode_frame(
                        {"op": "error", "seq": None, "code": fatal.code, "message": fatal.message}
                    ))
                    conn.close_after = True
                writer.write(b"".join(out))
                await writer.drain()
        except ConnectionError as e:
            # The client went away; it resends what it has no answer for.
            log.debug("connection lost: %r", e)
        except Exception as e:
            log.error(json.dumps({"event": "error", "where": "tcp", "error": repr(e)}))
            raise
        finally:
            self.connections -= 1
            writer.close()

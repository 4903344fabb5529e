"""The msgpack frame codec of wire protocol v1, sans I/O: bytes in, messages out.

A frame is a 4-byte big-endian unsigned length N (1 <= N <= max frame) followed
by N bytes holding exactly one msgpack map. The decoder owns no socket and no
event loop (the h11 approach), so the TCP server, the HTTP ingest route and the
tests all drive the same code, and a hostile byte stream can be replayed in a
unit test.

Two error classes, because the protocol answers them differently:

- ``FrameError`` (``bad_frame``, ``too_large``): the byte stream itself is broken
  or hostile; frame boundaries can no longer be trusted, so the server answers
  an error frame and closes the connection.
- ``ProtocolError`` (``bad_request`` and the codes of later layers): a well-formed
  frame whose content is wrong; the server answers an error frame and keeps the
  connection open.

Memory: the length prefix is checked before a single body byte is buffered, and
msgpack's per-container limits are tied to the frame size, so no length field
inside a frame can make the decoder allocate more than the frame implies. One
frame still decodes into at most about one Python object per payload byte,
and a Python object is tens of bytes, so the worst frame costs well over an
order of magnitude its own size in memory (docs/performance.md has the figure
and how to reproduce it). Choose ``max_frame`` and the number of concurrent
connections with that in mind. A server's decoder (``scan_rows``) reads large row frames with numpy
instead (``wire/row_blocks.py``): at most ~40 bytes of arrays per payload byte,
and a frame it would read at more cost goes to the general decoder.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from tally.wire.row_blocks import RowBlock, SeriesBytes, scan_rows

DEFAULT_MAX_FRAME = 16 * 1024 * 1024
PROTOCOL_VERSION = 1
MAX_PRODUCER = 200
ACKS = ("received", "durable")
MAX_SEQ = 2**63 - 1  # seqs are stored as int64 (journal records, BSON)

_PREFIX = struct.Struct(">I")
_MAX_PREFIX = 2**32 - 1


class FrameError(Exception):
    """The byte stream is broken; fatal for the connection.

    ``code`` is ``bad_frame`` or ``too_large``. ``messages`` holds the complete
    messages that preceded the bad frame in the same ``feed`` call: they were
    well formed, so a server answers them (in order) before the error frame.
    """

    def __init__(self, code: str, message: str, messages: list[dict] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.messages: list[dict] = messages if messages is not None else []

    def frame(self) -> dict:
        """The error frame a server sends before closing."""
        return {"op": "error", "seq": None, "code": self.code, "message": self.message}


def _unpack(payload: memoryview) -> dict:
    """Decode one frame body into one map, or raise ``bad_frame``.

    ``max_*_len`` are tied to the payload size (a container of n entries needs
    at least n bytes), so a length field cannot ask for more than the frame
    holds. ``max_ext_len=0`` refuses every ext type, including the timestamp
    ext -1, which msgpack would otherwise decode without calling any hook.
    """
    size = len(payload)
    try:
        msg = msgpack.unpackb(payload, raw=False, strict_map_key=False, **_limits(size))
    except MemoryError:
        raise
    except UnicodeDecodeError as exc:
        raise FrameError("bad_frame", f"frame holds a string that is not UTF-8: {exc}") from None
    except msgpack.ExtraData:
        raise FrameError(
            "bad_frame", "frame holds bytes after its msgpack map; one frame is one map"
        ) from None
    except Exception as exc:  # msgpack raises ValueError subclasses, TypeError (unhashable key)
        text = str(exc) or type(exc).__name__
        if "max_ext_len" in text:
            text = "msgpack ext types are not accepted"
        raise FrameError("bad_frame", f"frame is not valid msgpack: {text}") from None
    if type(msg) is not dict:
        raise FrameError(
            "bad_frame", f"frame holds a msgpack {type(msg).__name__}; a frame holds one map"
        )
    return msg


def _limits(size: int) -> dict[str, int]:
    return {"max_str_len": size, "max_bin_len": size, "max_array_len": size,
            "max_map_len": size // 2, "max_ext_len": 0}


_ROWS_KEY = msgpack.packb("rows")
HEAD_BYTES = 256  # a row frame's keys before its rows fit (op, seq, ack: ~20 bytes)
SCAN_ROWS_FROM = 4096  # payload bytes: smaller row frames decode faster as they are


def _unpack_scanning_rows(payload: memoryview, series: SeriesBytes) -> dict | None:
    """A frame whose ``rows`` are read as a ``RowBlock``; or the frame decoded as it is
    when it holds no rows; or None: the general decoder is to read it (rows of another
    shape, or anything it will refuse, which it then names).

    The scanner finds where the rows end (msgpack's own ``skip`` over them cost a
    tenth of the scan), and the map's keys after them are read from there. The keys
    before them are read from the frame's head alone: an unpacker copies what it is
    fed, and the rows are nearly all of the frame."""
    size = len(payload)
    offset = 0  # where ``unpacker``'s bytes start in the payload

    def unpacker_at(at: int, upto: int = size) -> msgpack.Unpacker:
        unpacker = msgpack.Unpacker(None, raw=False, strict_map_key=False,
                                    max_buffer_size=max(upto - at, 1), **_limits(size))
        unpacker.feed(payload[at:upto])
        return unpacker

    unpacker = unpacker_at(0, min(size, HEAD_BYTES))  # (keys past it: OutOfData, below)
    msg: dict = {}
    block = None
    try:
        for _ in range(unpacker.read_map_header()):
            key = unpacker.unpack()
            if key == "rows" and type(key) is str:
                if block is not None:
                    return None
                block = scan_rows(payload, offset + unpacker.tell(), series)
                if block is None:
                    return None
                offset = block.span[1]
                unpacker = unpacker_at(offset)
            else:
                msg[key] = unpacker.unpack()
    except MemoryError:
        raise
    except Exception:  # any refusal is the general decoder's to word
        return None
    if offset + unpacker.tell() != size:
        return None
    if block is None:
        return msg
    if msg.get("op") != "inc":
        return None
    msg["rows"] = block
    return msg


class FrameDecoder:
    """Turns a byte stream into messages, whatever the chunk boundaries.

    Complete frames are decoded straight from the caller's chunk when nothing is
    held from before, and only the incomplete tail is copied, so a chunk with
    thousands of small frames costs one pass and no quadratic buffer shuffling.
    """

    __slots__ = ("_max", "_buf", "_error", "_series")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME, scan_rows: bool = False) -> None:
        """``scan_rows``: an ``inc`` frame's rows may come out as a ``RowBlock`` rather
        than a list (a server's decoder: ``tally.wire.batches.rows_batch`` takes either)."""
        if not 1 <= max_frame <= _MAX_PREFIX:
            raise ValueError(f"max_frame must be in [1, {_MAX_PREFIX}], not {max_frame}")
        self._max = max_frame
        self._buf = bytearray()
        self._error: FrameError | None = None
        self._series = SeriesBytes() if scan_rows else None

    @property
    def max_frame(self) -> int:
        return self._max

    @property
    def pending(self) -> int:
        """Bytes held of an incomplete frame, so a server can time out a stalled client."""
        return len(self._buf)

    def _decode(self, payload: memoryview) -> dict:
        if (self._series is not None and len(payload) >= SCAN_ROWS_FROM
                and _ROWS_KEY in bytes(payload[:64])):
            msg = _unpack_scanning_rows(payload, self._series)
            if msg is not None:
                return msg
        return _unpack(payload)

    def _size(self, view: memoryview, pos: int) -> int:
        (size,) = _PREFIX.unpack_from(view, pos)
        if size > self._max:
            raise FrameError(
                "too_large", f"frame of {size} bytes exceeds the limit of {self._max} bytes"
            )
        if size == 0:
            raise FrameError("bad_frame", "frame of 0 bytes; a frame holds one msgpack map")
        return size

    def feed(self, data: bytes | bytearray | memoryview) -> list[dict]:
        """Complete messages so far, in order.

        Raises ``FrameError`` on the first broken frame; the decoder then refuses
        all further input (the stream's frame boundaries are lost).
        """
        payloads, fatal = self.frames(data)
        out: list[dict] = []
        for payload in payloads:
            try:
                out.append(self.decode(payload))
            except FrameError as exc:
                exc.messages = out
                raise
        if fatal is not None:
            fatal.messages = out
            raise fatal
        return out

    def frames(self, data: bytes | bytearray | memoryview
               ) -> tuple[list[memoryview], FrameError | None]:
        """The payloads of the frames ``data`` completes, not decoded yet (``decode``
        each), and the framing error after them, if any: the decoder then refuses all
        further input. A server decodes a frame while the one before it is applied.

        Bytes are copied only for a frame split across chunks, and only that frame's:
        the held part takes what it lacks, and the frames after it are read from the
        chunk itself (a pipelining client's reads hold several 300 KB frames). The
        payloads are views of ``data`` (or of that frame's own buffer): ``data`` must
        not change until they are decoded.
        """
        if self._error is not None:
            raise FrameError(self._error.code, self._error.message)
        out: list[memoryview] = []
        view = memoryview(data).cast("B")
        end = len(view)
        pos = 0
        try:
            if self._buf:
                pos = self._complete_held(view, out)
            while end - pos >= 4:
                stop = pos + 4 + self._size(view, pos)
                if stop > end:
                    break
                out.append(view[pos + 4 : stop])
                pos = stop
            if pos < end:
                self._buf += view[pos:]
        except FrameError as exc:
            self._fail(exc)
            return out, exc
        return out, None

    def decode(self, payload: memoryview) -> dict:
        """One payload ``frames`` gave; a ``FrameError`` (the decoder then refuses all
        further input) if it is not a msgpack map."""
        try:
            return self._decode(payload)
        except FrameError as exc:
            self._fail(exc)
            raise

    def _fail(self, exc: FrameError) -> None:
        self._error = exc
        # Drop the buffer rather than clear it: a payload or traceback may still hold
        # a view of it, and a bytearray with live views cannot be resized.
        self._buf = bytearray()

    def _complete_held(self, view: memoryview, out: list[memoryview]) -> int:
        """Add to the held partial frame what it lacks from ``view``; its payload once
        whole. Returns how much of ``view`` was taken."""
        buf = self._buf
        taken = min(max(0, 4 - len(buf)), len(view))
        buf += view[:taken]
        if len(buf) < 4:
            return taken
        held = memoryview(buf)
        try:
            whole = 4 + self._size(held, 0)
        finally:
            held.release()
        more = min(whole - len(buf), len(view) - taken)
        buf += view[taken:taken + more]
        taken += more
        if len(buf) == whole:
            self._buf = bytearray()  # a new one: the payload is a view of this one
            out.append(memoryview(buf)[4:])
        return taken


def encode_frame(msg: dict) -> bytes:
    """One frame: 4-byte big-endian length + msgpack (bin type for bytes)."""
    body = msgpack.packb(msg, use_bin_type=True)
    return _PREFIX.pack(len(body)) + body


class ProtocolError(Exception):
    """A well-formed frame with wrong content; answered, the connection stays open.

    ``extra`` carries code-specific fields, e.g. ``row=3`` for ``bad_row``.
    """

    def __init__(self, code: str, message: str, seq: int | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.seq = seq
        self.extra = extra

    def frame(self) -> dict:
        # extra first, so it can add fields but never replace the fixed ones
        return {
            **self.extra,
            "op": "error",
            "seq": self.seq,
            "code": self.code,
            "message": self.message,
        }


@dataclass(slots=True)
class Hello:
    v: int
    token: str | None
    producer: str


@dataclass(slots=True)
class Inc:
    """A batch of increments: ``rows`` is set, or the columnar ``series``/``i``/``ts``/``v``;
    columnar without ``series``, ``i`` indexes the connection's series table."""

    seq: int
    ack: str
    rows: list | None
    series: list | None
    i: bytes | None
    ts: bytes | None
    v: bytes | None


@dataclass(slots=True)
class SeriesTable:
    """Entries appended to the connection's series table (``base`` is its length before)."""

    base: int
    series: list


@dataclass(slots=True)
class Events:
    seq: int
    ack: str
    events: list


@dataclass(slots=True)
class Ping:
    pass


Message = Hello | Inc | Events | SeriesTable | Ping

_COLUMNS = ("series", "i", "ts", "v")


def _is_int(x: Any) -> bool:
    return type(x) is int  # bool is an int subclass, and msgpack never yields subclasses


def _seq_of(msg: dict) -> int | None:
    seq = msg.get("seq")
    return seq if _is_int(seq) and 0 <= seq <= MAX_SEQ else None


def _bad(message: str, seq: int | None = None) -> ProtocolError:
    return ProtocolError("bad_request", message, seq)


def _seq_and_ack(msg: dict, op: str) -> tuple[int, str]:
    seq = _seq_of(msg)
    if seq is None:
        raw = msg.get("seq")
        if "seq" not in msg:
            raise _bad(f"{op}: seq is missing")
        raise _bad(f"{op}: seq {raw!r} is not an integer in [0, 2^63-1]")
    ack = msg.get("ack")
    if ack is None:
        ack = "received"
    elif type(ack) is not str or ack not in ACKS:
        raise _bad(f"{op}: ack {ack!r} is not 'received' or 'durable'", seq)
    return seq, ack


def _parse_hello(msg: dict) -> Hello:
    v = msg.get("v")
    if not _is_int(v) or v != PROTOCOL_VERSION:
        raise _bad(
            f"hello: unsupported protocol version {v!r}; this server speaks {PROTOCOL_VERSION}"
        )
    token = msg.get("token")
    if token is not None and type(token) is not str:
        raise _bad(f"hello: token must be a string or nil, not {type(token).__name__}")
    producer = msg.get("producer")
    if type(producer) is not str or not producer:
        raise _bad(f"hello: producer {producer!r} must be a non-empty string")
    if len(producer) > MAX_PRODUCER:
        raise _bad(f"hello: producer is {len(producer)} characters; at most {MAX_PRODUCER}")
    return Hello(v, token, producer)


def _parse_inc(msg: dict) -> Inc:
    seq, ack = _seq_and_ack(msg, "inc")
    rows = msg.get("rows")
    present = [k for k in _COLUMNS if msg.get(k) is not None]
    if rows is not None:
        if present:
            raise _bad(f"inc: has both rows and columnar {', '.join(present)}; send one form", seq)
        if type(rows) is not list and type(rows) is not RowBlock:
            raise _bad(f"inc: rows must be a list, not {type(rows).__name__}", seq)
        return Inc(seq, ack, rows, None, None, None, None)
    if not present:
        raise _bad("inc: needs rows, or the columnar series, i, ts and v", seq)
    missing = [k for k in _COLUMNS if k not in present]
    if missing == ["series"]:  # i indexes the connection's table (the ``series`` op)
        for k in ("i", "ts", "v"):
            if type(msg[k]) is not bytes:
                raise _bad(f"inc: {k} must be msgpack bin, not {type(msg[k]).__name__}", seq)
        return Inc(seq, ack, None, None, msg["i"], msg["ts"], msg["v"])
    if missing:
        raise _bad(f"inc: columnar batch lacks {', '.join(missing)}", seq)
    series = msg["series"]
    if type(series) is not list:
        raise _bad(f"inc: series must be a list, not {type(series).__name__}", seq)
    for k in ("i", "ts", "v"):
        if type(msg[k]) is not bytes:
            raise _bad(f"inc: {k} must be msgpack bin, not {type(msg[k]).__name__}", seq)
    return Inc(seq, ack, None, series, msg["i"], msg["ts"], msg["v"])


def _parse_events(msg: dict) -> Events:
    seq, ack = _seq_and_ack(msg, "event")
    events = msg.get("events")
    if type(events) is not list:
        what = "missing" if events is None else f"a {type(events).__name__}, not a list"
        raise _bad(f"event: events is {what}", seq)
    return Events(seq, ack, events)


def _parse_series(msg: dict) -> SeriesTable:
    base, series = msg.get("base"), msg.get("series")
    if not _is_int(base) or base < 0:
        raise _bad(f"series: base {base!r} must be the table's length, an integer >= 0")
    if type(series) is not list:
        what = "missing" if series is None else f"a {type(series).__name__}, not a list"
        raise _bad(f"series: series is {what}")
    return SeriesTable(base, series)


_PING = Ping()

_PARSERS = {"hello": _parse_hello, "inc": _parse_inc, "event": _parse_events,
            "series": _parse_series}


def parse_message(msg: dict) -> Message:
    """Check a decoded map against protocol v1; ``ProtocolError("bad_request")`` names the field.

    Only the envelope is checked here: rows, columns and events are validated by
    ``wire.batches`` and the fan-out rules, which know their own error codes.
    Errors carry the message's seq whenever it was a valid seq. A nil optional
    field is treated as absent (``ack`` nil means ``received``). Unknown extra
    keys are ignored, so a newer client can add optional fields.
    """
    op = msg.get("op")
    if type(op) is not str:
        if "op" not in msg:
            raise _bad("frame has no op", _seq_of(msg))
        raise _bad(f"op must be a string, not {type(op).__name__}", _seq_of(msg))
    if op == "ping":
        return _PING
    parser = _PARSERS.get(op)
    if parser is None:
        raise _bad(f"unknown op {op[:64]!r}", _seq_of(msg))
    return parser(msg)

"""The benchmark's increments, generated once and pre-encoded, with their exact totals.

Frames are assembled from a few distinct pre-packed bodies (the ``rows`` array,
or the columnar ``series``/``i``/``ts``/``v``) cycled over the run, so the
sender spends nothing on encoding while it is being timed and the expected
totals are known exactly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import msgpack
import numpy as np

TENANT = "bench"
METRIC = "messages.received"
CHANNELS = ("email", "chat", "twitter", "phone", "web", "sms", "whatsapp")


def series_list(n: int, metric: str = METRIC) -> list[list]:
    return [[TENANT, metric, {"agent": f"agent{k:05d}", "channel": CHANNELS[k % len(CHANNELS)]}]
            for k in range(n)]


@dataclass(frozen=True)
class Chunk:
    """One pre-packed body: ``body`` is the msgpack of the map's other keys and values."""

    body: bytes
    keys: int  # map entries in body
    increments: int
    total: int  # sum of the values
    by_series: np.ndarray  # per series index: sum of the values
    # the increments themselves, for a peer sent the same batches (bench/peer.py)
    i: np.ndarray | None = None
    ts: np.ndarray | None = None
    v: np.ndarray | None = None


def frame(chunk: Chunk, seq: int) -> bytes:
    """A whole wire frame around a pre-packed chunk: {"op": "inc", "seq": seq, **body}."""
    head = msgpack.packb("op") + msgpack.packb("inc") + msgpack.packb("seq") + msgpack.packb(seq)
    payload = bytes([0x80 | (chunk.keys + 2)]) + head + chunk.body
    return len(payload).to_bytes(4, "big") + payload


class Workload:
    """``series`` series, timestamps uniform over the last ``hours`` hours (``hours=0``:
    the current UTC hour, from its start to now), values 1 to 3."""

    def __init__(self, series: int = 1000, hours: int = 24, seed: int = 2026,
                 now: int | None = None, metric: str = METRIC) -> None:
        self.series = series_list(series, metric)
        self.now = int(now if now is not None else time.time())
        self.hours = hours
        self.rng = np.random.default_rng(seed)

    @property
    def first_ts(self) -> int:
        if self.hours == 0:
            return self.now - self.now % 3600
        return self.now - 60 - self.hours * 3600 + 1

    def _columns(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = self.rng
        i = rng.integers(0, len(self.series), n).astype("<u4")
        ts = rng.integers(self.first_ts, max(self.first_ts, self.now - 60) + 1, n).astype("<i8")
        v = rng.integers(1, 4, n).astype("<i8")
        return i, ts, v

    def _chunk(self, body: dict, i: np.ndarray, v: np.ndarray,
               ts: np.ndarray | None = None) -> Chunk:
        by_series = np.bincount(i, weights=v, minlength=len(self.series)).astype(np.int64)
        packed = b"".join(msgpack.packb(k) + msgpack.packb(x) for k, x in body.items())
        return Chunk(packed, len(body), len(v), int(v.sum()), by_series, i, ts, v)

    def row_chunks(self, rows_per_frame: int, distinct: int = 8) -> list[Chunk]:
        out = []
        for _ in range(distinct):
            i, ts, v = self._columns(rows_per_frame)
            rows = [[*self.series[k], t, x]
                    for k, t, x in zip(i.tolist(), ts.tolist(), v.tolist(), strict=True)]
            out.append(self._chunk({"rows": rows}, i, v, ts))
        return out

    def columnar_chunks(self, per_frame: int, distinct: int = 4, table: bool = False
                        ) -> list[Chunk]:
        """Frames of ``per_frame`` increments, each with the whole series table, or
        indexing the connection's (``table``: the stream defines ``self.series`` first)."""
        out = []
        for _ in range(distinct):
            i, ts, v = self._columns(per_frame)
            body = {"i": i.tobytes(), "ts": ts.tobytes(), "v": v.tobytes()}
            if not table:
                body = {"series": self.series, **body}
            out.append(self._chunk(body, i, v, ts))
        return out

    def warmup_chunks(self, per_frame: int, table: bool = False) -> list[Chunk]:
        """Two increments per series, at the window's oldest and newest second: what makes
        every series *active* (known to its shard, both ends of the window loaded) before a
        cell is timed."""
        n = len(self.series)
        i = np.tile(np.arange(n, dtype="<u4"), 2)
        ts = np.repeat(np.array([self.first_ts, max(self.first_ts, self.now - 60)], "<i8"), n)
        v = np.ones(2 * n, "<i8")
        out = []
        for k in range(0, 2 * n, per_frame):
            part = slice(k, k + per_frame)
            body = {"i": i[part].tobytes(), "ts": ts[part].tobytes(), "v": v[part].tobytes()}
            if not table:
                body = {"series": self.series, **body}
            out.append(self._chunk(body, i[part], v[part], ts[part]))
        return out

    def hourly_chunks(self, hours: int, per_frame: int = 200_000, table: bool = False
                      ) -> list[Chunk]:
        """One increment per series and hour, for ``hours`` hours of the current UTC month
        (fewer early in the month: ``month_hours`` says how many): one series-month each.
        (A past month is written and then forgotten by the shards: not live memory.)"""
        month_start = self.now - self.now % 86400 - (time.gmtime(self.now).tm_mday - 1) * 86400
        hours = self.month_hours(hours)
        last = self.now - 60
        n = len(self.series)
        i = np.repeat(np.arange(n, dtype="<u4"), hours)
        ts = np.maximum(last - np.tile(np.arange(hours, dtype="<i8"), n) * 3600, month_start)
        v = np.ones(len(i), "<i8")
        out = []
        for k in range(0, len(i), per_frame):
            part = slice(k, k + per_frame)
            body = {"i": i[part].tobytes(), "ts": ts[part].tobytes(), "v": v[part].tobytes()}
            if not table:
                body = {"series": self.series, **body}
            chunk = self._chunk(body, i[part], v[part])
            out.append(Chunk(chunk.body, chunk.keys, chunk.increments, chunk.total,
                             chunk.by_series))  # (no arrays kept: this phase has many frames)
        return out

    def month_hours(self, hours: int) -> int:
        """``hours``, or the hours the current UTC month has begun if fewer."""
        return max(1, min(hours, time.gmtime(self.now).tm_mday * 24 - 23
                          + time.gmtime(self.now).tm_hour))

    @property
    def days(self) -> tuple[str, str]:
        """UTC dates covering every timestamp of the workload."""
        fmt = "%Y-%m-%d"
        return (time.strftime(fmt, time.gmtime(self.first_ts)),
                time.strftime(fmt, time.gmtime(self.now)))

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


def frame(chunk: Chunk, seq: int) -> bytes:
    """A whole wire frame around a pre-packed chunk: {"op": "inc", "seq": seq, **body}."""
    head = msgpack.packb("op") + msgpack.packb("inc") + msgpack.packb("seq") + msgpack.packb(seq)
    payload = bytes([0x80 | (chunk.keys + 2)]) + head + chunk.body
    return len(payload).to_bytes(4, "big") + payload


class Workload:
    def __init__(self, series: int = 1000, hours: int = 24, seed: int = 2026,
                 now: int | None = None, metric: str = METRIC) -> None:
        self.series = series_list(series, metric)
        self.now = int(now if now is not None else time.time())
        self.hours = hours
        self.rng = np.random.default_rng(seed)

    def _columns(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = self.rng
        i = rng.integers(0, len(self.series), n).astype("<u4")
        ts = (self.now - 60 - rng.integers(0, self.hours * 3600, n)).astype("<i8")
        v = rng.integers(1, 4, n).astype("<i8")
        return i, ts, v

    def _chunk(self, body: dict, i: np.ndarray, v: np.ndarray) -> Chunk:
        by_series = np.bincount(i, weights=v, minlength=len(self.series)).astype(np.int64)
        packed = b"".join(msgpack.packb(k) + msgpack.packb(x) for k, x in body.items())
        return Chunk(packed, len(body), len(v), int(v.sum()), by_series)

    def row_chunks(self, rows_per_frame: int, distinct: int = 8) -> list[Chunk]:
        out = []
        for _ in range(distinct):
            i, ts, v = self._columns(rows_per_frame)
            rows = [[*self.series[k], t, x]
                    for k, t, x in zip(i.tolist(), ts.tolist(), v.tolist(), strict=True)]
            out.append(self._chunk({"rows": rows}, i, v))
        return out

    def columnar_chunks(self, per_frame: int, distinct: int = 4) -> list[Chunk]:
        out = []
        for _ in range(distinct):
            i, ts, v = self._columns(per_frame)
            body = {"series": self.series, "i": i.tobytes(), "ts": ts.tobytes(),
                    "v": v.tobytes()}
            out.append(self._chunk(body, i, v))
        return out

    def hourly_chunks(self, hours: int, per_frame: int = 200_000) -> list[Chunk]:
        """One increment per series and hour, for ``hours`` hours of the current UTC month
        (fewer distinct hours early on the 1st): one series-month each."""
        month_start = self.now - self.now % 86400 - (time.gmtime(self.now).tm_mday - 1) * 86400
        n = len(self.series)
        i = np.repeat(np.arange(n, dtype="<u4"), hours)
        ts = self.now - 60 - np.tile(np.arange(hours, dtype="<i8"), n) * 3600
        ts = np.maximum(ts, month_start).astype("<i8")
        v = np.ones(len(i), "<i8")
        out = []
        for k in range(0, len(i), per_frame):
            part = slice(k, k + per_frame)
            body = {"series": self.series, "i": i[part].tobytes(), "ts": ts[part].tobytes(),
                    "v": v[part].tobytes()}
            out.append(self._chunk(body, i[part], v[part]))
        return out

    @property
    def days(self) -> tuple[str, str]:
        """UTC dates covering every timestamp of the workload."""
        first = self.now - 60 - self.hours * 3600
        fmt = "%Y-%m-%d"
        return time.strftime(fmt, time.gmtime(first)), time.strftime(fmt, time.gmtime(self.now))

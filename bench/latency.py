"""Query latency over HTTP with a kept-alive connection, as a dashboard would see it."""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx
import numpy as np


@dataclass(frozen=True)
class Latency:
    p50_ms: float
    p99_ms: float
    n: int


def sample(client: httpx.Client, path: str, params: dict, n: int) -> tuple[Latency, dict]:
    """Time ``n`` GETs after a few warm-up calls; every answer must be 200."""
    last: dict = {}
    for _ in range(5):
        client.get(path, params=params).raise_for_status()
    took = np.empty(n)
    for k in range(n):
        started = time.perf_counter()
        r = client.get(path, params=params)
        took[k] = time.perf_counter() - started
        r.raise_for_status()
        last = r.json()
    ms = took * 1000
    return Latency(float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), n), last

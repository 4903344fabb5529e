"""A store held by one Ray actor and used by the others through a proxy.

``memory://`` (mongomock) lives in a single process, while shards and the
gateway are separate processes; they share it by calling this actor. Only
tests use it: production stores (SQLite, MongoDB) are opened in each process.
"""

from __future__ import annotations

from collections.abc import Container
from typing import Any

import ray

from tally.checkpoint.store import Checkpoint, MonthDoc, MonthKey, ShardRecord
from tally.wire.series import SeriesKey

HOST_NAME = "tally-store"


@ray.remote(num_cpus=0, max_concurrency=1)
class StoreHost:
    def __init__(self, url: str) -> None:
        from tally.checkpoint.urls import open_store

        self.store = open_store(url)

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.store, method)(*args)


class RemoteStore:
    """Store protocol over a StoreHost; errors raised there are raised here."""

    def __init__(self, name: str = HOST_NAME, namespace: str | None = None) -> None:
        self.host = ray.get_actor(name, namespace=namespace)

    def _call(self, method: str, *args: Any) -> Any:
        return ray.get(self.host.call.remote(method, *args))

    def ensure_layout(self, shards: int) -> None:
        self._call("ensure_layout", shards)

    def open_shard(self, shard: int) -> ShardRecord:
        return self._call("open_shard", shard)

    def write_checkpoint(self, cp: Checkpoint) -> None:
        self._call("write_checkpoint", cp)

    def load_months(self, keys: list[MonthKey]) -> dict[MonthKey, MonthDoc]:
        return self._call("load_months", keys)

    def read_months(
        self, tenant: str, metric: str, where: dict[str, str], months: list[str],
        exclude: Container[MonthKey] = frozenset(),
    ) -> list[MonthDoc]:
        return self._call("read_months", tenant, metric, where, months, exclude)

    def catalog(self, tenant: str, metric: str | None = None) -> list[SeriesKey]:
        return self._call("catalog", tenant, metric)

    def close(self) -> None:
        """The host owns the store; closing a proxy leaves it open for the others."""


def open_store_in_actor(url: str, runs: bool = False) -> Any:
    """The store a shard or gateway actor should use for ``url`` (``runs``: see
    ``open_store``)."""
    if url.startswith("memory://"):
        return RemoteStore()
    from tally.checkpoint.urls import open_store

    return open_store(url, runs=runs)

"""In-process store on mongomock, for tests (``memory://``).

It runs MongoStore's own code on mongomock so tests exercise the real
document layout and queries, with three adjustments for mongomock 4.3:

- its ``bulk_write`` breaks with pymongo >= 4.11 (it rejects the ``sort``
  argument pymongo's UpdateOne now passes), so the same filter and update
  documents, built by ``checkpoint.layout``, go through ``update_one`` one
  by one;
- it is not thread-safe, while stores are shared by threads, so every public
  method holds one lock;
- it keeps Python ints, so an ``$inc`` past int64 silently makes a number no
  BSON can hold where MongoDB fails with "Failed to apply $inc operations";
  that refusal is reproduced here so tests see what production would do.

Its duplicate-key behaviour matches MongoDB's: an upsert whose ``ck`` guard
does not match an existing ``_id`` raises DuplicateKeyError (code 11000).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Container
from typing import Any, TypeVar

import mongomock
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError, PyMongoError

from tally.checkpoint.layout import INT64_MAX, INT64_MIN, JOURNAL_PART_BYTES
from tally.checkpoint.mongo import MongoStore
from tally.checkpoint.store import Checkpoint, MonthDoc, MonthKey, ShardRecord, StoreError
from tally.wire.series import SeriesKey

F = TypeVar("F", bound=Callable[..., Any])


def _locked(method: F) -> F:
    @functools.wraps(method)
    def wrapper(self: MemoryStore, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _field(doc: dict, path: str) -> Any:
    """The value at a dotted path, None where the path does not exist yet."""
    value: Any = doc
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


class MemoryStore(MongoStore):
    """A fresh, isolated, empty store living in this object; for tests only.

    ``shared_with`` gives instead a new store object on another one's data
    (same mongomock client, same lock), as a restarted process would open the
    same database: crash tests leave a half-written checkpoint behind with
    one object and recover it with a new one, which shares nothing else.
    """

    def __init__(
        self,
        journal_part_bytes: int = JOURNAL_PART_BYTES,
        shared_with: MemoryStore | None = None,
    ) -> None:
        if shared_with is None:
            self._lock = threading.RLock()
            client = mongomock.MongoClient()
        else:
            self._lock = shared_with._lock
            client = shared_with._client
        super().__init__(
            "memory://", client_factory=lambda _url: client, journal_part_bytes=journal_part_bytes
        )

    def _open_database(self, client: Any, name: str) -> Database:
        return client[name]  # no write concern to choose: nothing reaches a disk

    def _upsert_all(self, collection: Collection, ops: list[tuple[dict, dict]], what: str) -> None:
        """MongoStore's unordered bulk, emulated: every op is tried, failures raised at the end."""
        failures: list[str] = []
        for filter_doc, update in ops:
            try:
                overflow = self._inc_overflow(collection, filter_doc, update)
                if overflow:
                    failures.append(overflow)
                    continue
                collection.update_one(filter_doc, update, upsert=True)
            except DuplicateKeyError:
                continue  # the document already took this checkpoint (ck >= cp.ck)
            except PyMongoError as e:
                failures.append(f"{filter_doc.get('_id')!r}: {e}")
        if failures:
            raise StoreError(
                f"memory store: writing {what} failed for {len(failures)} of {len(ops)} "
                f"documents; first: {failures[0]}"
            )

    @staticmethod
    def _inc_overflow(collection: Collection, filter_doc: dict, update: dict) -> str | None:
        """MongoDB's refusal of an ``$inc`` that leaves int64, as a message, or None."""
        inc = update.get("$inc")
        if not inc:
            return None
        doc = collection.find_one(filter_doc)
        if doc is None:
            return None  # an insert stores the increments themselves, already int64
        for path, delta in inc.items():
            current = _field(doc, path) or 0
            if not INT64_MIN <= current + delta <= INT64_MAX:
                return (
                    f"{doc['_id']!r}: Failed to apply $inc operations to current value "
                    f"{current} at {path} (+{delta} leaves int64)"
                )
        return None

    # Every public method holds the lock: mongomock is not thread-safe.

    @_locked
    def write_checkpoint(self, cp: Checkpoint) -> None:
        super().write_checkpoint(cp)

    @_locked
    def ensure_layout(self, shards: int) -> None:
        super().ensure_layout(shards)

    @_locked
    def open_shard(self, shard: int) -> ShardRecord:
        return super().open_shard(shard)

    @_locked
    def load_months(self, keys: list[MonthKey]) -> dict[MonthKey, MonthDoc]:
        return super().load_months(keys)

    @_locked
    def read_months(
        self, tenant: str, metric: str, where: dict[str, str], months: list[str],
        exclude: Container[MonthKey] = frozenset(),
    ) -> list[MonthDoc]:
        return super().read_months(tenant, metric, where, months, exclude)

    @_locked
    def catalog(self, tenant: str, metric: str | None = None) -> list[SeriesKey]:
        return super().catalog(tenant, metric)

    @_locked
    def close(self) -> None:
        super().close()

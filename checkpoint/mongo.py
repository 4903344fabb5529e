"""MongoDB store: month documents in the design's layout, written with pymongo.

Idempotence comes from two rules (see ``checkpoint.store``): the shard's
checkpoint id is claimed in ``shards`` before any month document changes, so
a restarted shard never reuses an id whose deltas may be half applied; and
every month update is guarded by ``ck < cp.ck``, so replaying a checkpoint
skips the documents that already took it.

A duplicate-key error on a month upsert is read as "this document already
has ``ck >= cp.ck``". That holds because each document has one writer, the
shard that owns its series, whose checkpoints run one at a time: no two
upserts ever race to insert the same document.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import pymongo
from bson.int64 import Int64
from pymongo import UpdateOne
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import BulkWriteError, DuplicateKeyError, InvalidURI, PyMongoError
from pymongo.write_concern import WriteConcern

from checkpoint.layout import (
    check_month,
    check_where,
    month_doc_from_document,
    month_doc_id,
    month_update,
    series_upsert,
)
from checkpoint.store import Checkpoint, LayoutMismatch, MonthDoc, MonthKey, StoreError
from checkpoint.urls import redact_url
from wire.series import SeriesKey, check_metric, check_tenant, parse_series_id

DEFAULT_DATABASE = "tally"
DEFAULT_SERVER_SELECTION_TIMEOUT_MS = 5000
BULK_CHUNK = 2000  # operations per bulk_write call: well under the 100k/48 MB batch limits
IN_CHUNK = 1000  # ids per $in query, so a big load stays far from the 16 MB command limit
DUPLICATE_KEY = 11000

# Fields a reader needs; ``d`` is derivable from ``h`` and the identity fields from ``_id``.
_MONTH_PROJECTION = {"h": 1, "ck": 1}

ClientFactory = Callable[[str], Any]


def database_name(url: str) -> str:
    """The database named by the URL's path, ``tally`` when it names none."""
    name = unquote(urlsplit(url).path.lstrip("/"))
    return name or DEFAULT_DATABASE


def default_client(url: str) -> pymongo.MongoClient:
    """A client that gives up on an unreachable server after 5 s unless the URL says otherwise.

    pymongo waits 30 s by default; a shard stuck that long on a checkpoint
    holds its memory bound for nothing, while a fast StoreError lets it retry.
    """
    options = {key.lower() for key, _ in parse_qsl(urlsplit(url).query)}
    kwargs: dict[str, Any] = {}
    if "serverselectiontimeoutms" not in options:
        kwargs["serverSelectionTimeoutMS"] = DEFAULT_SERVER_SELECTION_TIMEOUT_MS
    return pymongo.MongoClient(url, **kwargs)


class MongoStore:
    """Store on MongoDB (or any server speaking its wire protocol).

    The client is created here, not passed in, because the store is built
    inside a Ray actor and pymongo clients cannot be pickled. Nothing talks to
    the server until the first call, so a shard can start while the database
    is down and fail (and retry) per operation with StoreError instead.
    ``client_factory(url)`` replaces pymongo's client, e.g. with mongomock.
    """

    def __init__(self, url: str, client_factory: ClientFactory | None = None) -> None:
        self._url = url
        try:
            self._client = (client_factory or default_client)(url)
        except InvalidURI as e:
            raise ValueError(f"MongoDB URL {self._redacted_url()} is invalid: {e}") from e
        except PyMongoError as e:  # e.g. the DNS lookup of a mongodb+srv:// URL
            raise StoreError(
                f"MongoDB {self._redacted_url()}: creating the client failed: {e}"
            ) from e
        self._db = self._open_database(self._client, database_name(url))
        self._months: Collection = self._db["months"]
        self._series: Collection = self._db["series"]
        self._shards: Collection = self._db["shards"]
        self._meta: Collection = self._db["meta"]
        self._indexes_ready = False
        self._indexes_lock = threading.Lock()

    @property
    def database(self) -> Database:
        """The database holding the collections, for inspection (tests, tooling)."""
        return self._db

    def _open_database(self, client: Any, name: str) -> Database:
        """The database with journaled writes unless the URL chose a write concern.

        ``write_checkpoint`` promises durability when it returns; with w:1 and
        no journal, MongoDB acknowledges before the write reaches disk.
        """
        concern = dict(client.write_concern.document)
        if "j" not in concern and "fsync" not in concern:
            concern["j"] = True
        return client.get_database(name, write_concern=WriteConcern(**concern))

    def _redacted_url(self) -> str:
        return redact_url(self._url)

    @contextmanager
    def _errors(self, operation: str) -> Iterator[None]:
        """Turn driver failures into StoreError naming the operation and the server."""
        try:
            yield
        except PyMongoError as e:
            raise StoreError(f"MongoDB {self._redacted_url()}: {operation} failed: {e}") from e

    def _ensure_indexes(self) -> None:
        """Create indexes on first use rather than in __init__, which must not need the server."""
        if self._indexes_ready:
            return
        with self._indexes_lock:
            if self._indexes_ready:
                return
            with self._errors("creating indexes"):
                self._months.create_index(
                    [("tenant", 1), ("metric", 1), ("month", 1)], name="tenant_metric_month"
                )
                self._series.create_index([("tenant", 1)], name="tenant")
            self._indexes_ready = True

    # -- writes ---------------------------------------------------------------

    def _upsert_all(self, collection: Collection, ops: list[tuple[dict, dict]], what: str) -> None:
        """Apply upserts in unordered bulks; a duplicate key means "already applied".

        Unordered, so one document that fails does not stop the others: a
        retry then only has the failed ones left to do.
        """
        for start in range(0, len(ops), BULK_CHUNK):
            chunk = [UpdateOne(f, u, upsert=True) for f, u in ops[start : start + BULK_CHUNK]]
            try:
                collection.bulk_write(chunk, ordered=False)
            except BulkWriteError as e:
                details = e.details
                failures = [
                    w for w in details.get("writeErrors", []) if w.get("code") != DUPLICATE_KEY
                ]
                concern = details.get("writeConcernErrors", [])
                if failures or concern:
                    first = (failures or concern)[0]
                    raise StoreError(
                        f"MongoDB {self._redacted_url()}: writing {what} failed for "
                        f"{len(failures)} of {len(chunk)} documents"
                        + (f" and {len(concern)} write concern errors" if concern else "")
                        + f"; first: code {first.get('code')}: {first.get('errmsg')}"
                    ) from e
            except PyMongoError as e:
                raise StoreError(
                    f"MongoDB {self._redacted_url()}: writing {what} failed: {e}"
                ) from e

    def write_checkpoint(self, cp: Checkpoint) -> None:
        # Build (and so validate) every update before the claim: a bad
        # checkpoint raises ValueError without touching the store.
        month_ops = [
            op
            for key, hours in cp.deltas.items()
            if (op := month_update(key, hours, cp.ck)) is not None
        ]
        series_ops = [series_upsert(sid) for sid in cp.new_series]
        self._ensure_indexes()
        with self._errors(f"claiming checkpoint {cp.ck} of shard {cp.shard}"):
            self._shards.update_one(
                {"_id": f"shard-{cp.shard}"}, {"$max": {"ck": Int64(cp.ck)}}, upsert=True
            )
        if series_ops:
            self._upsert_all(self._series, series_ops, "series")
        if month_ops:
            self._upsert_all(self._months, month_ops, f"checkpoint {cp.ck} of shard {cp.shard}")

    def ensure_layout(self, shards: int) -> None:
        if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
            raise ValueError(f"shard count must be a positive integer, not {shards!r}")
        self._ensure_indexes()
        with self._errors("recording the shard layout"):
            # A duplicate key means another process inserted the document
            # between our filter and our insert; the read below compares
            # against its value, so there is nothing else to do.
            with suppress(DuplicateKeyError):
                self._meta.update_one(
                    {"_id": "layout"}, {"$setOnInsert": {"shards": shards}}, upsert=True
                )
            doc = self._meta.find_one({"_id": "layout"})
        if doc is None:
            raise StoreError(f"MongoDB {self._redacted_url()}: layout document vanished")
        if doc["shards"] != shards:
            raise LayoutMismatch(
                f"the store at {self._redacted_url()} was created with {doc['shards']} shards, "
                f"not {shards}; start with --shards {doc['shards']} or migrate it"
            )

    # -- reads ----------------------------------------------------------------

    def open_shard(self, shard: int) -> int:
        with self._errors(f"reading the checkpoint id of shard {shard}"):
            doc = self._shards.find_one({"_id": f"shard-{shard}"})
        return int(doc["ck"]) if doc else 0

    def load_months(self, keys: list[MonthKey]) -> dict[MonthKey, MonthDoc]:
        out: dict[MonthKey, MonthDoc] = {}
        ids = list(dict.fromkeys(month_doc_id((sid, check_month(month))) for sid, month in keys))
        with self._errors(f"loading {len(ids)} month documents"):
            for start in range(0, len(ids), IN_CHUNK):
                cursor = self._months.find(
                    {"_id": {"$in": ids[start : start + IN_CHUNK]}}, _MONTH_PROJECTION
                )
                for doc in cursor:
                    month_doc = month_doc_from_document(doc)
                    out[(month_doc.sid, month_doc.month)] = month_doc
        return out

    def read_months(
        self, tenant: str, metric: str, where: dict[str, str], months: list[str]
    ) -> list[MonthDoc]:
        check_tenant(tenant)
        check_metric(metric)
        query: dict[str, Any] = {
            "tenant": tenant,
            "metric": metric,
            "month": {"$in": [check_month(m) for m in months]},
        }
        for key, value in check_where(where).items():
            query[f"tags.{key}"] = value
        with self._errors(f"reading {tenant}/{metric} for {len(months)} months"):
            docs = [month_doc_from_document(d) for d in self._months.find(query, _MONTH_PROJECTION)]
        docs.sort(key=lambda d: (d.sid, d.month))
        return docs

    def catalog(self, tenant: str) -> list[SeriesKey]:
        check_tenant(tenant)
        with self._errors(f"reading the catalog of {tenant}"):
            sids = [doc["_id"] for doc in self._series.find({"tenant": tenant}, {"_id": 1})]
        return [parse_series_id(sid) for sid in sorted(sids)]

    def close(self) -> None:
        self._client.close()

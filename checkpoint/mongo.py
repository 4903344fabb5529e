"""MongoDB store: month documents in the design's layout, written with pymongo.

A checkpoint changes many documents (months, catalog entries, producer
marks, the shard's record) and MongoDB only makes single-document writes
atomic without transactions, which standalone servers (and SecantusDB) do
not have. So each checkpoint goes through a journal, in four steps:

(a) **journal**: the whole checkpoint (deltas, new series, producer marks,
    id) is written to ``journal`` in parts of bounded size (BSON documents
    stop at 16 MB), part 0 last. Part 0 is the commit marker: the checkpoint
    exists exactly when it does, and it says how many parts there are.
(b) **apply**: catalog upserts, then month updates guarded by ``ck < N``,
    so a document that already took checkpoint N ignores it again.
(c) **record**: each producer's mark is set (one document per shard and
    producer in ``marks``, guarded by ``ck < N`` like a month, so the
    latest checkpoint's mark wins), then the shard's ``ck`` is raised.
(d) **drop**: part 0 is deleted first, then the other parts. Parts without a
    part 0 are garbage whatever their history, so a crash in between leaves
    nothing that recovery could mistake for a committed checkpoint.

Every step is idempotent, so ``write_checkpoint`` retried after a failure at
any point, or ``open_shard``'s recovery after a crash at any point, ends in
the same state: a committed checkpoint is replayed whole ((b)-(d) again, in
id order), an uncommitted one is dropped whole (nothing of it reached a
month document or a mark, as (b) and (c) only start once the marker is
written). A reader sees marks only through ``open_shard``, after recovery, so
marks and deltas become visible together.

Two assumptions, both the protocol's: each shard has one writer (the shard
that owns its series), whose checkpoints run one at a time, in increasing
id order, each retried until it succeeds before the next one starts. That
is why a duplicate-key error on a month upsert can be read as "this
document already has ``ck >= N``" (no two upserts race to insert it), and
why recovery may delete parts without a marker (no live writer is about to
add one).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Container, Iterator
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

from tally.checkpoint.layout import (
    JOURNAL_PART_BYTES,
    CheckedCheckpoint,
    check_checkpoint,
    check_journal_part_bytes,
    check_month,
    check_where,
    checkpoint_from_journal,
    journal_documents,
    journal_id,
    mark_update,
    month_doc_from_document,
    month_doc_id,
    month_update,
    prefix_range,
    series_upsert,
)
from tally.checkpoint.redact import redact_url
from tally.checkpoint.store import (
    Checkpoint,
    LayoutMismatch,
    MonthDoc,
    MonthKey,
    ShardRecord,
    StoreError,
)
from tally.wire.series import SeriesKey, check_metric, check_tenant, parse_series_id

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
    ``journal_part_bytes`` bounds each journal part (tests make it small to
    split checkpoints into many parts).
    """

    def __init__(
        self,
        url: str,
        client_factory: ClientFactory | None = None,
        journal_part_bytes: int = JOURNAL_PART_BYTES,
    ) -> None:
        self._url = url
        self._journal_part_bytes = check_journal_part_bytes(journal_part_bytes)
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
        self._journal: Collection = self._db["journal"]
        self._marks: Collection = self._db["marks"]
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
                self._series.create_index([("tenant", 1), ("metric", 1)], name="tenant_metric")
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
        # Validate and build everything before the first write: a bad
        # checkpoint raises ValueError without touching the store.
        checked = check_checkpoint(cp)
        parts = journal_documents(checked, self._journal_part_bytes)
        self._ensure_indexes()
        self._write_journal(checked, parts)
        self._apply(checked)
        # A one-part journal (most checkpoints) is gone with its marker: the
        # range delete would only cost another journaled round trip.
        self._drop_journal(checked.shard, checked.ck, marker_only=len(parts) == 1)

    def _what(self, cp: CheckedCheckpoint) -> str:
        return f"checkpoint {cp.ck} of shard {cp.shard}"

    def _write_journal(self, cp: CheckedCheckpoint, parts: list[dict]) -> None:
        """Step (a): every other part, then part 0, whose write commits the checkpoint."""
        with self._errors(f"journaling {self._what(cp)}"):
            for doc in parts[1:]:
                self._put_journal_part(doc)
            self._put_journal_part(parts[0])

    def _put_journal_part(self, doc: dict) -> None:
        # A replace, not an insert: a retry finds the parts of its failed
        # attempt and rewrites them with the same content.
        self._journal.replace_one({"_id": doc["_id"]}, doc, upsert=True)

    def _apply(self, cp: CheckedCheckpoint) -> None:
        """Steps (b) and (c) for a committed checkpoint; a no-op for what already took it.

        The catalog goes first so that a series with counts is always listed
        (a listed series without counts is harmless); marks and the shard's
        ``ck`` go last, though with the journal any order would recover.
        """
        if cp.series:
            self._upsert_all(self._series, [series_upsert(sid) for sid in cp.series], "series")
        month_ops = [month_update(key, pairs, cp.ck) for key, pairs in cp.months]
        if month_ops:
            self._upsert_all(self._months, month_ops, self._what(cp))
        if cp.producers:
            mark_ops = [
                mark_update(cp.shard, name, seq, cp.ck) for name, seq in cp.producers.items()
            ]
            self._upsert_all(self._marks, mark_ops, f"producer marks of {self._what(cp)}")
        self._claim(cp.shard, cp.ck)

    def _claim(self, shard: int, ck: int) -> None:
        """Raise the shard's record to ``ck``: the id is used, the next one is ``ck + 1``."""
        with self._errors(f"recording checkpoint {ck} of shard {shard}"):
            self._shards.update_one(
                {"_id": f"shard-{shard}"}, {"$max": {"ck": Int64(ck)}}, upsert=True
            )

    def _drop_journal(self, shard: int, ck: int, marker_only: bool = False) -> None:
        """Step (d): the marker first, so a crash half way leaves only unmarked garbage.

        ``marker_only`` leaves any other part of this id in place; that is
        safe whatever is left, as unmarked parts are never replayed and the
        next ``open_shard`` deletes them.
        """
        with self._errors(f"dropping the journal of checkpoint {ck} of shard {shard}"):
            self._delete_journal({"_id": journal_id(shard, ck, 0)})
            if not marker_only:
                self._delete_journal({"_id": prefix_range(f"{shard}|{ck}|")})

    def _delete_journal(self, query: dict) -> None:
        self._journal.delete_many(query)

    def _recover(self, shard: int) -> None:
        """Finish or drop, in id order, every checkpoint of the shard left in the journal.

        A committed one is replayed whole: (b)-(d) skip whatever it already
        did. An uncommitted one never reached a month document or a mark, so
        its parts are dropped; its id is still recorded as claimed, so that
        ids only ever go up. Replaying in id order matters: a document that
        took checkpoint N+1 would ignore a later replay of N.
        """
        with self._errors(f"reading the journal of shard {shard}"):
            heads = list(
                self._journal.find(
                    {"_id": prefix_range(f"{shard}|")}, {"ck": 1, "part": 1, "parts": 1}
                )
            )
        by_ck: dict[int, dict[int, int | None]] = {}
        for doc in heads:
            parts = doc.get("parts")
            by_ck.setdefault(int(doc["ck"]), {})[int(doc["part"])] = (
                None if parts is None else int(parts)
            )
        for ck in sorted(by_ck):
            count = by_ck[ck].get(0)
            if count is None:
                self._claim(shard, ck)
            else:
                self._replay(shard, ck, count)
            self._drop_journal(shard, ck)

    def _replay(self, shard: int, ck: int, count: int) -> None:
        ids = [journal_id(shard, ck, part) for part in range(count)]
        with self._errors(f"reading the journal of checkpoint {ck} of shard {shard}"):
            docs = list(self._journal.find({"_id": {"$in": ids}}))
        try:
            cp = checkpoint_from_journal(docs)
        except (ValueError, KeyError, TypeError) as e:
            # Only a second writer of the shard or a hand edit gets here: the
            # parts are written before the marker and deleted after it.
            raise StoreError(
                f"MongoDB {self._redacted_url()}: the journal of checkpoint {ck} of shard "
                f"{shard} is committed but unreadable ({e}); it was left in place"
            ) from e
        try:
            self._apply(cp)
        except StoreError as e:
            e.add_note(
                f"while replaying committed checkpoint {ck} of shard {shard} from the journal; "
                "the shard cannot start until it applies"
            )
            raise

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

    def open_shard(self, shard: int) -> ShardRecord:
        self._recover(shard)
        with self._errors(f"reading the record of shard {shard}"):
            doc = self._shards.find_one({"_id": f"shard-{shard}"})
            marks = {
                m["p"]: int(m["seq"])
                for m in self._marks.find({"_id": prefix_range(f"{shard}|")}, {"p": 1, "seq": 1})
            }
        return ShardRecord(ck=int(doc["ck"]) if doc else 0, producers=marks)

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
        self, tenant: str, metric: str, where: dict[str, str], months: list[str],
        exclude: Container[MonthKey] = frozenset(),
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
            if exclude:
                # ids first (small), then only the documents the caller lacks
                ids = [d["_id"] for d in self._months.find(query, {"_id": 1, "month": 1})
                       if (d["_id"].rsplit("|", 1)[0], d["month"]) not in exclude]
                query = {"_id": {"$in": ids}} if ids else {}
            docs = ([month_doc_from_document(d)
                     for d in self._months.find(query, _MONTH_PROJECTION)]
                    if query else [])
        docs.sort(key=lambda d: (d.sid, d.month))
        return docs

    def catalog(self, tenant: str, metric: str | None = None) -> list[SeriesKey]:
        query = {"tenant": check_tenant(tenant)}
        if metric is not None:
            query["metric"] = check_metric(metric)
        with self._errors(f"reading the catalog of {tenant}"):
            sids = [doc["_id"] for doc in self._series.find(query, {"_id": 1})]
        return [parse_series_id(sid) for sid in sorted(sids)]

    def close(self) -> None:
        self._client.close()

"""The document layouts shared by the stores, free of I/O.

Each backend turns a checkpoint into its own writes; the checks and the
MongoDB document shapes (month documents, producer marks, journal parts) live
here once, so the pymongo store and the mongomock store cannot drift apart
(mongomock has to issue the very same filter and update documents one by
one) and so the SQLite store refuses exactly what the others refuse.
"""

from __future__ import annotations

import operator
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from bson.int64 import Int64

from tally.checkpoint.slots import Slots, nonzero, plainly_valid
from tally.checkpoint.store import Checkpoint, MonthDoc, MonthKey
from tally.wire.frames import MAX_PRODUCER
from tally.wire.series import (
    SeriesKey,
    check_tag_key,
    check_tag_value,
    parse_series_id,
    plainly_canonical,
    series_key,
)
from tally.wire.timeslots import day_and_hour, month_hours
from tally.wire.vocabulary import INT64_MAX, INT64_MIN  # re-exported: checkpoint.memory uses them

_MONTH_RE = re.compile(r"\d{4}-(0[1-9]|1[0-2])")


def check_month(month: Any) -> str:
    """A ``YYYY-MM`` string; anything else would make a document id no reader can find."""
    if not isinstance(month, str) or not _MONTH_RE.fullmatch(month):
        raise ValueError(f"month {month!r} is invalid: expected YYYY-MM")
    return month


# Ids already found canonical (keys only: a dict's table is a third of a set's).
# The same series come back every checkpoint. Holding the id strings, which the
# shard holds anyway while the series is live, costs a dict entry per id, where
# caching the parsed keys cost many small objects per series, made in the
# middle of a checkpoint's short-lived objects: those pinned the allocator's
# arenas, so a shard's resident memory kept much of what each large checkpoint used.
_CANONICAL: dict[str, None] = {}
# then forgotten at once (a re-check is a few microseconds): above the series a wide shard
# holds live, whose every checkpoint would otherwise re-check most of them
_CANONICAL_LIMIT = 1 << 20


def check_all_canonical(sids: list[str]) -> None:
    """``check_canonical`` of each, with one pass in C when every one is a ``str`` known
    canonical already (a shard's checkpoint names the same series again and again), and
    once per distinct id otherwise (a backfill's checkpoint names each in many months)."""
    strings = set(map(type, sids)) <= {str}
    if strings and all(map(_CANONICAL.__contains__, sids)):
        return
    for sid in dict.fromkeys(sids) if strings else sids:
        check_canonical(sid)


def check_canonical(sid: str) -> str:
    """``sid`` if it is a canonical series id; ValueError for anything else.

    A malformed or non-canonical id (tags out of order, say) would be stored
    under a key that no query computes, so it is refused before any write.
    """
    if type(sid) is not str or sid not in _CANONICAL:
        if not plainly_canonical(sid):
            _check_sid(sid)
        if len(_CANONICAL) >= _CANONICAL_LIMIT:
            _CANONICAL.clear()
        _CANONICAL[sid] = None
    return sid


def check_sid(sid: str) -> SeriesKey:
    """The series a canonical series id names; ValueError for anything else."""
    return parse_series_id(check_canonical(sid))


def _check_sid(sid: str) -> SeriesKey:
    try:
        parsed = parse_series_id(sid)
        key = series_key(parsed.tenant, parsed.metric, dict(parsed.tags))
    except ValueError as e:  # InvalidSeries included
        raise ValueError(f"series id {sid!r} is invalid: {e}") from None
    if key.sid != sid:
        raise ValueError(f"series id {sid!r} is not canonical; expected {key.sid!r}")
    return key


def month_deltas(key: MonthKey, hours: dict[int, int]) -> list[tuple[int, int]]:
    """The non-zero ``(absolute hour, delta)`` pairs of one document, sorted by hour.

    Raises ValueError before anything is written when the checkpoint is wrong:
    an hour outside the key's month would land in another month's slot while
    the ``ck`` guard of this month's document decides whether it is applied,
    and a value outside int64 would be wrapped or turned into a float by some
    backends. A day whose deltas add up to more than int64 is refused too:
    the document's day total (``d``) could not take it, and every store must
    refuse the same checkpoints. ``operator.index`` accepts numpy integers
    (what shard state may hand over) and refuses floats and strings.
    """
    return sorted(_checked_pairs(key, hours))


def _checked_pairs(key: MonthKey, hours: dict[int, int]) -> Iterator[tuple[int, int]]:
    """The non-zero pairs of ``month_deltas``, unsorted, one at a time; the same checks
    (those of the day totals once the last pair is out)."""
    sid, month = key
    check_canonical(sid)
    first, end = month_hours(check_month(month))
    day_totals: dict[int, int] = defaultdict(int)
    for raw_hour, raw_delta in hours.items():
        hour = operator.index(raw_hour)
        if not first <= hour < end:
            raise ValueError(
                f"checkpoint delta for {sid!r} in {month}: hour {hour} is outside the month "
                f"(hours {first}..{end - 1})"
            )
        try:
            delta = operator.index(raw_delta)
        except TypeError:
            raise ValueError(
                f"checkpoint delta for {sid!r} in {month}, hour {hour}: "
                f"{type(raw_delta).__name__} {raw_delta!r} is not an integer"
            ) from None
        if not INT64_MIN <= delta <= INT64_MAX:
            raise ValueError(
                f"checkpoint delta for {sid!r} in {month}, hour {hour}: {delta} is outside int64"
            )
        if delta:
            day_totals[(hour - first) // 24 + 1] += delta
            yield hour, delta
    for day, total in sorted(day_totals.items()):
        if not INT64_MIN <= total <= INT64_MAX:
            raise ValueError(
                f"checkpoint deltas for {sid!r} in {month}: day {day} adds up to {total}, "
                "outside int64"
            )


def check_where(where: dict[str, str]) -> dict[str, str]:
    """Tag filters, validated because their keys become MongoDB field paths."""
    return {check_tag_key(k): check_tag_value(k, v) for k, v in where.items()}


def month_doc_id(key: MonthKey) -> str:
    sid, month = key
    return f"{sid}|{month}"


def month_update(key: MonthKey, pairs: list[tuple[int, int]], ck: int) -> tuple[dict, dict]:
    """``(filter, update)`` applying one document's deltas at most once.

    ``pairs`` are what ``month_deltas`` returned for the key (non-empty).

    The filter's ``ck < cp.ck`` guard is what makes a replayed checkpoint a
    no-op: a document that already took this checkpoint (or a newer one) does
    not match, and the upsert then collides with the existing ``_id``
    (duplicate key, code 11000), which callers treat as "already applied".
    Every number is an explicit Int64 so a field never starts as int32 and
    all stores hold the same BSON types.
    """
    sid, month = key
    series = check_sid(sid)
    first, _ = month_hours(month)
    inc: dict[str, Int64] = {}
    day_totals: dict[int, int] = defaultdict(int)
    for hour, delta in pairs:
        day, hour_of_day = day_and_hour(hour, first)
        inc[f"h.{day}.{hour_of_day}"] = Int64(delta)
        day_totals[day] += delta
    for day, total in sorted(day_totals.items()):
        if total:  # $inc by 0 would only create a field that says nothing
            inc[f"d.{day}"] = Int64(total)
    update = {
        "$inc": inc,
        "$set": {"ck": Int64(ck)},
        "$setOnInsert": {
            "tenant": series.tenant,
            "metric": series.metric,
            "tags": dict(series.tags),
            "month": month,
        },
    }
    return {"_id": month_doc_id(key), "ck": {"$lt": Int64(ck)}}, update


def series_upsert(sid: str) -> tuple[dict, dict]:
    """``(filter, update)`` recording a series in the catalog; a no-op when it is there."""
    series = check_sid(sid)
    return {"_id": sid}, {
        "$setOnInsert": {
            "tenant": series.tenant,
            "metric": series.metric,
            "tags": dict(series.tags),
        }
    }


def month_doc_from_document(doc: dict) -> MonthDoc:
    """A stored month document back in absolute hours; ``d`` is derived, so only ``h`` is read."""
    sid, month = doc["_id"].rsplit("|", 1)
    first, _ = month_hours(month)
    hours: dict[int, int] = {}
    for day, by_hour in doc.get("h", {}).items():
        base = first + (int(day) - 1) * 24
        for hour_of_day, value in by_hour.items():
            if value:
                hours[base + int(hour_of_day)] = int(value)
    return MonthDoc(sid=sid, month=month, hours=hours, ck=int(doc.get("ck", 0)))


# -- whole checkpoints and producer marks ------------------------------------------


def _int64(value: Any, what: str) -> int:
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{what}: {type(value).__name__} {value!r} is not an integer") from None
    if not INT64_MIN <= number <= INT64_MAX:
        raise ValueError(f"{what}: {number} is outside int64")
    return number


def check_producers(producers: dict[str, int]) -> dict[str, int]:
    """Producer marks as plain ``str -> int``; ValueError for anything a store cannot keep.

    A name is any non-empty string of at most ``MAX_PRODUCER`` characters
    (what a ``hello`` frame accepts) that UTF-8 can encode: a lone surrogate
    would make BSON and SQLite fail half way through a write instead of
    before it. Seqs are int64 (stored as BSON longs and SQLite integers); a
    negative one is allowed, as shard state marks "nothing applied" with -1.
    """
    out: dict[str, int] = {}
    for name, seq in producers.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"producer name {name!r} must be a non-empty string")
        if len(name) > MAX_PRODUCER:
            raise ValueError(
                f"producer name {name[:40]!r}... is {len(name)} characters; at most {MAX_PRODUCER}"
            )
        try:
            name.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"producer name {name!r} is not valid Unicode text: {e}") from None
        out[str(name)] = _int64(seq, f"seq of producer {name!r}")
    return out


@dataclass(frozen=True, slots=True)
class CheckedCheckpoint:
    """A checkpoint every store can write without refusing it half way.

    Numbers are plain ints (numpy integers from shard state are not BSON),
    ``months`` holds only documents with a non-zero delta.
    """

    shard: int
    ck: int
    months: list[tuple[MonthKey, list[tuple[int, int]]]]  # key -> sorted non-zero pairs
    series: list[str]
    producers: dict[str, int]


def check_checkpoint(cp: Checkpoint) -> CheckedCheckpoint:
    """Validate all of a checkpoint before any write: ValueError leaves a store as it was."""
    shard, ck = _checked_ids(cp)
    if cp.slots is not None:
        months = list(_checked_slots(cp).documents())
    else:
        months = [
            (key, pairs) for key, hours in cp.deltas.items() if (pairs := month_deltas(key, hours))
        ]
    return CheckedCheckpoint(shard, ck, months, *_checked_series_and_marks(cp))


def check_columns(cp: Checkpoint) -> tuple[CheckedCheckpoint, Slots]:
    """What ``check_checkpoint`` checks, for a store that writes by column: the checked
    checkpoint without ``months``, and its documents with a non-zero delta as ``Slots``
    (each document's hours increasing), which cost no Python object per slot when the
    checkpoint came by column (as shards send it)."""
    shard, ck = _checked_ids(cp)
    if cp.slots is not None:
        slots = _checked_slots(cp)
    else:
        slots = Slots.from_deltas({
            key: dict(pairs) for key, hours in cp.deltas.items()
            if (pairs := month_deltas(key, hours))
        })
    return CheckedCheckpoint(shard, ck, [], *_checked_series_and_marks(cp)), slots


def _checked_slots(cp: Checkpoint) -> Slots:
    """``cp.slots`` checked as the dict form is; the non-zero slots and their documents.

    The common case is proved valid with numpy and a cached check per document. Any
    doubt sends the slots through the dict form's checks, which name the first
    problem exactly as they would for the same deltas given as a dict.
    """
    slots = cp.slots
    assert slots is not None
    if cp.deltas:
        raise ValueError(f"checkpoint {cp.ck} of shard {cp.shard} carries its deltas both as "
                         "a dict and as slots")
    try:
        check_all_canonical(slots.sids)
        bounds = {m: month_hours(check_month(m)) for m in dict.fromkeys(slots.months)}
    except (ValueError, TypeError, AttributeError):
        pass  # named below, in the dict form's order
    else:
        if plainly_valid(slots, bounds):
            return nonzero(slots)
    starts = slots.starts().tolist()
    for k, key in enumerate(slots.doc_keys()):
        hours = slots.hours[starts[k]:starts[k + 1]].tolist()
        if len(set(hours)) != len(hours):
            raise ValueError(f"checkpoint deltas for {key[0]!r} in {key[1]}: an hour is "
                             "listed twice")
    return Slots.from_deltas({
        key: dict(pairs) for key, hours in slots.to_deltas().items()
        if (pairs := month_deltas(key, hours))
    })


def _checked_ids(cp: Checkpoint) -> tuple[int, int]:
    shard = _int64(cp.shard, "checkpoint shard")
    ck = _int64(cp.ck, f"checkpoint id of shard {shard}")
    if shard < 0:
        raise ValueError(f"checkpoint shard {shard} is negative")
    if ck < 1:
        raise ValueError(f"checkpoint id {ck} of shard {shard} is not positive")
    return shard, ck


def _checked_series_and_marks(cp: Checkpoint) -> tuple[list[str], dict[str, int]]:
    for sid in cp.new_series:
        check_canonical(sid)
    return list(dict.fromkeys(cp.new_series)), check_producers(cp.producers)


def prefix_range(prefix: str) -> dict[str, str]:
    """A ``_id`` filter matching the ids that start with ``prefix``, which ends in ``|``.

    A range rather than a regex so that it runs on the ``_id`` index. "}" is
    the character after "|", and the ids below put only decimal digits
    before each "|", so ``"1|"`` does not match ``"10|..."`` ("0" < "|").
    """
    if not prefix.endswith("|"):
        raise ValueError(f"id prefix {prefix!r} must end with '|'")
    return {"$gte": prefix, "$lt": prefix[:-1] + "}"}


def mark_id(shard: int, producer: str) -> str:
    """The ``_id`` of a producer's mark on a shard: one document per (shard, producer).

    The name is a value, never a field name, so "$x" or "a.b" need no escaping.
    """
    return f"{shard}|{producer}"


def mark_update(shard: int, producer: str, seq: int, ck: int) -> tuple[dict, dict]:
    """``(filter, update)`` setting a mark as of checkpoint ``ck``, guarded like a month.

    The mark is set, not maxed: marks usually rise, but when a batch is
    reverted after a checkpoint held it (another shard refused its part), the
    next checkpoint carries the lower mark, and the store must keep it or
    the producer's resend of that batch would be skipped as a duplicate.
    The guard ``ck < N`` makes checkpoint order, not arrival order, decide:
    a replayed or late older checkpoint never overrides a newer one's mark,
    and a mark that already took checkpoint N collides on ``_id``
    (duplicate key), read as "already applied" exactly as for months.
    """
    return {"_id": mark_id(shard, producer), "ck": {"$lt": Int64(ck)}}, {
        "$set": {"seq": Int64(seq), "ck": Int64(ck)},
        "$setOnInsert": {"shard": Int64(shard), "p": producer},
    }


# -- the checkpoint journal (MongoDB) ------------------------------------------------

JOURNAL_PART_BYTES = 4 * 1024 * 1024  # a quarter of BSON's 16 MB document limit
MAX_JOURNAL_PART_BYTES = 8 * 1024 * 1024  # plus one entry (<= ~40 kB) stays far below 16 MB

# Upper bounds of the BSON bytes each piece of a journal part takes (checked
# against bson.encode in tests/test_journal.py). An array element costs a
# type byte, its index as a C string, then the value: at most 8 bytes for a
# number, as the hours and deltas are plain ints, which pymongo stores as
# int32 or int64, whichever holds them (Int64 objects would cost far more
# time to build, for a document that lives only until it is written).
_PART_BYTES = 512  # _id, shard, ck, part, parts and the three array headers
_MONTH_ENTRY_BYTES = 96  # the entry document: keys, month, two array headers, its index
_SLOT_BYTES = 32  # an hour and a delta: 2 x (type + index "743\0" + 8 bytes)
_SERIES_BYTES = 32  # type, index, length, NUL
_PRODUCER_BYTES = 64  # the {p, q} document, its keys, index and seq


def check_journal_part_bytes(part_bytes: int) -> int:
    """A part size that keeps every part well below 16 MB, even with one entry over it."""
    if isinstance(part_bytes, bool) or not isinstance(part_bytes, int):
        raise ValueError(f"journal part size must be an integer, not {part_bytes!r}")
    if not 1 <= part_bytes <= MAX_JOURNAL_PART_BYTES:
        raise ValueError(
            f"journal part size {part_bytes} must be between 1 and {MAX_JOURNAL_PART_BYTES} bytes"
        )
    return part_bytes


def journal_id(shard: int, ck: int, part: int) -> str:
    """Deterministic, so a retried write replaces its parts; prefixes select a shard or a ck."""
    return f"{shard}|{ck}|{part}"


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


def journal_documents(cp: CheckedCheckpoint, part_bytes: int = JOURNAL_PART_BYTES) -> list[dict]:
    """The journal parts of a checkpoint, part 0 first; part 0 is the commit marker.

    Each part stays under ``part_bytes`` of BSON (a single entry bigger than
    that gets a part to itself: one month of one series is at most ~40 kB),
    so no part nears the 16 MB document limit however big the checkpoint.
    Part 0 also carries ``parts``, the number of parts: written last, it is
    what makes the checkpoint exist, and it says which parts recovery needs.
    Ids are deterministic so a retried write replaces the parts it left.
    Month entries are never split: an entry holds whole documents, so a
    part's size is known before it is built.
    """
    check_journal_part_bytes(part_bytes)
    entries: list[tuple[str, Any, int]] = []
    for (sid, month), pairs in cp.months:
        entry = {
            "s": sid,
            "m": month,
            "h": [hour for hour, _ in pairs],
            "v": [delta for _, delta in pairs],
        }
        entries.append(
            ("months", entry, _MONTH_ENTRY_BYTES + _utf8_len(sid) + _SLOT_BYTES * len(pairs))
        )
    for sid in cp.series:
        entries.append(("series", sid, _SERIES_BYTES + _utf8_len(sid)))
    for name, seq in cp.producers.items():
        entries.append(
            ("producers", {"p": name, "q": Int64(seq)}, _PRODUCER_BYTES + _utf8_len(name))
        )

    def new_part(index: int) -> dict:
        return {
            "_id": journal_id(cp.shard, cp.ck, index),
            "shard": Int64(cp.shard),
            "ck": Int64(cp.ck),
            "part": index,
            "months": [],
            "series": [],
            "producers": [],
        }

    parts = [new_part(0)]
    size = _PART_BYTES
    for kind, value, cost in entries:
        if size + cost > part_bytes and size > _PART_BYTES:
            parts.append(new_part(len(parts)))
            size = _PART_BYTES
        parts[-1][kind].append(value)
        size += cost
    parts[0]["parts"] = len(parts)
    return parts


def checkpoint_from_journal(docs: Iterable[dict]) -> CheckedCheckpoint:
    """The checkpoint a committed journal holds; ValueError if a part is missing or malformed.

    Parts go back through ``check_checkpoint``, so a replay applies exactly
    what a fresh write of the same checkpoint would.
    """
    by_part = {int(doc["part"]): doc for doc in docs}
    marker = by_part.get(0)
    if marker is None or "parts" not in marker:
        raise ValueError("the journal has no commit marker (part 0 with a part count)")
    count = int(marker["parts"])
    missing = [i for i in range(count) if i not in by_part]
    if missing:
        raise ValueError(f"the journal of {count} parts lacks parts {missing}")
    shard, ck = int(marker["shard"]), int(marker["ck"])
    deltas: dict[MonthKey, dict[int, int]] = {}
    series: list[str] = []
    producers: dict[str, int] = {}
    for index in range(count):
        doc = by_part[index]
        if int(doc["shard"]) != shard or int(doc["ck"]) != ck:
            raise ValueError(f"journal part {index} belongs to another checkpoint")
        for entry in doc.get("months", []):
            hours, values = entry["h"], entry["v"]
            if len(hours) != len(values):
                raise ValueError(f"journal part {index}: {entry['s']!r} has unpaired hours")
            deltas[(entry["s"], entry["m"])] = {
                int(h): int(v) for h, v in zip(hours, values, strict=True)
            }
        series.extend(doc.get("series", []))
        for mark in doc.get("producers", []):
            producers[mark["p"]] = int(mark["q"])
    return check_checkpoint(Checkpoint(shard, ck, deltas, series, producers))

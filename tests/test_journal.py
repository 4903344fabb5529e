"""The journal's document layout, without a database: sizes, splitting, decoding.

The stores' behaviour around the journal (crashes at each step, retries,
recovery) is in the contract suite; this checks the pure functions it rests
on, in particular that no part can reach BSON's 16 MB document limit.
"""

from __future__ import annotations

import random

import bson
import pytest
from bson.int64 import Int64

from tally.checkpoint.layout import (
    JOURNAL_PART_BYTES,
    MAX_JOURNAL_PART_BYTES,
    CheckedCheckpoint,
    check_checkpoint,
    check_journal_part_bytes,
    checkpoint_from_journal,
    journal_documents,
    prefix_range,
)
from tally.checkpoint.store import Checkpoint
from tally.wire.series import series_id
from tally.wire.timeslots import month_first_hour, month_hours

BSON_LIMIT = 16 * 1024 * 1024
NOV = "2026-11"


def longest_sid(n: int) -> str:
    """A series id near the longest the data model allows (about 14 kB of UTF-8)."""
    tags = {f"k{i:02d}" + "x" * 60: "|" * 100 + "🦜" * 100 for i in range(16)}
    tags["k00" + "x" * 60] = str(n) + "🦜" * 190
    return series_id("t" * 64, "m" * 200, tags)


def big_checkpoint(documents: int, seed: int = 7) -> Checkpoint:
    rng = random.Random(seed)
    first, end = month_hours(NOV)
    deltas: dict[tuple[str, str], dict[int, int]] = {}
    for n in range(documents):
        sid = longest_sid(n) if n % 3 == 0 else series_id("acme", "m", {"n": str(n)})
        hours = range(first, end) if n % 5 == 0 else rng.sample(range(first, end), 40)
        deltas[(sid, NOV)] = {h: rng.choice([-(2**63), 2**63 - 1, -1, 1, 2**40]) for h in hours}
    producers = {"🦜" * 200: 2**63 - 1, "a.b": -1, "$x": 0}
    producers.update({f"producer-{i}" + "é" * 150: i for i in range(50)})
    return Checkpoint(3, 2**40, deltas, [sid for sid, _ in deltas], producers)


@pytest.mark.parametrize("part_bytes", [1, 700, 5000, 100_000, JOURNAL_PART_BYTES])
def test_parts_stay_within_their_budget_and_round_trip(part_bytes: int) -> None:
    # Day totals would overflow with these values, so check parts, not days.
    cp = big_checkpoint(40)
    checked = CheckedCheckpoint(
        cp.shard,
        cp.ck,
        [(key, sorted(hours.items())) for key, hours in cp.deltas.items()],
        cp.new_series,
        cp.producers,
    )
    parts = journal_documents(checked, part_bytes)
    assert [p["part"] for p in parts] == list(range(len(parts)))
    assert parts[0]["parts"] == len(parts) and all("parts" not in p for p in parts[1:])
    for doc in parts:
        size = len(bson.encode(doc))
        entries = len(doc["months"]) + len(doc["series"]) + len(doc["producers"])
        # Only a part holding a single entry may exceed the budget.
        assert size <= part_bytes or entries == 1, (size, part_bytes, entries)
        assert size < BSON_LIMIT
    if part_bytes == 1:
        assert len(parts) == 40 + 40 + 53  # an entry per part
    # Decoding from real BSON (Int64 back, parts in any order) gives the same checkpoint.
    decoded = [bson.decode(bson.encode(p)) for p in reversed(parts)]
    months = dict(checked.months)
    got = _unchecked_from_journal(decoded)
    assert got == (checked.shard, checked.ck, months, checked.series, checked.producers)


def _unchecked_from_journal(docs: list[dict]) -> tuple:
    """Decoding without ``check_checkpoint``, which refuses this checkpoint's day totals."""
    months: dict = {}
    series: list[str] = []
    producers: dict[str, int] = {}
    marker = next(d for d in docs if d["part"] == 0)
    for doc in sorted(docs, key=lambda d: d["part"]):
        for entry in doc["months"]:
            months[(entry["s"], entry["m"])] = [
                (int(h), int(v)) for h, v in zip(entry["h"], entry["v"], strict=True)
            ]
        series += doc["series"]
        producers.update({m["p"]: int(m["q"]) for m in doc["producers"]})
    return int(marker["shard"]), int(marker["ck"]), months, series, producers


def test_default_parts_of_the_largest_entries_stay_far_below_16_mb() -> None:
    # Every hour of a month, on the longest series ids: each part holds
    # about 4 MB and one more entry at most.
    first, end = month_hours(NOV)
    deltas = {(longest_sid(n), NOV): {h: 2**40 for h in range(first, end)} for n in range(300)}
    checked = check_checkpoint(Checkpoint(0, 1, deltas))
    parts = journal_documents(checked)
    assert len(parts) > 2
    sizes = [len(bson.encode(p)) for p in parts]
    assert max(sizes) <= JOURNAL_PART_BYTES, sizes
    assert min(sizes[:-1]) > JOURNAL_PART_BYTES / 2  # and the budget is used, not wasted


def test_checkpoint_from_journal_is_what_was_journaled() -> None:
    first = month_first_hour(NOV)
    cp = Checkpoint(
        1,
        9,
        {
            (series_id("acme", "m", {"a": "1"}), NOV): {first: 1, first + 5: -3, first + 6: 0},
            (series_id("acme", "m", {"a": "2"}), NOV): {first: 0},  # nothing: not journaled
        },
        [series_id("acme", "m", {"a": "1"})],
        {"p.q": 4, "$": -1},
    )
    checked = check_checkpoint(cp)
    for part_bytes in (1, JOURNAL_PART_BYTES):
        docs = [bson.decode(bson.encode(d)) for d in journal_documents(checked, part_bytes)]
        assert all(type(d["ck"]) is Int64 for d in docs)
        assert checkpoint_from_journal(docs) == checked
    assert checked.months == [
        ((series_id("acme", "m", {"a": "1"}), NOV), [(first, 1), (first + 5, -3)])
    ]


def test_incomplete_or_foreign_journals_are_refused() -> None:
    first = month_first_hour(NOV)
    deltas = {(series_id("acme", "m", {"a": str(n)}), NOV): {first: n + 1} for n in range(3)}
    parts = journal_documents(check_checkpoint(Checkpoint(0, 5, deltas)), 1)
    assert len(parts) == 3
    with pytest.raises(ValueError, match="no commit marker"):
        checkpoint_from_journal(parts[1:])
    with pytest.raises(ValueError, match=r"lacks parts \[1\]"):
        checkpoint_from_journal([parts[0], parts[2]])
    other = journal_documents(check_checkpoint(Checkpoint(0, 6, deltas)), 1)
    with pytest.raises(ValueError, match="another checkpoint"):
        checkpoint_from_journal([parts[0], other[1], parts[2]])


@pytest.mark.parametrize(
    ("shard", "ck", "message"),
    [(-1, 1, "negative"), (0, 0, "not positive"), (0, 2**63, "outside int64"), (0.0, 1, "integer")],
)
def test_checkpoint_ids_are_checked(shard: object, ck: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_checkpoint(Checkpoint(shard, ck, {}))  # type: ignore[arg-type]


@pytest.mark.parametrize("part_bytes", [0, -5, MAX_JOURNAL_PART_BYTES + 1, True, 1.5])
def test_journal_part_size_is_checked(part_bytes: object) -> None:
    with pytest.raises(ValueError, match="journal part size"):
        check_journal_part_bytes(part_bytes)  # type: ignore[arg-type]


def test_prefix_ranges_do_not_leak_into_longer_numbers() -> None:
    ids = ["1|a", "1|", "10|a", "11|x", "1}", "0|z", "2|", "1|🦜", "1|\U0010ffff"]
    bounds = prefix_range("1|")
    # Python compares code points, as MongoDB compares UTF-8 bytes: the same order.
    inside = {i for i in ids if bounds["$gte"] <= i < bounds["$lt"]}
    assert inside == {"1|", "1|a", "1|\U0010ffff", "1|🦜"}
    with pytest.raises(ValueError):
        prefix_range("1")

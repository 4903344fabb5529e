"""The SQLite store's streamed checkpoint validation refuses and writes exactly what
check_checkpoint does (it avoids building every slot's tuple at once: memory)."""

from __future__ import annotations

import numpy as np
import pytest

from tally.checkpoint.layout import check_checkpoint, check_sid, check_streamed, month_pairs
from tally.checkpoint.store import Checkpoint
from tally.wire.series import series_id
from tally.wire.timeslots import month_hours

NOV = "2026-11"
FIRST, END = month_hours(NOV)
A = series_id("acme", "m", {"a": "1"})
B = series_id("acme", "m", {"a": "2"})
BIG = 2**63 - 1

GOOD = [
    {(A, NOV): {FIRST + 5: 3, FIRST: -1, FIRST + 6: 0}, (B, NOV): {FIRST: 0}},
    {(A, NOV): {np.int64(FIRST): np.int64(7)}},
    {(A, NOV): {FIRST: BIG, FIRST + 24: BIG}},
    {},
]
BAD = [
    {(A, NOV): {END: 1}},
    {(A, NOV): {FIRST: 1.0}},
    {(A, NOV): {FIRST: BIG + 1}},
    {(A, NOV): {FIRST: BIG, FIRST + 1: 1}},  # the day's total
    {(A, "2026-13"): {FIRST: 1}},
    {("acme|m|b=1,a=2", NOV): {FIRST: 1}},  # not canonical
    {("nope", NOV): {FIRST: 1}},
    {(A, NOV): {FIRST: 1}, (B, NOV): {"x": 1}},
]


@pytest.mark.parametrize("deltas", GOOD)
def test_same_documents_and_pairs(deltas):
    cp = Checkpoint(1, 2, deltas, [A], {"p": 3})
    full = check_checkpoint(cp)
    head, keys = check_streamed(cp)
    assert keys == [key for key, _ in full.months]
    assert (head.shard, head.ck, head.series, head.producers) == (
        full.shard, full.ck, full.series, full.producers)
    for key, pairs in full.months:
        got = sorted(month_pairs(deltas[key]))
        assert got == pairs and all(type(h) is int and type(v) is int for h, v in got)


@pytest.mark.parametrize("deltas", BAD)
def test_same_refusals(deltas):
    cp = Checkpoint(1, 2, deltas)
    with pytest.raises((ValueError, TypeError)) as full:
        check_checkpoint(cp)
    with pytest.raises((ValueError, TypeError)) as streamed:
        check_streamed(cp)
    assert (type(full.value), str(full.value)) == (type(streamed.value), str(streamed.value))


def test_bad_ids_and_series_refused_alike():
    for cp in (Checkpoint(-1, 2, {}), Checkpoint(1, 0, {}), Checkpoint(1, 2, {}, ["x|y"])):
        with pytest.raises(ValueError) as full:
            check_checkpoint(cp)
        with pytest.raises(ValueError) as streamed:
            check_streamed(cp)
        assert str(full.value) == str(streamed.value)


def test_check_sid_cached_validity_still_refuses_and_returns_keys():
    assert check_sid(A) == check_sid(A)
    assert check_sid(A).sid == A
    for bad in ("acme|m|b=1,a=2", "nope"):
        for _ in range(2):  # a refusal is never remembered as valid
            with pytest.raises(ValueError):
                check_sid(bad)

"""Checkpoints by column (checkpoint/slots.py, as shards send them): the column checks
refuse and keep exactly what check_checkpoint does with the same deltas as a dict."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tally.checkpoint.layout import check_checkpoint, check_columns, check_sid
from tally.checkpoint.slots import Slots
from tally.checkpoint.store import Checkpoint
from tally.wire.series import plainly_canonical, series_id
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


def both_forms(deltas, *rest):
    """The same checkpoint as a dict and by column."""
    return [Checkpoint(1, 2, deltas, *rest), Checkpoint(1, 2, {}, *rest,
                                                        slots=Slots.from_deltas(deltas))]


def documents(slots: Slots) -> list:
    return list(slots.documents())


@pytest.mark.parametrize("deltas", GOOD)
def test_same_documents_and_pairs(deltas):
    want = check_checkpoint(Checkpoint(1, 2, deltas, [A], {"p": 3}))
    assert want.months == [(k, sorted(p)) for k, p in want.months]
    for cp in both_forms(deltas, [A], {"p": 3}):
        assert check_checkpoint(cp) == want
        head, slots = check_columns(cp)
        assert documents(slots) == want.months
        assert (head.shard, head.ck, head.series, head.producers, head.months) == (
            want.shard, want.ck, want.series, want.producers, [])
        for _, pairs in documents(slots):
            assert all(type(h) is int and type(v) is int for h, v in pairs)


@pytest.mark.parametrize("deltas", BAD)
def test_same_refusals(deltas):
    with pytest.raises((ValueError, TypeError)) as want:
        check_checkpoint(Checkpoint(1, 2, deltas))
    for cp in both_forms(deltas):
        for check in (check_checkpoint, check_columns):
            with pytest.raises((ValueError, TypeError)) as got:
                check(cp)
            assert (type(got.value), str(got.value)) == (type(want.value), str(want.value))


def test_bad_ids_and_series_refused_alike():
    for cp in (Checkpoint(-1, 2, {}), Checkpoint(1, 0, {}), Checkpoint(1, 2, {}, ["x|y"])):
        with pytest.raises(ValueError) as full:
            check_checkpoint(cp)
        with pytest.raises(ValueError) as columns:
            check_columns(cp)
        assert str(full.value) == str(columns.value)


def test_an_hour_listed_twice_in_a_document_is_refused():
    # (a dict cannot say it twice; columns can, and the second would be lost or doubled)
    twice = Slots([A], [NOV], np.array([2]), np.array([FIRST, FIRST]), np.array([1, 2]))
    for check in (check_checkpoint, check_columns):
        with pytest.raises(ValueError, match="an hour is listed twice"):
            check(Checkpoint(1, 2, {}, slots=twice))


def test_columns_of_unsorted_hours_and_zeros_come_out_sorted_and_nonzero():
    slots = Slots([A, B, A], [NOV, NOV, "2026-12"], np.array([3, 1, 1]),
                  np.array([FIRST + 7, FIRST, FIRST + 3, FIRST + 1, END]),
                  np.array([1, 2, 0, 0, 5]))
    _, got = check_columns(Checkpoint(1, 2, {}, slots=slots))
    assert documents(got) == [((A, NOV), [(FIRST, 2), (FIRST + 7, 1)]),
                              ((A, "2026-12"), [(END, 5)])]


def test_both_forms_at_once_are_refused():
    cp = Checkpoint(1, 2, {(A, NOV): {FIRST: 1}}, slots=Slots.from_deltas({(B, NOV): {FIRST: 1}}))
    for check in (check_checkpoint, check_columns):
        with pytest.raises(ValueError, match="both as a dict and as slots"):
            check(cp)


def test_check_sid_cached_validity_still_refuses_and_returns_keys():
    assert check_sid(A) == check_sid(A)
    assert check_sid(A).sid == A
    for bad in ("acme|m|b=1,a=2", "nope"):
        for _ in range(2):  # a refusal is never remembered as valid
            with pytest.raises(ValueError):
                check_sid(bad)


# -- the quick canonical check ---------------------------------------------------------

def _canonical_by_parsing(sid: str) -> bool:
    try:
        from tally.checkpoint.layout import _check_sid

        _check_sid(sid)
    except ValueError:
        return False
    return True


_ID_PARTS = st.lists(st.sampled_from(
    ["acme", "a", "A", "t-1", "_x", "|", ",", "=", "%", "%25", "%2C", "%3D", "%7C", "%41",
     "%2", "m.x:y", "k", "b", "z9", "\u00e9", "\n", "", "v" * 60, "w" * 199]), max_size=12)


@settings(max_examples=600, deadline=None)
@given(_ID_PARTS)
def test_the_quick_check_never_passes_an_id_that_parsing_refuses(parts: list[str]) -> None:
    sid = "".join(parts)
    if plainly_canonical(sid):
        assert _canonical_by_parsing(sid), sid


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.from_regex(r"[a-z_][a-z0-9_]{0,5}", fullmatch=True),
                       st.text(max_size=200), max_size=16),
       st.sampled_from(["acme", "t" * 64]), st.sampled_from(["m", "orders.created"]))
def test_the_quick_check_passes_every_id_a_series_has(tags, tenant, metric) -> None:
    assert plainly_canonical(series_id(tenant, metric, tags))


@pytest.mark.parametrize("sid", [
    "acme|m|b=1,a=2",  # out of order
    "acme|m|a=1,a=1",  # twice
    "acme|m|a=%41",  # not an escape tally makes
    "acme|m|a=" + "x" * 201,
    "acme|m|" + ",".join(f"k{n:02d}=v" for n in range(17)),
    "Acme|m|", "acme||", "acme|m", "acme|m|a", "acme|m|a=1,", "acme|m|=1",
])
def test_the_quick_check_leaves_doubtful_ids_to_parsing(sid: str) -> None:
    assert not plainly_canonical(sid)
    assert not _canonical_by_parsing(sid)

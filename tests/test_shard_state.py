"""ShardState against a real SQLite store: marks, reverts, checkpoints, restarts."""

from __future__ import annotations

import calendar

import numpy as np
import pytest

from tally.actors.day_blocks import BLOCK_BYTES, DAY_BITS, DayBlocks
from tally.actors.hour_tiers import NARROW, SMALL
from tally.actors.shard_state import Applying, Outcome, ShardState
from tally.checkpoint.sqlite import SqliteStore
from tally.checkpoint.store import MonthDoc
from tally.wire.batches import rows_batch
from tally.wire.series import series_id
from tally.wire.timeslots import month_days, month_number

NOW = calendar.timegm((2026, 11, 20, 12, 0, 0))
HOUR = calendar.timegm((2026, 11, 2, 5, 0, 0))


@pytest.fixture
def store(tmp_path):
    s = SqliteStore(str(tmp_path / "s.db"))
    yield s
    s.close()


def checkpoint(state: ShardState, store) -> None:
    cp = state.begin_checkpoint()
    assert cp is not None
    store.write_checkpoint(cp)
    state.finish_checkpoint(cp.ck)


def total(state: ShardState) -> int:
    return int(state.hourly("acme", "m", {}, HOUR // 3600, HOUR // 3600 + 1)[0].sum())


def batch(value: int):
    return rows_batch([["acme", "m", None, HOUR, value]], NOW)


def test_a_revert_that_was_checkpointed_lets_the_resend_apply_after_a_restart(store):
    state = ShardState(0, store.open_shard(0))
    assert state.ingest(batch(5), store.load_months, "p", 1, None).outcome is Outcome.APPLIED
    assert state.ingest(batch(7), store.load_months, "p", 2, 1).outcome is Outcome.APPLIED
    checkpoint(state, store)  # holds seq 2 and its 7
    assert state.revert(batch(7), store.load_months, "p", 2)  # another shard refused seq 2
    checkpoint(state, store)  # holds the undo: net 5, mark back at 1
    restarted = ShardState(0, store.open_shard(0))
    assert restarted.applied == {"p": 1}
    answer = restarted.ingest(batch(7), store.load_months, "p", 2, None)
    assert answer.outcome is Outcome.APPLIED
    assert total(restarted) == 12


def test_a_batch_a_resend_found_here_is_not_undone(store):
    """A failover: the old connection's batch 2 applied here while another shard
    restarted; the producer's new connection resent it (a duplicate here, applied
    on the restarted shard) before the old connection's refusal came back."""
    state = ShardState(0, store.open_shard(0))
    state.ingest(batch(5), store.load_months, "p", 1, None)
    assert state.ingest(batch(7), store.load_months, "p", 2, 1).outcome is Outcome.APPLIED
    assert state.ingest(batch(7), store.load_months, "p", 2, 1).outcome is Outcome.DUPLICATE
    assert state.revert(batch(7), store.load_months, "p", 2) is False
    assert total(state) == 12 and state.applied == {"p": 2}


def test_only_the_producers_last_batch_can_be_undone(store):
    state = ShardState(0, store.open_shard(0))
    state.ingest(batch(5), store.load_months, "p", 1, None)
    state.ingest(batch(7), store.load_months, "p", 2, 1)
    assert state.revert(batch(5), store.load_months, "p", 1) is False
    assert state.revert(batch(7), store.load_months, "q", 2) is False
    assert total(state) == 12 and state.applied == {"p": 2}
    assert state.revert(batch(7), store.load_months, "p", 2) is True
    assert state.revert(batch(7), store.load_months, "p", 2) is False  # once
    assert total(state) == 5 and state.applied == {"p": 1}


def test_marks_survive_a_restart_and_resends_are_skipped(store):
    state = ShardState(0, store.open_shard(0))
    state.ingest(batch(5), store.load_months, "p", 1, None)
    state.ingest(batch(5), store.load_months, "q", 9, None)
    checkpoint(state, store)
    restarted = ShardState(0, store.open_shard(0))
    assert restarted.ingest(batch(5), store.load_months, "p", 1, None).outcome is Outcome.DUPLICATE
    assert restarted.ingest(batch(5), store.load_months, "q", 8, None).outcome is Outcome.DUPLICATE
    assert restarted.ingest(batch(1), store.load_months, "p", 2, 1).outcome is Outcome.APPLIED
    assert total(restarted) == 11


def test_a_gap_is_refused_and_changes_nothing(store):
    state = ShardState(0, store.open_shard(0))
    state.ingest(batch(5), store.load_months, "p", 1, None)
    answer = state.ingest(batch(5), store.load_months, "p", 3, 2)
    assert answer.outcome is Outcome.GAP and "resend" in answer.message
    assert total(state) == 5 and state.applied == {"p": 1}


def test_the_holding_checkpoint_is_one_that_will_happen(store):
    state = ShardState(0, store.open_shard(0))
    a = state.ingest(batch(5), store.load_months, "p", 1, None)
    assert a.ck == 1
    cp = state.begin_checkpoint()
    # a resend while checkpoint 1 is in flight is durable with checkpoint 1
    assert state.ingest(batch(5), store.load_months, "p", 1, None).ck == 1
    store.write_checkpoint(cp)
    state.finish_checkpoint(cp.ck)
    assert state.begin_checkpoint() is None
    # and after it, already durable: no checkpoint 2 is needed or promised
    assert state.ingest(batch(5), store.load_months, "p", 1, None).ck == 1


def test_the_dirty_bound_refuses_before_applying(store):
    state = ShardState(0, store.open_shard(0), max_dirty=10)
    rows = [["acme", "m", {"k": str(i)}, HOUR, 1] for i in range(4)]
    assert state.ingest(rows_batch(rows, NOW), store.load_months, "p", 1, None).ck == 1
    more = [["acme", "m", {"k": str(i)}, HOUR + 3600, 1] for i in range(4)]
    answer = state.ingest(rows_batch(more, NOW), store.load_months, "p", 2, 1)
    assert answer.outcome is Outcome.FULL and "bound 10" in answer.message
    assert state.dirty_slots == 4 and state.applied == {"p": 1}


def test_an_undo_after_a_checkpoint_took_the_batch_stays_within_the_bound(store):
    state = ShardState(0, store.open_shard(0), max_dirty=10)
    rows = [["acme", "m", {"k": str(i)}, HOUR, 1] for i in range(3)]
    state.ingest(rows_batch(rows, NOW), store.load_months, "p", 1, None)
    more = [["acme", "m", {"k": str(i)}, HOUR + 3600, 1] for i in range(3)]
    state.ingest(rows_batch(more, NOW), store.load_months, "p", 2, 1)
    state.begin_checkpoint()  # the write hangs: the store is down
    assert state.revert(rows_batch(more, NOW), store.load_months, "p", 2)
    assert state.dirty_slots == 9 <= state.max_dirty


def test_a_revert_after_the_month_was_evicted_reloads_it(store):
    state = ShardState(0, store.open_shard(0))
    state.ingest(batch(5), store.load_months, "p", 1, None)
    state.ingest(batch(7), store.load_months, "p", 2, 1)
    checkpoint(state, store)
    assert state.evict("2027-01", idle=0) == 1  # November is clean and past: dropped
    assert state.revert(batch(7), store.load_months, "p", 2)
    assert total(state) == 5 and state.applied == {"p": 1}
    checkpoint(state, store)
    restarted = ShardState(0, store.open_shard(0))
    restarted.ingest(batch(7), store.load_months, "p", 2, None)
    assert total(restarted) == 12


def test_a_wide_backfill_installs_stored_months_once_and_counts_exactly(store):
    """A backfill names hundreds of series-months a batch, some stored, some not, some
    of series the store never saw; each is loaded once, and one already live keeps its
    counts whatever a later install brings."""
    ts = [calendar.timegm((2026, m, 3, 4, 0, 0)) for m in (8, 9, 10)]
    first = ShardState(0, store.open_shard(0))
    rows = [["acme", "m", {"n": str(n)}, ts[n % 3], n + 1] for n in range(900)]
    assert first.ingest(rows_batch(rows, NOW), store.load_months, "p", 1, None).outcome \
        is Outcome.APPLIED
    checkpoint(first, store)
    state = ShardState(0, store.open_shard(0))
    again = [["acme", "m", {"n": str(n)}, t, 1] for n in range(0, 1200, 2) for t in ts]
    loads: list[int] = []

    def load(keys):
        loads.append(len(keys))
        return store.load_months(keys)

    assert state.ingest(rows_batch(again, NOW), load, "p", 2, 1).outcome is Outcome.APPLIED
    assert loads == [1800]  # 600 series x 3 months, in one call
    sids = [series_id("acme", "m", {"n": str(n)}) for n in range(1200)]
    h0, h1 = ts[0] // 3600, ts[2] // 3600 + 1
    expected = [(n + 1 if n < 900 else 0) + (3 if n % 2 == 0 else 0) for n in range(1200)]
    assert state.totals_of(sids, h0, h1, load) == expected
    august = "2026-08"
    state.install([(sids[0], august)], {(sids[0], august): MonthDoc(
        sids[0], august, {ts[0] // 3600: 10**6}, ck=9)})
    assert state.totals_of(sids, h0, h1, load) == expected
    checkpoint(state, store)
    assert ShardState(0, store.open_shard(0)).totals_of(sids, h0, h1, store.load_months) \
        == expected


SID = "acme|m|"


def stored(store) -> int:
    """The month document's count for HOUR, as a restarted shard would load it."""
    (doc,) = store.load_months([(SID, "2026-11")]).values()
    return doc.hours[HOUR // 3600]


def test_a_checkpoint_summed_later_holds_exactly_what_was_taken(store):
    """The actor sums a checkpoint on its writer thread while batches keep arriving:
    what arrives meanwhile belongs to the next checkpoint, and a restart counts each once."""
    state = ShardState(0, store.open_shard(0))
    state.ingest(batch(5), store.load_months, "p", 1, None)
    state.ingest(batch(7), store.load_months, "p", 2, 1)
    cp = state.begin_checkpoint(settle_later=True)
    assert cp is not None and cp.slots is None  # taken, not named yet
    state.ingest(batch(11), store.load_months, "p", 3, 2)  # while the writer sums
    state.settle_checkpoint()
    assert cp.documents() == {(SID, "2026-11"): {HOUR // 3600: 12}}
    assert state.dirty_slots == 2  # one summed slot in flight, one entry since
    store.write_checkpoint(cp)
    state.finish_checkpoint(cp.ck)
    assert stored(store) == 12
    checkpoint(state, store)
    assert stored(store) == 23 and store.open_shard(0).producers == {"p": 3}


def test_a_log_that_sums_to_nothing_is_still_written_when_summed_later(store):
    state = ShardState(0, store.open_shard(0))
    state.ingest(batch(5), store.load_months, "p", 1, None)
    checkpoint(state, store)
    state.ingest(batch(7), store.load_months, "p", 2, 1)
    state.revert(batch(7), store.load_months, "p", 2)
    cp = state.begin_checkpoint(settle_later=True)
    assert cp is not None  # the undo's entries were taken before anyone summed them
    state.settle_checkpoint()
    assert cp.documents() == {}
    store.write_checkpoint(cp)
    state.finish_checkpoint(cp.ck)
    assert stored(store) == 5 and store.open_shard(0).producers == {"p": 1}


@pytest.mark.parametrize("seed", range(8))
def test_pending_deltas_sum_per_slot_exactly_even_past_int64(seed: int) -> None:
    # Batches add at distinct (block row, hour) slots, as aggregates do; a checkpoint takes
    # each slot's sum, zero sums dropped, and the dirty count is the nonzero slots. Sums
    # that leave int64 (an hour moved by more than 2**63 between checkpoints) stay exact,
    # and so do sums that pass the table's narrower widths (int16, int32) mid-interval.
    import numpy as np

    from tally.actors.pending import PendingDeltas

    rng = np.random.default_rng(seed)
    pending = PendingDeltas(64)
    pending.reserve(500)
    # take() leaves nothing behind; the first interval's deltas fit int16 all along, the
    # second's int32, the third's may not even fit int64
    for interval in range(3):
        expected: dict[tuple[int, int], int] = {}
        for _ in range(int(rng.integers(1, 40))):
            n = int(rng.integers(1, 200))
            slots = rng.choice(500 * 24, size=min(n, 500 * 24), replace=False)
            rows, hod = slots // 24, slots % 24
            edge = [1.0, 0.2, rng.random()][interval]
            if edge < 0.1:  # values near the int64 edges
                vals = rng.choice([2**62, -(2**62), 2**63 - 1, -(2**63) + 1, 5], size=len(rows))
            elif edge < 0.15:  # ... near the int32 edges
                vals = rng.choice([2**31 - 1, 2**31, -(2**31), 5], size=len(rows))
            elif edge < 0.35:  # ... past int16's
                vals = rng.choice([2**15 - 1, 2**15, -(2**15), 70_000, -3, 5], size=len(rows))
            else:
                vals = rng.integers(-3, 4, len(rows))
            vals = vals.astype(np.int64)
            keep = vals != 0
            rows, hod, vals = rows[keep], hod[keep], vals[keep]
            pending.add(rows, hod, vals, lambda at, rows=rows: rows[at] * 1000 + 7)
            for r, h, v in zip(rows.tolist(), hod.tolist(), vals.tolist(), strict=True):
                expected[(r, h)] = expected.get((r, h), 0) + v
            assert pending.slots == sum(1 for v in expected.values() if v)
        rows, hod, sums, keys = pending.take()
        assert keys.tolist() == (rows * 1000 + 7).tolist()  # each block's key, named once
        got = dict(zip(zip(rows.tolist(), hod.tolist(), strict=True), sums.tolist(), strict=True))
        assert got == {k: v for k, v in expected.items() if v}
        assert len(got) == len(rows) and rows.dtype == hod.dtype == np.int64
        assert sums.dtype == (object if any(not -(2**63) <= v < 2**63 for v in got.values())
                              else np.int64)
        assert pending.slots == pending.rows == 0


def test_an_hour_moved_past_int64_since_the_last_checkpoint_waits_for_the_next(store):
    """Each total stays within int64, the change since the last checkpoint would not: a
    checkpoint carries it as one int64 increment. The batch is refused as overloaded and
    changes nothing; once a checkpoint began, its resend applies."""
    low, high = -(2**63) + 1, 2**63 - 1
    state = ShardState(0, store.open_shard(0))
    state.ingest(batch(low), store.load_months, "p", 1, None)
    checkpoint(state, store)
    assert state.ingest(batch(high), store.load_months, "p", 2, 1).outcome is Outcome.APPLIED
    answer = state.ingest(batch(high), store.load_months, "p", 3, 2)  # moved by 2**64 - 2
    assert answer.outcome is Outcome.DELTA_OVERFLOW
    assert "since the last checkpoint" in answer.message
    assert total(state) == 0 and state.applied == {"p": 2} and state.dirty_slots == 1
    cp = state.begin_checkpoint()
    assert state.ingest(batch(high), store.load_months, "p", 3, 2).outcome is Outcome.APPLIED
    store.write_checkpoint(cp)
    state.finish_checkpoint(cp.ck)
    checkpoint(state, store)
    assert stored(store) == high == total(state) and store.open_shard(0).producers == {"p": 3}


def test_an_eviction_leaves_exactly_the_months_still_live_and_queries_read_the_rest(store):
    """Which series hold which month live is kept per month (a bool per series number
    and a count): after an eviction the shard holds exactly what is left, counts its
    series-months exactly, and a query over both months reads the evicted one back."""
    nov, dec = calendar.timegm((2026, 11, 5, 3, 0, 0)), calendar.timegm((2026, 12, 2, 3, 0, 0))
    now = dec + 3600
    state = ShardState(0, store.open_shard(0))
    state.ingest(rows_batch([["acme", "m", {"k": "a"}, nov, 1], ["acme", "m", {"k": "b"}, nov, 2],
                             ["acme", "m", {"k": "a"}, dec, 4]], now), store.load_months)
    live = state.live
    a, b = live.series["acme|m|k=a"], live.series["acme|m|k=b"]
    assert live.series_months == 3 and sorted(live.months()) == [month_number("2026-11"),
                                                                 month_number("2026-12")]
    checkpoint(state, store)
    assert state.evict("2026-12", idle=0) == 2  # November's two: clean and past
    assert live.months() == [month_number("2026-12")] and live.series_months == 1
    assert live.holders(month_number("2026-12")).tolist() == [a]
    assert live.holding(month_number("2026-12"), [a, None, 10**6]).tolist() == [True, False,
                                                                                 False]
    assert live.holding(month_number("2026-11"), [a]).tolist() == [False]
    assert "acme|m|k=b" not in live.series  # it held nothing live any more
    sids = ["acme|m|k=a", "acme|m|k=b"]
    assert state.totals_of(sids, nov // 3600, dec // 3600 + 1, store.load_months) == [5, 2]
    assert b not in live.holders(month_number("2026-12")).tolist()


def test_rows_freed_by_an_eviction_are_not_found_again_for_their_old_series(store):
    """The recent days' rows are kept in arrays by series number; an eviction frees a
    month's rows (another series' new day takes one) and may give the series' number
    to another series: neither may still be found for the old (series, day)."""
    dec = calendar.timegm((2026, 12, 3, 10, 0, 0))
    now = dec + 7200

    def rows(*pairs: tuple[str, int]):
        return rows_batch([["acme", "m", {"k": k}, dec, v] for k, v in pairs], now)

    def totals(state: ShardState) -> dict[str, int]:
        return dict(zip(["acme|m|k=" + k for k in "abc"], state.totals_of(
            ["acme|m|k=" + k for k in "abc"], dec // 3600, dec // 3600 + 1,
            store.load_months), strict=True))

    state = ShardState(0, store.open_shard(0))
    state.ingest(rows(("a", 1), ("b", 10)), store.load_months)
    checkpoint(state, store)
    assert state.evict("2026-11", idle=0) == 2  # December is not the current month: both go
    state.ingest(rows(("c", 100)), store.load_months)  # a freed row, maybe b's number
    state.ingest(rows(("a", 2), ("b", 20)), store.load_months)  # loaded again
    assert totals(state) == {"acme|m|k=a": 3, "acme|m|k=b": 30, "acme|m|k=c": 100}
    checkpoint(state, store)
    restarted = ShardState(0, store.open_shard(0))
    assert totals(restarted) == {"acme|m|k=a": 3, "acme|m|k=b": 30, "acme|m|k=c": 100}


def test_a_store_outage_is_its_own_outcome_and_answers_as_before(store):
    """A month's base cannot be read: the outcome says so (not the message), nothing
    changes, and the gateway hears the same ``overloaded`` as for a full shard."""
    state = ShardState(0, store.open_shard(0))

    def down(keys):
        raise ConnectionError("store down")

    answer = state.ingest(batch(5), down, "p", 1, None)
    assert answer.outcome is Outcome.STORE_DOWN and not answer.outcome.accepted
    assert answer.answer() == {"code": "overloaded", "message": "store unavailable: store down"}
    assert state.applied == {} and state.dirty_slots == 0 and state.begin_checkpoint() is None
    assert state.ingest(batch(5), store.load_months, "p", 1, None).outcome is Outcome.APPLIED


def test_every_outcome_answers_the_gateway_key_for_key():
    """``answer`` is what the shard sent before outcomes were typed: msgpack bytes equal."""
    import msgpack

    from tally.actors.outcomes import Ingested

    cases = [
        (Ingested.applied(3, []), {"status": "applied", "ck": 3}),
        (Ingested.applied(3, ["a|m|", "b|m|"]),
         {"status": "applied", "ck": 3, "new": ["a|m|", "b|m|"]}),
        (Ingested.duplicate(2), {"status": "duplicate", "ck": 2}),
        (Ingested.refused(Outcome.GAP, "g"), {"code": "gap", "message": "g"}),
        (Ingested.refused(Outcome.FULL, "f"), {"code": "overloaded", "message": "f"}),
        (Ingested.refused(Outcome.STORE_DOWN, "s"), {"code": "overloaded", "message": "s"}),
        (Ingested.refused(Outcome.DELTA_OVERFLOW, "d"), {"code": "overloaded", "message": "d"}),
        (Ingested.refused(Outcome.BAD_ROW, "b", 4),
         {"code": "bad_row", "aggregate": 4, "message": "b"}),
    ]
    assert {r.outcome for r, _ in cases} == set(Outcome)
    for result, legacy in cases:
        assert msgpack.packb(result.answer()) == msgpack.packb(legacy), result


def test_the_shard_actor_counts_a_store_outage_and_nothing_else(tmp_path, monkeypatch):
    """The actor decides a store error from the outcome: an outage is counted and kept in
    ``last_error``; a full shard, refused alike on the wire, is not a store error."""
    import asyncio

    from tally.actors.shard import ShardActor

    monkeypatch.setattr("tally.actors.shard.gc.freeze", lambda: None)
    actor = ShardActor.__ray_actor_class__(0, f"sqlite:///{tmp_path}/t.db", 3600.0, max_dirty=1)

    def down(keys):
        raise ConnectionError("store down")

    async def scenario() -> None:
        load = actor.store.load_months
        actor.store.load_months = down
        answer = await actor.apply(batch(5), "p", 1, None)
        assert answer == {"code": "overloaded", "message": "store unavailable: store down",
                          "incarnation": actor.incarnation}
        assert actor.store_errors == 1
        assert actor.last_error == "RuntimeError('store unavailable: store down')"
        actor.store.load_months = load
        assert (await actor.apply(batch(5), "p", 1, None))["status"] == "applied"
        wider = rows_batch([["acme", "m", {"k": "v"}, HOUR, 1]], NOW)
        answer = await actor.apply(wider, "p", 2, 1)  # 1 dirty slot + 2 * 1 > 1
        assert answer["code"] == "overloaded" and "bound 1" in answer["message"]
        assert actor.store_errors == 1
        actor._writer.shutdown()

    asyncio.run(scenario())


def test_a_past_month_a_backfill_keeps_writing_stays_live(store):
    """Evicting a past month after every checkpoint made a backfill load it again with the
    next batch: it now stays live until it was idle for some checkpoints, or until past
    months hold more series-months than the shard keeps."""
    state = ShardState(0, store.open_shard(0))
    loads: list[int] = []

    def load(keys):  # the store's load, counted
        loads.append(len(keys))
        return store.load_months(keys)

    state.ingest(batch(5), load, "p", 1, None)
    for seq in range(2, 5):  # written again between checkpoints: kept, never reloaded
        checkpoint(state, store)
        assert state.evict("2027-01", idle=3) == 0
        state.ingest(batch(1), load, "p", seq, seq - 1)
    assert loads == [1] and total(state) == 8
    checkpoint(state, store)
    assert [state.evict("2027-01", idle=3) for _ in range(4)] == [0, 0, 0, 1]  # then idle
    state.ingest(batch(2), load, "p", 5, 4)
    assert loads == [1, 1] and total(state) == 10
    checkpoint(state, store)
    held = state.blocks.days_bytes(*month_days(month_number("2026-11")))
    assert held >= BLOCK_BYTES  # its block, and its day's table
    assert state.evict("2027-01", idle=3, keep=held) == 0  # within the bound in bytes
    assert state.evict("2027-01", idle=3, keep=held - 1) == 1  # past it: goes at once
    assert state.blocks.days_bytes(*month_days(month_number("2026-11"))) == 0


def test_day_blocks_move_a_block_to_a_wider_tier_and_give_the_row_back_small():
    """Hours are int8 until one outgrows it: that block moves to int16 with its other
    hours, then to int64 past int16; a freed row is small again for its next owner, and
    the rows it left are reused. The changed blocks' keys come from the writer."""
    blocks = DayBlocks()
    day = 20000
    g = np.array([3, 3, 4], np.int64)
    rows = blocks.locate(g, np.full(3, day), 8)
    hod = np.array([1, 2, 1])

    def write(at: slice, new: list[int], moved: list[int]) -> None:
        keys = g[at] << DAY_BITS | day
        blocks.write(rows[at], hod[at], np.array(new), np.array(moved), keys.__getitem__)

    write(slice(None), [SMALL, -7, -SMALL], [SMALL, -7, -SMALL])
    assert blocks.get(rows, hod).tolist() == [SMALL, -7, -SMALL]
    assert blocks.hours.moved == 0
    write(slice(0, 1), [SMALL + 1], [1])
    assert blocks.get(rows, hod).tolist() == [SMALL + 1, -7, -SMALL]  # to int16
    assert blocks.hours.moved == 1 and blocks.wide_blocks == 0
    assert blocks.row_counts(rows[:1])[0, :3].tolist() == [0, SMALL + 1, -7]
    write(slice(0, 1), [NARROW + 1], [NARROW - SMALL])
    assert blocks.get(rows, hod).tolist() == [NARROW + 1, -7, -SMALL]  # to int64
    assert blocks.hours.moved == 1 and blocks.wide_blocks == 1
    # a small block straight to int64, beside one in int16 in the same write
    write(slice(1, 3), [300, -(2**40)], [307, -(2**40) + SMALL])
    assert blocks.get(rows, hod).tolist() == [NARROW + 1, 300, -(2**40)]
    assert blocks.row_counts(rows)[:, :3].tolist() == [
        [0, NARROW + 1, 300], [0, NARROW + 1, 300], [0, -(2**40), 0]]
    assert blocks.wide_blocks == 2
    taken = blocks.take()  # (a checkpoint: a month is forgotten only once written)
    assert sorted(set(taken.keys.tolist())) == [3 << DAY_BITS | day, 4 << DAY_BITS | day]
    blocks.free_month(3, day, day + 1)
    blocks.free_month(4, day, day + 1)
    assert blocks.hours.moved == 0
    g = np.array([5, 6], np.int64)
    rows, hod = blocks.locate(g, np.full(2, day), 8), np.array([1, 1])
    assert blocks.get(rows, hod).tolist() == [0, 0]
    write(slice(None), [NARROW + 5, 200], [NARROW + 5, 200])
    assert blocks.get(rows, hod).tolist() == [NARROW + 5, 200]
    assert (blocks.hours.wide.used, blocks.hours.mid.used) == (2, 1)  # (rows reused)
    assert sorted(blocks.take().keys.tolist()) == [5 << DAY_BITS | day, 6 << DAY_BITS | day]


def test_a_batch_written_in_slices_shows_whole_series_and_holds_off_checkpoints(store):
    """A shard writes a wide batch a slice at a time and answers queries between slices:
    each series' increments of the batch are seen all at once, and nothing that changes
    the state (a checkpoint above all: the producer's mark moves only at the end) may
    come in between."""
    state = ShardState(0, store.open_shard(0))
    rows = [["acme", "m", {"k": str(k)}, HOUR + h * 3600, 1 + k] for k in range(3)
            for h in range(4)]  # three series, four hours each
    wide = rows_batch(rows, NOW)
    first = state.ingest(batch(1), store.load_months, "p", 1, None)
    assert first.outcome is Outcome.APPLIED
    applying = state.begin_ingest(wide, store.load_months, "p", 2, 1)
    assert isinstance(applying, Applying)
    assert applying.step(2)  # at least 2 aggregates, to the end of the first series: 4

    def hours_of(k: int) -> list[int]:
        return state.hourly("acme", "m", {"k": str(k)}, HOUR // 3600,
                            HOUR // 3600 + 4)[0].tolist()

    assert [hours_of(k) for k in range(3)] == [[1] * 4, [0] * 4, [0] * 4]
    for refused in (state.begin_checkpoint, lambda: state.ingest(batch(1), store.load_months),
                    lambda: state.revert(batch(1), store.load_months, "p", 1),
                    lambda: state.evict("2026-12")):
        with pytest.raises(RuntimeError, match="half written"):
            refused()
    assert state.applied == {"p": 1}  # the mark waits for the last slice
    assert applying.step(4)  # the second series (4 more), not the third
    assert [hours_of(k) for k in range(3)] == [[1] * 4, [2] * 4, [0] * 4]
    assert not applying.step(5)
    assert applying.result is not None and applying.result.outcome is Outcome.APPLIED
    assert [hours_of(k) for k in range(3)] == [[1] * 4, [2] * 4, [3] * 4]
    assert state.applied == {"p": 2}
    checkpoint(state, store)
    restarted = ShardState(0, store.open_shard(0))
    assert restarted.applied == {"p": 2}
    assert restarted.ingest(wide, store.load_months, "p", 2, 1).outcome is Outcome.DUPLICATE


def test_slices_that_move_their_blocks_to_wider_tiers_leave_the_next_slices_exact(store):
    """A slice writes its slots back where the batch read them, unless its own values
    move its blocks: each slice holds all the slots of its series, so one slice moving
    its blocks to int16 or int64 moves none of the next slice's."""
    state = ShardState(0, store.open_shard(0))
    values = {0: 100, 1: 5, 2: 40_000, 3: 7}  # series 0 passes int8, 2 passes int16
    rows = [["acme", "m", {"k": str(k)}, HOUR + h * 3600, v] for k, v in values.items()
            for h in range(3)]
    for seq in (1, 2):  # read all small, then read some moved
        applying = state.begin_ingest(rows_batch(rows, NOW), store.load_months, "p", seq,
                                      seq - 1 if seq > 1 else None)
        assert isinstance(applying, Applying)
        while applying.step(3):  # a series a slice
            pass
        assert applying.result is not None and applying.result.outcome is Outcome.APPLIED
    for k, v in values.items():
        got = state.hourly("acme", "m", {"k": str(k)}, HOUR // 3600, HOUR // 3600 + 3)
        assert got[0].tolist() == [2 * v] * 3
    assert state.blocks.hours.moved == 2 and state.blocks.wide_blocks == 1
    all_moved = [["acme", "m", {"k": "0"}, HOUR, 1], ["acme", "m", {"k": "2"}, HOUR, -1]]
    assert state.ingest(rows_batch(all_moved, NOW), store.load_months, "p", 3, 2).outcome \
        is Outcome.APPLIED
    assert state.hourly("acme", "m", {"k": "0"}, HOUR // 3600, HOUR // 3600 + 1)[0].tolist() \
        == [201]
    assert state.hourly("acme", "m", {"k": "2"}, HOUR // 3600, HOUR // 3600 + 1)[0].tolist() \
        == [79_999]


def test_a_slice_that_fails_leaves_the_state_refusing_everything(store, monkeypatch):
    """Half a batch applied and the mark not moved: the state refuses every change and
    checkpoint from then on, never taking the half into a checkpoint (the shard actor
    ends its process instead, and restarts from its last checkpoint)."""
    state = ShardState(0, store.open_shard(0))
    rows = [["acme", "m", {"k": str(k)}, HOUR, 1] for k in range(3)]
    applying = state.begin_ingest(rows_batch(rows, NOW), store.load_months, "p", 1, None)
    assert isinstance(applying, Applying)
    assert applying.step(1)
    monkeypatch.setattr(state.blocks, "write", lambda *a: (_ for _ in ()).throw(MemoryError))
    with pytest.raises(MemoryError):
        applying.step(1)
    monkeypatch.undo()
    assert state.applied == {}
    with pytest.raises(RuntimeError, match="half written"):
        state.begin_checkpoint()
    with pytest.raises(RuntimeError, match="half written"):
        state.ingest(batch(1), store.load_months, "p", 1, None)


@pytest.mark.parametrize("far", [False, True])
def test_a_checkpoints_slots_come_by_document_with_their_hours_in_order(far: bool) -> None:
    # Taken.slots groups a checkpoint's slots per (series, month) document, the documents
    # in series then month order and each one's hours in order, whatever order the slots
    # were taken in. ``far``: hours 50 years apart over many series, beyond what the
    # 4-byte sort key holds, so the 8-byte one sorts them.
    import numpy as np

    from tally.actors.day_blocks import DAY_BITS, Taken
    from tally.wire.timeslots import month_of_hour

    rng = np.random.default_rng(3)
    n = 5_000
    series = rng.integers(0, 20_000 if far else 50, n).astype(np.int64)
    now = 500_000
    hours = now - rng.integers(0, 24 * 60, n)
    if far:
        hours[::7] -= 50 * 8766
    pairs = dict.fromkeys(zip(series.tolist(), hours.tolist(), strict=True))  # distinct
    series = np.array([s for s, _ in pairs], np.int64)
    hours = np.array([h for _, h in pairs], np.int64)
    values = rng.integers(1, 9, len(hours)).astype(np.int64)
    taken = Taken(np.arange(len(hours)), hours % 24, values, series << DAY_BITS | hours // 24)
    sids = [f"s{k:05d}" for k in range(20_000)]
    got = taken.slots(sids)

    expected: dict[tuple[str, str], dict[int, int]] = {}
    for s, h, v in zip(series.tolist(), hours.tolist(), values.tolist(), strict=True):
        expected.setdefault((sids[s], month_of_hour(h)), {})[h] = v
    assert got.to_deltas() == expected
    assert got.doc_keys() == sorted(expected)  # (the sids sort as their numbers do)
    for _, slots in got.documents():
        assert [h for h, _ in slots] == sorted(h for h, _ in slots)

"""Checkpoints kept as runs and folded later count exactly what the direct way counts.

Random checkpoints of several shards go to two SQLite files: one written the
direct way, one as runs folded a few slots at a time in between (and left half
folded at the end). Every read must agree, at every step; a store reopened on a
half-folded file goes on from where the fold stopped; a process SIGKILLed while
it folds leaves a file that reads exactly; and the peak bound sends a checkpoint
that could leave int64 the direct way, where it is refused.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tally.checkpoint.runs import Run, merge
from tally.checkpoint.sqlite import SqliteStore
from tally.checkpoint.sqlite_schema import PEAK_BOUND
from tally.checkpoint.store import Checkpoint, StoreError
from tally.wire.series import series_id
from tally.wire.timeslots import month_first_hour

SIDS = [series_id("acme", "m", {"k": str(k)}) for k in range(6)]
MONTHS = ["2026-10", "2026-11"]


def keys() -> list[tuple[str, str]]:
    return [(sid, month) for sid in SIDS for month in MONTHS]


def random_checkpoint(rng: np.random.Generator, shard: int, ck: int) -> Checkpoint:
    deltas: dict[tuple[str, str], dict[int, int]] = {}
    for sid, month in keys():
        if sid.endswith(str(shard)) or rng.random() < 0.5:  # shards share no series...
            continue
        if SIDS.index(sid) % 2 != shard:  # ...each has its own
            continue
        first = month_first_hour(month)
        hours = rng.choice(60, size=int(rng.integers(1, 8)), replace=False)
        deltas[(sid, month)] = {first + int(h): int(rng.integers(-5, 50)) or 1 for h in hours}
    return Checkpoint(shard, ck, deltas, new_series=[sid for sid, _ in deltas],
                      producers={"p": ck})


def everything(store: SqliteStore) -> tuple:
    docs = store.load_months(keys())
    read = store.read_months("acme", "m", {}, MONTHS)
    return ({k: d.hours for k, d in docs.items()},
            [(d.sid, d.month, d.hours) for d in read],
            store.open_shard(0), store.open_shard(1))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), budget=st.integers(1, 40))
def test_runs_folded_in_any_steps_read_as_the_direct_way(tmp_path_factory: pytest.TempPathFactory,
                                                          seed: int, budget: int) -> None:
    base = tmp_path_factory.mktemp("runs")
    direct = SqliteStore(str(base / "direct.db"))
    runs = SqliteStore(str(base / "runs.db"), runs=True)
    rng = np.random.default_rng(seed)
    try:
        for ck in range(1, 9):
            for shard in (0, 1):
                cp = random_checkpoint(rng, shard, ck)
                direct.write_checkpoint(cp)
                runs.write_checkpoint(cp)
                if rng.random() < 0.6:
                    runs.fold(shard, budget)
                assert everything(runs) == everything(direct)
        # a store opened anew (another process, after a crash) reads the half-folded
        # file the same, and its folds finish what this one's began
        reopened = SqliteStore(str(base / "runs.db"), runs=True)
        assert everything(reopened) == everything(direct)
        for shard in (0, 1):
            while reopened.fold(shard, budget):
                assert everything(reopened) == everything(direct)
            assert reopened.unfolded(shard) == 0
        assert everything(reopened) == everything(direct)
        reopened.close()
    finally:
        direct.close()
        runs.close()


def test_merge_sums_per_slot_exactly_past_int64() -> None:
    one = np.array([1], np.int64)
    big = 2**62
    runs = [Run(0, ck, one * 7, one * 682, one, np.array([490000 + ck % 2]), one * big)
            for ck in range(1, 4)]
    merged = merge(runs)
    assert merged.values.tolist() == [big, 2 * big]  # (hour 490000 in one run, 490001 in two)
    assert merged.values.dtype == object


def test_a_run_that_could_leave_int64_goes_the_direct_way(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "t.db"), runs=True)
    sid, month = SIDS[0], MONTHS[1]
    first = month_first_hour(month)
    store.write_checkpoint(Checkpoint(0, 1, {(sid, month): {first: 5}}))
    assert store.unfolded(0) == 1  # a run
    store.write_checkpoint(Checkpoint(0, 2, {(sid, month): {first: 2**63 - 10}}))
    # past the peak bound: written (and checked) the direct way, and so is what follows
    with pytest.raises(StoreError, match="int64"):
        store.write_checkpoint(Checkpoint(0, 3, {(sid, month): {first: 10}}))
    assert store.unfolded(0) == 1
    assert store.fold(0, 100) == 0
    assert store.load_months([(sid, month)])[(sid, month)].hours == {first: 2**63 - 5}
    raw = sqlite3.connect(tmp_path / "t.db")
    assert raw.execute("SELECT value FROM meta WHERE key = 'peak'").fetchone() == (PEAK_BOUND,)
    raw.close()
    store.close()


def test_a_file_of_a_newer_layout_is_refused(tmp_path: Path) -> None:
    SqliteStore(str(tmp_path / "t.db")).close()
    raw = sqlite3.connect(tmp_path / "t.db")
    with raw:
        raw.execute("UPDATE meta SET value = 99 WHERE key = 'layout'")
    raw.close()
    with pytest.raises(RuntimeError, match="layout 99, written by a newer tally"):
        SqliteStore(str(tmp_path / "t.db"))


FOLDER = textwrap.dedent("""
    import sys
    from tally.checkpoint.sqlite import SqliteStore
    from tally.checkpoint.store import Checkpoint
    from tally.wire.series import series_id
    from tally.wire.timeslots import month_first_hour
    store = SqliteStore(sys.argv[1], runs=True)
    first = month_first_hour("2026-11")
    sids = [series_id("acme", "m", {"k": str(k)}) for k in range(200)]
    for ck in range(1, 41):
        store.write_checkpoint(Checkpoint(0, ck, {
            (sid, "2026-11"): {first + h: 1 for h in range(0, 600, 7)} for sid in sids}))
    store.fold(0, 997)
    print("part way", flush=True)  # (a fold cursor is in the file now)
    while store.fold(0, 1):  # then a slot a transaction: many thousands of them
        pass
""")


def test_a_fold_killed_midway_leaves_every_count(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    proc = subprocess.Popen([sys.executable, "-c", FOLDER, str(path)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "part way\n"
        os.kill(proc.pid, signal.SIGKILL)  # (wherever it is: every count must survive)
    finally:
        proc.kill()
        proc.wait()
    store = SqliteStore(str(path), runs=True)
    first = month_first_hour("2026-11")
    expected = {first + h: 40 for h in range(0, 600, 7)}
    sids = [series_id("acme", "m", {"k": str(k)}) for k in range(200)]
    docs = store.load_months([(sid, "2026-11") for sid in sids])
    assert all(docs[(sid, "2026-11")].hours == expected for sid in sids)
    while store.fold(0, 5000):
        pass
    docs = store.load_months([(sid, "2026-11") for sid in sids])
    assert all(docs[(sid, "2026-11")].hours == expected for sid in sids)
    raw = sqlite3.connect(path)
    assert raw.execute("SELECT count(*) FROM runs").fetchone() == (0,)
    assert raw.execute("SELECT count(*), sum(value) FROM slots").fetchone() == (
        200 * len(expected), 200 * 40 * len(expected))
    raw.close()
    store.close()

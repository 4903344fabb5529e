"""``python -m tally.bench.inprocess``: each side of a cell alone runs and reports a rate
(the figures themselves are docs/performance.md's, never asserted here)."""

from __future__ import annotations

import re

import pytest

from tally.actors.shard_state import ShardState
from tally.bench.inprocess import PART, backfill, main, memory
from tally.bench.workload import Workload


@pytest.mark.parametrize("side", ["gateway", "gateway-rows", "shard", "checkpoint"])
def test_each_side_runs_and_reports_its_rate(side: str, capsys) -> None:
    main([side, "300", "24", "--seconds", "0.3"])
    out = capsys.readouterr().out
    unit = "M slots/s" if side == "checkpoint" else "M increments/s"
    rate = re.search(rf"([0-9.]+) {unit}", out)
    assert rate is not None and float(rate.group(1)) > 0, out
    assert out.startswith(f"{side}, 300 series x 24 hour(s)")


def test_a_backfill_run_reports_its_rate_and_counts_every_increment_it_sent(
        tmp_path, capsys) -> None:
    main(["backfill", "300", "8760", "--parts", "3"])
    out = capsys.readouterr().out
    assert out.startswith("backfill, 300 series x 8760 hour(s): ") and "M increments/s" in out
    seconds, checkpoints, n, shard = backfill(Workload(400, 24 * 60), str(tmp_path), 25)
    assert n == 25 * PART and 0 < checkpoints < seconds
    sids = sorted({sid for part in shard.parts for sid in part.sids})
    h0 = min(int(part.hours.min()) for part in shard.parts)
    h1 = max(int(part.hours.max()) for part in shard.parts) + 1
    restarted = ShardState(0, shard.store.open_shard(0))  # (all it has is the store's)
    assert sum(restarted.totals_of(sids, h0, h1, shard.store.load_months)) == sum(
        int(part.values.sum()) for part in shard.parts)


def test_the_memory_side_holds_every_series_month_it_sent_and_reports_its_bytes(
        tmp_path, capsys) -> None:
    main(["memory", "300", "720"])
    out = capsys.readouterr().out
    assert re.match(r"memory, 300 series x \d+ hour\(s\) of this month: [0-9,]+ bytes per "
                    r"live series-month \(300 series-months\)", out), out
    _, months = memory(200, 48, str(tmp_path))  # (the figure itself is not asserted)
    assert months == 200

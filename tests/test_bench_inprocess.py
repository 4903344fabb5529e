"""``python -m tally.bench.inprocess``: each side of a cell alone runs and reports a rate
(the figures themselves are docs/performance.md's, never asserted here)."""

from __future__ import annotations

import re

import pytest

from tally.bench.inprocess import main


@pytest.mark.parametrize("side", ["gateway", "gateway-rows", "shard", "checkpoint"])
def test_each_side_runs_and_reports_its_rate(side: str, capsys) -> None:
    main([side, "300", "24", "--seconds", "0.3"])
    out = capsys.readouterr().out
    unit = "M slots/s" if side == "checkpoint" else "M increments/s"
    rate = re.search(rf"([0-9.]+) {unit}", out)
    assert rate is not None and float(rate.group(1)) > 0, out
    assert out.startswith(f"{side}, 300 series x 24 hour(s)")

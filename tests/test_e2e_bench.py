"""`tally bench` end to end, small: it must run, check its totals and print its table.

Only that it works is asserted here; what it measures is for people to read
(the README's figures), never a pass/fail threshold in a test.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from served import TALLY

pytestmark = pytest.mark.e2e


def test_tally_bench_runs_small_and_finds_its_totals_exact(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [TALLY, "bench", "--shards", "2", "--series", "200,3000", "--windows", "hour,30d",
         "--rows", "20000", "--columnar", "400000", "--queries", "20",
         "--breakdown-series", "150", "--memory-series", "1000", "--json", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for line in ("worst columnar cell", "worst rows cell", "3,000 × 30d", "200 × hour",
                 "breakdown over 150 series", "memory per live series-month",
                 "totals exact"):
        assert line in done.stdout, done.stdout
    results = json.loads(out.read_text())
    assert results["exact"] and not results["errors"]
    cells = {(c["series"], c["window"]): c for c in results["cells"]}
    assert set(cells) == {(200, "hour"), (200, "30d"), (3000, "hour"), (3000, "30d")}
    for c in cells.values():  # every cell's total is exactly what was acknowledged
        assert c["exact"] and c["queried_total"] == c["acked_total"] > 400_000
        assert c["columnar"]["increments"] == 400_000 and c["rows"]["increments"] == 20_000
    assert results["totals"]["queried"] == results["totals"]["sent_and_acked"] > 0
    assert results["query"]["n"] == 20 and results["bytes_per_series_month"] > 0

"""``tally bench``'s tables: the verdicts it prints are the ones its figures support."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from tally.bench.report import report
from tally.bench.run import Results


def printed(res: Results) -> str:
    out = io.StringIO()
    report(res, Console(file=out, width=200, color_system=None))
    return out.getvalue()


@pytest.mark.parametrize(("hours", "size", "verdict"), [
    (720, 1785, "yes"),
    (744, 2500, "no"),
    (170, 2500, "no"),  # over the target with a week of hours: more with a month
    (170, 1785, "not yet known"),  # under it with a week says nothing of a full month
])
def test_the_memory_verdict_is_given_only_where_the_hours_support_it(hours, size, verdict):
    res = Results(machine={"cpus": 2, "cpu": "test"},
                  config={"memory_series": 100_000, "checkpoint_interval": 2.0},
                  bytes_per_series_month=size, resident_bytes_per_series_month=size + 700,
                  memory_hours=hours)
    row = next(line for line in printed(res).splitlines() if "memory per live" in line)
    assert f"{hours} hours each" in row and "the target is for 720" in row
    assert row.rstrip(" │").endswith(verdict), row

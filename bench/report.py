"""``tally bench``'s tables: the worst cell first, then every cell, then queries and memory."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from tally.bench.matrix import CellResult


def _targets() -> dict[str, float]:
    from tally.bench.run import TARGETS

    return TARGETS


def _columnar_target(c: CellResult) -> float:
    t = _targets()
    return t["columnar_hour_mps"] if c.window == "hour" else t["columnar_mps"]


def worst(cells: list[CellResult], phase: str) -> CellResult | None:
    """The cell furthest below its target for ``phase`` (its ratio to the target)."""
    t = _targets()
    measured = [c for c in cells if getattr(c, phase).increments]
    if not measured:
        return None
    if phase == "columnar":
        return min(measured, key=lambda c: c.columnar.mps / _columnar_target(c))
    return min(measured, key=lambda c: c.rows.mps / t["rows_mps"])


def headline(res: Any) -> list[str]:
    lines = []
    for phase in ("columnar", "rows"):
        c = worst(res.cells, phase)
        if c is not None:
            p = getattr(c, phase)
            lines.append(f"worst {phase} cell: {c.series:,} series × {c.window}: "
                         f"{p.mps:.2f} M increments/s")
    return lines


def report(res: Any, console: Console | None = None) -> None:
    console = console or Console(width=max(Console().width, 150))
    t = _targets()
    interval = res.config.get("checkpoint_interval", 2.0)
    for line in headline(res):
        console.print(f"[bold]{line}[/bold]")
    table = Table(title=f"tally bench — {res.machine['cpus']} CPUs, {res.machine['cpu']}; "
                  f"in-process ceiling {res.ceiling_mps:.2f} M rows/s")
    peer = any(c.peer for c in res.cells)
    for col in ("cell", "columnar M/s", "target", "rows M/s", "target", "refused",
                "drain s", "fold s", "slow ckpt",
                *(("ClickHouse M/s", "tally / CH") if peer else ()),
                "total exact"):
        table.add_column(col)
    for c in res.cells:
        ok_c = not c.columnar.increments or c.columnar.mps >= _columnar_target(c)
        ok_r = not c.rows.increments or c.rows.mps >= t["rows_mps"]
        lag = max(c.columnar.drain_s, c.rows.drain_s)
        ch = c.peer.get("insert_mps") if c.peer else None
        table.add_row(
            f"{c.series:,} × {c.window}",
            f"{c.columnar.mps:.2f}" if c.columnar.increments else "-",
            _met(ok_c, f"≥ {_columnar_target(c):g}"),
            f"{c.rows.mps:.2f}" if c.rows.increments else "-", _met(ok_r, f"≥ {t['rows_mps']:g}"),
            str(c.columnar.refused + c.rows.refused),
            _met(lag <= t["lag_over_interval_s"] + interval, f"{lag:.1f}"),
            f"{c.columnar.fold_s:.1f} / {c.rows.fold_s:.1f}",
            str(c.columnar.slow_checkpoints + c.rows.slow_checkpoints),
            *((f"{ch:.2f}" if ch else "-", f"{c.columnar.mps / ch:.2f}x" if ch else "-")
              if peer else ()),
            _met(c.exact, f"{c.queried_total:,}"),
        )
    console.print(table)
    setup = max((c.columnar.connect_s for c in res.cells), default=0.0)
    if setup:
        console.print(f"(each phase timed from its first frame to its last answer; the "
                      f"columnar phases' series tables were defined before, untimed: up to "
                      f"{setup:.2f} s a connection)")
    q, h, b = res.query, res.healthz, res.breakdown
    other = Table(title=f"while the {res.query_cell} cell ingests ({res.background_mps:.2f} M/s)")
    for col in ("measure", "tally", "baseline", "target", "met"):
        other.add_column(col)
    if q and h and b:
        ch = res.peer_queries.get("series") if res.peer_queries else None
        other.add_row("query: 1 series, 31 days by day, Europe/London (ms p50 / p99)",
                      f"{q.p50_ms:.2f} / {q.p99_ms:.2f}",
                      f"/healthz {h.p50_ms:.2f} / {h.p99_ms:.2f}"
                      + (f"; ClickHouse {ch[0]:.2f} / {ch[1]:.2f}" if ch else ""),
                      f"≤ {t['query_p50_ms']:g} / ≤ {t['query_p99_ms']:g}",
                      _yes(q.p50_ms <= t["query_p50_ms"] and q.p99_ms <= t["query_p99_ms"]))
        other.add_row(f"breakdown over {res.config.get('breakdown_series', 0):,} series "
                      "(ms p50 / p99)", f"{b.p50_ms:.2f} / {b.p99_ms:.2f}", "",
                      f"p99 ≤ {t['breakdown_p99_ms']:g}", _yes(b.p99_ms <= t["breakdown_p99_ms"]))
    if res.config.get("memory_series"):
        # Early in a month a series-month holds fewer hours than the target's: a figure
        # below it then says nothing about a full month, which holds more (only one above
        # it is a verdict).
        full = res.memory_hours >= t["series_month_hours"]
        ok = res.bytes_per_series_month <= t["bytes_per_series_month"]
        other.add_row(f"memory per live series-month, {res.memory_hours} hours each "
                      f"(bytes, private; the target is for {t['series_month_hours']})",
                      f"{res.bytes_per_series_month:,.0f}",
                      f"resident {res.resident_bytes_per_series_month:,.0f}",
                      f"≤ {t['bytes_per_series_month']:g}",
                      _yes(ok) if full or not ok else "not yet known")
    if res.config.get("queries"):
        other.add_row("totals exact (queries phase)", f"{res.totals.get('queried', 0):,}",
                      f"sent {res.totals.get('sent_and_acked', 0):,}", "equal",
                      _yes(res.totals.get("queried") == res.totals.get("sent_and_acked")))
    if other.row_count:
        console.print(other)
    for e in res.errors:
        console.print(f"[red]error:[/red] {e}")


def _met(ok: bool, text: str) -> str:
    return text if ok else f"[red]{text}[/red]"


def _yes(ok: bool) -> str:
    return "yes" if ok else "[red]no[/red]"

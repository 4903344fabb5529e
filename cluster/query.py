"""``tally query``: a series or a breakdown from the HTTP API, as a table in the terminal.

A thin client of ``GET /v1/series`` and ``GET /v1/breakdown``: the parameters
keep the API's names and are passed through unchanged, so the server stays the
one place that validates them and its error (code and message) is what the
user sees. The command only fills in a default range (the last 30 days in the
asked time zone, since the API requires one) and draws the answer: one row per
bucket with a sparkline row (the ``sparklines`` package) for a series, one row
per tag value with a bar for a breakdown, then the total and, with
``--compare``, the previous period beside it and the change.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import httpx
from rich.bar import Bar
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from sparklines import sparklines

DEFAULT_URL = "http://127.0.0.1:8780"
DEFAULT_DAYS = 30
SPARK_WIDTH = 60  # a longer series is summed into this many marks


class QueryFailed(Exception):
    """The API refused the query (``code`` and its message) or could not be reached."""

    def __init__(self, message: str, code: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


@dataclass
class QueryArgs:
    """The command's parameters, named as the API names them."""

    tenant: str
    metric: str
    from_: str | None = None
    to: str | None = None
    granularity: str | None = None
    tz: str | None = None
    where: list[str] = field(default_factory=list)
    compare: str | None = None
    by: str | None = None
    limit: int | None = None
    url: str = DEFAULT_URL
    token: str | None = None

    def params(self) -> list[tuple[str, str]]:
        """The query string; absent options are left to the API's defaults."""
        start, end = default_range(self.tz, self.to)
        out = [("tenant", self.tenant), ("metric", self.metric),
               ("from", self.from_ or start), ("to", self.to or end)]
        if self.tz is not None:
            out.append(("tz", self.tz))
        out += [("where", w) for w in self.where]
        if self.by is not None:
            out.append(("by", self.by))
            if self.limit is not None:
                out.append(("limit", str(self.limit)))
        else:
            if self.granularity is not None:
                out.append(("granularity", self.granularity))
            if self.compare is not None:
                out.append(("compare", self.compare))
        return out


def default_range(tz: str | None, to: str | None = None) -> tuple[str, str]:
    """30 days ending with ``to`` (a date or datetime), or today in ``tz``.

    An unknown zone or a malformed ``to`` is left for the API to refuse with
    its own message; the default here then falls back to today in UTC.
    """
    try:
        last = date.fromisoformat(to[:10]) if to else None
    except ValueError:
        last = None
    if last is None:
        try:
            last = datetime.now(ZoneInfo(tz or "UTC")).date()
        except (ZoneInfoNotFoundError, ValueError):
            last = datetime.now(ZoneInfo("UTC")).date()
    return (last - timedelta(days=DEFAULT_DAYS - 1)).isoformat(), last.isoformat()


def fetch(args: QueryArgs) -> dict[str, Any]:
    """The API's answer; ``QueryFailed`` with its code and message when it refuses."""
    route = "/v1/breakdown" if args.by is not None else "/v1/series"
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    url = args.url.rstrip("/") + route
    try:
        r = httpx.get(url, params=args.params(), headers=headers, timeout=30)
    except httpx.HTTPError as e:
        raise QueryFailed(f"cannot reach {args.url}: {e}") from None
    try:
        body = r.json()
    except ValueError:
        body = None
    if r.status_code != 200:
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):
            raise QueryFailed(str(err.get("message")), str(err.get("code")), r.status_code)
        raise QueryFailed(f"HTTP {r.status_code}: {r.text[:200]}", None, r.status_code)
    if not isinstance(body, dict):
        raise QueryFailed(f"{url} did not answer JSON: {r.text[:200]}")
    return body


def spark(values: list[int], width: int = SPARK_WIDTH) -> tuple[str, int]:
    """A one-line sparkline and how many buckets each mark stands for.

    A series longer than ``width`` is folded: each mark is the mean of ``step``
    buckets (a mean, so a shorter last group does not look like a dip). The
    scale starts at zero, so a flat busy series does not look like a spiky one.
    """
    if not values:
        return "", 1
    step = -(-len(values) // width)
    folded = [sum(g) / len(g) for g in (values[i:i + step] for i in range(0, len(values), step))]
    return sparklines(folded, minimum=min(0.0, min(folded)))[0], step


def _change(change: float | None) -> str:
    return "n/a (previous total is 0)" if change is None else f"{change:+.1%}"


def spark_width(answer: dict[str, Any], console_width: int) -> int:
    """Marks that fit the value column(s) of a ``console_width`` terminal (at least 8)."""
    labels = [str(p[0]) for p in answer["points"]] + ["trend (99/mark)"]
    compare = answer.get("compare")
    if compare:
        labels += [str(p[0]) for p in compare["points"]]
    label_w = max(len(x) for x in labels) + 3  # padding and a border
    columns = 2 if compare else 1
    free = console_width - 1 - columns * label_w
    return max(8, min(SPARK_WIDTH, free // columns - 3))


def series_table(answer: dict[str, Any], width: int = SPARK_WIDTH) -> Table:
    """One row per bucket, the compared bucket beside it, then trend, total and change.

    ``width`` is the most marks the sparkline may have; longer series are folded.
    """
    where = answer.get("where") or {}
    filters = "".join(f" {k}:{v}" for k, v in where.items())
    title = (f"{answer['tenant']} · {answer['metric']}{filters} · {answer['from']} .. "
             f"{answer['to']} · by {answer['granularity']} · {answer['tz']}")
    compare = answer.get("compare")
    if compare:
        title += f" · compared with {compare['from']} .. {compare['to']}"
    table = Table(title=escape(title), title_justify="left")
    table.add_column(answer["granularity"])
    table.add_column("value", justify="right")
    if compare:
        table.add_column("previous")
        table.add_column("value", justify="right")
    points = answer["points"]
    prev_points = compare["points"] if compare else []
    for n, (label, value) in enumerate(points):
        row = [escape(str(label)), f"{value:,}"]
        if compare:
            prev = prev_points[n] if n < len(prev_points) else ("", None)
            row += [escape(str(prev[0])), "" if prev[1] is None else f"{prev[1]:,}"]
        table.add_row(*row)
    line, step = spark([v for _, v in points], width)
    trend = "trend" if step == 1 else f"trend ({step}/mark)"
    row = [trend, line]
    if compare:
        prev_line, _ = spark([v for _, v in prev_points], width)
        row += ["", prev_line]
    table.add_section()
    table.add_row(*row)
    total = ["total", f"{answer['total']:,}"]
    if compare:
        total += ["", f"{compare['total']:,}"]
    table.add_row(*total, style="bold")
    if compare:
        table.add_row("change", _change(compare.get("change")), "", "", style="bold")
    return table


def breakdown_table(answer: dict[str, Any], args: QueryArgs) -> Table:
    """One row per tag value, largest first, with its share and a bar; other and total."""
    total = answer["total"]
    groups = answer["groups"]
    scale = max([g["total"] for g in groups] + [answer.get("other", 0), 1])
    where = answer.get("where") or {}
    filters = "".join(f" {k}:{v}" for k, v in where.items())
    title = (f"{answer.get('tenant', args.tenant)} · {answer.get('metric', args.metric)}"
             f"{filters} · {answer.get('from')} .. {answer.get('to')} · {answer.get('tz')} · "
             f"by {answer['by']}")
    table = Table(title=escape(title), title_justify="left")
    table.add_column(answer["by"])
    table.add_column("total", justify="right")
    table.add_column("share", justify="right")
    table.add_column("", width=30)

    def row(label: str, value: int, style: str | None = None) -> None:
        share = f"{value / total:.1%}" if total else "-"
        table.add_row(escape(label), f"{value:,}", share, Bar(scale, 0, value, width=30),
                      style=style)

    for g in groups:
        row("(no tag)" if g["value"] is None else str(g["value"]), g["total"])
    if answer.get("other"):
        row("(other)", answer["other"], "dim")
    table.add_section()
    table.add_row("total", f"{total:,}", "", "", style="bold")
    return table


def run_query(args: QueryArgs, *, as_json: bool = False, console: Console | None = None) -> int:
    """Fetch and print; 0, or 1 with the API's code and message on stderr."""
    console = console or Console()
    try:
        answer = fetch(args)
    except QueryFailed as e:
        code = f"{e.code}: " if e.code else ""
        status = f" (HTTP {e.status})" if e.status else ""
        Console(stderr=True).print(escape(f"tally query: error{status}: {code}{e}"),
                                   highlight=False)
        return 1
    if as_json:
        console.print_json(json.dumps(answer))
        return 0
    if args.by is not None:
        console.print(breakdown_table(answer, args))
    else:
        console.print(series_table(answer, spark_width(answer, console.width)))
    return 0

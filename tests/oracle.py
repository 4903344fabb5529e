"""A brute-force model of what tally should answer, independent of api/timerange.

It keeps raw increments per series and hour and converts every UTC hour
with zoneinfo directly, so a bug in the planner's transition search or
bucket arithmetic shows up as a mismatch.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo


class Oracle:
    def __init__(self) -> None:
        # (tenant, metric) -> tags tuple -> utc hour -> total
        self.data: dict[tuple[str, str], dict[tuple, dict[int, int]]] = defaultdict(
            lambda: defaultdict(lambda: defaultdict(int))
        )

    def add(self, tenant: str, metric: str, tags: dict | None, ts: int, value: int) -> None:
        self.data[(tenant, metric)][tuple(sorted((tags or {}).items()))][ts // 3600] += value

    def _hours(self, tenant: str, metric: str, where: dict[str, str]) -> dict[int, int]:
        out: dict[int, int] = defaultdict(int)
        for tags, hours in self.data.get((tenant, metric), {}).items():
            d = dict(tags)
            if all(d.get(k) == v for k, v in where.items()):
                for h, v in hours.items():
                    out[h] += v
        return out

    @staticmethod
    def _label(local: datetime, granularity: str) -> str:
        if granularity == "hour":
            return local.isoformat(timespec="seconds")
        d = local.date()
        if granularity == "day":
            return d.isoformat()
        if granularity == "week":
            return (d - timedelta(days=d.weekday())).isoformat()
        return f"{d.year:04d}-{d.month:02d}"

    def series(
        self, tenant: str, metric: str, where: dict[str, str], start: date, end: date,
        granularity: str, tz: str,
    ) -> tuple[list[list], int]:
        """Every bucket of local dates [start, end], in order, zeros included."""
        zone = ZoneInfo(tz)
        hours = self._hours(tenant, metric, where)
        first = int(datetime(start.year, start.month, start.day, tzinfo=UTC).timestamp()) // 3600
        last = int(datetime(end.year, end.month, end.day, tzinfo=UTC).timestamp()) // 3600
        points: dict[str, int] = {}
        for h in range(first - 48, last + 72):
            local = datetime.fromtimestamp(h * 3600, zone)
            if not start <= local.date() <= end:
                continue
            label = self._label(local, granularity)
            points[label] = points.get(label, 0) + hours.get(h, 0)
        pts = [[k, v] for k, v in points.items()]
        return pts, sum(points.values())

    def breakdown(
        self, tenant: str, metric: str, by: str, where: dict[str, str], start: date, end: date,
        tz: str,
    ) -> dict[str | None, int]:
        zone = ZoneInfo(tz)
        groups: dict[str | None, int] = defaultdict(int)
        for tags, hours in self.data.get((tenant, metric), {}).items():
            d = dict(tags)
            if not all(d.get(k) == v for k, v in where.items()):
                continue
            for h, v in hours.items():
                if start <= datetime.fromtimestamp(h * 3600, zone).date() <= end:
                    groups[d.get(by)] += v
        return {k: v for k, v in groups.items() if v}

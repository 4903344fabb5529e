"""GET /v1/series answered ahead of FastAPI (api/fast_series.py), on real sockets.

What a user must not be able to tell: the fast path answers exactly what the
route answers, refuses nothing itself (every refusal still comes from the
route, with its code and message) and is counted in the metrics like the route.
"""

from __future__ import annotations

import calendar
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from inproc import InProcessTally, tokens_file

from tally.api.access import parse_access
from tally.api.fast_series import FastSeries

DAY = "2026-03-29"  # Europe's spring-forward: a 23-hour day in Paris
TS = calendar.timegm((2026, 3, 29, 0, 30, 0))
QUERY = {"Authorization": "Bearer q-acme-0123456789abcdef"}
TOKENS = tokens_file(
    ("query acme", "q-acme-0123456789abcdef", ["acme"], ["query"]),
    ("ingest all", "ingest-0123456789abcdef", ["*"], ["ingest"]),
    ("scraper", "admin-0123456789abcdef", ["*"], ["admin"]),
)


@pytest.fixture(scope="module")
def tally(tmp_path_factory) -> Iterator[InProcessTally]:
    server = InProcessTally(tmp_path_factory.mktemp("fast"), access=parse_access(TOKENS)).start()
    rows = [["acme", "m", {"k": f"v{n % 3}"}, TS - 3600 * 24 * (n % 40) + 60 * n, n + 1]
            for n in range(400)]
    r = httpx.post(server.url + "/v1/increments", json={"rows": rows},
                   headers={"Authorization": "Bearer ingest-0123456789abcdef"})
    assert r.status_code == 200, r.text
    yield server
    server.stop()


def fast_path(tally: InProcessTally) -> FastSeries:
    node: Any = tally.app.middleware_stack
    while not isinstance(node, FastSeries):
        node = node.app
    return node


QUERIES = [
    {"from": "2026-03-01", "to": "2026-03-31"},
    {"from": "2026-03-01", "to": "2026-03-31", "tz": "Europe/Paris", "granularity": "hour"},
    {"from": "2026-02-01", "to": DAY, "granularity": "week", "where": ["k:v1"]},
    {"from": "2026-03-10", "to": "2026-03-29", "compare": "previous_period",
     "where": ["k:v2", "k:v2"]},
    {"from": "2026-03-28T22:00+01:00", "to": "2026-03-29T05:00", "tz": "Europe/Paris",
     "granularity": "hour"},
    {"from": "2025-12-01", "to": "2026-03-31", "granularity": "month",
     "compare": "previous_year", "where": ["k:none"]},
]


@pytest.mark.parametrize("params", QUERIES)
def test_the_fast_path_answers_what_the_route_answers(tally, params):
    fast = fast_path(tally)
    query = {"tenant": "acme", "metric": "m", **params}
    before = fast.answered
    quick = httpx.get(tally.url + "/v1/series", params=query, headers=QUERY)
    assert quick.status_code == 200, quick.text
    assert fast.answered == before + 1
    # a parameter given twice (the same value) is left to the route, which takes it
    routed = httpx.get(tally.url + "/v1/series", params={**query, "tenant": ["acme", "acme"]},
                       headers=QUERY)
    assert fast.answered == before + 1
    assert routed.status_code == 200 and routed.json() == quick.json()
    assert quick.headers["content-type"] == routed.headers["content-type"]


REFUSALS = [
    ({}, {"Authorization": "Bearer nobody-0123456789abcdef"}, 401, "unauthorized"),
    ({}, {}, 401, "unauthorized"),
    ({}, {"Authorization": "Basic q-acme-0123456789abcdef"}, 401, "unauthorized"),
    ({"tenant": "globex"}, QUERY, 403, "forbidden"),
    ({"granularity": "fortnight"}, QUERY, 400, "bad_request"),
    ({"granularty": "hour"}, QUERY, 400, "bad_request"),
    ({"to": "2026-02-30"}, QUERY, 400, "bad_request"),
    ({"where": "k"}, QUERY, 400, "bad_request"),
    ({"tz": "Mars/Olympus"}, QUERY, 400, "bad_request"),
    ({"compare": "last_week"}, QUERY, 400, "bad_request"),
    ({"metric": "bad metric!"}, QUERY, 400, "bad_request"),
    ({"from": None}, QUERY, 400, "bad_request"),
]


@pytest.mark.parametrize(("change", "headers", "status", "code"), REFUSALS)
def test_every_refusal_is_the_routes(tally, change, headers, status, code):
    fast = fast_path(tally)
    query = {"tenant": "acme", "metric": "m", "from": "2026-03-01", "to": "2026-03-31"}
    query = {k: v for k, v in {**query, **change}.items() if v is not None}
    before = fast.answered
    r = httpx.get(tally.url + "/v1/series", params=query, headers=headers)
    assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
    assert fast.answered == before


def test_fast_answers_are_counted_under_the_route(tally):
    def count() -> float:
        text = httpx.get(tally.url + "/metrics",
                         headers={"Authorization": "Bearer admin-0123456789abcdef"}).text
        for line in text.splitlines():
            if line.startswith('tally_http_requests_total{route="/v1/series",status="200"}'):
                return float(line.split()[-1])
        return 0.0

    before, answered = count(), fast_path(tally).answered
    for _ in range(3):
        r = httpx.get(tally.url + "/v1/series", headers=QUERY, params={
            "tenant": "acme", "metric": "m", "from": DAY, "to": DAY})
        assert r.status_code == 200
    assert fast_path(tally).answered == answered + 3
    assert count() == before + 3

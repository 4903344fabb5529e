"""`/openapi.json` is the truth about HTTP API v1: schemathesis holds the real server to it.

Schemathesis reads the schema the gateway serves, generates requests for
every operation from it (valid ones, and invalid ones that must be refused),
sends them to the real HTTP server (tests/inproc.py: uvicorn over in-process
shards and SQLite), and checks each answer: never a 500, every status and
body documented (errors in the design's ``{"error": {"code", "message"}}``
shape), invalid input refused with a 4xx, and a request without the token
refused (the server runs with a tokens file, so skipping auth would show).

One check is left out: ``positive_data_acceptance`` expects a 2xx for every
request the schema allows, but some rules of the API are not expressible in
JSON Schema (``from`` not after ``to``, a real IANA zone without a
fractional offset, a timestamp not in the future, ``producer`` and ``seq``
together), and those requests are rightly answered 400.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import msgpack
import pytest
import schemathesis
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from inproc import InProcessTally, tokens_file
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tally.api.access import parse_access

SECRET = "schemathesis-0123456789"
TOKENS = tokens_file(("schemathesis", SECRET, ["*"], ["ingest", "query", "admin"]))
EXAMPLES = 150  # per operation: the six take about 20 s on a 2-core machine


@schemathesis.serializer("application/msgpack", "application/x-msgpack")
def _msgpack(_: Any, value: Any) -> bytes:
    """The ingest routes take msgpack as well as JSON: let schemathesis send both. An integer
    past 64 bits has no msgpack encoding (JSON sends it, and it is refused as a bad row)."""
    try:
        return msgpack.packb(value)
    except OverflowError:
        reject()


@pytest.fixture(scope="module")
def tally(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessTally]:
    server = InProcessTally(
        tmp_path_factory.mktemp("openapi"), access=parse_access(TOKENS)
    ).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api_schema(tally: InProcessTally) -> Any:
    """The schema as the server serves it (not as the app object would build it)."""
    return schemathesis.openapi.from_url(tally.url + "/openapi.json")


def sends_every_parameter(case: Any) -> bool:
    """A query parameter whose value is None or [] never reaches the wire, so a case "with an
    unknown parameter" of that kind is sent without it, and its 200 would be reported as
    invalid data accepted."""
    return all(value is not None and value != [] for value in (case.query or {}).values())


# (schemathesis.pytest.from_fixture would make one test per operation by itself, but it
# sets a pytest internal that pytest 9 no longer has; the strategies it builds on are public)
OPERATIONS = [
    ("GET", "/healthz"), ("POST", "/v1/increments"), ("POST", "/v1/events"),
    ("GET", "/v1/series"), ("GET", "/v1/breakdown"), ("GET", "/v1/catalog"),
]


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_every_answer_matches_the_schema(api_schema: Any, method: str, path: str) -> None:
    """Valid and invalid requests alike: each answer valid per the schema, none a 500."""
    operation = api_schema[path][method]
    cases = st.one_of(
        operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
        operation.as_strategy(generation_mode=GenerationMode.NEGATIVE),
    )

    @given(case=cases.filter(sends_every_parameter))
    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def answers_match(case: Any) -> None:
        case.call_and_validate(
            headers={"Authorization": f"Bearer {SECRET}"},
            excluded_checks=[positive_data_acceptance],
            timeout=30,
        )

    answers_match()


def test_the_schema_documents_every_route(tally: InProcessTally) -> None:
    """Every API route is in the schema with its real parameters, body and error answers;
    the dashboard and /metrics (Prometheus text) are left out on purpose."""
    doc = httpx.get(tally.url + "/openapi.json").json()
    assert set(doc["paths"]) == {
        "/healthz", "/v1/increments", "/v1/events", "/v1/series", "/v1/breakdown", "/v1/catalog",
    }
    ops = {path: next(iter(methods.values())) for path, methods in doc["paths"].items()}
    for path in ("/v1/increments", "/v1/events"):
        body = ops[path]["requestBody"]["content"]
        assert set(body) == {"application/json", "application/msgpack"}
        assert sorted(ops[path]["responses"]) == ["200", "400", "401", "403", "413", "503"]
    for path in ("/v1/series", "/v1/breakdown", "/v1/catalog"):
        assert sorted(ops[path]["responses"]) == ["200", "400", "401", "403", "503"]
    error = doc["components"]["schemas"]["ErrorDetail"]
    assert {"code", "message"} <= set(error["required"])
    params = {p["name"]: p for p in ops["/v1/series"]["parameters"]}
    assert set(params) == {"tenant", "metric", "from", "to", "granularity", "tz", "where",
                           "compare"}
    assert params["granularity"]["schema"]["enum"] == ["hour", "day", "week", "month"]
    assert params["where"]["schema"]["type"] == "array"
    breakdown = {p["name"] for p in ops["/v1/breakdown"]["parameters"]}
    assert breakdown == {"tenant", "metric", "by", "from", "to", "tz", "where", "limit"}
    # /docs renders this schema, without a token
    assert httpx.get(tally.url + "/docs").status_code == 200


def test_a_parameter_the_route_does_not_take_is_refused(tally: InProcessTally) -> None:
    """Found by schemathesis: unknown query parameters were ignored, so a misspelt
    ``granularty=hour`` answered days with a 200. Now a 400 names it."""
    auth = {"Authorization": f"Bearer {SECRET}"}
    window = {"tenant": "acme", "metric": "m", "from": "2026-01-01", "to": "2026-01-02"}
    r = httpx.get(tally.url + "/v1/series", params={**window, "granularty": "hour"},
                  headers=auth)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "bad_request"
    assert "unknown parameter 'granularty'" in r.json()["error"]["message"]
    assert "granularity" in r.json()["error"]["message"]  # the ones it takes are listed
    r = httpx.get(tally.url + "/v1/catalog", params={"tenant": "acme", "metric": "m"},
                  headers=auth)
    assert r.status_code == 400 and "'metric'" in r.json()["error"]["message"]
    # a 405 keeps the error shape and says which methods would do
    r = httpx.delete(tally.url + "/v1/series", headers=auth)
    assert (r.status_code, r.json()["error"]["code"]) == (405, "method_not_allowed")
    assert r.headers["allow"] == "GET"

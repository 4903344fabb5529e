"""The access matrix: no token, unknown token, wrong tenant, wrong scope, right token,
for TCP and every HTTP route, on the real servers (in-process, tests/inproc.py).

Each refusal is checked for its status and code and for changing nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from inproc import InProcessTally, RawConnection, tokens_file

from tally.api.access import parse_access
from tally.client import TallyClient, Unauthorized

NOW = int(time.time())
DAY = time.strftime("%Y-%m-%d", time.gmtime(NOW - 60))
TS = NOW - 60 - (NOW - 60) % 86400 + 1

SECRETS = {
    "ingest_acme": "ingest-acme-0123456789",
    "query_acme": "query-acme-0123456789",
    "admin": "admin-only-0123456789",
    "all": "everything-0123456789",
}
TOKENS = tokens_file(
    ("ingest acme", SECRETS["ingest_acme"], ["acme"], ["ingest"]),
    ("query acme", SECRETS["query_acme"], ["acme"], ["query"]),
    ("scraper", SECRETS["admin"], ["*"], ["admin"]),
    ("root", SECRETS["all"], ["*"], ["ingest", "query", "admin"]),
)


@pytest.fixture(scope="module")
def tally(tmp_path_factory) -> Iterator[InProcessTally]:
    server = InProcessTally(tmp_path_factory.mktemp("auth"), access=parse_access(TOKENS)).start()
    yield server
    server.stop()


def headers(who: str | None) -> dict[str, str]:
    if who is None:
        return {}
    secret = SECRETS.get(who, "not-a-token-0123456789")
    return {"Authorization": f"Bearer {secret}"}


def total(tally: InProcessTally, tenant: str) -> int:
    return tally.total(tenant, "m", DAY, token=SECRETS["all"])


def query_params(tenant: str) -> dict[str, dict[str, str]]:
    window = {"tenant": tenant, "metric": "m", "from": DAY, "to": DAY}
    return {
        "/v1/series": window,
        "/v1/breakdown": {**window, "by": "k"},
        "/v1/catalog": {"tenant": tenant},
    }


# who, tenant → expected (status, code)
MATRIX = [
    (None, "acme", 401, "unauthorized"),
    ("wrong", "acme", 401, "unauthorized"),
    ("query_acme", "globex", 403, "forbidden"),  # right scope, wrong tenant
    ("ingest_acme", "acme", 403, "forbidden"),  # right tenant, wrong scope
    ("admin", "acme", 403, "forbidden"),  # admin does not imply query
    ("query_acme", "acme", 200, None),
    ("all", "globex", 200, None),
]


@pytest.mark.parametrize("route", ["/v1/series", "/v1/breakdown", "/v1/catalog"])
@pytest.mark.parametrize(("who", "tenant", "status", "code"), MATRIX)
def test_query_routes(tally, route, who, tenant, status, code) -> None:
    r = httpx.get(tally.url + route, params=query_params(tenant)[route], headers=headers(who))
    assert r.status_code == status, r.text
    if code is not None:
        assert r.json()["error"]["code"] == code
    if status == 401:
        assert r.headers["www-authenticate"].startswith("Bearer")


INGEST_MATRIX = [
    (None, "acme", 401, "unauthorized"),
    ("wrong", "acme", 401, "unauthorized"),
    ("ingest_acme", "globex", 403, "forbidden"),
    ("query_acme", "acme", 403, "forbidden"),
    ("admin", "acme", 403, "forbidden"),
    ("ingest_acme", "acme", 200, None),
    ("all", "globex", 200, None),
]


@pytest.mark.parametrize(("who", "tenant", "status", "code"), INGEST_MATRIX)
def test_http_ingest(tally, who, tenant, status, code) -> None:
    before = total(tally, tenant)
    rows = [[tenant, "m", {"k": "v"}, TS, 5]]
    r = httpx.post(tally.url + "/v1/increments", json={"rows": rows}, headers=headers(who))
    assert r.status_code == status, r.text
    if code is not None:
        assert r.json()["error"]["code"] == code
    assert total(tally, tenant) == before + (5 if status == 200 else 0)


def test_http_ingest_names_the_first_row_of_a_forbidden_tenant(tally) -> None:
    before = (total(tally, "acme"), total(tally, "globex"))
    rows = [["acme", "m", None, TS, 1], ["acme", "m", None, TS, 1], ["globex", "m", None, TS, 1]]
    r = httpx.post(tally.url + "/v1/increments", json={"rows": rows},
                   headers=headers("ingest_acme"))
    assert r.status_code == 403
    assert r.json()["error"] == {
        "code": "forbidden",
        "message": "row 2: token 'ingest acme' has no access to tenant 'globex'",
    }
    assert (total(tally, "acme"), total(tally, "globex")) == before


@pytest.mark.parametrize(
    ("who", "status"), [(None, 401), ("wrong", 401), ("query_acme", 403), ("admin", 200)]
)
def test_metrics_needs_the_admin_scope(tally, who, status) -> None:
    r = httpx.get(tally.url + "/metrics", headers=headers(who))
    assert r.status_code == status, r.text
    if status == 200:
        assert "tally_connections_open" in r.text


def test_healthz_is_open(tally) -> None:
    assert httpx.get(tally.url + "/healthz").status_code == 200


def test_a_bearer_header_of_another_scheme_is_unauthorized(tally) -> None:
    r = httpx.get(tally.url + "/v1/catalog", params={"tenant": "acme"},
                  headers={"Authorization": f"Basic {SECRETS['query_acme']}"})
    assert (r.status_code, r.json()["error"]["code"]) == (401, "unauthorized")


# -------------------------------------------------------------------------- TCP


@pytest.mark.parametrize(
    ("who", "words"),
    [
        (None, "hello: a token is required"),
        ("wrong", "unknown token"),
        ("query_acme", "token 'query acme' lacks the 'ingest' scope"),
        ("admin", "token 'scraper' lacks the 'ingest' scope"),
    ],
)
def test_tcp_hello_without_a_valid_ingest_token_is_unauthorized_and_closed(
    tally, who, words
) -> None:
    token = None if who is None else SECRETS.get(who, "not-a-token-0123456789")
    with RawConnection(tally.tcp_port) as conn:
        answer = conn.request({"op": "hello", "v": 1, "token": token, "producer": "x"})
        assert (answer["op"], answer["code"]) == ("error", "unauthorized")
        assert words in answer["message"]
        assert conn.closed_by_server()


def test_tcp_batches_for_a_tenant_outside_the_token_are_refused_at_their_row(tally) -> None:
    before = (total(tally, "acme"), total(tally, "globex"))
    with RawConnection(tally.tcp_port) as conn:
        hello = {"op": "hello", "v": 1, "token": SECRETS["ingest_acme"], "producer": "tcp-a"}
        assert conn.request(hello)["op"] == "welcome"
        rows = [["acme", "m", None, TS, 1], ["globex", "m", None, TS, 1]]
        answer = conn.request({"op": "inc", "seq": 1, "rows": rows})
        assert (answer["code"], answer["row"], answer["seq"]) == ("unauthorized", 1, 1)
        assert "no access to tenant 'globex'" in answer["message"]
        # the connection goes on for what the token covers
        ok = conn.request({"op": "inc", "seq": 2, "rows": [["acme", "m", None, TS, 2]]})
        assert ok == {"op": "ack", "seq": 2, "rows": 1}
    assert (total(tally, "acme"), total(tally, "globex")) == (before[0] + 2, before[1])


def test_a_large_row_frame_naming_a_tenant_outside_the_token_is_refused_at_its_row(
        tally) -> None:
    # a frame past 4 KiB is read by the scanner and goes by gateway number: the refusal
    # still names the first row of the forbidden tenant, and nothing of it counts
    before = (total(tally, "acme"), total(tally, "globex"))
    rows = [["acme", "m", {"k": f"v{n % 40}"}, TS, 1] for n in range(400)]
    rows[150] = ["globex", "m", {"k": "v1"}, TS, 1]
    rows[300] = ["globex", "m", None, TS, 1]
    with RawConnection(tally.tcp_port) as conn:
        hello = {"op": "hello", "v": 1, "token": SECRETS["ingest_acme"], "producer": "tcp-big"}
        assert conn.request(hello)["op"] == "welcome"
        answer = conn.request({"op": "inc", "seq": 1, "rows": rows})
        assert (answer["code"], answer["row"]) == ("unauthorized", 150)
        ok = conn.request({"op": "inc", "seq": 2, "rows": rows[:150]})
        assert ok == {"op": "ack", "seq": 2, "rows": 150}
    assert (total(tally, "acme"), total(tally, "globex")) == (before[0] + 150, before[1])


def test_the_client_library_raises_unauthorized_for_a_bad_token(tally) -> None:
    before = total(tally, "acme")
    client = TallyClient("127.0.0.1", tally.tcp_port, token="not-a-token-0123456789")
    with pytest.raises(Unauthorized):
        client.inc("acme", "m", 1, ts=TS)
        client.flush(timeout=10)
    client.close(timeout=1)  # the failure was seen: closing raises nothing more
    assert total(tally, "acme") == before


def test_the_client_library_ingests_with_a_good_token(tally) -> None:
    before = total(tally, "acme")
    with TallyClient("127.0.0.1", tally.tcp_port, token=SECRETS["ingest_acme"]) as client:
        for _ in range(10):
            client.inc("acme", "m", 3, ts=TS)
        client.flush(durable=True, timeout=20)
    assert total(tally, "acme") == before + 30

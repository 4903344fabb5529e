"""Events end to end on the real servers (in-process, tests/inproc.py): `POST /v1/events`,
the TCP `event` op and the client library's `event`, fanned out by the built-in rules
or by a rules file, with every refusal checked for its code, its event index and for
changing nothing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import msgpack
import pytest
from inproc import InProcessTally, RawConnection, tokens_file

from tally.api.access import parse_access
from tally.api.rules import parse_rules
from tally.client import AsyncTallyClient, BatchRejected, Connection, ServerError, TallyClient

NOW = int(time.time())
DAY = time.strftime("%Y-%m-%d", time.gmtime(NOW - 60))
TS = NOW - 60 - (NOW - 60) % 86400 + 1  # early in today's UTC day

SECRETS = {"acme": "ingest-acme-0123456789", "root": "everything-0123456789"}
TOKENS = tokens_file(
    ("ingest acme", SECRETS["acme"], ["acme"], ["ingest"]),
    ("root", SECRETS["root"], ["*"], ["ingest", "query", "admin"]),
)
ORDERS = """
builtin = true

[[rule]]
event = "order.placed"
metric = "orders.items"
tags = ["country"]
value = "items"
"""


@pytest.fixture(scope="module")
def tally(tmp_path_factory) -> Iterator[InProcessTally]:
    server = InProcessTally(tmp_path_factory.mktemp("events")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def guarded(tmp_path_factory) -> Iterator[InProcessTally]:
    """Tokens, and a rules file that keeps the built-ins and adds orders."""
    server = InProcessTally(
        tmp_path_factory.mktemp("events-guarded"), access=parse_access(TOKENS),
        rules=parse_rules(ORDERS, "orders.toml"),
    ).start()
    yield server
    server.stop()


def received(tenant: str, channel: str = "email", **over: Any) -> dict[str, Any]:
    return {"type": "message.received", "tenant": tenant, "ts": TS, "channel": channel,
            "sentiment": "positive", **over}


def replied(tenant: str, seconds: float = 95, agent: str = "ann", **over: Any) -> dict[str, Any]:
    return {"type": "message.replied", "tenant": tenant, "ts": TS, "agent": agent,
            "channel": "chat", "response_seconds": seconds, **over}


def totals(tally: InProcessTally, tenant: str, token: str | None = None) -> dict[str, int]:
    """Every series the built-in rules make, as a user reads them over HTTP."""
    t = tally.total
    kw = {"token": token} if token else {}
    return {
        "received": t(tenant, "messages.received", DAY, **kw),
        "received.chat": t(tenant, "messages.received", DAY, where="channel:chat", **kw),
        "handled.ann": t(tenant, "messages.handled", DAY, where="agent:ann", **kw),
        "handled": t(tenant, "messages.handled", DAY, **kw),
        "lt_30m": t(tenant, "response_time", DAY, where="bucket:lt_30m", **kw),
        "lt_1h": t(tenant, "response_time", DAY, where="bucket:lt_1h", **kw),
        "gt_24h": t(tenant, "response_time", DAY, where="bucket:gt_24h", **kw),
        "sum": t(tenant, "response_seconds.sum", DAY, **kw),
        "count": t(tenant, "response_seconds.count", DAY, **kw),
    }


def zero(**over: int) -> dict[str, int]:
    base = dict.fromkeys(["received", "received.chat", "handled.ann", "handled", "lt_30m",
                          "lt_1h", "gt_24h", "sum", "count"], 0)
    return {**base, **over}


EVENTS = [  # (events, the increments they make, the totals after them)
    lambda t: received(t),
    lambda t: received(t, channel="chat"),
    lambda t: replied(t, 95),
    lambda t: replied(t, 1800, agent="bob"),
    lambda t: replied(t, 90000.4),
]
EXPECTED = zero(received=2, **{"received.chat": 1, "handled.ann": 2}, handled=3, lt_30m=1,
                lt_1h=1, gt_24h=1, sum=95 + 1800 + 90000, count=3)


def events_for(tenant: str) -> list[dict[str, Any]]:
    return [make(tenant) for make in EVENTS]


# ---- HTTP ---------------------------------------------------------------------------


def test_http_events_are_fanned_out_and_counted(tally) -> None:
    r = httpx.post(tally.url + "/v1/events", json={"events": events_for("h-json")})
    assert r.status_code == 200, r.text
    assert r.json() == {"rows": 2 + 3 * 4}  # increments, not events
    assert totals(tally, "h-json") == EXPECTED


def test_http_events_in_msgpack_with_producer_seq_and_durable_ack(tally) -> None:
    body = {"producer": "h-mp", "seq": 7, "ack": "durable", "events": events_for("h-mp")}
    for _ in range(2):  # the resend is answered, and applied once
        r = httpx.post(tally.url + "/v1/events", content=msgpack.packb(body),
                       headers={"content-type": "application/msgpack"})
        assert r.status_code == 200, r.text
        assert r.json() == {"rows": 14}
    assert totals(tally, "h-mp") == EXPECTED


@pytest.mark.parametrize(("bad", "says"), [
    ({"type": "message.replied", "tenant": "h-bad", "ts": TS, "agent": "ann"},
     "event 2 (message.replied): field 'response_seconds' is missing"),
    ({"type": "message.sent", "tenant": "h-bad", "ts": TS},
     "event 2: no rule for type 'message.sent'"),
    (replied("h-bad", -3), "event 2 (message.replied): field 'response_seconds' is -3"),
    (replied("h-bad", "fast"),
     "event 2 (message.replied): field 'response_seconds' is a string ('fast')"),
    ({**received("h-bad"), "tenant": "H-BAD"}, "event 2: tenant 'H-BAD' is invalid"),
    (received("h-bad", ts=NOW + 7200), f"event 2: ts {NOW + 7200} is "),
    (received("h-bad", channel=42),
     "event 2 (message.received): field 'channel' is an integer (42)"),
    ("message.received", "event 2: an event is a map"),
])
def test_http_a_bad_event_refuses_the_batch_naming_the_event(tally, bad, says) -> None:
    before = totals(tally, "h-bad")
    events = [received("h-bad"), replied("h-bad"), bad, received("h-bad")]
    r = httpx.post(tally.url + "/v1/events", json={"events": events})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["code"], error["row"]) == ("bad_row", 2)
    assert error["message"].startswith(says), error["message"]
    assert totals(tally, "h-bad") == before


@pytest.mark.parametrize(("body", "says"), [
    ({"events": {"type": "message.received"}}, "events is a dict, not a list"),
    ({}, "events is missing"),
    ({"producer": "p", "events": []}, "producer and seq go together"),
    ({"ack": "maybe", "events": []}, "ack must be 'received' or 'durable'"),
])
def test_http_a_bad_envelope_is_bad_request(tally, body, says) -> None:
    r = httpx.post(tally.url + "/v1/events", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "bad_request" and says in r.json()["error"]["message"]


def test_http_an_empty_list_of_events_is_zero_increments(tally) -> None:
    r = httpx.post(tally.url + "/v1/events", json={"events": []})
    assert (r.status_code, r.json()) == (200, {"rows": 0})


def test_http_a_shard_overflow_names_the_event_behind_the_increment(tally) -> None:
    # the first batch puts response_seconds.sum at 2**62; event 1 of the second takes it
    # out of int64 on the shard, long after fan-out, and is still named as an event
    big = 2**62
    r = httpx.post(tally.url + "/v1/events", json={"events": [replied("h-big", big)]})
    assert r.status_code == 200, r.text
    before = totals(tally, "h-big")
    r = httpx.post(tally.url + "/v1/events",
                   json={"events": [received("h-big"), replied("h-big", big)]})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["code"], error["row"]) == ("bad_row", 1)
    assert error["message"].startswith("event 1: "), error["message"]
    assert "would leave int64 (in the increment of rule 'response_seconds.sum')" in error["message"]
    assert totals(tally, "h-big") == before


def test_http_events_need_the_ingest_scope_and_each_events_tenant(guarded) -> None:
    def post(token: str | None, events: list) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.post(guarded.url + "/v1/events", json={"events": events}, headers=headers)

    root = SECRETS["root"]
    before = totals(guarded, "acme", root), totals(guarded, "globex", root)
    assert post(None, [received("acme")]).status_code == 401
    r = post(SECRETS["acme"], [received("acme"), replied("acme"), received("globex")])
    assert r.status_code == 403
    assert r.json()["error"] == {
        "code": "forbidden",
        "message": "event 2: token 'ingest acme' has no access to tenant 'globex'",
    }
    assert (totals(guarded, "acme", root), totals(guarded, "globex", root)) == before
    r = post(SECRETS["acme"], [received("acme")])
    assert (r.status_code, r.json()) == (200, {"rows": 1})


def test_a_rules_file_that_keeps_the_built_ins_counts_both(guarded) -> None:
    root = SECRETS["root"]
    order = {"type": "order.placed", "tenant": "shop", "ts": TS, "country": "fr", "items": 4}
    r = httpx.post(guarded.url + "/v1/events", json={"events": [order, received("shop")]},
                   headers={"Authorization": f"Bearer {root}"})
    assert (r.status_code, r.json()) == (200, {"rows": 2}), r.text
    assert guarded.total("shop", "orders.items", DAY, where="country:fr", token=root) == 4
    assert guarded.total("shop", "messages.received", DAY, token=root) == 1


# ---- TCP ----------------------------------------------------------------------------


def hello(conn: RawConnection, producer: str, token: str | None = None) -> None:
    answer = conn.request({"op": "hello", "v": 1, "token": token, "producer": producer})
    assert answer["op"] == "welcome", answer


def test_tcp_events_are_acked_with_the_increments_made_then_durable(tally) -> None:
    with RawConnection(tally.tcp_port) as conn:
        hello(conn, "t-ok")
        msg = {"op": "event", "seq": 1, "ack": "durable", "events": events_for("t-ok")}
        assert conn.request(msg) == {"op": "ack", "seq": 1, "rows": 14}
        assert conn.receive() == {"op": "durable", "seq": 1}
        # a resend of seq 1 is acknowledged again and not applied twice
        assert conn.request({**msg, "ack": "received"}) == {"op": "ack", "seq": 1, "rows": 14}
        assert conn.request({"op": "ping"}) == {"op": "pong"}
    assert totals(tally, "t-ok") == EXPECTED


def test_tcp_a_bad_event_is_bad_row_at_its_index_and_the_connection_goes_on(tally) -> None:
    before = totals(tally, "t-bad")
    with RawConnection(tally.tcp_port) as conn:
        hello(conn, "t-bad")
        events = [received("t-bad"), replied("t-bad"), replied("t-bad"),
                  {**replied("t-bad"), "agent": None}]
        answer = conn.request({"op": "event", "seq": 1, "events": events})
        assert (answer["op"], answer["code"], answer["seq"], answer["row"]) == (
            "error", "bad_row", 1, 3)
        assert answer["message"].startswith(
            "event 3 (message.replied): field 'agent' is nil; rule 'messages.handled'")
        # an increment a rule made with a ts in the future names its event, not its row (9)
        ahead = int(time.time()) + 3700  # NOW was taken at import, minutes ago in a long run
        answer = conn.request({"op": "event", "seq": 2, "events": [
            received("t-bad"), replied("t-bad"), replied("t-bad", ts=ahead)]})
        assert (answer["code"], answer["row"]) == ("bad_row", 2)
        assert answer["message"].startswith(f"event 2: ts {ahead} is ")
        assert "s ahead of the server clock" in answer["message"]
        assert totals(tally, "t-bad") == before
        # later seqs pass: a bad batch is dropped for good, not retried
        ok = conn.request({"op": "event", "seq": 3, "events": [received("t-bad")]})
        assert ok == {"op": "ack", "seq": 3, "rows": 1}
    assert totals(tally, "t-bad") == {**before, "received": before["received"] + 1}


def test_tcp_events_is_not_a_list_is_bad_request(tally) -> None:
    with RawConnection(tally.tcp_port) as conn:
        hello(conn, "t-env")
        answer = conn.request({"op": "event", "seq": 1, "events": {"type": "x"}})
        assert (answer["code"], answer["seq"]) == ("bad_request", 1)
        assert "row" not in answer


def test_tcp_an_event_for_a_tenant_outside_the_token_is_unauthorized_at_its_index(
    guarded
) -> None:
    root = SECRETS["root"]
    before = totals(guarded, "acme", root), totals(guarded, "globex", root)
    with RawConnection(guarded.tcp_port) as conn:
        hello(conn, "t-auth", SECRETS["acme"])
        answer = conn.request({"op": "event", "seq": 1, "events": [
            replied("acme"), replied("globex"), received("acme")]})
        assert (answer["code"], answer["row"], answer["seq"]) == ("unauthorized", 1, 1)
        assert answer["message"] == (
            "event 1: token 'ingest acme' has no access to tenant 'globex'")
        assert conn.request({"op": "event", "seq": 2, "events": [received("acme")]})["op"] == (
            "ack")
    after = totals(guarded, "acme", root), totals(guarded, "globex", root)
    assert after == ({**before[0], "received": before[0]["received"] + 1}, before[1])


def test_the_one_at_a_time_connection_sends_events(tally) -> None:
    with Connection("127.0.0.1", tally.tcp_port) as conn:
        assert conn.send_events([received("t-conn")])["rows"] == 1
        with pytest.raises(ServerError) as info:
            conn.send_events([received("t-conn"), {"type": "nope"}])
        assert (info.value.code, info.value.row) == ("bad_row", 1)
    assert totals(tally, "t-conn")["received"] == 1


def test_a_connection_run_again_under_its_producer_name_is_applied_again(tally) -> None:
    """A script rerun with the same producer name: its batches must not be taken for
    resends of the first run's (acknowledged and silently dropped)."""
    seqs = []
    for _ in range(2):
        with Connection("127.0.0.1", tally.tcp_port, producer="rerun") as conn:
            reply = conn.send_events([received("t-rerun")])
            assert reply["op"] == "ack" and reply["rows"] == 1
            seqs.append(reply["seq"])
    assert totals(tally, "t-rerun")["received"] == 2
    assert seqs[1] > seqs[0] > 1_700_000_000_000_000  # the clock in microseconds
    with Connection("127.0.0.1", tally.tcp_port) as conn:  # a fresh name starts at 1
        assert conn.send_events([received("t-rerun")])["seq"] == 1
    with Connection("127.0.0.1", tally.tcp_port, producer="rerun", first_seq=5) as conn:
        assert conn.send_events([received("t-rerun")])["seq"] == 5  # below the marks: a resend
    assert totals(tally, "t-rerun")["received"] == 3


# ---- the client library --------------------------------------------------------------


def test_the_client_library_sends_events_exactly_once(tally) -> None:
    with TallyClient("127.0.0.1", tally.tcp_port, linger=0.01) as client:
        for make in EVENTS:
            event = make("c-sync")
            fields = {k: v for k, v in event.items() if k not in ("type", "tenant", "ts")}
            client.event("c-sync", event["type"], ts=TS, **fields)
        client.inc("c-sync", "messages.received", 5, ts=TS, tags={"channel": "chat"})
        client.flush(durable=True, timeout=20)
        assert client.stats["rejected"] == 0 and client.pending == 0
    expected = {**EXPECTED, "received": EXPECTED["received"] + 5,
                "received.chat": EXPECTED["received.chat"] + 5}
    assert totals(tally, "c-sync") == expected


def test_the_client_library_reports_a_refused_event_batch_with_the_event(tally) -> None:
    client = TallyClient("127.0.0.1", tally.tcp_port)
    client.event("c-bad", "message.received", ts=TS, channel="email", sentiment="neutral")
    client.event("c-bad", "message.replied", ts=TS, agent="ann")  # no response_seconds
    with pytest.raises(BatchRejected) as info:
        client.flush(timeout=20)
    err = info.value
    assert (err.code, err.row, err.increments) == ("bad_row", 1, 2)
    assert err.event == {"type": "message.replied", "tenant": "c-bad", "ts": TS, "agent": "ann"}
    client.close(timeout=10)
    assert totals(tally, "c-bad") == zero()


def test_the_client_library_checks_the_envelope_at_once(tally) -> None:
    with TallyClient("127.0.0.1", tally.tcp_port) as client:
        with pytest.raises(ValueError, match="tenant 'ACME' is invalid"):
            client.event("ACME", "message.received")
        with pytest.raises(TypeError, match="event type must be a non-empty string"):
            client.event("acme", "")
        with pytest.raises(ValueError, match="ahead of this machine's clock"):
            client.event("acme", "message.received", ts=int(time.time()) + 7200)
        with pytest.raises(TypeError, match="msgpack values"):
            client.event("acme", "message.received", channel=object())
        assert client.pending == 0


def test_the_async_client_sends_events(tally) -> None:
    async def main() -> None:
        async with AsyncTallyClient("127.0.0.1", tally.tcp_port, linger=0.01) as client:
            await client.event("c-async", "message.replied", ts=TS, agent="ann",
                               response_seconds=3600)
            await client.event("c-async", "message.received", ts=TS, channel="chat",
                               sentiment="negative")
            await client.flush(durable=True, timeout=20)

    asyncio.run(main())
    assert totals(tally, "c-async") == zero(
        received=1, **{"received.chat": 1, "handled.ann": 1}, handled=1, sum=3600, count=1)

"""StatsD ingress: the sans-I/O parser line by line, then real StatsD clients from PyPI
(``statsd``, ``datadog``'s DogStatsd) sending to the in-process listeners, with totals
read back through the HTTP query API."""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import Iterator
from fractions import Fraction

import httpx
import pytest
import statsd
from datadog.dogstatsd import DogStatsd
from hypothesis import given, settings
from hypothesis import strategies as st
from inproc import InProcessTally

from tally.api.statsd import RateLimitedLog, StatsdIngress
from tally.cluster.config import ConfigError, load_config
from tally.wire.statsd import (
    MAX_DATAGRAM,
    MAX_LINE,
    REASONS,
    Parsed,
    StatsdFolder,
    StatsdParser,
    Window,
    round_half_even,
)

NOW = 1_800_000_000


def parse(data: bytes | str, tenant: str | None = "acme") -> Parsed:
    raw = data.encode() if isinstance(data, str) else data
    return StatsdParser(tenant).parse(raw, NOW)


def reasons(p: Parsed) -> list[tuple[int, str]]:
    return [(r.line, r.reason) for r in p.rejections]


# ---- counters, sample rates --------------------------------------------------------


def test_counter_line() -> None:
    p = parse("messages.received:3|c")
    assert p.rows == [["acme", "messages.received", None, NOW, 3]]
    assert p.rejections == [] and p.lines == 1 and p.row_lines == [0]


@pytest.mark.parametrize(("line", "value"), [
    ("m:1|c|@0.1", 10),
    ("m:1|c|@0.3", 3),      # 3.333... -> 3
    ("m:1|c|@0.4", 2),      # 2.5 -> 2 (ties to even)
    ("m:3|c|@0.4", 8),      # 7.5 -> 8 (ties to even)
    ("m:1|c|@0.6", 2),      # 1.666... -> 2
    ("m:5|c|@0.5", 10),
    ("m:1|c|@1", 1),
    ("m:1.5|c", 2),         # a decimal counter: 1.5 -> 2
    ("m:2.5|c", 2),         # 2.5 -> 2
    ("m:-1|c|@0.4", -2),    # -2.5 -> -2
    ("m:1|c|@1e-1", 10),
    ("m:7|c|@0.07", 100),   # exact: a float would give 99.99999999999999
])
def test_sample_rate_rounding_is_half_even_of_the_exact_rational(line: str, value: int) -> None:
    p = parse(line)
    assert p.rows[0][4] == value, p.rejections


def test_round_half_even_is_exact() -> None:
    assert round_half_even(Fraction(5, 2)) == 2
    assert round_half_even(Fraction(7, 2)) == 4
    assert round_half_even(Fraction(-5, 2)) == -2
    # 0.1 as a float is not 1/10: the parser never goes through floats
    assert round_half_even(Fraction("0.35") / Fraction("0.1")) == 4  # 3.5 -> 4


@pytest.mark.parametrize("rate", ["0", "1.5", "-0.1", "abc", "", "nan", "1/3"])
def test_bad_sample_rate(rate: str) -> None:
    assert reasons(parse(f"m:1|c|@{rate}")) == [(0, "bad_rate")]


def test_several_lines_and_packed_values() -> None:
    p = parse("a:1|c\nb:2|c\r\n\n  \nc:1:2:3|c\n")
    assert [(r[1], r[4]) for r in p.rows] == [("a", 1), ("b", 2), ("c", 1), ("c", 2), ("c", 3)]
    assert p.row_lines == [0, 1, 2, 2, 2] and p.lines == 3


def test_metric_names_follow_the_data_model() -> None:
    p = parse("ok.name-1_x:1|c\nbad name:1|c\n" + "x" * 201 + ":1|c\nbad/name:1|c")
    assert p.rows == [["acme", "ok.name-1_x", None, NOW, 1]]
    assert reasons(p) == [(1, "bad_name"), (2, "bad_name"), (3, "bad_name")]


def test_value_out_of_int64_is_refused() -> None:
    p = parse(f"m:{2**63}|c\nm:1|c|@{Fraction(1, 2**62)}\nm:{2**62}|c|@0.25")
    assert [r.reason for r in p.rejections][0] == "overflow"
    assert reasons(p)[-1] == (2, "overflow")


# ---- tags and tenants --------------------------------------------------------------


def test_dogstatsd_tags() -> None:
    p = parse("m:1|c|#channel:twitter,agent:ann,url:http://x")
    assert p.rows[0][2] == {"channel": "twitter", "agent": "ann", "url": "http://x"}


def test_tag_without_value_gets_the_empty_value() -> None:
    assert parse("m:1|c|#canary,env:prod").rows[0][2] == {"canary": "", "env": "prod"}


@pytest.mark.parametrize("tags", [
    "Channel:x", "service.name:x", "k:" + "v" * 201, "a:1,a:2", "9k:v", ":v",
    ",".join(f"k{i}:v" for i in range(17)),
])
def test_bad_tags_refuse_the_line(tags: str) -> None:
    assert reasons(parse(f"m:1|c|#{tags}\nm:1|c")) == [(0, "bad_tag")]


def test_tenant_tag_wins_over_the_listener_default() -> None:
    p = parse("m:1|c|#tenant:globex,k:v\nm:1|c|#k:v")
    assert [(r[0], r[2]) for r in p.rows] == [("globex", {"k": "v"}), ("acme", {"k": "v"})]


def test_no_tenant_anywhere_is_refused() -> None:
    p = parse("m:1|c\nm:1|c|#tenant:globex", tenant=None)
    assert reasons(p) == [(0, "no_tenant")]
    assert p.rows == [["globex", "m", None, NOW, 1]]


@pytest.mark.parametrize("tags", ["tenant:Acme", "tenant:", "tenant:a,tenant:b"])
def test_bad_tenant_tag(tags: str) -> None:
    assert reasons(parse(f"m:1|c|#{tags}")) == [(0, "bad_tenant")]


def test_default_tenant_is_checked() -> None:
    with pytest.raises(ValueError):
        StatsdParser("Not A Tenant")


# ---- timers, histograms, distributions; refused types ----------------------------------


@pytest.mark.parametrize("kind", ["ms", "h", "d"])
def test_timers_become_bucketed_counters(kind: str) -> None:
    p = parse(f"rt:12.5|{kind}|#k:v")
    assert p.rows == [
        ["acme", "rt.count", {"k": "v"}, NOW, 1],
        ["acme", "rt.sum", {"k": "v"}, NOW, 12],  # 12.5 -> 12
        ["acme", "rt", {"k": "v", "le": "25"}, NOW, 1],
    ]


def test_timer_buckets_sample_rate_and_edges() -> None:
    p = parse("rt:10|ms|@0.25\nrt:10001|ms\nrt:0|ms\nrt:1:3|ms")
    by_line = [(r[1], r[2], r[4]) for r in p.rows]
    assert by_line[:3] == [("rt.count", None, 4), ("rt.sum", None, 40), ("rt", {"le": "10"}, 4)]
    assert by_line[5] == ("rt", {"le": "inf"}, 1)
    assert by_line[8] == ("rt", {"le": "1"}, 1)
    assert by_line[11] == ("rt", {"le": "1"}, 1) and by_line[14] == ("rt", {"le": "5"}, 1)


def test_timer_refusals() -> None:
    p = parse("rt:-1|ms\nrt:1|ms|#le:5\n" + "r" * 196 + ":1|ms")
    assert reasons(p) == [(0, "bad_value"), (1, "bad_tag"), (2, "bad_name")]


@pytest.mark.parametrize(("line", "reason"), [
    ("g:1|g", "unsupported_type"),
    ("u:alice|s", "unsupported_type"),
    ("_e{5,4}:title|text", "unsupported_type"),
    ("_sc|check|0", "unsupported_type"),
    ("m:1|x", "malformed"),
    ("m:1", "malformed"),
    ("m|c", "malformed"),
    (":1|c", "malformed"),
    ("m:1|c|@0.5|@0.5", "malformed"),
    ("m:1|c|c:container", "malformed"),
    ("m:abc|c", "bad_value"),
    ("m:|c", "bad_value"),
    ("m:inf|c", "bad_value"),
    ("m:1|c|Tsoon", "bad_timestamp"),
    (f"m:1|c|T{NOW + 3601}", "bad_timestamp"),
])
def test_refused_lines_name_their_reason(line: str, reason: str) -> None:
    p = parse(f"ok:1|c\n{line}\nok:1|c")
    assert reasons(p) == [(1, reason)]
    assert len(p.rows) == 2 and p.rejections[0].message


def test_dogstatsd_timestamp_is_honoured() -> None:
    assert parse(f"m:1|c|T{NOW - 86400}").rows[0][3] == NOW - 86400
    assert parse(f"m:1|c|T{NOW + 3600}").rows[0][3] == NOW + 3600


def test_oversize_input() -> None:
    assert reasons(parse(b"m:1|c\n" * (MAX_DATAGRAM // 6 + 1))) == [(0, "too_long")]
    assert reasons(parse(b"m:1|c|#k:" + b"v" * MAX_LINE)) == [(0, "too_long")]
    assert reasons(parse(b"m:\xff|c")) == [(0, "not_utf8")]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_never_raises_on_random_bytes(data: bytes) -> None:
    p = StatsdParser("acme").parse(data, NOW)
    assert p.lines == len({*p.row_lines}) + len(p.rejections)
    assert all(r.reason in REASONS for r in p.rejections)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet="ab:|@#T.,0123456789-cmsgh\n", max_size=30), max_size=5))
def test_never_raises_on_near_statsd_text(lines: list[str]) -> None:
    data = "\n".join(lines).encode()
    parser = StatsdParser("acme")
    p = parser.parse(data, NOW)
    assert p.lines == len({*p.row_lines}) + len(p.rejections)
    again = parser.parse(data, NOW)  # from the cache of checked names, tags and rates
    assert (again.rows, again.rejections) == (p.rows, p.rejections)


# ---- folding: datagrams into sums per (series, hour) ----------------------------------


def sums_of(rows: list[list]) -> dict[tuple, int]:
    """Rows summed per (tenant, metric, tags, hour), zero sums left out: what the shards keep."""
    out: dict[tuple, int] = {}
    for tenant, metric, tags, ts, v in rows:
        key = (tenant, metric, tuple(sorted((tags or {}).items())), ts // 3600)
        out[key] = out.get(key, 0) + v
    return {k: v for k, v in out.items() if v}


def fold_all(datagrams: list[bytes], times: list[float], folder: StatsdFolder
             ) -> tuple[Window, int, list[tuple[int, str]]]:
    line = 0
    for data, now in zip(datagrams, times, strict=True):
        line += folder.fold(data, now, line)
    refused = [(r.line, r.reason) for r, _peer in folder.refused]
    return folder.take(), line, refused


def parse_all(datagrams: list[bytes], times: list[float]
              ) -> tuple[list[list], int, list[tuple[int, str]], int]:
    parser, line, rows, refused, good = StatsdParser("acme"), 0, [], [], 0
    for data, now in zip(datagrams, times, strict=True):
        p = parser.parse(data, now, line)
        line += p.lines
        rows += p.rows
        refused += reasons(p)
        good += p.accepted_lines
    return rows, line, refused, good


MIXED = [
    b"a:1|c\na:1|c\nb:2|c|#k:v\n", b"a:1|c\n", b"t:120|ms|@0.5\nt:120|ms|@0.5\n",
    b"bad line\na:1|c\n\n  \nx:1|g\n", f"old:5|c|T{NOW - 7200}\na:-3|c\n".encode(),
    b"p:1:2:3|c\nc:1|c|#tenant:globex\n", b"m:\xff|c\na:1|c", b"a:1|c\n",
]


def test_fold_gives_what_parse_gives_summed_per_series_and_hour() -> None:
    """Same lines, same refusals at the same line numbers, same sums: folding only moves
    the adding forward. The last datagram comes in the next hour, a second before the
    others' lines would have been folded into the same sums."""
    times = [NOW + 0.5] * (len(MIXED) - 1) + [NOW - NOW % 3600 + 3600.0]
    folder = StatsdFolder(StatsdParser("acme"))
    first, _lines, _refused = fold_all(MIXED, times, folder)  # lines seen once: kept as rows
    assert len(first.batch_rows()) > len(first.sums.get(NOW // 3600, {}))
    folder.refused.clear()
    window, lines, refused = fold_all(MIXED, times, folder)  # seen again: folded
    rows, plines, prefused, good = parse_all(MIXED, times)
    assert (lines, refused) == (plines, prefused)
    assert refused == [(6, "malformed"), (8, "unsupported_type"), (13, "not_utf8")]
    assert window.lines == good == 13
    assert sums_of(window.batch_rows()) == sums_of(rows)
    hour = NOW // 3600
    assert sums_of(window.batch_rows())[("acme", "a", (), hour)] == 2 + 1 + 1 - 3 + 1
    assert sums_of(window.batch_rows())[("acme", "a", (), hour + 1)] == 1
    # one row per (series, hour), and the |T line's row as it was parsed
    assert len(window.batch_rows()) == len(sums_of(rows)) == 9


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.sampled_from([
    "a:1|c", "a:2|c|@0.5", "b:1|c|#k:v", "b:1|c|#k:w,tenant:globex", "t:30|ms", "t:7|h|@0.1",
    "c:1:2|c", "x:1|g", "y:1|c|#K:v", "bad", "", " ", f"o:1|c|T{NOW - 86400}",
    f"f:1|c|T{NOW + 7200}",
]), max_size=6), max_size=8), st.integers(0, 3))
def test_fold_equals_parse_on_any_mix(datagrams: list[list[str]], hour_turn: int) -> None:
    data = ["\n".join(d).encode() for d in datagrams]
    times = [NOW + (3600.0 if k >= hour_turn else 0.0) for k in range(len(data))]
    folder = StatsdFolder(StatsdParser("acme"))
    for _ in range(2):  # the second time from the folder's cache of lines
        window, lines, refused = fold_all(data, times, folder)
        folder.refused.clear()
        rows, plines, prefused, good = parse_all(data, times)
        assert (lines, refused, window.lines) == (plines, prefused, good)
        assert sums_of(window.batch_rows()) == sums_of(rows)
        replayed, row_lines, _peers = folder.replay(window)
        assert sums_of(replayed) == sums_of(rows) and len(row_lines) == len(rows)


def test_fold_bound_refuses_whole_datagrams_as_overloaded() -> None:
    folder = StatsdFolder(StatsdParser("acme"), max_rows=5)
    assert folder.fold(b"a:1|c\na:1|c\n", NOW, 0) == 2
    assert folder.fold(b"t:1|ms\nb:1|c\nbad\n", NOW, 2) == 3  # 2 + 4 rows > 5
    assert [(r.line, r.reason) for r, _ in folder.refused] == [
        (4, "malformed"), (2, "overloaded"), (3, "overloaded")]
    assert folder.fold(b"b:1|c\n", NOW, 5) == 1  # 2 + 1 rows: room
    window = folder.take()
    assert window.lines == 3 and sums_of(window.batch_rows()) == {
        ("acme", "a", (), NOW // 3600): 2, ("acme", "b", (), NOW // 3600): 1}
    assert folder.rows == 0 and folder.take().lines == 0


class _SlowService:
    """Service.ingest that holds the first batch until released: a flush in progress."""

    def __init__(self) -> None:
        from tally.api.metrics import GatewayMetrics

        self.metrics = GatewayMetrics()
        self.increments = 0
        self.release = asyncio.Event()
        self.calls = 0

    async def ingest(self, batch) -> None:  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.calls == 1:
            await self.release.wait()
        self.increments += batch.increments


def test_flush_waits_for_a_flush_in_progress() -> None:
    """flush() returns once everything received before it is applied, even while the timed
    flush holds a window in Service.ingest."""
    service = _SlowService()
    ingress = StatsdIngress(service, "acme")  # type: ignore[arg-type]

    async def scenario() -> list[int]:
        ingress.received(b"a:1|c\na:1|c\n", "udp:test")
        timed = asyncio.create_task(ingress.flush())  # as the flusher does
        await asyncio.sleep(0)  # it takes the window and waits in ingest
        ingress.received(b"b:5|c\n", "udp:test")
        mine = asyncio.create_task(ingress.flush())
        await asyncio.sleep(0.01)
        early = [ingress.stats.accepted_lines, int(mine.done())]
        service.release.set()
        return [*early, await mine, await timed, ingress.stats.accepted_lines]

    assert asyncio.run(scenario()) == [0, 0, 1, 2, 3]
    assert service.calls == 2
    assert ingress.stats.batches == 2 and ingress.stats.accepted_lines == 3


def test_rate_limited_log() -> None:
    clock = [0.0]
    logged: list[str] = []

    class Sink:
        def warning(self, msg: str) -> None:
            logged.append(msg)

    limited = RateLimitedLog(1.0, clock=lambda: clock[0], logger=Sink())  # type: ignore[arg-type]
    assert limited.rejected("bad_tag", "x", "udp:1", 0)
    assert not any(limited.rejected("bad_tag", "x", "udp:1", 0) for _ in range(99))
    assert limited.rejected("malformed", "y", "udp:1", 0)
    clock[0] = 1.5
    assert limited.rejected("bad_tag", "x", "udp:1", 0)
    assert '"count": 100' in logged[-1]


def test_config_flags() -> None:
    cfg = load_config({"statsd_port": 8125}, None, {"TALLY_STATSD_TENANT": "acme"})
    assert (cfg.statsd_port, cfg.statsd_tenant) == (8125, "acme")
    assert load_config({}, None, {}).statsd_port is None
    with pytest.raises(ConfigError, match="statsd-tenant"):
        load_config({"statsd_port": 8125, "statsd_tenant": "Bad Tenant"}, None, {})
    with pytest.raises(ConfigError, match="statsd-port is not"):
        load_config({"statsd_tenant": "acme"}, None, {})
    with pytest.raises(ConfigError, match="also the HTTP"):
        load_config({"statsd_port": 8780}, None, {})
    with pytest.raises(ConfigError, match="statsd-host is set but statsd-port is not"):
        load_config({"statsd_host": "127.0.0.1"}, None, {})


def test_statsd_beyond_loopback_only_where_named(tmp_path) -> None:
    """StatsD has no token: with a public --host it binds only to an address named for it."""
    tokens = tmp_path / "tokens.toml"
    tokens.write_text('[[token]]\nsecret = "0123456789abcdef0123"\ntenants = ["*"]\n'
                      'scopes = ["ingest"]\n')
    public = {"host": "0.0.0.0", "tokens": str(tokens), "statsd_port": 8125}
    with pytest.raises(ConfigError, match="--statsd-host"):
        load_config(public, None, {})
    cfg = load_config(public, None, {"TALLY_STATSD_HOST": "127.0.0.1"})
    assert (cfg.host, cfg.statsd_host) == ("0.0.0.0", "127.0.0.1")
    assert load_config({**public, "statsd_host": "0.0.0.0"}, None, {}).statsd_host == "0.0.0.0"
    with pytest.raises(ConfigError, match="does not resolve"):
        load_config({**public, "statsd_host": "no-such-host.invalid"}, None, {})


# ---- real clients against the in-process listeners ------------------------------------


@pytest.fixture
def tally(tmp_path) -> Iterator[InProcessTally]:
    server = InProcessTally(tmp_path, statsd_port=0, statsd_tenant="acme").start()
    yield server
    server.stop()


def total(tally: InProcessTally, metric: str, tenant: str = "acme", **params: str) -> int:
    now = time.time()
    r = httpx.get(tally.url + "/v1/series", params={
        "tenant": tenant, "metric": metric, "from": time.strftime("%Y-%m-%d",
                                                                  time.gmtime(now - 86400)),
        "to": time.strftime("%Y-%m-%d", time.gmtime(now + 60)), **params})
    assert r.status_code == 200, r.text
    return r.json()["total"]


def seen(tally: InProcessTally, lines: int, timeout: float = 30) -> None:
    """Wait until the listener has seen ``lines`` lines (or ``timeout`` s, a bound on a hang
    or on lines lost: what they were meant to count then fails the test)."""
    assert tally.statsd is not None
    deadline = time.monotonic() + timeout
    while tally.statsd.stats.lines < lines and time.monotonic() < deadline:
        time.sleep(0.01)


def settle(tally: InProcessTally, lines: int, timeout: float = 30) -> None:
    """Wait until the listener has seen ``lines`` lines, then flush its buffer."""
    seen(tally, lines, timeout)
    assert tally.statsd is not None
    tally.call(tally.statsd.flush())


def test_statsd_client_over_tcp_exact(tally: InProcessTally, monkeypatch) -> None:
    # The client drops a sampled stat when random() > rate; never here, so totals are exact.
    monkeypatch.setattr(random, "random", lambda: 0.0)
    client = statsd.TCPStatsClient("127.0.0.1", tally.statsd_port)
    n = 3000
    with client.pipeline() as pipe:
        for k in range(n):
            pipe.incr("app.requests")
            pipe.incr("app.sampled", 1, rate=0.1)
            pipe.incr("app.bytes", k % 7)
            pipe.timing("app.latency", k % 300)
    client.gauge("app.queue", 5)  # refused, counted
    client.set("app.users", "ann")  # refused, counted
    client.close()
    settle(tally, 4 * n + 2)
    assert total(tally, "app.requests") == n
    assert total(tally, "app.sampled") == 10 * n
    assert total(tally, "app.bytes") == sum(k % 7 for k in range(n))
    assert total(tally, "app.latency.count") == n
    assert total(tally, "app.latency") == n
    assert total(tally, "app.latency.sum") == sum(k % 300 for k in range(n))
    assert total(tally, "app.latency", where="le:100") == sum(
        1 for k in range(n) if 50 < k % 300 <= 100)
    stats = tally.statsd.stats
    assert stats.rejected == {"unsupported_type": 2}
    assert stats.accepted_lines == 4 * n
    metrics = httpx.get(tally.url + "/metrics").text
    assert 'tally_statsd_rejected_lines_total{reason="unsupported_type"} 2.0' in metrics
    assert f'tally_statsd_lines_total{{outcome="accepted"}} {4 * n}.0' in metrics


def test_tcp_bad_lines_do_not_drop_good_ones(tally: InProcessTally) -> None:
    with socket.create_connection(("127.0.0.1", tally.statsd_port)) as s:
        s.sendall(b"good:1|c\nbad line\ngood:1|c|#tenant:globex\nx:1|c|#K:v\n")
        s.sendall(b"long:1|c|#k:" + b"v" * (MAX_LINE + 10))
        s.sendall(b"\ngood:2|c\ngood:3|c")  # the last line has no newline: taken at close
    settle(tally, 7)
    assert total(tally, "good") == 6
    assert total(tally, "good", tenant="globex") == 1
    assert tally.statsd.stats.rejected == {"malformed": 1, "bad_tag": 1, "too_long": 1}


def test_overflowing_hour_refuses_only_that_line(tally: InProcessTally) -> None:
    """Each line fits int64, but two in one hour do not: the batch names the second, which
    is refused alone, and the batch is applied without it (and then the third likewise)."""
    big = 2**62
    with socket.create_connection(("127.0.0.1", tally.statsd_port)) as s:
        s.sendall(f"o:{big}|c\nfine:1|c\no:{big}|c\no:{big}|c\nfine:1|c\n".encode())
    settle(tally, 5)
    assert total(tally, "fine") == 2
    assert total(tally, "o") == big  # 2**62 + 2**62 is 2**63: one past int64
    assert tally.statsd.stats.rejected == {"overflow": 2}


def test_an_hour_filled_by_an_earlier_flush_refuses_the_line_past_it(tally: InProcessTally
                                                                      ) -> None:
    """The shard refuses a folded sum that takes the stored hour past int64: the window is
    replayed line by line, and only the line that overflows is refused."""
    big = 2**62
    with socket.create_connection(("127.0.0.1", tally.statsd_port)) as s:
        s.sendall(f"o:{big}|c\no:{big - 1}|c\n".encode())
        settle(tally, 2)
        s.sendall(b"fine:1|c\no:1|c\nfine:2|c\n")
        settle(tally, 5)
    assert total(tally, "o") == 2**63 - 1
    assert total(tally, "fine") == 3
    assert tally.statsd.stats.rejected == {"overflow": 1}
    assert tally.statsd.stats.accepted_lines == 4


def test_an_error_in_the_receive_loop_is_logged_and_receiving_goes_on(
        tally: InProcessTally, caplog) -> None:
    assert tally.statsd is not None
    fold = tally.statsd.folder.fold
    calls = []

    def failing_once(*args):  # type: ignore[no-untyped-def]
        calls.append(args[0])
        if len(calls) == 1:
            raise RuntimeError("a bug in the fold")
        return fold(*args)

    tally.statsd.folder.fold = failing_once  # type: ignore[method-assign]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.sendto(b"lost:1|c\n", ("127.0.0.1", tally.statsd_port))
        deadline = time.monotonic() + 30
        while not calls and time.monotonic() < deadline:
            time.sleep(0.01)
        u.sendto(b"kept:1|c\n", ("127.0.0.1", tally.statsd_port))
        settle(tally, 1)
    assert total(tally, "kept") == 1 and total(tally, "lost") == 0
    assert "a bug in the fold" in caplog.text and "statsd receive" in caplog.text


def test_dogstatsd_over_udp_with_tags(tally: InProcessTally) -> None:
    """A paced send on loopback, so exact: every 10 pairs of datagrams the sender waits
    until the listener has read them. (Paced by a sleep instead, a busy machine can leave
    the listener unscheduled while the socket's receive buffer fills (net.core.rmem_max
    caps it, 208 KiB by default), and the kernel drops datagrams.)"""
    client = DogStatsd("127.0.0.1", tally.statsd_port, disable_telemetry=True,
                       disable_buffering=True, disable_aggregation=True)
    n = 200
    for k in range(n):
        client.increment("dd.hits", tags=[f"channel:{'ab'[k % 2]}", "tenant:globex"])
        client.histogram("dd.size", k, tags=["tenant:globex"])
        if k % 10 == 9:
            seen(tally, 2 * (k + 1))
    client.gauge("dd.temp", 3.5, tags=["tenant:globex"])
    client.close_socket()
    settle(tally, 2 * n + 1)
    assert total(tally, "dd.hits", tenant="globex") == n
    assert total(tally, "dd.hits", tenant="globex", where="channel:a") == n // 2
    assert total(tally, "dd.size.count", tenant="globex") == n
    assert total(tally, "dd.size.sum", tenant="globex") == sum(range(n))
    assert tally.statsd.stats.rejected == {"unsupported_type": 1}


def test_udp_loss_rate_is_reported(tally: InProcessTally, capsys) -> None:
    """An unpaced burst: UDP may drop, and nothing can tell the sender. Totals never exceed
    what was sent; the loss is printed, not hidden."""
    client = statsd.StatsClient("127.0.0.1", tally.statsd_port)
    n = 50_000
    with client.pipeline() as pipe:  # packs lines into datagrams of up to 512 bytes
        for _ in range(n):
            pipe.incr("burst")
    client.close()
    settle(tally, n, timeout=5)
    got = total(tally, "burst")
    assert 0 < got <= n
    with capsys.disabled():
        print(f"\nstatsd UDP burst: {n} lines sent, {got} counted, loss {1 - got / n:.2%}")


def test_bench_statsd_ramp_counts_every_line_at_a_low_rate() -> None:
    """`tally bench-statsd`'s machinery, briefly: its own listener process, one slow step."""
    from tally.bench.statsd import StatsdBenchConfig, run_statsd, to_json

    # 125 datagrams of 10 lines: the listener's receive buffer holds them all even if a
    # busy machine leaves its process unscheduled for the whole send (500 datagrams, about
    # 1 KiB each in the kernel's accounting, may not fit at net.core.rmem_max's default)
    cfg = StatsdBenchConfig(duration=0.05, max_rate=25_000, etsy=False)
    res = run_statsd(cfg, say=lambda _m: None)
    assert [(s.sent, s.counted) for s in res.tally.steps] == [(1250, 1250)]
    assert res.tally.best > 0 and res.etsy is None and '"ratio": null' in to_json(res)


def test_gateway_starts_and_stops_the_statsd_listeners(tmp_path) -> None:
    """The gateway actor's own start/stop with ``statsd_port``, run as a plain object (the
    class Ray wraps) over in-process shards: no Ray session is started."""
    import asyncio
    import gc

    from tally.actors.clients import LocalShards
    from tally.api.gateway import Gateway, GatewayOptions
    from tally.api.service import Service
    from tally.api.tcp import TcpServer
    from tally.checkpoint.sqlite import SqliteStore

    cls = Gateway.__ray_metadata__.modified_class
    store = SqliteStore(str(tmp_path / "gw.db"))
    store.ensure_layout(2)

    async def scenario() -> tuple[dict, dict, int]:
        gw = cls.__new__(cls)
        gw.options = GatewayOptions(statsd_port=0, statsd_tenant="acme")
        gw.store = store
        gw.service = Service(LocalShards(store, 2), store)
        gw.tcp = TcpServer(gw.service, gw.options.limits, None, gw.options.rules)
        gw.http, gw._http_task, gw.statsd, gw.ports = None, None, None, None
        ports = await gw.start("127.0.0.1", 0, 0)  # any free ports, as it reports them
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.sendto(b"x:5|c\ny:1|g\n", ("127.0.0.1", ports["statsd_port"]))
        deadline = time.monotonic() + 30
        while gw.statsd.stats.lines < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await gw.stop()  # applies what is buffered
        return ports, (await gw.stats())["statsd"], gw.service.increments

    try:
        ports, stats, increments = asyncio.run(scenario())
    finally:
        gc.unfreeze()
        store.close()
    assert ports["statsd_port"] > 0
    assert stats["accepted_lines"] == 1 and stats["rejected"] == {"unsupported_type": 1}
    assert increments == 1


@pytest.fixture
def untimed(tmp_path) -> Iterator[InProcessTally]:
    """Listeners without a timed flush in a test's time: the buffer empties at settle()."""
    server = InProcessTally(tmp_path, statsd_port=0, statsd_tenant="acme",
                            statsd_flush_interval=3600).start()
    yield server
    server.stop()


def test_a_full_buffer_refuses_lines_as_overloaded(untimed: InProcessTally) -> None:
    """Bounded memory: past max_pending buffered rows, new lines are refused and counted."""
    tally = untimed
    assert tally.statsd is not None
    tally.statsd.max_pending = 4
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.sendto(b"p:1|c\n" * 3, ("127.0.0.1", tally.statsd_port))
        seen(tally, 3)  # buffered
        u.sendto(b"p:1|c\n" * 3, ("127.0.0.1", tally.statsd_port))  # 3 + 3 > 4: refused
    settle(tally, 6)
    assert total(tally, "p") == 3
    assert tally.statsd.stats.rejected == {"overloaded": 3}

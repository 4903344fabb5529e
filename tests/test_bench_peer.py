"""`tally bench --peer clickhouse`: the ClickHouse peer (chDB) and the numpy oracle it is
checked against.

A small workload, 50 series over four days around 2026-04-01 00:00 UTC, so a month
boundary and London's switch to summer time (2026-03-29 01:00 UTC) both fall inside
it, sent in batches whose series tables differ (another order, tags in another order,
one series named twice). The oracle must equal a brute-force sum over every increment
in plain Python (zoneinfo per timestamp), and the peer must equal the oracle: exactly,
before and after ClickHouse merges its parts. Nothing here is timed.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from tally.bench.peer import (
    HOURLY_ENGINES,
    ClickHousePeer,
    Oracle,
    PeerUnavailable,
    latency,
    local_day_hours,
)

CHANNELS = ("email", "chat", "twitter", "phone", "web")
T0 = int(datetime(2026, 3, 28, 12, tzinfo=UTC).timestamp())
T1 = int(datetime(2026, 4, 1, 12, tzinfo=UTC).timestamp())
# instants at the edges the answers hinge on, each sent in some batch
EDGES = [
    int(datetime(*when, tzinfo=UTC).timestamp()) + dt
    for when in ((2026, 3, 29, 0), (2026, 3, 29, 1), (2026, 3, 31, 23), (2026, 4, 1, 0),
                 (2026, 3, 30, 23), (2026, 3, 31, 0))
    for dt in (-1, 0, 1)
]
FIRST, LAST = "2026-03-28", "2026-04-01"


def make_series() -> list[list]:
    """50 series: 44 of acme's messages.received {agent, channel}, one with an extra tag
    (a superset of another's tags), one without a channel, and 4 of other metrics or
    tenants."""
    out: list[list] = [
        ["acme", "messages.received", {"agent": f"a{k:02d}", "channel": CHANNELS[k % 5]}]
        for k in range(44)
    ]
    out.append(["acme", "messages.received", {"agent": "a03", "channel": "phone",
                                              "region": "eu"}])  # superset of a03's tags
    out.append(["acme", "messages.received", {"agent": "a99"}])  # no channel
    out.append(["acme", "messages.handled", {"agent": "a01", "channel": "chat"}])
    out.append(["acme", "messages.handled", None])
    out.append(["globex", "messages.received", {"agent": "a01", "channel": "chat"}])
    out.append(["globex", "messages.received", {"agent": "a02", "channel": "email"}])
    return out


SERIES = make_series()


def make_batches(seed: int = 7) -> list[tuple[list[list], np.ndarray, np.ndarray, np.ndarray]]:
    """Batches of (series table, i, ts, v); tables are permutations of SERIES, one with
    tags in another key order and one series twice, all meaning the same 50 series."""
    rng = np.random.default_rng(seed)
    batches = []
    for b in range(6):
        order = rng.permutation(len(SERIES))
        table = [SERIES[k] for k in order]
        if b == 2:  # the same series, tags in another key order, and named twice
            first = table[0]
            table = [[first[0], first[1], dict(reversed(list((first[2] or {}).items())))],
                     *table[1:], first]
        n = 3000
        entry = rng.integers(0, len(table), n).astype(np.uint32)
        ts = rng.integers(T0, T1, n).astype(np.int64)
        ts[: len(EDGES)] = EDGES  # every edge in every batch, other series each time
        v = rng.integers(-3, 20, n).astype(np.int64)  # negative too: some slots sum to 0
        batches.append((table, entry, ts, v))
    return batches


BATCHES = make_batches()


# ---- brute force: one increment at a time, in Python ints ------------------------------


def _increments() -> list[tuple[str, str, dict, int, int]]:
    out = []
    for table, entry, ts, v in BATCHES:
        for k, t, x in zip(entry.tolist(), ts.tolist(), v.tolist(), strict=True):
            tenant, metric, tags = table[k]
            out.append((tenant, metric, dict(tags or {}), t, x))
    return out


INCREMENTS = _increments()
_LOCAL_DAYS: dict[str, list[str]] = {}


def increments():
    return iter(INCREMENTS)


def local_days(tz: str) -> list[str]:
    """The local date of every increment in ``tz``, zoneinfo per timestamp (cached per zone)."""
    if tz not in _LOCAL_DAYS:
        zone = ZoneInfo(tz)
        _LOCAL_DAYS[tz] = [datetime.fromtimestamp(t, zone).date().isoformat()
                           for _, _, _, t, _ in INCREMENTS]
    return _LOCAL_DAYS[tz]


def brute_series_by_day(tenant, metric, where, first, last, tz):
    days = local_day_hours(first, last, tz)[2]
    out = dict.fromkeys(days, 0)
    for (te, me, tags, _, x), day in zip(increments(), local_days(tz), strict=True):
        if te == tenant and me == metric and where.items() <= tags.items() and day in out:
            out[day] += x
    return list(out.items())


def brute_breakdown(tenant, metric, by, first, last):
    out: dict = {}
    for (te, me, tags, _, x), day in zip(increments(), local_days("UTC"), strict=True):
        if te == tenant and me == metric and first <= day <= last:
            out[tags.get(by)] = out.get(tags.get(by), 0) + x
    return {value: total for value, total in out.items() if total}


def brute_month_total(tenant, metric, month):
    return sum(x for (te, me, _, _, x), day in zip(increments(), local_days("UTC"), strict=True)
               if te == tenant and me == metric and day[:7] == month)


# Lord Howe is at +11:00 until 2026-04-05, a whole hour (half-hour zones are refused)
ZONES = ["UTC", "Europe/London", "America/New_York", "Asia/Tokyo", "Pacific/Auckland",
         "Australia/Lord_Howe"]
WHERES = [
    ("acme", "messages.received", {"agent": "a03", "channel": "phone"}),  # and its superset
    ("acme", "messages.received", {"agent": "a07", "channel": "chat"}),
    ("acme", "messages.received", {"channel": "chat"}),
    ("acme", "messages.received", {}),
    ("acme", "messages.handled", {}),
    ("globex", "messages.received", {"agent": "a01"}),
    ("acme", "messages.received", {"agent": "nobody"}),
    ("nobody", "messages.received", {}),
]
BREAKDOWNS = [("acme", "messages.received", "channel"), ("acme", "messages.received", "agent"),
              ("acme", "messages.handled", "channel"), ("globex", "messages.received", "agent")]
RANGES = [(FIRST, LAST), ("2026-03-29", "2026-03-31"), ("2026-04-01", "2026-04-01")]
MONTHS = ["2026-03", "2026-04", "2026-05"]


def questions():
    """(name, args) of every question asked of the oracle and the peer."""
    for tenant, metric, where in WHERES:
        for tz in ZONES:
            for first, last in RANGES:
                yield "series_by_day", (tenant, metric, where, first, last, tz)
    for tenant, metric, by in BREAKDOWNS:
        for first, last in RANGES:
            yield "breakdown", (tenant, metric, by, first, last)
    for tenant, metric, _ in WHERES:
        for month in MONTHS:
            yield "month_total", (tenant, metric, month)


BRUTE = {"series_by_day": brute_series_by_day, "breakdown": brute_breakdown,
         "month_total": brute_month_total}


@pytest.fixture(scope="module")
def oracle() -> Oracle:
    o = Oracle()
    for batch in BATCHES:
        o.insert(*batch)
    return o


def test_the_workload_crosses_a_month_and_a_dst_change() -> None:
    london = ZoneInfo("Europe/London")
    offsets = {datetime.fromtimestamp(t, london).utcoffset() for t in EDGES}
    assert len(offsets) == 2
    months = {datetime.fromtimestamp(t, UTC).strftime("%Y-%m") for _, _, _, t, _ in increments()}
    assert months == {"2026-03", "2026-04"}


def test_the_oracle_equals_a_brute_force_sum(oracle: Oracle) -> None:
    nonzero = 0
    for name, args in questions():
        expected = BRUTE[name](*args)
        assert getattr(oracle, name)(*args) == expected, (name, args)
        nonzero += bool(expected if name != "series_by_day" else any(x for _, x in expected))
    assert nonzero > 100  # the questions have answers, not only zeros
    # the superset series counts in a03's where, the tagless one under None
    assert oracle.breakdown("acme", "messages.received", "channel", FIRST, LAST)[None]


def test_the_oracle_is_exact_beyond_float_precision() -> None:
    o = Oracle()
    big = np.array([2**62, 2**53 + 1, -(2**61), 1], np.int64)
    o.insert([["t", "m", None]], np.zeros(4, np.uint32), np.full(4, T0, np.int64), big)
    assert o.month_total("t", "m", "2026-03") == 2**62 + 2**53 + 2 - 2**61


def test_zones_without_a_whole_hour_offset_are_refused(oracle: Oracle) -> None:
    for tz in ("Asia/Kolkata", "Asia/Kathmandu", "Australia/Adelaide"):  # +05:30, +05:45, +10:30
        with pytest.raises(ValueError, match="whole hour"):
            oracle.series_by_day("acme", "messages.received", {}, FIRST, LAST, tz)
    with pytest.raises(ValueError, match="after"):
        oracle.series_by_day("acme", "messages.received", {}, LAST, FIRST, "UTC")


def test_latency_reports_p50_and_p99() -> None:
    p50, p99 = latency(lambda: None, 20)
    assert 0 <= p50 <= p99


# ---- the peer ------------------------------------------------------------------------


def test_the_module_imports_without_chdb() -> None:
    """`tally bench` without --peer never imports chdb; asking for the peer without it
    installed names the extra to install."""
    code = (
        "import sys; sys.modules['chdb'] = None; sys.modules['pyarrow'] = None\n"
        "import tally.bench.peer as peer\n"
        "try:\n"
        "    peer.ClickHousePeer('/nonexistent')\n"
        "except peer.PeerUnavailable as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert "pip install 'tally[bench]'" in out.stdout
    assert issubclass(PeerUnavailable, RuntimeError)


@pytest.fixture(scope="module", params=sorted(HOURLY_ENGINES))
def peer(request, tmp_path_factory) -> ClickHousePeer:
    pytest.importorskip("chdb", reason="the peer needs chdb: pip install 'tally[bench]'")
    p = ClickHousePeer(tmp_path_factory.mktemp("peer"), hourly_engine=request.param)
    for batch in BATCHES:
        p.insert(*batch)
    yield p
    p.close()


def test_the_peer_answers_as_the_oracle(peer: ClickHousePeer, oracle: Oracle) -> None:
    assert set(peer.insert_seconds) == {"raw", "hourly"}
    assert all(s > 0 for s in peer.insert_seconds.values())
    assert peer.increments == sum(len(b[1]) for b in BATCHES)
    for name, args in questions():
        assert getattr(peer, name)(*args) == getattr(oracle, name)(*args), (name, args)


def test_the_peer_keeps_every_increment_and_each_series_once(peer: ClickHousePeer) -> None:
    raw = peer._query("SELECT count(), sum(v) FROM raw")[0]
    assert [int(x) for x in raw] == [sum(len(b[1]) for b in BATCHES),
                                     sum(int(b[3].sum()) for b in BATCHES)]
    series = peer._query("SELECT count(), uniqExact(id), uniqExact(sid) FROM series")[0]
    assert [int(x) for x in series] == [len(SERIES)] * 3


def test_the_answers_do_not_depend_on_merges(peer: ClickHousePeer, oracle: Oracle) -> None:
    """The SummingMergeTree's parts merge lazily: the answers are the same with every
    part merged as with none."""
    peer._query("OPTIMIZE TABLE hourly FINAL")
    assert peer._query("SELECT count() FROM system.parts WHERE table = 'hourly' AND active")[0][0] \
        in (1, "1")
    for name, args in questions():
        assert getattr(peer, name)(*args) == getattr(oracle, name)(*args), (name, args)


def test_reset_starts_a_cell_from_nothing(peer: ClickHousePeer) -> None:
    """(chDB runs one embedded server per process, at one path: the module's peer is reset
    here, then given its batches back.)"""
    try:
        assert peer.month_total("acme", "messages.received", "2026-03") != 0
        peer.reset()
        assert peer.insert_seconds == {"raw": 0.0, "hourly": 0.0}
        assert peer.month_total("acme", "messages.received", "2026-03") == 0
        assert peer.breakdown("acme", "messages.received", "channel", FIRST, LAST) == {}
        peer.insert(*BATCHES[1])
        o = Oracle()
        o.insert(*BATCHES[1])
        for name, args in questions():
            assert getattr(peer, name)(*args) == getattr(o, name)(*args), (name, args)
    finally:
        peer.reset()
        for batch in BATCHES:
            peer.insert(*batch)

"""``tally demo``: a year of realistic customer-service events for a demo tenant.

The point is a dashboard where every panel and every comparison has something
to show, so the data has the shapes a real support desk has: weekday peaks and
weekend dips, busy office hours and quiet nights, a business that grows over
the year with a December rush and a few campaign spikes, channels whose mix
moves with the hour (chat and phone by day, email and twitter at night),
sentiment that depends on the channel, and agents of very different speeds
whose response times are log-normal, so that every response-time bucket from
``lt_30m`` to ``gt_24h`` fills.

It goes through the public ingest path only -- TCP ``event`` frames from the
client library, fanned out by the server's rules (the built-in ones:
``message.received`` and ``message.replied``) -- and ends with a durable flush,
so what it reports having sent is what queries will answer.

Generation is a pure function of (seed, days, end), vectorised with numpy (a
year is about 250,000 events, with no Python loop per event); the same seed and
end give the same events. Nothing is later than ``end`` (the server refuses
timestamps more than an hour ahead): a reply that would come after it is a
conversation still open.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tally.api.rules import BUILTIN, Rules
from tally.client import TallyClient

CHANNELS = ("email", "chat", "phone", "twitter", "facebook")
# Channel mix by day and by night; an hour's mix is a blend weighted by how busy it is.
DAY_MIX = (0.32, 0.30, 0.18, 0.12, 0.08)
NIGHT_MIX = (0.45, 0.10, 0.03, 0.30, 0.12)
SENTIMENTS = ("positive", "neutral", "negative")
SENTIMENT_BY_CHANNEL = (  # P(positive, neutral, negative) for each channel above
    (0.30, 0.50, 0.20),
    (0.40, 0.45, 0.15),
    (0.35, 0.45, 0.20),
    (0.20, 0.35, 0.45),
    (0.30, 0.40, 0.30),
)
# (name, share of replies, median response in seconds on email-like channels)
AGENTS = (
    ("ann", 0.22, 8 * 60),
    ("bob", 0.20, 25 * 60),
    ("carla", 0.18, 45 * 60),
    ("dev", 0.15, 2 * 3600),
    ("emma", 0.15, 15 * 60),
    ("farid", 0.10, 6 * 3600),
)
# How much faster (<1) or slower (>1) than an agent's median each channel is answered.
CHANNEL_SPEED = (2.0, 0.15, 0.05, 0.6, 1.0)
RESPONSE_SIGMA = 1.1  # log-normal spread: an agent's replies span several buckets
REPLY_RATE = 0.94  # the rest are never answered
# Relative message volume per UTC hour of the day and per weekday (Monday first).
HOURLY = (0.15, 0.10, 0.08, 0.08, 0.10, 0.20, 0.40, 0.70, 1.00, 1.25, 1.35, 1.30,
          1.20, 1.25, 1.30, 1.25, 1.10, 0.90, 0.70, 0.55, 0.45, 0.35, 0.25, 0.20)
WEEKDAY = (1.00, 1.05, 1.00, 0.98, 0.90, 0.45, 0.35)
PER_HOUR = 26.0  # messages in an hour of weight 1 on an average weekday: ~420 a weekday
SPIKES = 4  # campaign days with about 2.5 times the usual volume
MAX_RESPONSE = 14 * 86400


@dataclass(frozen=True)
class DemoEvents:
    """The demo's events as parallel columns, in time order.

    ``replied`` marks ``message.replied`` events (else ``message.received``);
    ``sentiment`` is meaningful for received messages, ``agent`` and
    ``response`` for replies.
    """

    ts: np.ndarray
    replied: np.ndarray
    channel: np.ndarray
    sentiment: np.ndarray
    agent: np.ndarray
    response: np.ndarray

    def __len__(self) -> int:
        return len(self.ts)

    @property
    def received_count(self) -> int:
        return int((~self.replied).sum())

    @property
    def replied_count(self) -> int:
        return int(self.replied.sum())

    def events(self) -> Iterator[tuple[str, int, dict[str, Any]]]:
        """``(type, ts, fields)`` for each event, as the client's ``event`` takes them."""
        columns = (self.ts.tolist(), self.replied.tolist(), self.channel.tolist(),
                   self.sentiment.tolist(), self.agent.tolist(), self.response.tolist())
        agents = [a[0] for a in AGENTS]
        for ts, replied, ch, se, ag, rs in zip(*columns, strict=True):
            if replied:
                yield "message.replied", ts, {"agent": agents[ag], "channel": CHANNELS[ch],
                                              "response_seconds": rs}
            else:
                yield "message.received", ts, {"channel": CHANNELS[ch],
                                               "sentiment": SENTIMENTS[se]}

    def fields(self, etype: str) -> dict[str, np.ndarray]:
        """The numeric fields of one event type as arrays (what a rule's ``value`` reads)."""
        if etype == "message.replied":
            return {"response_seconds": self.response[self.replied]}
        return {}

    def count(self, etype: str) -> int:
        return self.replied_count if etype == "message.replied" else self.received_count


def _pick(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One category per row of ``probs`` (rows sum to 1), vectorised."""
    cum = np.cumsum(probs, axis=1)
    u = rng.random(len(probs))[:, None]
    return np.minimum((u > cum).sum(axis=1), probs.shape[1] - 1)


def generate(seed: int, days: int, end: int) -> DemoEvents:
    """``days`` days of events up to ``end`` (Unix seconds); the same arguments, the same events."""
    if days < 1:
        raise ValueError("days must be at least 1")
    rng = np.random.default_rng(seed)
    h1 = end // 3600
    h0 = h1 - days * 24 + 1
    hours = np.arange(h0, h1 + 1, dtype=np.int64)
    day_index = hours // 24
    weekday = (day_index + 3) % 7  # 1970-01-01 was a Thursday
    hod = hours % 24
    hourly = np.asarray(HOURLY)[hod]
    busy = hourly / max(HOURLY)

    # The shape of a year: growth, a December rush, noisy days and a few campaigns.
    progress = (hours - h0) / max(1, h1 - h0)
    doy = (day_index % 365.2425) / 365.2425
    season = 1 + 0.15 * np.cos(2 * np.pi * (doy - 0.95))
    days_seen, day_of_hour = np.unique(day_index, return_inverse=True)
    daily = rng.gamma(20.0, 1 / 20.0, len(days_seen))
    spikes = rng.choice(len(days_seen), size=min(SPIKES, len(days_seen)), replace=False)
    daily[spikes] *= 2.5
    rate = (PER_HOUR * hourly * np.asarray(WEEKDAY)[weekday] * (0.8 + 0.4 * progress)
            * season * daily[day_of_hour])
    per_hour = rng.poisson(rate)

    # Received messages: a moment in their hour, a channel by the hour's mix, a sentiment.
    hour_of = np.repeat(np.arange(len(hours)), per_hour)
    ts = hours[hour_of] * 3600 + rng.integers(0, 3600, len(hour_of))
    b = busy[hour_of][:, None]
    channel = _pick(rng, b * np.asarray(DAY_MIX) + (1 - b) * np.asarray(NIGHT_MIX))
    sentiment = _pick(rng, np.asarray(SENTIMENT_BY_CHANNEL)[channel])
    keep = ts <= end
    ts, channel, sentiment, hour_of = ts[keep], channel[keep], sentiment[keep], hour_of[keep]

    # Replies: most messages get one, from an agent at that agent's pace; weekends and
    # nights are slower. A reply later than ``end`` has not happened yet.
    answered = rng.random(len(ts)) < REPLY_RATE
    shares = np.asarray([a[1] for a in AGENTS])
    agent = rng.choice(len(AGENTS), size=len(ts), p=shares / shares.sum())
    median = (np.asarray([a[2] for a in AGENTS], dtype=float)[agent]
              * np.asarray(CHANNEL_SPEED)[channel]
              * np.where(weekday[hour_of] >= 5, 2.0, 1.0)
              * np.where(busy[hour_of] < 0.3, 1.5, 1.0))
    response = np.exp(rng.normal(np.log(median), RESPONSE_SIGMA))
    response = np.clip(np.rint(response), 5, MAX_RESPONSE).astype(np.int64)
    answered &= ts + response <= end

    n, m = len(ts), int(answered.sum())
    all_ts = np.concatenate([ts, (ts + response)[answered]])
    order = np.argsort(all_ts, kind="stable")
    replied = np.concatenate([np.zeros(n, bool), np.ones(m, bool)])
    return DemoEvents(
        ts=all_ts[order],
        replied=replied[order],
        channel=np.concatenate([channel, channel[answered]])[order],
        sentiment=np.concatenate([sentiment, np.full(m, -1)])[order],
        agent=np.concatenate([np.full(n, -1), agent[answered]])[order],
        response=np.concatenate([np.zeros(n, np.int64), response[answered]])[order],
    )


def expected_totals(events: DemoEvents, rules: Rules = BUILTIN) -> dict[str, int]:
    """Each metric's total once the rules fan the events out, worked out from the rules.

    Computed from the rules rather than written down, so the demo's report
    stays true if the built-in rules change.
    """
    totals: Counter[str] = Counter()
    for etype in ("message.received", "message.replied"):
        for rule in rules.by_event.get(etype, ()):
            if rule.value is None:
                totals[rule.metric] += events.count(etype)
            else:
                totals[rule.metric] += int(events.fields(etype)[rule.value].sum())
    return dict(sorted(totals.items()))


@dataclass
class DemoResult:
    """What the demo sent; ``totals`` are per metric, over every day it covered."""

    tenant: str
    first_day: str
    last_day: str
    events: int
    received: int
    replied: int
    increments: int
    totals: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    url: str = ""
    warning: str | None = None


def existing_data(http_base: str, tenant: str, token: str | None) -> str | None:
    """A warning when the tenant already has metrics (the demo adds to them), else None.

    Best effort: without a query scope or an HTTP port the check is skipped.
    """
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        r = httpx.get(f"{http_base}/v1/catalog", params={"tenant": tenant}, headers=headers,
                      timeout=5)
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    metrics = r.json().get("metrics") or []
    if metrics:
        return (f"tenant {tenant!r} already has {len(metrics)} metrics: the demo adds to them "
                "(use --tenant for a fresh one)")
    return None


def run_demo(
    *, host: str = "127.0.0.1", tcp_port: int = 8781, http_port: int = 8780,
    token: str | None = None, tenant: str = "demo", days: int = 365, seed: int = 1,
    end: int | None = None, console: Console | None = None, progress: bool = True,
) -> DemoResult:
    """Generate the events, send them through the client, flush durably; what was sent."""
    end = int(time.time()) if end is None else end
    console = console or Console(stderr=True)
    events = generate(seed, days, end)
    totals = expected_totals(events)
    result = DemoResult(
        tenant=tenant,
        first_day=_day(int(events.ts[0])) if len(events) else _day(end),
        last_day=_day(end),
        events=len(events),
        received=events.received_count,
        replied=events.replied_count,
        increments=sum(len(BUILTIN.by_event.get(t, ())) * events.count(t)
                       for t in ("message.received", "message.replied")),
        totals=totals,
        url=f"http://{host}:{http_port}/?tenant={tenant}",
        warning=existing_data(f"http://{host}:{http_port}", tenant, token),
    )
    began = time.monotonic()
    bar = Progress(TextColumn("[bold]demo[/] events"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=console, disable=not progress)
    with bar, TallyClient(host, tcp_port, producer=f"demo:{tenant}:{uuid.uuid4().hex[:12]}",
                          token=token, timeout=60) as client:
        task = bar.add_task("events", total=len(events))
        for n, (etype, ts, fields) in enumerate(events.events(), start=1):
            client.event(tenant, etype, ts, **fields)
            if n % 10_000 == 0:
                bar.update(task, completed=n)
        client.flush(durable=True, timeout=300)
        bar.update(task, completed=len(events))
    result.seconds = time.monotonic() - began
    return result


def _day(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


def report(result: DemoResult) -> Table:
    """The table printed after a demo run."""
    table = Table(title=f"tally demo: tenant {result.tenant}, {result.first_day} .. "
                  f"{result.last_day} (UTC)", title_justify="left")
    table.add_column("metric")
    table.add_column("total", justify="right")
    for metric, total in result.totals.items():
        table.add_row(metric, f"{total:,}")
    return table


def sent_line(result: DemoResult) -> str:
    """One sentence: what was sent, how many increments it made, how fast."""
    rate = result.events / result.seconds if result.seconds else 0.0
    return (f"{result.events:,} events sent ({result.received:,} message.received, "
            f"{result.replied:,} message.replied) = {result.increments:,} increments, all "
            f"durable, in {result.seconds:.1f} s ({rate:,.0f} events/s)")

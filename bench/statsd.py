"""``tally bench-statsd``: StatsD lines per second accepted over UDP with zero loss.

UDP has no acknowledgement, so the only honest figure is a ramp: send at a
paced rate for a few seconds, count what the server counted, and raise the
rate until a line goes missing; the figure is the highest rate at which
every line arrived. The same ramp, with the same datagrams, runs against
Etsy's statsd (the reference implementation, from npm) when ``npm`` is
available, and the two ramps alternate step by step (tally at a rate, then
Etsy statsd at the same rate) so that both see the same minute of a shared,
noisy machine; they are printed side by side with their ratio.

tally's side is, by default, ``tally serve`` itself (Ray shard actors, the
gateway's StatsD listener on ``--statsd-port``), counted by querying
``/v1/series`` as a user would; ``--listener`` measures the listener alone
(bench/statsd_targets.py). Each step sends counters of a metric of its own,
so no step's stragglers count in another's, and loss is exact: the bench
knows how many lines it sent.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tally.bench.statsd_targets import EtsyTarget, InProcessTarget, ServeTarget, Target

RATES = (25_000, 50_000, 75_000, 100_000, 150_000, 200_000, 250_000, 300_000, 350_000,
         400_000, 450_000, 500_000, 600_000, 700_000, 800_000, 1_000_000, 1_200_000,
         1_600_000)


@dataclass
class StatsdBenchConfig:
    duration: float = 2.0  # seconds per step
    lines_per_datagram: int = 10  # what a client pipeline or DogStatsD buffering packs
    max_rate: int = 1_600_000
    min_rate: int = 0  # skip the ramp's steps below this (a quicker run near the knee)
    etsy: bool = True  # also measure Etsy's statsd from npm, when npm is there
    shards: int = 2
    listener: bool = False  # the listener alone, no Ray (default: tally serve)


@dataclass
class Step:
    rate: int  # lines/s asked for
    sent_rate: float  # lines/s the sender achieved
    sent: int
    counted: int

    @property
    def lossless(self) -> bool:
        return self.counted == self.sent


@dataclass
class Ramp:
    name: str
    steps: list[Step] = field(default_factory=list)
    error: str | None = None

    @property
    def best(self) -> float:
        """Highest achieved send rate with zero loss (0: none)."""
        return max((s.sent_rate for s in self.steps if s.lossless), default=0.0)

    @property
    def done(self) -> bool:
        """Two lossy steps in a row: past the knee, no need to go on. (One lossy step
        alone is often a moment when a busy machine left the server unscheduled.)"""
        last = self.steps[-2:]
        return self.error is not None or (len(last) == 2 and not any(s.lossless for s in last))


# ---- the sender ------------------------------------------------------------------


def send_paced(port: int, metric: str, rate: int, duration: float,
               lines_per_datagram: int) -> tuple[int, float]:
    """Send ``metric:1|c`` lines at ``rate`` lines/s for ``duration``; (lines sent, lines/s)."""
    payload = (f"{metric}:1|c\n" * lines_per_datagram).encode()
    datagrams = max(1, int(rate * duration / lines_per_datagram))
    interval = lines_per_datagram / rate
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("127.0.0.1", port))
        send = s.send
        start = time.perf_counter()
        sent = 0
        while sent < datagrams:
            due = int((time.perf_counter() - start) / interval) + 1
            burst = min(due, datagrams) - sent
            if burst <= 0:
                time.sleep(interval / 2 if interval > 0.0002 else 0)
                continue
            for _ in range(burst):
                send(payload)
                sent += 1
        elapsed = time.perf_counter() - start
    lines = sent * lines_per_datagram
    return lines, lines / elapsed


def step(ramp: Ramp, target: Target, k: int, rate: int, cfg: StatsdBenchConfig,
         say: Any) -> None:
    """One step of one ramp: metric ``bench.r<k>`` at ``rate``, then its exact count."""
    metric = f"bench.r{k}"
    sent, achieved = send_paced(target.port, metric, rate, cfg.duration, cfg.lines_per_datagram)
    counted = target.counted(metric, sent)
    ramp.steps.append(Step(rate, achieved, sent, counted))
    say(f"{ramp.name}: {achieved:,.0f} lines/s sent, {counted:,}/{sent:,} counted "
        f"({1 - counted / sent:.2%} lost)")


def ramps(targets: list[tuple[Ramp, Target]], cfg: StatsdBenchConfig, say: Any) -> None:
    """Every target at each rate in turn, until each is past its knee."""
    rates = [r for r in RATES if cfg.min_rate <= r <= cfg.max_rate]
    for k, rate in enumerate(rates):
        for ramp, target in targets:
            if not ramp.done:
                step(ramp, target, k, rate, cfg, say)
        if all(ramp.done for ramp, _ in targets):
            break


# ---- the run ---------------------------------------------------------------------


@dataclass
class StatsdResults:
    config: dict[str, Any]
    tally: Ramp
    etsy: Ramp | None

    @property
    def ratio(self) -> float | None:
        if self.etsy is None or not self.etsy.best:
            return None
        return self.tally.best / self.etsy.best


def run_statsd(cfg: StatsdBenchConfig, say: Any = print) -> StatsdResults:
    what = "StatsD listener alone (no Ray)" if cfg.listener else "tally serve --statsd-port"
    say(f"{what}, {cfg.lines_per_datagram} lines per datagram, {cfg.duration:g} s per step")
    tally_target: Target = (InProcessTarget(cfg.shards) if cfg.listener
                            else ServeTarget(cfg.shards))
    tally = Ramp(tally_target.name)
    targets: list[tuple[Ramp, Target]] = [(tally, tally_target)]
    etsy: Ramp | None = None
    with tempfile.TemporaryDirectory(prefix="tally-bench-etsy-") as tmp:
        try:
            if cfg.etsy and shutil.which("npm") and shutil.which("node"):
                say("Etsy statsd from npm")
                try:
                    reference = EtsyTarget(Path(tmp))
                except (subprocess.SubprocessError, RuntimeError, OSError) as e:
                    etsy = Ramp("etsy statsd", error=f"could not start: {e}")
                else:
                    etsy = Ramp(reference.name)
                    targets.append((etsy, reference))
            elif cfg.etsy:
                etsy = Ramp("etsy statsd", error="npm or node not found: not measured")
            ramps(targets, cfg, say)
        finally:
            for _, target in targets:
                target.close()
    return StatsdResults(asdict(cfg), tally, etsy)


def report(res: StatsdResults, say: Any = print) -> None:
    def line(r: Ramp) -> str:
        if r.error:
            return f"{r.name}: {r.error}"
        lossy = next((s for s in r.steps if not s.lossless), None)
        knee = (f" ({lossy.sent - lossy.counted:,} of {lossy.sent:,} lines lost at "
                f"{lossy.sent_rate:,.0f})" if lossy else "")
        return f"{r.name}: {r.best:,.0f} lines/s with zero loss{knee}"

    say(line(res.tally))
    if res.etsy is not None:
        say(line(res.etsy))
    if res.ratio is not None:
        say(f"ratio tally / etsy statsd: {res.ratio:.2f}x")


def to_json(res: StatsdResults) -> str:
    return json.dumps({"config": res.config, "tally": asdict(res.tally),
                       "etsy": asdict(res.etsy) if res.etsy else None,
                       "tally_best": res.tally.best,
                       "etsy_best": res.etsy.best if res.etsy else None,
                       "ratio": res.ratio}, indent=2)

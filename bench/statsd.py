"""``tally bench-statsd``: StatsD lines per second accepted over UDP with zero loss.

UDP has no acknowledgement, so the only honest figure is a ramp: send at a
paced rate for a few seconds, count what the server counted, and raise the
rate until a line goes missing; the figure is the highest rate at which
every line arrived. The same ramp, with the same datagrams, runs against
Etsy's statsd (the reference implementation, from npm) when ``npm`` is
available, in the same run on the same machine, and the two are printed
side by side with their ratio.

tally's side is the gateway's StatsD listener (api/statsd.py: the parser,
the batching and ``Service.ingest``) in a process of its own, with in-process
shards over SQLite: no Ray, so the figure is the listener's and the shards'
work, not Ray's. Each step sends counters of a metric of its own and reads
the count back (tally: the listener's accepted lines; statsd: its management
port's ``counters``), so no step's stragglers count in another's.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

from tally.bench.spawn import free_port

RATES = (25_000, 50_000, 100_000, 150_000, 200_000, 250_000, 300_000, 400_000, 500_000,
         600_000, 800_000, 1_000_000, 1_200_000, 1_600_000)


@dataclass
class StatsdBenchConfig:
    duration: float = 2.0  # seconds per step
    lines_per_datagram: int = 10  # what a client pipeline or DogStatsD buffering packs
    max_rate: int = 1_600_000
    etsy: bool = True  # also measure Etsy's statsd from npm, when npm is there
    shards: int = 2


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


class Target(Protocol):
    port: int

    def counted(self, metric: str, expect: int) -> int: ...


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
                try:
                    send(payload)
                except BlockingIOError:  # pragma: no cover - the socket is blocking
                    break
                sent += 1
        elapsed = time.perf_counter() - start
    lines = sent * lines_per_datagram
    return lines, lines / elapsed


def ramp(name: str, target: Target, cfg: StatsdBenchConfig, say: Any) -> Ramp:
    out = Ramp(name)
    for k, rate in enumerate(r for r in RATES if r <= cfg.max_rate):
        metric = f"bench.r{k}"
        sent, achieved = send_paced(target.port, metric, rate, cfg.duration,
                                    cfg.lines_per_datagram)
        counted = target.counted(metric, sent)
        out.steps.append(Step(rate, achieved, sent, counted))
        say(f"{name}: {achieved:,.0f} lines/s sent, {counted:,}/{sent:,} counted "
            f"({1 - counted / sent:.2%} lost)")
        if counted < sent and len([s for s in out.steps if not s.lossless]) >= 2:
            break  # two lossy steps: past the knee
    return out


def _wait_stable(read: Any, expect: int, timeout: float = 5.0) -> int:
    """Read a count until it reaches ``expect`` or stops moving for half a second."""
    deadline = time.monotonic() + timeout
    last, still = -1, time.monotonic()
    while time.monotonic() < deadline:
        n = read()
        if n >= expect:
            return n
        if n != last:
            last, still = n, time.monotonic()
        elif time.monotonic() - still > 0.5:
            return n
        time.sleep(0.05)
    return last


# ---- tally's listener in a process of its own ---------------------------------------


def _serve_tally(conn: Connection, shards: int) -> None:
    from tally.actors.clients import LocalShards
    from tally.api.service import Service
    from tally.api.statsd import StatsdIngress
    from tally.checkpoint.sqlite import SqliteStore

    async def main() -> None:
        with tempfile.TemporaryDirectory(prefix="tally-bench-statsd-") as tmp:
            store = SqliteStore(str(Path(tmp) / "bench.db"))
            store.ensure_layout(shards)
            local = LocalShards(store, shards)
            service = Service(local, store)
            service.start()
            ingress = StatsdIngress(service, "bench")
            port = await ingress.start("127.0.0.1", 0)
            conn.send(port)
            loop = asyncio.get_running_loop()
            while True:
                cmd = await loop.run_in_executor(None, conn.recv)
                if cmd == "stop":
                    break
                await ingress.flush()
                stats = ingress.stats
                conn.send((stats.lines, stats.accepted_lines, dict(stats.rejected)))
            await ingress.stop()
            service.tracker.stop()
            store.close()

    asyncio.run(main())


class TallyTarget:
    def __init__(self, shards: int) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve_tally, args=(child, shards), daemon=True)
        self.proc.start()
        self.port: int = self.conn.recv()
        self.base = 0

    def accepted(self) -> int:
        self.conn.send("stats")
        _lines, accepted, _rejected = self.conn.recv()
        return accepted

    def counted(self, metric: str, expect: int) -> int:
        n = _wait_stable(lambda: self.accepted() - self.base, expect)
        self.base += n
        return n

    def close(self) -> None:
        self.conn.send("stop")
        self.proc.join(10)


# ---- Etsy's statsd ----------------------------------------------------------------


class EtsyTarget:
    """Etsy's statsd, installed with npm into a temporary folder, no backend, one flush an hour."""

    def __init__(self, workdir: Path) -> None:
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent", "statsd"],
                       cwd=workdir, check=True, capture_output=True, timeout=300)
        self.port, self.mgmt = free_port(), free_port()
        config = workdir / "config.js"
        config.write_text(
            f'{{ port: {self.port}, address: "127.0.0.1", mgmt_port: {self.mgmt}, '
            f'mgmt_address: "127.0.0.1", backends: [], flushInterval: 3600000 }}\n')
        self.log = open(workdir / "statsd.log", "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            ["node", str(workdir / "node_modules/statsd/stats.js"), str(config)],
            cwd=workdir, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            try:
                self._counters()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("Etsy statsd did not start") from None
                time.sleep(0.2)

    def _counters(self) -> str:
        with socket.create_connection(("127.0.0.1", self.mgmt), timeout=5) as s:
            s.sendall(b"counters\n")
            data = b""
            while b"END" not in data:
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                data += chunk
        return data.decode()

    def counted(self, metric: str, expect: int) -> int:
        pattern = re.compile(rf"'{re.escape(metric)}': (\d+)")

        def read() -> int:
            m = pattern.search(self._counters())
            return int(m.group(1)) if m else 0

        return _wait_stable(read, expect)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


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
    say(f"tally StatsD listener ({cfg.lines_per_datagram} lines per datagram, "
        f"{cfg.duration:g} s per step)")
    target = TallyTarget(cfg.shards)
    try:
        tally = ramp("tally", target, cfg, say)
    finally:
        target.close()
    etsy: Ramp | None = None
    if cfg.etsy and shutil.which("npm") and shutil.which("node"):
        with tempfile.TemporaryDirectory(prefix="tally-bench-etsy-") as tmp:
            say("Etsy statsd from npm")
            try:
                reference = EtsyTarget(Path(tmp))
            except (subprocess.SubprocessError, RuntimeError, OSError) as e:
                etsy = Ramp("etsy statsd", error=f"could not start: {e}")
            else:
                try:
                    etsy = ramp("etsy statsd", reference, cfg, say)
                finally:
                    reference.close()
    elif cfg.etsy:
        etsy = Ramp("etsy statsd", error="npm or node not found: not measured")
    return StatsdResults(asdict(cfg), tally, etsy)


def report(res: StatsdResults, say: Any = print) -> None:
    def line(r: Ramp) -> str:
        if r.error:
            return f"{r.name}: {r.error}"
        return f"{r.name}: {r.best:,.0f} lines/s with zero loss"

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

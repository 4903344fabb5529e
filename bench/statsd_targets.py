"""What ``tally bench-statsd`` sends to, and how each target counts what it got.

- ``ServeTarget``: ``tally serve`` itself (Ray shard actors, the gateway's StatsD
  listener, ``--statsd-port``), counting through ``GET /v1/series``: what a user
  of the service would read back.
- ``InProcessTarget``: the listener (api/statsd.py) in a process of its own over
  in-process shards, no Ray: the listener's own cost, counted by its stats.
- ``EtsyTarget``: Etsy's statsd from npm, counting through its management port.

Each counts the lines of one metric (one per ramp step), so no step's stragglers
count in another's.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import re
import socket
import subprocess
import tempfile
import time
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Protocol

import httpx

from tally.bench.spawn import Spawned, free_port

TENANT = "bench"
# what `tally serve` prints once StatsD listens (cluster/boot.py)
STATSD_SERVING = re.compile(r"StatsD \(UDP and TCP\) on \S+:(\d+)")


class Target(Protocol):
    name: str
    port: int

    def counted(self, metric: str, expect: int) -> int: ...

    def close(self) -> None: ...


def wait_stable(read: object, expect: int, timeout: float = 10.0, quiet: float = 0.6) -> int:
    """Read a count until it reaches ``expect`` or stops moving for ``quiet`` seconds.

    ``read`` is a callable returning the count so far. A count past ``expect`` is
    returned as it is (the caller sees the excess; it would be a double count)."""
    deadline = time.monotonic() + timeout
    last, still = -1, time.monotonic()
    while time.monotonic() < deadline:
        n = read()  # type: ignore[operator]
        if n >= expect:
            return n
        if n != last:
            last, still = n, time.monotonic()
        elif time.monotonic() - still > quiet:
            return n
        time.sleep(0.05)
    return last


def udp_and_tcp_port() -> int:
    """A port free for TCP and UDP both just now (the child binds it later: see the retry
    in ServeTarget)."""
    for _ in range(50):
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            try:
                u.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise OSError("no port free for both TCP and UDP")


# ---- tally serve ---------------------------------------------------------------------


class ServeTarget:
    """``tally serve --statsd-port P --statsd-tenant bench`` over SQLite in a temporary folder.

    ``--statsd-port`` takes no 0, so a free port is picked here and bound by the
    gateway later; if something took it meanwhile the service exits naming it,
    and the start is retried on another port.
    """

    name = "tally serve"

    def __init__(self, shards: int, extra: tuple[str, ...] = (), attempts: int = 4) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="tally-bench-statsd-")
        work = Path(self._tmp.name)
        store = f"sqlite:///{work / 'bench.db'}"
        for attempt in range(attempts):
            port = udp_and_tcp_port()
            service = Spawned(work, store, "--statsd-port", str(port), "--statsd-tenant", TENANT,
                              *extra, shards=shards)
            try:
                service.start()
            except RuntimeError as e:
                if "StatsD port" in str(e) and attempt < attempts - 1:
                    continue  # taken between the pick and the bind: another port
                self._tmp.cleanup()
                raise
            break
        self.service = service
        m = STATSD_SERVING.search(service.output())
        self.port = int(m.group(1)) if m else port
        self.http = httpx.Client(base_url=service.url, timeout=30)

    def total(self, metric: str) -> int:
        now = datetime.now(UTC)
        r = self.http.get("/v1/series", params={
            "tenant": TENANT, "metric": metric,
            "from": (now - timedelta(days=1)).strftime("%Y-%m-%d"),
            "to": (now + timedelta(days=1)).strftime("%Y-%m-%d")})
        r.raise_for_status()
        return int(r.json()["total"])

    def counted(self, metric: str, expect: int) -> int:
        return wait_stable(lambda: self.total(metric), expect)

    def close(self) -> None:
        self.http.close()
        try:
            self.service.stop()
        finally:
            self._tmp.cleanup()


# ---- the listener alone, in a process of its own --------------------------------------


def _serve_listener(conn: Connection, shards: int) -> None:
    from tally.actors.clients import LocalShards
    from tally.api.service import Service
    from tally.api.statsd import StatsdIngress
    from tally.checkpoint.sqlite import SqliteStore

    async def main() -> None:
        with tempfile.TemporaryDirectory(prefix="tally-bench-statsd-") as tmp:
            store = SqliteStore(str(Path(tmp) / "bench.db"))
            store.ensure_layout(shards)
            service = Service(LocalShards(store, shards), store)
            service.start()
            ingress = StatsdIngress(service, TENANT)
            port = await ingress.start("127.0.0.1", 0)
            conn.send(port)
            loop = asyncio.get_running_loop()
            while True:
                cmd = await loop.run_in_executor(None, conn.recv)
                if cmd == "stop":
                    break
                await ingress.flush()
                conn.send(ingress.stats.accepted_lines)
            await ingress.stop()
            service.tracker.stop()
            store.close()

    asyncio.run(main())


class InProcessTarget:
    """The StatsD listener over in-process shards (SQLite), no Ray, in a child process."""

    name = "tally listener"

    def __init__(self, shards: int) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve_listener, args=(child, shards), daemon=True)
        self.proc.start()
        self.port: int = self.conn.recv()
        self.base = 0

    def accepted(self) -> int:
        self.conn.send("stats")
        return int(self.conn.recv())

    def counted(self, metric: str, expect: int) -> int:
        n = wait_stable(lambda: self.accepted() - self.base, expect)
        self.base += n
        return n

    def close(self) -> None:
        self.conn.send("stop")
        self.proc.join(10)


# ---- Etsy's statsd ---------------------------------------------------------------------


class EtsyTarget:
    """Etsy's statsd, installed with npm into a temporary folder, no backend, one flush an
    hour (so its counters only grow during a run).

    Its ports are picked free here and bound by node later; node exits when one was
    taken meanwhile, and the start is retried on other ports.
    """

    name = "etsy statsd"

    def __init__(self, workdir: Path, attempts: int = 5) -> None:
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent", "statsd"],
                       cwd=workdir, check=True, capture_output=True, timeout=300)
        self.workdir = workdir
        for attempt in range(attempts):
            try:
                self._start()
                return
            except RuntimeError:
                if attempt == attempts - 1:
                    raise

    def _start(self) -> None:
        workdir = self.workdir
        self.port, self.mgmt = udp_and_tcp_port(), free_port()
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
                answer = self._counters()
            except OSError:
                answer = ""
            # (an answer from someone else on a port taken meanwhile: node then exits)
            time.sleep(0.2)
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("Etsy statsd did not start (a port taken meanwhile?)")
            if "END" in answer:
                return

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
        # (node prints a key quoted unless it is an identifier: 'bench.r0', but m0)
        pattern = re.compile(rf"(?:'{re.escape(metric)}'|\b{re.escape(metric)}): (\d+)")

        def read() -> int:
            m = pattern.search(self._counters())
            return int(m.group(1)) if m else 0

        return wait_stable(read, expect)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(10)
        self.log.close()

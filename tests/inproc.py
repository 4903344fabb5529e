"""The gateway's real servers (asyncio TCP + uvicorn HTTP) on real sockets, without Ray.

Shards are in-process (LocalShards over SQLite) and checkpoint on a timer, so
durable acks work. It starts in well under a second, which makes it the place
for the many small tests of refusals, limits and access; the end-to-end tests
run the same code inside `tally serve`.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from tally.actors.clients import LocalShards
from tally.api.access import AccessList
from tally.api.http import create_app
from tally.api.rules import BUILTIN, Rules
from tally.api.service import Service
from tally.api.statsd import StatsdIngress
from tally.api.tcp import TcpLimits, TcpServer
from tally.checkpoint.sqlite import SqliteStore
from tally.wire.frames import FrameDecoder, encode_frame


def tokens_file(*tokens: tuple[str | None, str, list[str], list[str]]) -> str:
    """A tokens file (TOML) from (name, secret, tenants, scopes) entries; name may be None."""
    out = []
    for name, secret, tenants, scopes in tokens:
        out.append("[[token]]")
        if name is not None:
            out.append(f"name = {json.dumps(name)}")
        out += [f"secret = {json.dumps(secret)}", f"tenants = {json.dumps(tenants)}",
                f"scopes = {json.dumps(scopes)}", ""]
    return "\n".join(out)


class InProcessTally:
    def __init__(
        self, workdir: Path, *, shards: int = 2, limits: TcpLimits | None = None,
        access: AccessList | None = None, max_query_days: int = 3660,
        rules: Rules = BUILTIN, statsd_port: int | None = None,
        statsd_tenant: str | None = None, statsd_flush_interval: float = 0.1,
    ) -> None:
        self.store = SqliteStore(str(workdir / "inproc.db"))
        self.store.ensure_layout(shards)
        self.shards = LocalShards(self.store, shards)
        self.service = Service(self.shards, self.store)
        self.limits = limits or TcpLimits()
        self.tcp = TcpServer(self.service, self.limits, access, rules)
        self.app = create_app(
            self.service, max_body=self.limits.max_frame, access=access,
            max_query_days=max_query_days, rules=rules,
        )
        # StatsD listeners when ``statsd_port`` is given (0: a free port for UDP and TCP)
        self.statsd_port = statsd_port
        self.statsd: StatsdIngress | None = None
        if statsd_port is not None:
            self.statsd = StatsdIngress(self.service, statsd_tenant,
                                        flush_interval=statsd_flush_interval)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.http: uvicorn.Server | None = None
        self.tcp_port = self.http_port = 0
        self._tasks: list[asyncio.Task] = []

    def start(self) -> InProcessTally:
        self.thread.start()
        self.call(self._start())
        return self

    async def _start(self) -> None:
        self.service.start()
        self.tcp_port = await self.tcp.start("127.0.0.1", 0)
        if self.statsd is not None:
            self.statsd_port = await self.statsd.start("127.0.0.1", self.statsd_port or 0)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.http_port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app, log_level="warning", lifespan="off", access_log=False,
            limit_concurrency=self.limits.max_connections,
        )
        self.http = uvicorn.Server(config)
        self._tasks.append(asyncio.create_task(self.http.serve(sockets=[sock])))
        self._tasks.append(asyncio.create_task(self._checkpoints()))
        while not self.http.started:
            await asyncio.sleep(0.01)

    async def _checkpoints(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            self.shards.checkpoint()

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        async def _stop() -> None:
            await self.tcp.stop()
            if self.statsd is not None:
                await self.statsd.stop()
            self.service.tracker.stop()
            assert self.http is not None
            self.http.should_exit = True
            for task in self._tasks[1:]:
                task.cancel()
            # Wait for every task, uvicorn's serve() included (a bare gather returns at the
            # first cancelled one and leaves the rest pending); a task that failed fails stop().
            results = await asyncio.gather(*self._tasks, return_exceptions=True)
            for r in results:
                if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError):
                    raise r

        self.call(_stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.store.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def total(self, tenant: str, metric: str, day: str, **params: Any) -> int:
        """The day's total as a user sees it over HTTP (token in params['token'])."""
        token = params.pop("token", None)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        r = httpx.get(self.url + "/v1/series", params={
            "tenant": tenant, "metric": metric, "from": day, "to": day, **params,
        }, headers=headers)
        assert r.status_code == 200, r.text
        return r.json()["total"]


class RawConnection:
    """A TCP connection that sends exactly the bytes it is given and reads frames."""

    def __init__(self, port: int, timeout: float = 10) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.decoder = FrameDecoder()
        self.pending: list[dict] = []

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, msg: dict | bytes) -> None:
        self.sock.sendall(msg if isinstance(msg, bytes) else encode_frame(msg))

    def receive(self) -> dict:
        while not self.pending:
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("closed by the server")
            self.pending.extend(self.decoder.feed(data))
        return self.pending.pop(0)

    def request(self, msg: dict | bytes) -> dict:
        self.send(msg)
        return self.receive()

    def closed_by_server(self, within: float = 30) -> bool:
        """True when the server closes the connection (EOF) within ``within`` seconds (a
        bound on a hang: it returns at the close)."""
        deadline = time.monotonic() + within
        self.sock.settimeout(0.2)
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                continue
            except ConnectionError:
                return True
            if not data:
                return True
            self.pending.extend(self.decoder.feed(data))
        return False

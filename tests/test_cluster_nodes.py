"""Beyond one machine: a Ray cluster of several raylets on this host (ray.cluster_utils),
``tally serve --address`` on it, one gateway per node, nodes removed mid-stream.

Each node's gateway listens on ports of its own (``--http-port 0 --tcp-port 0``:
every raylet here shares 127.0.0.1), and ``tally serve`` prints where. Ray's
health checks are tightened so that a killed node is noticed in about 3 s
instead of about 16.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from served import TALLY

from tally.client import TallyClient

ray = pytest.importorskip("ray")
from ray._private.state import jobs as ray_jobs  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

HEALTH = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 1000,
    "health_check_failure_threshold": 2,
    "health_check_timeout_ms": 1000,
}
NODE = {"num_cpus": 1, "object_store_memory": 80 * 1024 * 1024}
GATEWAY_LINE = re.compile(
    r"tally: gateway on node \S+ \((\w+)\): HTTP http://127\.0\.0\.1:(\d+), TCP 127\.0\.0\.1:(\d+)"
)
LOST_LINE = re.compile(r"tally: gateway lost with its node: node \S+ \((\w+)\)")
T0 = 1_790_000_000  # 2026-09-21, long enough ago that every month is history by now
SERIES = [f"s{i}" for i in range(40)]  # over every shard


class ClusterService:
    """A Cluster and ``tally serve --address`` on it, its output read as it comes."""

    def __init__(self, tmp: Path) -> None:
        # for this process's Ray (the cluster's nodes, ray.init) until stop(): left set, it
        # changed every later test's `tally serve` (token auth off in a whole run, on alone)
        self.env = pytest.MonkeyPatch()
        self.env.setenv("RAY_AUTH_MODE", "disabled")
        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={**NODE, "include_dashboard": False, "_system_config": HEALTH},
        )
        self.workers = [self.cluster.add_node(**NODE) for _ in range(2)]
        self.tmp = tmp
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.proc = self.launch()
        ray.init(address=self.cluster.address, namespace="tally", log_to_driver=False)

    def launch(self) -> subprocess.Popen:
        """``tally serve`` on the cluster, its output read into ``lines`` as it comes."""
        proc = subprocess.Popen(
            [TALLY, "serve", "--address", self.cluster.address,
             "--store", f"sqlite:///{self.tmp / 'tally.db'}", "--shards", "4",
             "--checkpoint-interval", "0.5", "--http-port", "0", "--tcp-port", "0"],
            cwd=self.tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"},
        )
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()
        return proc

    def _read(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with self.changed:
                self.lines.append(line.rstrip())
                self.changed.notify_all()

    def wait_for(self, what: re.Pattern[str], count: int, timeout: float = 120) -> list[re.Match]:
        """The first ``count`` lines matching ``what``, once printed."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                found = [m for m in map(what.search, self.lines) if m]
                if len(found) >= count:
                    return found[:count]
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    log = self.tmp / "serve.log"
                    log.write_text("\n".join(self.lines))
                    raise AssertionError(f"no {what.pattern!r} line; the output is in {log}")
                self.changed.wait(min(left, 1.0))

    def gateways(self) -> dict[str, tuple[int, int]]:
        """node id prefix -> (http port, tcp port) of every gateway listening now."""
        lost = {m.group(1) for m in map(LOST_LINE.search, self.lines) if m}
        return {m.group(1): (int(m.group(2)), int(m.group(3)))
                for m in map(GATEWAY_LINE.search, self.lines) if m and m.group(1) not in lost}

    def shard_nodes(self, shards: int = 4) -> dict[str, str]:
        """shard actor name -> the node it runs on, for those answering now."""
        out = {}
        for i in range(shards):
            name = f"tally-shard-{i}"
            try:
                out[name] = ray.get(ray.get_actor(name).ready.remote(), timeout=5)["node"]
            except (ray.exceptions.RayError, TimeoutError):
                continue  # restarting: not placed yet
        return out

    def stop(self) -> int:
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(90)
        finally:
            ray.shutdown()
            self.cluster.shutdown()
            self.env.undo()
            (self.tmp / "serve.log").write_text("\n".join(self.lines))  # to read after a failure


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterService]:
    service = ClusterService(tmp_path_factory.mktemp("cluster"))
    try:
        service.wait_for(GATEWAY_LINE, 3)
        yield service
    finally:
        code = service.stop()
        output = "\n".join(service.lines)
        assert code == 0, output[-5000:]
        assert "final checkpoint written" in output


def total(http_port: int, metric: str, tags: dict[str, str] | None = None) -> int:
    params = [("tenant", "acme"), ("metric", metric), ("from", "2026-09-01"),
              ("to", "2026-10-01"), ("granularity", "month"),
              *(("where", f"{k}:{v}") for k, v in (tags or {}).items())]
    answer = httpx.get(f"http://127.0.0.1:{http_port}/v1/series", params=params, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()["total"]


def test_a_series_acknowledged_by_one_gateway_is_found_at_once_by_another(served):
    (http_a, tcp_a), (http_b, tcp_b) = list(served.gateways().values())[:2]
    with TallyClient("127.0.0.1", tcp_a) as warm:
        warm.inc("acme", "peers", 1, tags={"k": "first"}, ts=T0)
        warm.flush(durable=False)
    # gateway B loads the metric now, and so holds a series index for it
    assert total(http_b, "peers") == 1
    for n in range(5):
        with TallyClient("127.0.0.1", tcp_a) as client:
            client.inc("acme", "peers", 10 + n, tags={"k": f"new{n}"}, ts=T0)
            client.flush(durable=False)  # acknowledged as received: visible everywhere
        assert total(http_b, "peers", {"k": f"new{n}"}) == 10 + n
    assert total(http_b, "peers") == 1 + sum(10 + n for n in range(5))


def stream_through_a_lost_node(served: ClusterService, graceful: bool, metric: str) -> None:
    """Producers on a worker node's gateway and on the head's; that node goes mid-stream.

    The shards were spread over the nodes when the service started (round
    robin over three nodes), so the node takes shards with it: they restart
    on the nodes left and recover from the store, and the producers resend
    what was not yet durable.
    """
    holding = set(served.shard_nodes().values())
    node = next(w for w in served.workers if w.node_id in holding)
    served.workers.remove(node)
    node_id = node.node_id
    ports = served.gateways()
    tcp_there = next(tcp for prefix, (_, tcp) in ports.items() if node_id.startswith(prefix))
    head = served.cluster.head_node.node_id
    http_here, tcp_here = next(p for prefix, p in ports.items() if head.startswith(prefix))
    sent = {"there": 0, "here": 0}
    stop = threading.Event()
    failures: list[BaseException] = []

    def produce(name: str, port: int, fallbacks: list[tuple[str, int]]) -> None:
        try:
            with TallyClient("127.0.0.1", port, fallbacks=fallbacks, batch_size=2_000,
                             linger=0.01, timeout=30, backoff=(0.2, 1.0)) as client:
                n = 0
                while not stop.is_set():
                    for i, s in enumerate(SERIES):
                        client.inc("acme", metric, 1 + i % 3, tags={"s": s},
                                   ts=T0 + 3600 * (n % 48))
                        sent[name] += 1 + i % 3
                    n += 1
                    time.sleep(0.002)
                client.flush(timeout=120)  # durable: everything kept was resent and landed
        except BaseException as e:  # reported by the test below, not lost with the thread
            failures.append(e)

    threads = [
        threading.Thread(target=produce, args=("there", tcp_there, [("127.0.0.1", tcp_here)])),
        threading.Thread(target=produce, args=("here", tcp_here, [])),
    ]
    for t in threads:
        t.start()
    time.sleep(3)
    moved = [name for name, n in served.shard_nodes().items() if n == node_id]
    assert moved, f"no shard on the node to remove: {served.shard_nodes()}"
    lost_at = time.monotonic()
    served.cluster.remove_node(node, allow_graceful=graceful)
    # the service answers again: every shard (moved ones too) applies a new producer's batch
    while True:
        try:
            with TallyClient("127.0.0.1", tcp_here, timeout=5) as probe:
                probe.inc("acme", f"{metric}.probe", 1, ts=T0)
                probe.flush(timeout=5, durable=False)
            break
        except Exception:
            # bounds a hang only: with three raylets on a 2-core CI machine, noticing the
            # loss (~3 s) and restarting and recovering shards take what the machine allows
            assert time.monotonic() - lost_at < 90, "no answer 90 s after the node was lost"
    answered_after = time.monotonic() - lost_at
    time.sleep(2)  # the stream goes on a while after the recovery
    stop.set()
    for t in threads:
        t.join(180)
    assert not failures, failures
    assert not set(served.shard_nodes().values()) & {node_id}, "a shard is left on a lost node"
    print(f"answered {answered_after:.1f} s after the node was lost; moved {moved}")
    assert total(http_here, metric) == sent["there"] + sent["here"]
    per_series = {s: total(http_here, metric, {"s": s}) for s in SERIES[:3]}
    assert sum(per_series.values()) > 0
    assert sent["there"] > 0 and sent["here"] > 0
    served.wait_for(re.compile(rf"tally: gateway lost with its node: node \S+ \({node_id[:12]}\)"),
                    1, timeout=30)


def test_graceful_node_removal_mid_stream_keeps_totals_exact(served):
    stream_through_a_lost_node(served, graceful=True, metric="graceful")


def test_a_new_node_gets_a_gateway_that_takes_increments(served):
    """Even after the supervisor itself was killed: it restarts and takes over."""
    supervisor = ray.get_actor("tally-supervisor")
    assert ray.get(supervisor.endpoints.remote()), "the supervisor reports no gateway"
    ray.kill(supervisor, no_restart=False)
    node = served.cluster.add_node(**NODE)
    served.workers.append(node)
    served.wait_for(re.compile(rf"tally: gateway on node \S+ \({node.node_id[:12]}\)"), 1)
    http_new, tcp_new = next(p for prefix, p in served.gateways().items()
                             if node.node_id.startswith(prefix))
    with TallyClient("127.0.0.1", tcp_new) as client:
        for i, s in enumerate(SERIES):
            client.inc("acme", "newnode", i, tags={"s": s}, ts=T0)
    assert total(http_new, "newnode") == sum(range(len(SERIES)))


def test_killed_node_mid_stream_keeps_totals_exact(served):
    stream_through_a_lost_node(served, graceful=False, metric="killed")


def test_the_service_outlives_its_driver_and_a_new_one_adopts_it(served):
    """On a cluster the actors are detached: a driver killed outright (a lost ssh
    session) leaves tally serving, and ``tally serve`` again takes it over."""
    head = served.cluster.head_node.node_id
    http, tcp = next(p for prefix, p in served.gateways().items() if head.startswith(prefix))
    with TallyClient("127.0.0.1", tcp) as client:
        client.inc("acme", "orphan", 5, ts=T0)
    driver = served.proc.pid
    os.kill(driver, signal.SIGKILL)
    served.proc.wait(30)
    # The cluster has noticed (the driver's job is marked dead) and then had 2 s for what
    # it cleans up after a dead driver: without the first, a slow machine could check the
    # service before Ray did anything to it.
    deadline = time.monotonic() + 60
    while not any(j["DriverPid"] == driver and j["IsDead"] for j in ray_jobs()):
        assert time.monotonic() < deadline, "the killed driver's job is not marked dead"
        time.sleep(0.2)
    time.sleep(2)
    with TallyClient("127.0.0.1", tcp) as client:
        client.inc("acme", "orphan", 7, ts=T0)  # durable on close: the shards still checkpoint
    assert total(http, "orphan") == 12
    before = len(served.lines)
    served.proc = served.launch()
    served.wait_for(re.compile("tally: adopted the service already running"), 1)
    served.wait_for(re.compile(r"tally: serving HTTP"), 2)
    assert len(served.lines) > before
    assert total(http, "orphan") == 12  # the same gateway, still listening

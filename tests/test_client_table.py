"""The client's producer series table (client/table.py): series numbered once, defined on
each connection with ``series`` frames, batches that carry no table.

The core without I/O (which frames go out, in which order, after a reconnect),
then the threaded client against the real TCP server through a proxy that cuts
its connections: every kept batch is resent after the table is defined again,
and the totals are exact.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import msgpack
import numpy as np
import pytest

from tally.client import TallyClient
from tally.client.core import ProducerCore
from tally.client.table import ProducerTable

NOW = int(time.time())
DAY = time.strftime("%Y-%m-%d", time.gmtime(NOW))


def entry(k: int, tenant: str = "acme") -> bytes:
    return msgpack.packb([tenant, "msgs", {"agent": f"a{k}"}])


def decode(frame: bytes) -> dict:
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4
    return msgpack.unpackb(frame[4:], raw=False)


def connected(core: ProducerCore) -> None:
    core.connection_made(0.0)
    core.receive({"op": "welcome", "v": 1, "durable_seq": 0}, 0.0)


def test_entries_are_defined_once_per_connection_and_frames_index_them() -> None:
    core = ProducerCore("p", first_seq=1, linger=None)
    connected(core)
    core.add_columnar(1, [entry(0), entry(1)], [1, 0, 1], [NOW] * 3, [5, 6, 7])
    sent = [decode(f) for f in core.take_frames(0.0)]
    core.add_columnar(2, [entry(1), entry(2)], [0, 1], [NOW] * 2, [1, 2])
    sent += [decode(f) for f in core.take_frames(0.0)]
    assert [m["op"] for m in sent] == ["series", "inc", "series", "inc"]
    assert sent[0] == {"op": "series", "base": 0, "series": [
        ["acme", "msgs", {"agent": "a0"}], ["acme", "msgs", {"agent": "a1"}]]}
    assert "series" not in sent[1] and np.frombuffer(sent[1]["i"], "<u4").tolist() == [1, 0, 1]
    assert sent[2]["base"] == 2 and sent[2]["series"] == [["acme", "msgs", {"agent": "a2"}]]
    assert np.frombuffer(sent[3]["i"], "<u4").tolist() == [1, 2]  # numbers, not the batch's
    for answer in ({"op": "defined", "base": 0, "count": 2}, {"op": "ack", "seq": 1, "rows": 3},
                   {"op": "defined", "base": 2, "count": 3}, {"op": "ack", "seq": 2, "rows": 2}):
        core.receive(answer, 0.0)
    assert not core.inflight and core.fatal is None

    # A new connection holds no table: all of it is defined again before the resends.
    core.disconnected("cut")
    connected(core)
    again = [decode(f) for f in core.take_frames(0.0)]
    assert [m["op"] for m in again] == ["series", "inc", "inc"]
    assert again[0]["base"] == 0 and len(again[0]["series"]) == 3
    assert [m["seq"] for m in again[1:]] == [1, 2]


def test_a_refused_definition_fails_the_client_with_a_clear_error() -> None:
    core = ProducerCore("p", first_seq=1, linger=None)
    connected(core)
    core.add_columnar(1, [entry(0)], [0], [NOW], [1])
    core.take_frames(0.0)
    core.receive({"op": "error", "seq": None, "code": "bad_request", "message": "unknown op"}, 0)
    assert core.fatal is not None and "series table" in str(core.fatal)


def test_a_full_table_leaves_the_batch_its_own_table() -> None:
    core = ProducerCore("p", first_seq=1, linger=None)
    core.table = ProducerTable(limit=2)
    connected(core)
    core.add_columnar(1, [entry(0), entry(1)], [0, 1], [NOW] * 2, [1, 1])
    core.add_columnar(2, [entry(2), entry(0)], [0, 1, 1], [NOW] * 3, [1, 2, 3])
    sent = [decode(f) for f in core.take_frames(0.0)]
    assert [m["op"] for m in sent] == ["series", "inc", "inc"]
    assert len(core.table) == 2  # nothing of the refused batch was numbered
    assert sent[2]["series"] == [["acme", "msgs", {"agent": "a2"}],
                                 ["acme", "msgs", {"agent": "a0"}]]
    assert np.frombuffer(sent[2]["i"], "<u4").tolist() == [0, 1, 1]


def test_an_index_past_the_entries_is_refused_and_nothing_is_kept() -> None:
    core = ProducerCore("p", first_seq=1, linger=None)
    with pytest.raises(ValueError, match="below len"):
        core.add_columnar(1, [entry(0)], [0, 1], [NOW] * 2, [1, 1])
    assert not core.kept and len(core.table) == 0


def test_a_rejected_batch_names_its_increment_through_the_table() -> None:
    core = ProducerCore("p", first_seq=1, linger=None)
    connected(core)
    core.add_columnar(1, [entry(0), entry(1, "beta")], [0, 1], [NOW, NOW], [1, 2])
    core.take_frames(0.0)
    core.receive({"op": "defined", "base": 0, "count": 2}, 0.0)
    core.receive({"op": "error", "seq": 1, "code": "bad_row", "row": 1,
                  "message": "row 1: no"}, 0.0)
    (rejected,) = core.rejections
    assert rejected.increment == ("beta", "msgs", {"agent": "a1"}, NOW, 2)


# -- against the real server ---------------------------------------------------------------


class CuttingProxy:
    """Forwards a local port to the server; ``cut()`` closes every open connection."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            with self.lock:
                self.open += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(1 << 16):
                b.sendall(data)
        except OSError:
            pass  # the other side was cut: this pipe ends with it
        for s in (a, b):
            with contextlib.suppress(OSError):  # (already shut)
                s.shutdown(socket.SHUT_RDWR)

    def wait_open(self, timeout: float = 30) -> None:
        """Until the client connected again since the last cut (however slow the machine)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if self.open:
                    return
            time.sleep(0.005)
        raise AssertionError("the client did not connect through the proxy")

    def cut(self) -> None:
        with self.lock:
            for s in self.open:
                with contextlib.suppress(OSError):  # (already shut)
                    s.shutdown(socket.SHUT_RDWR)
            self.open = []

    def close(self) -> None:
        self.cut()
        self.listener.close()


def test_batches_over_the_table_count_exactly_across_cut_connections(tally) -> None:
    proxy = CuttingProxy(tally.tcp_port)
    rng = np.random.default_rng(3)
    entries = [entry(k) for k in range(3000)]
    want = 0
    try:
        with TallyClient("127.0.0.1", proxy.port, linger=None, first_seq=1,
                         backoff=(0.01, 0.05), timeout=10) as client:
            for seq in range(1, 41):
                chosen = rng.choice(len(entries), size=500, replace=False)
                index = rng.integers(0, 500, size=2000)
                values = rng.integers(1, 100, size=2000)
                client.send_columnar(seq, [entries[k] for k in chosen.tolist()], index,
                                     np.full(2000, NOW), values)
                want += int(values.sum())
                if seq % 10 == 5:
                    time.sleep(0.05)
                    proxy.wait_open()  # (so that each cut ends a connection)
                    proxy.cut()  # whatever is in flight, acked or not
            client.flush(durable=True, timeout=60)
            stats = client.stats
        assert tally.total("acme", "msgs", DAY) == want
        assert stats["reconnects"] >= 4 and stats["rejected"] == 0
    finally:
        proxy.close()

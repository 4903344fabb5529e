"""The bench's sender: every frame answered and counted, and a phase timed to its
last answer.

The peer here is a plain socket server that speaks just enough of the protocol
(welcome, then an ack per frame, or `overloaded` once for one seq): what is under
test is the sender's own bookkeeping, which every figure of `tally bench` rests on.
"""

from __future__ import annotations

import socket
import threading
import time

from tally.bench.ingest import Stream, run_streams
from tally.bench.workload import Workload
from tally.wire.frames import FrameDecoder, encode_frame


class AckingPeer:
    """Accepts one connection; answers hello with welcome and each inc with an ack,
    except the first frame of seq ``refuse`` (answered `overloaded`)."""

    def __init__(self, refuse: int | None = None) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.refuse = refuse
        self.seqs: list[int] = []
        self.last_sent = 0.0  # perf_counter just before the last answer was written
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        decoder = FrameDecoder()
        with conn:
            while data := conn.recv(1 << 16):
                for msg in decoder.feed(data):
                    if msg["op"] == "hello":
                        reply = {"op": "welcome", "v": 1}
                    elif msg["seq"] == self.refuse:
                        self.refuse = None
                        reply = {"op": "error", "seq": msg["seq"], "code": "overloaded",
                                 "message": "busy"}
                    else:
                        self.seqs.append(msg["seq"])
                        reply = {"op": "ack", "seq": msg["seq"], "rows": 1}
                    # (stamped before the send: the reader may stamp its receipt before
                    # this thread runs again after it)
                    self.last_sent = time.perf_counter()
                    conn.sendall(encode_frame(reply))

    def close(self) -> None:
        self.listener.close()
        self.thread.join(5)


def test_every_frame_is_acked_once_and_a_refused_one_is_resent_and_counted():
    work = Workload(50, 0)
    chunks = work.columnar_chunks(1_000, distinct=3)
    peer = AckingPeer(refuse=4)
    try:
        stream = Stream(peer.port, chunks, frames=10)
        run_streams([stream])
    finally:
        peer.close()
    assert sorted(peer.seqs) == list(range(1, 11))
    assert stream.refused == 1 and not stream.errors
    assert stream.acked_increments == 10_000
    assert stream.acked_total == sum(chunks[k % 3].total for k in range(10))


def test_a_phase_ends_at_its_last_answer_not_when_the_sender_is_joined():
    # The sender learns it is done only after the last answer is read, and the reader
    # then waits in select(): the phase must not be charged for that wait. (It once
    # was, up to a second per phase: a third of a short cell's time.)
    work = Workload(50, 0)
    peer = AckingPeer()
    try:
        stream = Stream(peer.port, work.columnar_chunks(1_000, distinct=2), frames=6)
        before = time.perf_counter()
        seconds = run_streams([stream])
        after = time.perf_counter()
    finally:
        peer.close()
    assert stream.acked_increments == 6_000
    # the phase began inside the call and ended at the last answer the stream read
    assert before <= stream.last_answer - seconds <= after
    assert stream.last_answer >= peer.last_sent

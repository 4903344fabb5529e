"""Sending pre-encoded frames over raw TCP connections and timing them to the last ack."""

from __future__ import annotations

import multiprocessing
import select
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from tally.bench.workload import Chunk, frame
from tally.wire.frames import FrameDecoder, encode_frame

RESEND_BACKOFF = 0.02  # seconds before resending a batch refused `overloaded`


@dataclass
class Stream:
    """One connection's frames, sent by one thread while another reads the acks."""

    port: int
    chunks: list[Chunk]
    frames: int
    producer: str = field(default_factory=lambda: f"bench-{uuid.uuid4().hex[:12]}")
    acked_increments: int = 0
    acked_total: int = 0
    errors: list[dict] = field(default_factory=list)
    stop: Any = None  # an Event (threading or multiprocessing): when set, stop early
    rate: float | None = None  # increments per second to pace at (background streams)
    sent: int = 0
    table: list | None = None  # a series table to define on the connection first
    # resend what is refused `overloaded` (backpressure), as a producer must; counted
    resend: bool = True
    refused: int = 0
    # perf_counter of the last answer read: a phase ends there, not when the threads
    # are joined (which may be a select timeout later)
    last_answer: float = 0.0
    connect_seconds: float = 0.0  # connecting, hello and the series table, before the phase

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(encode_frame({"op": "hello", "v": 1, "token": None,
                                   "producer": self.producer}))
        decoder = FrameDecoder()
        expect = ["welcome"]
        if self.table is not None:
            sock.sendall(encode_frame({"op": "series", "base": 0, "series": self.table}))
            expect.append("defined")
        while expect:
            for msg in decoder.feed(sock.recv(65536)):
                assert msg["op"] == expect.pop(0), msg
        return sock

    def run(self, sock: socket.socket | None = None) -> None:
        """Send every frame and read every answer (on ``sock``, connected already, or a
        connection of its own)."""
        if sock is None:
            sock = self.connect()
        chunks = self.chunks

        def chunk_of(seq: int) -> Chunk:
            return chunks[(seq - 1) % len(chunks)]

        window = threading.Semaphore(16)  # frames in flight: a bounded pipeline
        failed: list[BaseException] = []
        lock = threading.Lock()
        outstanding = [0]  # frames sent and not yet acknowledged or refused for good
        self.resends = deque()

        def send() -> None:
            try:
                sending()
            except BaseException as e:  # kept: run() raises it, the bench never hangs on it
                failed.append(e)
            finally:
                self.sending_done = True

        def sending() -> None:
            started, increments = time.perf_counter(), 0
            seq = 1
            while seq <= self.frames or self.resends or outstanding[0]:
                window.acquire()
                if self.stop is not None and self.stop.is_set():
                    break
                if self.resends:  # refused `overloaded`: back off, resend in seq order
                    time.sleep(RESEND_BACKOFF)
                    again = self.resends.popleft()
                    sock.sendall(frame(chunk_of(again), again))
                    self.sent += 1
                    continue
                if seq > self.frames:  # only answers to wait for: they may bring resends
                    window.release()
                    time.sleep(0.005)
                    continue
                if self.rate:
                    ahead = increments / self.rate - (time.perf_counter() - started)
                    if ahead > 0:
                        time.sleep(ahead)
                chunk = chunk_of(seq)
                with lock:
                    outstanding[0] += 1
                sock.sendall(frame(chunk, seq))
                increments += chunk.increments
                self.sent += 1
                seq += 1

        self.sending_done = False
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        decoder = FrameDecoder()
        answered = 0
        # The socket stays blocking: a timeout set here would apply to the sender's
        # sendall too, which may wait longer than that while the server works.
        while not (self.sending_done and (failed or answered == self.sent)):
            # (short: the sender may finish just after the last answer is read, and the
            # phase is timed to that answer, but a long wait here is wall time all the same)
            readable, _, _ = select.select([sock], [], [], 0.01)
            if not readable:
                continue
            data = sock.recv(1 << 16)
            if not data:
                raise ConnectionError("the server closed a bench connection")
            for msg in decoder.feed(data):
                if msg.get("op") == "durable":
                    continue
                answered += 1
                self.last_answer = time.perf_counter()
                if msg.get("op") == "ack":
                    chunk = chunk_of(msg["seq"])
                    self.acked_increments += chunk.increments
                    self.acked_total += chunk.total
                    with lock:
                        outstanding[0] -= 1
                elif msg.get("code") == "overloaded" and self.resend:
                    self.refused += 1
                    self.resends.append(msg["seq"])
                else:
                    self.errors.append(msg)
                    with lock:
                        outstanding[0] -= 1
                window.release()
        sender.join()
        sock.close()
        if failed:
            raise failed[0]


def run_streams(streams: list[Stream]) -> float:
    """Connect every stream, then run them at once; seconds from the first frame to the
    last answer.

    Connecting (hello, and defining a series table, which for a wide table takes a
    while) is done first and kept in each stream's ``connect_seconds``, not in the
    phase: a producer's connection lives for far more frames than a phase sends.
    """
    socks = []
    for s in streams:
        began = time.perf_counter()
        socks.append(s.connect())
        s.connect_seconds = time.perf_counter() - began
    threads = [threading.Thread(target=s.run, args=(sock,), daemon=True)
               for s, sock in zip(streams, socks, strict=True)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return max([s.last_answer for s in streams] + [started]) - started


def _background_main(stream: Stream, stop: Any, ready: Any, results: Any) -> None:
    stream.stop = stop
    ready.set()
    try:
        stream.run()
    finally:
        results.put((stream.acked_increments, stream.acked_total, stream.errors))


class Background:
    """A paced stream in a process of its own, beside a latency sampler.

    Run as a thread it would share the sampler's GIL, and every query would
    wait for the sender's Python work: the figure would be the bench's, not
    tally's. A producer and a dashboard are different processes in real use.
    """

    def __init__(self, stream: Stream) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.stream = stream
        self._stop = ctx.Event()
        self._ready = ctx.Event()
        self._results = ctx.Queue()
        self._process = ctx.Process(
            target=_background_main, args=(stream, self._stop, self._ready, self._results),
            daemon=True,
        )

    def start(self, warm_up: float = 1.0) -> None:
        """Start, and return once the stream has been sending for ``warm_up`` seconds."""
        self._process.start()
        if not self._ready.wait(60):
            raise RuntimeError("the background sender did not start")
        time.sleep(warm_up)

    def finish(self, timeout: float = 120) -> Stream:
        """Stop sending, wait for the last ack; the stream's counts are then filled in."""
        self._stop.set()
        s = self.stream
        s.acked_increments, s.acked_total, s.errors = self._results.get(timeout=timeout)
        self._process.join(timeout)
        return s

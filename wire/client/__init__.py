"""Python client for tally's wire protocol v1: exactly-once increments, end to end.

Two clients share one sans-I/O core (``ProducerCore``) and differ only in how
they move bytes: ``TallyClient`` (synchronous, thread-safe, one background I/O
thread) and ``AsyncTallyClient`` (asyncio, the same API with ``await``).
``Connection`` is the one-request-at-a-time connection, for tests and scripts
that want to see each answer. This package needs msgpack and numpy only
(``pip install ./wire``), never the server's dependencies.

Usage::

    from tally.client import AsyncTallyClient, TallyClient

    with TallyClient("127.0.0.1", 8781, producer="billing-worker-3") as tally:
        tally.inc("acme", "messages.received", tags={"channel": "email"})
        tally.inc("acme", "messages.handled", 3, ts=1764158400, tags={"agent": "ann"})
        tally.flush()      # returns once every increment above is durable
    # leaving the block flushes (durable) and closes

    async with AsyncTallyClient("127.0.0.1", 8781) as tally:
        await tally.inc("acme", "logins")

Events go through the same machinery: ``tally.event("acme", "message.replied",
agent="ann", channel="email", response_seconds=95)`` buffers one raw event;
the server's fan-out rules turn it into increments.

What it promises (design guarantee 3)
-------------------------------------
Every ``inc`` that returned without raising is applied exactly once by the
server, provided the client process lives until ``flush(durable=True)`` or
``close()`` returns without raising. In between, connections may break,
time out, the server may refuse with ``overloaded`` or crash and restart:

- Increments are buffered and sent as columnar ``inc`` batches (a series
  table plus little-endian ``<u4`` index, ``<i8`` ts and ``<i8`` value
  arrays). A batch is sealed when it holds ``batch_size`` increments, when
  ``linger`` seconds have passed since its first increment, when the next
  increment would take the frame over ``max_batch_bytes`` (so the server
  never has to answer ``too_large``), or on ``flush``.
- A sealed batch gets the next ``seq`` and is encoded once; its frame is
  kept, byte for byte, until the server says it is durable. Batches go out
  with ``ack: "durable"``; ``{"op": "durable", "seq": s}`` means every batch
  of this producer up to ``s`` is checkpointed, and those are dropped.
  ``ack`` answers mean applied and visible to queries (what
  ``flush(durable=False)`` waits for).
- Up to ``max_in_flight`` batches are pipelined on one connection; answers
  come back in order and are read off the caller's thread (the I/O thread,
  or a reader task).
- On a broken connection, or when the oldest batch in flight has had no
  answer for ``timeout`` seconds, the client reconnects with capped
  exponential backoff and jitter, sends ``hello``, drops every kept batch up
  to ``welcome.durable_seq`` and resends every other kept batch in seq
  order, unchanged. The server applies a batch at most once per
  ``(producer, seq)``, so what was applied before the break is only
  acknowledged again, and what a crashed server lost is applied again.

Producers and seqs
------------------
``producer`` names the stream of seqs the server deduplicates. It defaults to
a fresh ``python-<uuid4>`` per client instance. Two live clients must never
share a name (the server fences the older connection, and seqs would
collide); the client fails with ``ProducerConflict`` when it can tell.

Seqs start at the wall clock in microseconds (``time.time_ns() // 1000``) and
then count up by one per batch. A restarted process that reuses its producer
name therefore starts above every seq its previous incarnation could have
sent, even those the server applied but never made durable; starting at
``durable_seq + 1`` instead would make the server skip new batches as
resends of old ones. Resending a *crashed client's* batches would need them
on disk: this client keeps them in memory only, so a crash of the client
process loses the increments not yet durable (``pending`` says how many).
A stable name is necessary for such a spool, not sufficient.

Errors
------
Every error is a ``TallyError``. ``inc`` validates what is cheap to check on
the caller's thread -- types, the series (tenant, metric, tags, with the
server's own rules, cached per series), int64 ranges, a ts at most an hour
ahead of this machine's clock -- and raises ``TypeError`` or ``ValueError``
(``InvalidSeries``) at once, without buffering anything. That matters more
than it looks: the server refuses a batch all or nothing, so one bad
increment would take up to ``batch_size - 1`` good ones down with it.

What the server can still refuse (a ts ahead of *its* clock, an hour slot
pushed out of int64) arrives later, from the I/O thread:

- ``bad_row`` / ``bad_request`` for a batch, or ``unauthorized`` for a batch
  naming a tenant the token does not cover: permanent. The batch is dropped
  and a ``BatchRejected`` (``.code``, ``.row``, ``.seq``, ``.increments``,
  ``.increment`` -- the offending increment when the server named a row) is
  raised from the next ``inc``, ``flush`` or ``close`` call, once, in any
  thread. An ``inc`` that raises it did not buffer its own increment; a
  ``flush`` raises it after its wait. Pass ``on_error`` to receive rejections
  in a callback instead (run on the I/O thread or task; keep it short; if it
  raises, the client stops with ``ClientFailed``).
- ``overloaded`` (and ``internal``): transient. The client stops sending,
  waits for the answers still in flight, backs off, then resends the refused
  batch and everything after it in seq order. (The server refuses later seqs
  of a producer until the refused one comes back, so nothing overtakes it.)
- ``unauthorized`` in answer to ``hello`` (no valid token, or one without the
  ``ingest`` scope): raised as ``Unauthorized``; the client stops, it does not
  retry.
- ``too_large``, a server that does not answer ``welcome.durable_seq`` (one
  without durable acks), a server that is not a tally wire endpoint, a
  producer conflict, an exception in the I/O thread or task: the client stops
  and raises a ``ClientFailed`` from every later call. These are bugs or
  misconfiguration, and a loop of retries would only hide them.

A fatal error is raised from the first call after the I/O side learns of it,
so which call that is depends on when the answer arrives: ``inc`` right after
the client is made usually runs before the server has answered ``hello``.
``wait_connected()`` waits for that answer, for a producer that wants a
wrong token or port to fail at a known call, at start-up.

``flush`` raises ``TallyTimeout`` (a ``TimeoutError``) when its wait runs out;
the batches stay kept and the client keeps trying, so calling ``flush`` again
is safe. Its message says what is missing and the last problem seen (e.g. the
connection refused while the server is down).

Events
------
``event`` batches raw events the same way, in ``event`` frames (an open
event batch beside the open increment batch; ``flush`` and the linger seal
both), with the same seqs, durability and resend. The client checks the
envelope (tenant, type, ts, fields that msgpack can carry) but not the
rules, which live on the server: an event the server's rules refuse (a type
no rule covers, a missing or mistyped field) takes its whole batch down, and
``BatchRejected.event`` is the event the server named. Producers that cannot
afford that validate their events first, or flush each one. ``pending`` and
``BatchRejected.increments`` count an event as one (the increments it makes
are known to the server only).

Memory
------
``max_pending`` bounds the increments held: buffered plus sent but not yet
durable. Once reached, ``inc`` blocks (awaits) until durable answers free
room -- backpressure, never a silent drop -- and raises ``TallyTimeout``
without buffering when that takes longer than ``timeout``. Each kept
increment costs about 20 bytes of frame (plus its series entries), so the
default 2,000,000 holds about 40 MiB and several seconds of checkpoint lag
at a high rate. Set it from (increments per second) x (checkpoint interval
+ a few seconds).

Producers that number their batches
------------------------------------
A producer whose seqs must name the same increments in every run (``tally
import``: a chunk of a file is one batch, its seq the byte offset where the
chunk ends, so a rerun resumes where the server's ``durable_seq`` says) sets
``first_seq``, ``linger=None`` (no batch sealed on a timer) and a
``batch_size`` and ``max_batch_bytes`` its batches stay under, then closes
each batch with ``seal(seq)``. ``take_rejections()`` hands it the refusals
queued so far instead of raising them, and ``abort()`` stops without sealing
the open batch, as a crash would, where ``close`` would seal it under the
next seq.

Threads and tasks
-----------------
``TallyClient`` may be shared by any number of threads; ``inc`` takes one
lock for a few list appends and wakes the I/O thread only when a batch is
sealed or starts. The I/O thread is a daemon: without ``close()``, what is
not durable at interpreter exit is lost. ``AsyncTallyClient`` belongs to
the event loop that first uses it and is not thread-safe.

Modules
-------
``errors`` (every error raised), ``validation`` (what ``inc`` and ``event``
check on the caller's thread), ``batching`` (open and kept batches, as wire
frames), ``core`` (``ProducerCore``, the protocol state without I/O),
``shell`` (what both clients share), ``threaded`` (``TallyClient``),
``asyncio_client`` (``AsyncTallyClient``), ``connection`` (``Connection``).
"""

from tally.client.asyncio_client import AsyncTallyClient
from tally.client.connection import Connection
from tally.client.errors import (
    BatchRejected,
    ClientClosed,
    ClientFailed,
    ProducerConflict,
    ProtocolMismatch,
    ServerError,
    TallyError,
    TallyTimeout,
    Unauthorized,
)
from tally.client.threaded import TallyClient
from tally.wire.series import InvalidSeries
from tally.wire.vocabulary import ErrorCode

__all__ = [
    "AsyncTallyClient",
    "BatchRejected",
    "ClientClosed",
    "ClientFailed",
    "Connection",
    "ErrorCode",
    "InvalidSeries",
    "ProducerConflict",
    "ProtocolMismatch",
    "ServerError",
    "TallyClient",
    "TallyError",
    "TallyTimeout",
    "Unauthorized",
]

"""The query socket between a gateway and a shard (actors/channel.py), over real sockets.

What a user notices: the same counts as the Ray call, and never a wrong or
missing answer when the socket cannot give one: then FALLBACK sends the
query to Ray, which answers as before.
"""

from __future__ import annotations

import asyncio
import calendar
from typing import Any

import numpy as np
import pytest

from tally.actors.channel import FALLBACK, RETRY_AFTER, AnswerLost, ChannelServer, ShardChannel
from tally.actors.shard_state import Outcome, ShardState
from tally.api.metrics import GatewayMetrics
from tally.checkpoint.sqlite import SqliteStore
from tally.wire.batches import INT64_MAX, rows_batch
from tally.wire.frames import encode_frame
from tally.wire.registry import SeriesRegistry

NOW = calendar.timegm((2026, 11, 20, 12, 0, 0))
DAY = calendar.timegm((2026, 11, 2, 0, 0, 0))
H0, H1 = DAY // 3600, DAY // 3600 + 31 * 24


@pytest.fixture
def state(tmp_path):
    store = SqliteStore(str(tmp_path / "s.db"))
    s = ShardState(0, store.open_shard(0))
    rows = [["acme", "m", {"agent": f"a{k}"}, DAY + 86400 * (k % 18) + 60 * k, k + 1]
            for k in range(40)]
    assert s.ingest(rows_batch(rows, NOW), store.load_months).outcome is Outcome.APPLIED
    s.load = store.load_months
    yield s
    store.close()


def sids(state: ShardState) -> list[str]:
    return sorted(state.series)


def query_of(state: ShardState):
    def query(method: str, sids: list[str], h0: int, h1: int) -> Any:
        return getattr(state, method)(sids, h0, h1, state.load)
    return query


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def serve(state: ShardState, apply: Any = None) -> tuple[ChannelServer, dict[str, Any]]:
    server = ChannelServer(query_of(state), apply)
    return server, await server.start("127.0.0.1")


def test_answers_equal_the_shards_own_and_queries_interleave(state):
    async def main() -> None:
        server, where = await serve(state)
        located = []

        async def locate() -> dict[str, Any]:
            located.append(1)
            return where

        channel = ShardChannel(locate)
        names = sids(state)
        calls = [channel.call("hourly_of", names[k:k + 3], H0, H1) for k in range(0, 40, 3)]
        calls.append(channel.call("totals_of", names, H0, H1))
        got = await asyncio.gather(*calls)
        for k, answer in zip(range(0, 40, 3), got, strict=False):
            expected = state.hourly_of(names[k:k + 3], H0, H1, state.load)
            assert answer.dtype == np.int64 and np.array_equal(answer, expected)
        assert got[-1] == state.totals_of(names, H0, H1, state.load)
        assert sum(got[-1]) == sum(range(1, 41))
        assert located == [1]  # one connection, located once, carried all 15 calls
        assert (channel.answered, channel.fell_back, server.answered) == (15, 0, 15)
        channel.close()
        await server.stop()

    asyncio.run(main())


def test_a_wrong_secret_is_refused_and_ray_answers_until_the_retry(state):
    async def main() -> None:
        server, where = await serve(state)
        clock = Clock()
        locations = [{**where, "secret": "0" * 64}, where]

        async def locate() -> dict[str, Any]:
            return locations.pop(0)

        channel = ShardChannel(locate, clock)
        names = sids(state)
        assert await channel.call("totals_of", names, H0, H1) is FALLBACK
        assert server.answered == 0
        # backing off: not even located again until RETRY_AFTER has passed
        assert await channel.call("totals_of", names, H0, H1) is FALLBACK
        assert len(locations) == 1
        clock.now += RETRY_AFTER
        assert sum(await channel.call("totals_of", names, H0, H1)) == sum(range(1, 41))
        # what an operator sees on /metrics: which road answered
        metrics = GatewayMetrics()
        metrics.watch_channels([channel])
        text = metrics.own_text()
        assert 'tally_shard_queries_total{path="socket"} 1.0' in text
        assert 'tally_shard_queries_total{path="ray"} 2.0' in text
        channel.close()
        await server.stop()

    asyncio.run(main())


def test_a_restarted_shard_is_found_on_its_new_port(state):
    async def main() -> None:
        first, where = await serve(state)
        clock = Clock()
        current = [where]

        async def locate() -> dict[str, Any]:
            return current[0]

        channel = ShardChannel(locate, clock)
        names = sids(state)
        assert len(await channel.call("hourly_of", names, H0, H1)) == H1 - H0
        await first.stop()  # the shard's process died: its connections went with it
        assert channel.conn is not None
        channel.conn.writer.transport.abort()
        await asyncio.sleep(0.01)
        assert await channel.call("hourly_of", names, H0, H1) is FALLBACK
        second, current[0] = await serve(state)
        clock.now += RETRY_AFTER
        assert int((await channel.call("hourly_of", names, H0, H1)).sum()) == sum(range(1, 41))
        assert second.answered == 1
        channel.close()
        await second.stop()

    asyncio.run(main())


def test_an_unreachable_shard_falls_back_to_ray():
    async def main() -> None:
        async def locate() -> dict[str, Any]:
            return {"host": "127.0.0.1", "port": 1, "secret": "x"}  # nothing listens there

        channel = ShardChannel(locate, Clock())
        assert await channel.call("hourly_of", ["acme|m|"], H0, H1) is FALLBACK
        assert channel.fell_back == 1

    asyncio.run(main())


def test_counts_beyond_int64_and_shard_errors_are_left_to_ray(tmp_path):
    """Hourly sums over two series beyond int64, totals beyond 64 bits, a failing store."""
    store = SqliteStore(str(tmp_path / "s.db"))
    state = ShardState(0, store.open_shard(0))
    rows = [["acme", "m", {"agent": a}, DAY + 86400 * d + 60, INT64_MAX]
            for a in ("x", "y") for d in range(3)]
    assert state.ingest(rows_batch(rows, NOW), store.load_months).outcome is Outcome.APPLIED
    state.load = store.load_months

    async def main() -> None:
        server, where = await serve(state)

        async def locate() -> dict[str, Any]:
            return where

        channel = ShardChannel(locate)
        names = sids(state)
        assert await channel.call("hourly_of", names, H0, H1) is FALLBACK
        assert await channel.call("totals_of", names, H0, H1) is FALLBACK
        assert len(await channel.call("hourly_of", names[:1], H0, H1)) == H1 - H0
        store.close()  # the next month's load fails: the Ray call will raise it
        assert await channel.call("hourly_of", names, H0 - 24 * 62, H1) is FALLBACK
        assert channel.conn is not None and channel.conn.open  # still usable
        assert (channel.answered, channel.fell_back) == (1, 3)
        channel.close()
        await server.stop()

    asyncio.run(main())


# ---- batches by socket ----------------------------------------------------


def test_batches_by_socket_are_applied_once_and_answered_as_by_ray(state):
    """A producer's batches: the shard's own answers, a resend recognised, a gap refused,
    the counts added once; a request that is not a batch is left to Ray, unapplied."""
    batch = rows_batch([["acme", "m", {"agent": "new"}, DAY + 120, 5],
                        ["acme", "m", {"agent": "a1"}, DAY + 60, 2]], NOW)

    def totals() -> list[int]:
        return state.totals_of(["acme|m|agent=a1", "acme|m|agent=new"], H0, H1, state.load)

    assert totals() == [2, 0]

    async def main() -> None:
        server, where = await serve(state, lambda b, p, s, e, known=None: state.ingest(
            b, state.load, p, s, e).answer())

        async def locate() -> dict[str, Any]:
            return where

        channel = ShardChannel(locate)
        first = await channel.apply(batch, "prod", 1, None)
        assert first["status"] == "applied" and first["new"] == ["acme|m|agent=new"]
        assert (await channel.apply(batch, "prod", 1, None))["status"] == "duplicate"
        assert (await channel.apply(batch, "prod", 3, 2))["code"] == "gap"
        assert channel.conn is not None
        channel.conn.writer.write(encode_frame({"id": 99, "m": "apply", "b": 1, "p": "prod",
                                                "s": 2, "e": 1}))  # b is not a batch
        assert (await channel.apply(batch, "prod", 2, 9))["code"] == "gap"  # after it
        assert (channel.applied, channel.applies_lost) == (4, 0)
        channel.close()
        await server.stop()

    asyncio.run(main())
    assert totals() == [4, 5]


def test_an_answer_lost_after_the_batch_was_applied_fails_the_batch(state):
    """The shard applies, then its answer cannot go out and the connection ends: the
    gateway must not ask Ray (that could apply it twice without a producer's seq; with
    one it is a resend): it raises AnswerLost, and Ray then answers it as a duplicate."""
    batch = rows_batch([["acme", "m", None, DAY + 60, 7]], NOW)
    applied: list[int] = []

    def apply(b, p, s, e, known=None):
        answer = state.ingest(b, state.load, p, s, e).answer()
        applied.append(s)
        return {**answer, "unsendable": object()}

    async def main() -> None:
        server, where = await serve(state, apply)

        async def locate() -> dict[str, Any]:
            return where

        channel = ShardChannel(locate, Clock())
        with pytest.raises(AnswerLost):
            await channel.apply(batch, "prod", 1, None)
        assert channel.applies_lost == 1 and applied == [1]
        # within RETRY_AFTER the channel is not reopened: a batch goes to Ray
        assert await channel.apply(batch, "prod", 2, 1) is FALLBACK
        await server.stop()

    asyncio.run(main())
    assert state.ingest(batch, state.load, "prod", 1, None).outcome is Outcome.DUPLICATE
    assert state.totals_of(["acme|m|"], H0, H1, state.load) == [7]


def test_series_go_by_number_once_told_and_stale_numbers_are_not_trusted(state):
    """Batches with gateway numbers: each id crosses the socket once; a shard that
    forgot a series and gave its number to another still counts each under its own id;
    a registry that started over (a new epoch) starts the socket's table over."""
    registry = SeriesRegistry(shards=1)
    told: list[int] = []

    def numbered(rows: list) -> Any:
        batch = rows_batch(rows, NOW)
        batch.gn, batch.gn_epoch = registry.numbers(batch.sids), registry.epoch
        return batch

    def apply(b, p, s, e, known=None):
        told.append(len(b.sids))
        numbers = None if known is None else known.numbers(b, state.live)
        return state.ingest(b, state.load, p, s, e, numbers).answer()

    async def main() -> None:
        server, where = await serve(state, apply)

        async def locate() -> dict[str, Any]:
            return where

        channel = ShardChannel(locate)
        a = [["acme", "m", {"agent": "x1"}, DAY + 60, 1], ["acme", "m", {"agent": "x2"},
                                                          DAY + 60, 2]]
        assert (await channel.apply(numbered(a), "prod", 1, None))["status"] == "applied"
        sent = channel.conn.sent
        assert sent.told[registry.numbers(["acme|m|agent=x1", "acme|m|agent=x2"])].all()
        assert (await channel.apply(numbered(a), "prod", 2, 1))["status"] == "applied"
        # the shard forgets x1 (as eviction does); its number may go to another series
        g = state.live.series["acme|m|agent=x1"]
        for mno in state.live.months():
            if state.live.holding(mno, [g])[0]:
                state.live.release(g, mno)
        state.live.drop(g)
        b = [["acme", "m", {"agent": "y9"}, DAY + 60, 100], *a]
        assert (await channel.apply(numbered(b), "prod", 3, 2))["status"] == "applied"
        # the registry starts over: numbers mean other series now, the table starts over
        registry.epoch += 1
        registry._reset()
        c = [["acme", "m", {"agent": "x2"}, DAY + 60, 1000]]
        assert (await channel.apply(numbered(c), "prod", 4, 3))["status"] == "applied"
        assert channel.applied == 4 and channel.applies_by_ray == 0
        channel.close()
        await server.stop()

    asyncio.run(main())
    got = state.totals_of(["acme|m|agent=x1", "acme|m|agent=x2", "acme|m|agent=y9"], H0, H1,
                          state.load)
    assert got[1:] == [1006, 100]  # x2: 2 + 2 + 2 + 1000; y9: 100
    assert told == [2, 2, 3, 1]

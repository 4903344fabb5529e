"""What client and server share (tally.wire.vocabulary): codes, bounds, and checks in one place."""

from __future__ import annotations

import time

import pytest

from tally.client.validation import SeriesCache, prepare_increment
from tally.wire.batches import BadRow, rows_batch
from tally.wire.vocabulary import (
    FUTURE_TOLERANCE,
    INT64_MAX,
    INT64_MIN,
    ErrorCode,
    ts_limit,
    ts_problem,
    value_problem,
)


def test_the_error_codes_are_the_wire_protocols() -> None:
    assert [c.value for c in ErrorCode] == [
        "bad_frame", "too_large", "bad_request", "unauthorized", "bad_row", "overloaded",
        "internal"]
    assert {c for c in ErrorCode if c.retriable} == {ErrorCode.OVERLOADED, ErrorCode.INTERNAL}
    assert ErrorCode("bad_row") is ErrorCode.BAD_ROW and ErrorCode.BAD_ROW == "bad_row"


def test_int64_bounds() -> None:
    assert (INT64_MIN, INT64_MAX) == (-(2**63), 2**63 - 1)
    assert value_problem(INT64_MAX) is None and value_problem(INT64_MIN) is None
    assert "outside int64" in (value_problem(INT64_MAX + 1) or "")
    assert "is a float" in (value_problem(1.0) or "")
    assert "is a bool" in (value_problem(True) or "")


def test_ts_problems_name_whose_clock() -> None:
    now = 1_000_000.5
    limit = ts_limit(now)
    assert limit == 1_000_000 + FUTURE_TOLERANCE
    assert ts_problem(limit, limit) is None and ts_problem(0, limit) is None
    assert ts_problem(-1, limit) == "ts -1 is negative; timestamps are Unix seconds"
    assert "1 s ahead of the server clock" in (ts_problem(limit + 1, limit) or "")
    assert "ahead of this machine's clock" in (ts_problem(limit + 1, limit, "this machine's "
                                                                         "clock") or "")
    assert ts_limit(float(INT64_MAX)) == INT64_MAX  # never past int64


@pytest.mark.parametrize("ts,value", [
    (-1, 1), (10**12, 1), (1000, 2**63), (1000, -(2**63) - 1),
])
def test_client_and_server_refuse_the_same_increments_in_the_same_words(ts, value) -> None:
    now = time.time()
    with pytest.raises(ValueError) as client:
        prepare_increment(SeriesCache(), "acme", "m", value, ts, None, now)
    with pytest.raises(BadRow) as server:
        rows_batch([["acme", "m", None, ts, value]], now)
    # the server's "row 0: <problem>" and the client's "<problem> (why it matters)"
    problem = server.value.message.removeprefix("row 0: ")
    assert str(client.value).startswith(problem.replace("the server clock",
                                                        "this machine's clock"))

"""Tests for api.timerange: exact bucket bounds in awkward zones, refusals, compare
ranges, and bucket sums checked against a brute-force per-hour zoneinfo oracle."""

from __future__ import annotations

import random
from collections import OrderedDict
from datetime import UTC, date, datetime, timedelta, timezone
from itertools import pairwise
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from tally.api import timerange
from tally.api.timerange import (
    GRANULARITIES,
    Plan,
    QueryError,
    bucket_points,
    compare_plan,
    plan_range,
)


def H(iso: str) -> int:
    """Absolute UTC hour index of an ISO datetime with offset (the oracle for bounds)."""
    ts = datetime.fromisoformat(iso).timestamp()
    assert ts % 3600 == 0, iso
    return int(ts) // 3600


def lengths(plan: Plan) -> dict[str, int]:
    return {label: b1 - b0 for label, b0, b1 in plan.buckets}


def assert_contiguous(plan: Plan) -> None:
    assert plan.buckets[0][1] == plan.h0
    assert plan.buckets[-1][2] == plan.h1
    for (_, _, end), (_, start, _) in pairwise(plan.buckets):
        assert end == start
    assert all(b0 <= b1 for _, b0, b1 in plan.buckets)


# ------------------------------------------------------------------------- day buckets


def test_hour_index_anchor():
    # One literal, so the H() oracle itself is pinned: 2026-11-01T00:00Z = 1793491200 s.
    assert H("2026-11-01T00:00:00+00:00") == 498192


def test_utc_three_days():
    plan = plan_range("2026-11-01", "2026-11-03")
    assert plan == Plan(
        tz="UTC",
        granularity="day",
        from_label="2026-11-01",
        to_label="2026-11-03",
        h0=498192,
        h1=498264,
        buckets=(
            ("2026-11-01", 498192, 498216),
            ("2026-11-02", 498216, 498240),
            ("2026-11-03", 498240, 498264),
        ),
    )


def test_single_day_and_defaults():
    plan = plan_range("2026-11-01", "2026-11-01")
    assert (plan.tz, plan.granularity) == ("UTC", "day")
    assert plan.buckets == (("2026-11-01", 498192, 498216),)


def test_london_october_fall_back_day_has_25_hours():
    plan = plan_range("2026-10-24", "2026-10-26", tz="Europe/London")
    assert plan.buckets == (
        ("2026-10-24", H("2026-10-23T23:00Z"), H("2026-10-24T23:00Z")),
        ("2026-10-25", H("2026-10-24T23:00Z"), H("2026-10-26T00:00Z")),
        ("2026-10-26", H("2026-10-26T00:00Z"), H("2026-10-27T00:00Z")),
    )
    assert lengths(plan) == {"2026-10-24": 24, "2026-10-25": 25, "2026-10-26": 24}


def test_london_march_spring_forward_day_has_23_hours():
    plan = plan_range("2026-03-28", "2026-03-30", tz="Europe/London")
    assert plan.buckets == (
        ("2026-03-28", H("2026-03-28T00:00Z"), H("2026-03-29T00:00Z")),
        ("2026-03-29", H("2026-03-29T00:00Z"), H("2026-03-29T23:00Z")),
        ("2026-03-30", H("2026-03-29T23:00Z"), H("2026-03-30T23:00Z")),
    )


def test_new_york_dst_days():
    fall = plan_range("2026-10-31", "2026-11-02", tz="America/New_York")
    assert fall.buckets == (
        ("2026-10-31", H("2026-10-31T04:00Z"), H("2026-11-01T04:00Z")),
        ("2026-11-01", H("2026-11-01T04:00Z"), H("2026-11-02T05:00Z")),
        ("2026-11-02", H("2026-11-02T05:00Z"), H("2026-11-03T05:00Z")),
    )
    spring = plan_range("2026-03-08", "2026-03-08", tz="America/New_York")
    assert spring.buckets == (("2026-03-08", H("2026-03-08T05:00Z"), H("2026-03-09T04:00Z")),)


def test_tokyo_whole_offset_without_dst():
    plan = plan_range("2026-11-01", "2026-11-02", tz="Asia/Tokyo")
    assert plan.buckets == (
        ("2026-11-01", H("2026-10-31T15:00Z"), H("2026-11-01T15:00Z")),
        ("2026-11-02", H("2026-11-01T15:00Z"), H("2026-11-02T15:00Z")),
    )


def test_sydney_dst_in_the_southern_summer():
    summer = plan_range("2026-01-15", "2026-01-15", tz="Australia/Sydney")
    assert summer.buckets == (("2026-01-15", H("2026-01-14T13:00Z"), H("2026-01-15T13:00Z")),)
    winter = plan_range("2026-07-15", "2026-07-15", tz="Australia/Sydney")
    assert winter.buckets == (("2026-07-15", H("2026-07-14T14:00Z"), H("2026-07-15T14:00Z")),)
    # DST ends on the first Sunday of April (25 h), starts on the first Sunday of October.
    april = plan_range("2026-04-05", "2026-04-05", tz="Australia/Sydney")
    assert april.buckets == (("2026-04-05", H("2026-04-04T13:00Z"), H("2026-04-05T14:00Z")),)
    october = plan_range("2026-10-04", "2026-10-04", tz="Australia/Sydney")
    assert october.buckets == (("2026-10-04", H("2026-10-03T14:00Z"), H("2026-10-04T13:00Z")),)


def test_skipped_midnight_starts_the_day_at_the_first_existing_instant():
    # Sao Paulo's DST began at 00:00 on 2018-11-04: local midnight never happened, the
    # day began at 01:00 -02:00 (= 03:00Z) and had 23 hours.
    plan = plan_range("2018-11-03", "2018-11-04", tz="America/Sao_Paulo")
    assert plan.buckets == (
        ("2018-11-03", H("2018-11-03T03:00Z"), H("2018-11-04T03:00Z")),
        ("2018-11-04", H("2018-11-04T03:00Z"), H("2018-11-05T02:00Z")),
    )


def test_repeated_midnight_hour_stays_in_its_day():
    # Havana falls back at 01:00 CDT to 00:00 CST: the 00:00 hour happens twice, both
    # times on 2026-11-01, which starts at its first midnight and lasts 25 hours.
    plan = plan_range("2026-11-01", "2026-11-01", tz="America/Havana")
    assert plan.buckets == (("2026-11-01", H("2026-11-01T04:00Z"), H("2026-11-02T05:00Z")),)


def test_skipped_date_is_an_empty_bucket():
    # Samoa jumped the date line: 2011-12-30 did not exist in Pacific/Apia.
    plan = plan_range("2011-12-29", "2011-12-31", tz="Pacific/Apia")
    assert [label for label, _, _ in plan.buckets] == ["2011-12-29", "2011-12-30", "2011-12-31"]
    assert lengths(plan) == {"2011-12-29": 24, "2011-12-30": 0, "2011-12-31": 24}
    assert_contiguous(plan)
    points = bucket_points(plan, np.ones(plan.h1 - plan.h0, dtype=np.int64))
    assert points == [["2011-12-29", 24], ["2011-12-30", 0], ["2011-12-31", 24]]


# ------------------------------------------------------------------ week / month buckets


def test_week_buckets_cut_by_the_range():
    plan = plan_range("2026-11-04", "2026-11-20", "week")  # Wednesday .. Friday
    assert plan.buckets == (
        ("2026-11-02", H("2026-11-04T00:00Z"), H("2026-11-09T00:00Z")),
        ("2026-11-09", H("2026-11-09T00:00Z"), H("2026-11-16T00:00Z")),
        ("2026-11-16", H("2026-11-16T00:00Z"), H("2026-11-21T00:00Z")),
    )
    assert plan.buckets[0][0] < plan.from_label  # the first label is before `from`


def test_week_starting_on_sunday_is_labelled_by_the_monday_before():
    plan = plan_range("2026-11-01", "2026-11-02", "week")  # Sunday, Monday
    assert [b[0] for b in plan.buckets] == ["2026-10-26", "2026-11-02"]
    assert lengths(plan) == {"2026-10-26": 24, "2026-11-02": 24}


def test_london_week_with_the_fall_back_has_169_hours():
    plan = plan_range("2026-10-19", "2026-11-01", "week", "Europe/London")
    assert plan.buckets == (
        ("2026-10-19", H("2026-10-18T23:00Z"), H("2026-10-26T00:00Z")),
        ("2026-10-26", H("2026-10-26T00:00Z"), H("2026-11-02T00:00Z")),
    )
    assert lengths(plan) == {"2026-10-19": 169, "2026-10-26": 168}


def test_month_buckets_new_york():
    plan = plan_range("2026-02-15", "2026-03-31", "month", "America/New_York")
    assert plan.buckets == (
        ("2026-02", H("2026-02-15T05:00Z"), H("2026-03-01T05:00Z")),
        ("2026-03", H("2026-03-01T05:00Z"), H("2026-04-01T04:00Z")),
    )
    assert lengths(plan) == {"2026-02": 14 * 24, "2026-03": 31 * 24 - 1}


def test_month_buckets_cut_on_both_sides_across_a_year():
    plan = plan_range("2026-12-15", "2027-01-10", "month")
    assert plan.buckets == (
        ("2026-12", H("2026-12-15T00:00Z"), H("2027-01-01T00:00Z")),
        ("2027-01", H("2027-01-01T00:00Z"), H("2027-01-11T00:00Z")),
    )


# ------------------------------------------------------------------ hours and datetimes


def test_hour_labels_across_london_fall_back():
    plan = plan_range("2026-10-25T00:00", "2026-10-25T02:00", "hour", "Europe/London")
    h = H("2026-10-24T23:00Z")
    assert plan.buckets == (
        ("2026-10-25T00:00:00+01:00", h, h + 1),
        ("2026-10-25T01:00:00+01:00", h + 1, h + 2),
        ("2026-10-25T01:00:00+00:00", h + 2, h + 3),
        ("2026-10-25T02:00:00+00:00", h + 3, h + 4),
    )
    assert (plan.from_label, plan.to_label) == (
        "2026-10-25T00:00:00+01:00",
        "2026-10-25T02:00:00+00:00",
    )


def test_hour_labels_across_london_spring_forward_skip_the_missing_hour():
    plan = plan_range("2026-03-29T00:00", "2026-03-29T02:00", "hour", "Europe/London")
    h = H("2026-03-29T00:00Z")
    assert plan.buckets == (
        ("2026-03-29T00:00:00+00:00", h, h + 1),
        ("2026-03-29T02:00:00+01:00", h + 1, h + 2),
    )


def test_hour_buckets_of_a_date_range_are_real_utc_hours():
    labels = [b[0] for b in plan_range("2026-10-25", "2026-10-25", "hour", "Europe/London").buckets]
    assert len(labels) == 25
    assert labels[:3] == [
        "2026-10-25T00:00:00+01:00",
        "2026-10-25T01:00:00+01:00",
        "2026-10-25T01:00:00+00:00",
    ]
    assert labels[-1] == "2026-10-25T23:00:00+00:00"
    assert len(plan_range("2026-03-29", "2026-03-29", "hour", "Europe/London").buckets) == 23


def test_datetimes_are_floored_and_echoed_in_tz():
    plan = plan_range("2026-11-01T14:35:10", "2026-11-01T16:59:59.9", "hour", "Europe/London")
    assert (plan.h0, plan.h1) == (H("2026-11-01T14:00Z"), H("2026-11-01T17:00Z"))
    assert (plan.from_label, plan.to_label) == (
        "2026-11-01T14:00:00+00:00",
        "2026-11-01T16:00:00+00:00",
    )
    # Naive datetimes are local time in tz: 09:00 in New York summer is 13:00Z.
    ny = plan_range("2026-07-01T09:00", "2026-07-01T09:00", "hour", "America/New_York")
    assert ny.buckets == (("2026-07-01T09:00:00-04:00", H("2026-07-01T13:00Z"), ny.h0 + 1),)


def test_datetimes_with_an_offset_are_instants():
    # 14:35+05:30 is 09:05Z; the offset given need not be tz's (and may be fractional).
    plan = plan_range("2026-07-01T14:35+05:30", "2026-07-01T10:00:00Z", "hour")
    assert (plan.h0, plan.h1) == (H("2026-07-01T09:00Z"), H("2026-07-01T11:00Z"))
    assert plan.from_label == "2026-07-01T09:00:00+00:00"
    london = plan_range("2026-07-01T12:00:00+00:00", "2026-07-01T12:00Z", "hour", "Europe/London")
    assert london.buckets == (("2026-07-01T13:00:00+01:00", H("2026-07-01T12:00Z"), london.h1),)


def test_repeated_local_hour_from_first_to_last_occurrence():
    plan = plan_range("2026-10-25T01:00", "2026-10-25T01:30", "hour", "Europe/London")
    assert [b[0] for b in plan.buckets] == [
        "2026-10-25T01:00:00+01:00",
        "2026-10-25T01:00:00+00:00",
    ]


def test_skipped_local_hour():
    # 01:xx does not exist in London on 2026-03-29.
    ends_before = plan_range("2026-03-29T00:00", "2026-03-29T01:30", "hour", "Europe/London")
    assert [b[0] for b in ends_before.buckets] == ["2026-03-29T00:00:00+00:00"]
    assert ends_before.to_label == "2026-03-29T00:00:00+00:00"
    starts_after = plan_range("2026-03-29T01:30", "2026-03-29T02:00", "hour", "Europe/London")
    assert [b[0] for b in starts_after.buckets] == ["2026-03-29T02:00:00+01:00"]
    assert starts_after.from_label == "2026-03-29T02:00:00+01:00"  # at the change itself
    with pytest.raises(QueryError, match="empty in Europe/London"):
        plan_range("2026-03-29T01:00", "2026-03-29T01:59", "hour", "Europe/London")


def test_datetime_range_with_day_buckets_cuts_first_and_last_day():
    plan = plan_range("2026-11-01T22:00", "2026-11-03T01:00", "day", "America/New_York")
    assert plan.buckets == (
        ("2026-11-01", H("2026-11-02T03:00Z"), H("2026-11-02T05:00Z")),
        ("2026-11-02", H("2026-11-02T05:00Z"), H("2026-11-03T05:00Z")),
        ("2026-11-03", H("2026-11-03T05:00Z"), H("2026-11-03T07:00Z")),
    )
    assert plan.from_label == "2026-11-01T22:00:00-05:00"


def test_mixed_date_and_datetime():
    a = plan_range("2026-11-01", "2026-11-01T11:00", "hour", "Europe/London")
    assert (a.h0, a.h1) == (H("2026-11-01T00:00Z"), H("2026-11-01T12:00Z"))
    assert (a.from_label, a.to_label) == ("2026-11-01", "2026-11-01T11:00:00+00:00")
    b = plan_range("2026-11-01T20:00", "2026-11-02", "day", "Europe/London")
    assert b.buckets == (
        ("2026-11-01", H("2026-11-01T20:00Z"), H("2026-11-02T00:00Z")),
        ("2026-11-02", H("2026-11-02T00:00Z"), H("2026-11-03T00:00Z")),
    )
    assert (b.from_label, b.to_label) == ("2026-11-01T20:00:00+00:00", "2026-11-02")


# ------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    ("tz", "day", "offset"),
    [
        ("Asia/Kolkata", "2026-11-01", "+05:30"),
        ("Asia/Kathmandu", "2026-11-01", "+05:45"),
        ("Australia/Adelaide", "2026-01-15", "+10:30"),
        ("Australia/Adelaide", "2026-07-15", "+09:30"),
        ("America/St_Johns", "2026-01-15", "-03:30"),
        ("America/St_Johns", "2026-07-15", "-02:30"),
    ],
)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_fractional_offset_zones_are_refused(tz, day, offset, granularity):
    with pytest.raises(QueryError) as e:
        plan_range(day, day, granularity, tz)
    message = str(e.value)
    assert tz in message
    assert offset in message
    assert "whole UTC hours" in message
    assert "cannot be summed exactly" in message


def test_fractional_offset_anywhere_in_the_range_is_refused():
    # Caracas went from -04:30 to -04:00 at 2016-05-01T07:00Z (02:30 local).
    with pytest.raises(QueryError, match="-04:30"):
        plan_range("2016-04-20", "2016-05-10", tz="America/Caracas")
    with pytest.raises(QueryError, match="-04:30"):  # May 1 itself started at -04:30
        plan_range("2016-05-01", "2016-05-10", tz="America/Caracas")
    ok = plan_range("2016-05-02", "2016-05-10", tz="America/Caracas")
    assert ok.h0 == H("2016-05-02T04:00Z")
    # Pyongyang went from +08:30 to +09:00 exactly at local midnight of 2018-05-05.
    assert plan_range("2018-05-05", "2018-05-06", tz="Asia/Pyongyang").h0 == H("2018-05-04T15:00Z")
    with pytest.raises(QueryError, match=r"\+08:30"):
        plan_range("2018-05-04", "2018-05-06", tz="Asia/Pyongyang")
    # An hourly range ending before the change is refused too: the rule is per zone.
    with pytest.raises(QueryError, match=r"\+08:30"):
        plan_range("2018-05-04T10:00", "2018-05-04T11:00", "hour", "Asia/Pyongyang")


def test_clock_change_inside_an_hour_across_a_day_is_refused():
    # Goose Bay fell back at 00:01 ADT on 2000-10-29 (03:01Z) to 23:01 AST on the 28th:
    # the UTC hour 03:00-04:00 holds one minute of the 29th and 59 of the 28th.
    with pytest.raises(QueryError, match="America/Goose_Bay") as e:
        plan_range("2000-10-28", "2000-10-29", "day", "America/Goose_Bay")
    assert "2000-10-29T03:01:00Z" in str(e.value)
    assert "whole UTC hours" in str(e.value)
    # Both days are in one month and one week, and hour buckets are UTC hours anyway.
    assert len(plan_range("2000-10-28", "2000-10-29", "month", "America/Goose_Bay").buckets) == 1
    assert len(plan_range("2000-10-28", "2000-10-29", "hour", "America/Goose_Bay").buckets) == 49
    # Its spring-forward at 00:01 stays inside one day: 23 exact hours.
    spring = plan_range("2000-04-02", "2000-04-02", "day", "America/Goose_Bay")
    assert lengths(spring) == {"2000-04-02": 23}


def test_clock_turned_back_over_midnight_is_refused():
    # Casey went from +11 to +8 at 2010-03-04T15:00Z: 02:00 on the 5th became 23:00 on
    # the 4th, so a day of the 4th comes after hours of the 5th.
    with pytest.raises(QueryError, match="Antarctica/Casey"):
        plan_range("2010-03-03", "2010-03-06", "day", "Antarctica/Casey")
    assert plan_range("2010-03-03", "2010-03-06", "week", "Antarctica/Casey").buckets


def test_mid_hour_change_within_a_day_is_accepted():
    # Casey moved +8 -> +11 at 00:01 local on 2021-10-03 (16:01Z): a 21-hour day.
    plan = plan_range("2021-10-02", "2021-10-04", tz="Antarctica/Casey")
    assert lengths(plan) == {"2021-10-02": 24, "2021-10-03": 21, "2021-10-04": 24}


@pytest.mark.parametrize(
    "tz", ["Mars/Olympus", "europe/london", "America", "../etc/passwd", "/etc/localtime", ""]
)
def test_unknown_tz(tz):
    with pytest.raises(QueryError) as e:
        plan_range("2026-11-01", "2026-11-01", tz=tz)
    assert f"tz {tz!r}" in str(e.value)


def test_server_local_zone_is_not_an_iana_name():
    with pytest.raises(QueryError, match="'localtime'"):
        plan_range("2026-11-01", "2026-11-01", tz="localtime")


@pytest.mark.parametrize(
    ("param", "value"),
    [
        ("from", "2026-02-30"),
        ("from", "2026-13-01"),
        ("from", "2026-1-1"),
        ("from", "yesterday"),
        ("from", "20261101"),
        ("to", "2026-11-01T25:00"),
        ("to", "2026-11-01T"),
        ("to", "2026-W44-1"),
    ],
)
def test_malformed_dates_name_the_parameter_and_value(param, value):
    args = {"from_s": "2026-11-01", "to_s": "2026-11-02", param + "_s": value}
    with pytest.raises(QueryError) as e:
        plan_range(**args)
    assert str(e.value).startswith(f"{param} {value!r}")


def test_missing_value_and_plus_decoded_as_space():
    with pytest.raises(QueryError, match="^from is required"):
        plan_range("", "2026-11-02")
    with pytest.raises(QueryError, match="%2B"):
        plan_range("2026-11-01T14:00:00 01:00", "2026-11-02")


def test_from_after_to():
    with pytest.raises(QueryError) as e:
        plan_range("2026-11-05", "2026-11-01")
    assert str(e.value) == "from 2026-11-05 is after to 2026-11-01"
    with pytest.raises(QueryError, match="is after to"):
        plan_range("2026-11-01T15:00", "2026-11-01T14:00", "hour")
    with pytest.raises(QueryError, match="is after to"):
        plan_range("2026-11-02T00:00", "2026-11-01", "hour")
    with pytest.raises(QueryError, match="is after to"):
        plan_range("2026-11-01T10:00+00:00", "2026-11-01T10:00+01:00", "hour")


def test_bad_granularity():
    with pytest.raises(QueryError, match="granularity 'year' is not one of hour, day, week, month"):
        plan_range("2026-11-01", "2026-11-01", "year")


def test_range_limits():
    assert len(plan_range("2016-01-01", "2026-01-07").buckets) == 3660
    with pytest.raises(QueryError, match="3661 days; at most 3660"):
        plan_range("2016-01-01", "2026-01-08")
    with pytest.raises(QueryError, match="at most 10 days"):
        plan_range("2026-11-01", "2026-11-11", max_days=10)
    with pytest.raises(QueryError, match="at most 10 days"):
        plan_range("2026-11-01T00:00", "2026-11-11T00:00", "hour", max_days=10)
    assert len(plan_range("2024-01-01", "2024-12-31", "hour").buckets) == 8784
    with pytest.raises(QueryError, match="8808 buckets; at most 8784"):
        plan_range("2024-01-01", "2025-01-01", "hour")
    with pytest.raises(QueryError, match="granularity=hour"):
        plan_range("2026-11-01T00:00", "2026-11-01T05:00", "hour", max_hour_buckets=5)
    # The hour limit is about hour buckets only.
    assert len(plan_range("2024-01-01", "2025-01-01", "day").buckets) == 367


def test_before_1970_is_refused():
    assert plan_range("1970-01-01", "1970-01-01").h0 == 0
    for args in [("1969-12-31", "1970-01-02"), ("1960-01-01", "1970-01-02")]:
        with pytest.raises(QueryError, match="1970-01-01"):
            plan_range(*args)
    # Local 1970-01-01 in Tokyo began at 1969-12-31T15:00Z.
    with pytest.raises(QueryError, match="1969-12-31T15:00:00Z"):
        plan_range("1970-01-01", "1970-01-02", tz="Asia/Tokyo")
    # ... while 1969-12-31T20:00 in New York is 1970-01-01T01:00Z.
    assert plan_range("1969-12-31T20:00", "1969-12-31T21:00", "hour", "America/New_York").h0 == 1


def test_far_future_is_a_query_error_not_an_overflow():
    with pytest.raises(QueryError, match="out of range"):
        plan_range("9999-12-01", "9999-12-31", max_days=10**9)


# ------------------------------------------------------------------------------- compare


def test_previous_period_of_dates():
    plan = plan_range("2026-11-01", "2026-11-30", tz="Europe/London")
    prev = compare_plan(plan, "previous_period")
    assert (prev.from_label, prev.to_label) == ("2026-10-02", "2026-10-31")
    assert (prev.tz, prev.granularity) == ("Europe/London", "day")
    assert len(prev.buckets) == 30
    assert prev.h1 == plan.h0
    assert prev.h0 == H("2026-10-01T23:00Z")  # BST until the 25th
    assert lengths(prev)["2026-10-25"] == 25


def test_previous_period_of_weeks_keeps_granularity():
    plan = plan_range("2026-11-04", "2026-11-20", "week")
    prev = compare_plan(plan, "previous_period")
    assert (prev.from_label, prev.to_label) == ("2026-10-18", "2026-11-03")
    assert [b[0] for b in prev.buckets] == ["2026-10-12", "2026-10-19", "2026-10-26", "2026-11-02"]


def test_previous_period_of_datetimes_is_the_same_number_of_hours():
    plan = plan_range("2026-10-25T00:00", "2026-10-25T05:00", "hour", "Europe/London")
    assert plan.h1 - plan.h0 == 7
    prev = compare_plan(plan, "previous_period")
    assert (prev.h0, prev.h1) == (plan.h0 - 7, plan.h0)
    assert (prev.from_label, prev.to_label) == (
        "2026-10-24T17:00:00+01:00",
        "2026-10-24T23:00:00+01:00",
    )
    assert len(prev.buckets) == 7


def test_previous_year_of_dates_including_feb_29():
    plan = plan_range("2024-02-01", "2024-02-29")
    prev = compare_plan(plan, "previous_year")
    assert (prev.from_label, prev.to_label) == ("2023-02-01", "2023-02-28")
    assert len(prev.buckets) == 28
    assert prev.buckets[-1] == ("2023-02-28", H("2023-02-28T00:00Z"), H("2023-03-01T00:00Z"))
    leap = compare_plan(plan_range("2024-02-29", "2024-03-01"), "previous_year")
    assert (leap.from_label, leap.to_label) == ("2023-02-28", "2023-03-01")
    single = compare_plan(plan_range("2024-02-28", "2024-02-29", "month"), "previous_year")
    assert (single.from_label, single.to_label) == ("2023-02-28", "2023-02-28")
    assert single.buckets == (("2023-02", H("2023-02-28T00:00Z"), H("2023-03-01T00:00Z")),)


def test_previous_year_of_local_datetimes_keeps_the_wall_clock():
    plan = plan_range("2026-07-01T09:00", "2026-07-01T10:00", "hour", "Europe/London")
    prev = compare_plan(plan, "previous_year")
    assert (prev.from_label, prev.to_label) == (
        "2025-07-01T09:00:00+01:00",
        "2025-07-01T10:00:00+01:00",
    )
    assert (prev.h0, prev.h1) == (H("2025-07-01T08:00Z"), H("2025-07-01T10:00Z"))


def test_previous_year_in_sydney_summer():
    plan = plan_range("2026-01-01", "2026-01-31", "month", "Australia/Sydney")
    prev = compare_plan(plan, "previous_year")
    assert prev.buckets == (("2025-01", H("2024-12-31T13:00Z"), H("2025-01-31T13:00Z")),)


def test_compare_errors():
    plan = plan_range("2026-11-01", "2026-11-30")
    with pytest.raises(QueryError, match="compare 'last_week' is not one of"):
        compare_plan(plan, "last_week")
    early = plan_range("1970-03-01", "1970-03-31")
    with pytest.raises(QueryError, match="^compare=previous_year: .*1970-01-01"):
        compare_plan(early, "previous_year")
    with pytest.raises(QueryError, match="^compare=previous_period"):
        compare_plan(plan_range("1970-01-01", "1970-01-10"), "previous_period")


# ------------------------------------------------------------------------- bucket_points


def test_bucket_points_exact():
    plan = plan_range("2026-11-01", "2026-11-03")
    hourly = np.arange(72, dtype=np.int64)
    assert bucket_points(plan, hourly) == [
        ["2026-11-01", sum(range(24))],
        ["2026-11-02", sum(range(24, 48))],
        ["2026-11-03", sum(range(48, 72))],
    ]
    points = bucket_points(plan, hourly)
    assert all(type(v) is int for _, v in points)


def test_bucket_points_every_bucket_present_with_zeros():
    plan = plan_range("2026-01-01", "2026-12-31", "month", "Europe/London")
    points = bucket_points(plan, np.zeros(plan.h1 - plan.h0, dtype=np.int64))
    assert points == [[f"2026-{m:02d}", 0] for m in range(1, 13)]


def test_bucket_points_hour_granularity_and_negative_counts():
    plan = plan_range("2026-10-25T00:00", "2026-10-25T02:00", "hour", "Europe/London")
    assert bucket_points(plan, np.array([5, -2, 7, 0], dtype=np.int64)) == [
        ["2026-10-25T00:00:00+01:00", 5],
        ["2026-10-25T01:00:00+01:00", -2],
        ["2026-10-25T01:00:00+00:00", 7],
        ["2026-10-25T02:00:00+00:00", 0],
    ]


def test_bucket_points_never_wrap_int64():
    plan = plan_range("2026-11-01", "2026-11-02")
    big = np.full(48, 2**62, dtype=np.int64)
    assert bucket_points(plan, big) == [["2026-11-01", 24 * 2**62], ["2026-11-02", 24 * 2**62]]
    mixed = np.array([2**63 - 1, -(2**63)] * 24, dtype=np.int64)
    assert bucket_points(plan, mixed) == [["2026-11-01", -12], ["2026-11-02", -12]]


def test_bucket_points_rejects_wrong_input():
    plan = plan_range("2026-11-01", "2026-11-01")
    with pytest.raises(ValueError, match="covers 24 hours") as e:
        bucket_points(plan, np.zeros(23, dtype=np.int64))
    assert not isinstance(e.value, QueryError)  # a server bug, not a 400
    with pytest.raises(ValueError, match="integers"):
        bucket_points(plan, np.zeros(24))


# ---------------------------------------------------------------- brute-force oracle

ORACLE_ZONES = [
    "UTC",
    "Europe/London",
    "America/New_York",
    "Australia/Sydney",
    "Asia/Tokyo",
    "America/Sao_Paulo",
    "America/Havana",
    "America/Santiago",
    "Pacific/Apia",
    "Africa/Casablanca",
    "Asia/Gaza",
    "Antarctica/Casey",
]


def oracle_label(local: datetime, granularity: str) -> str:
    if granularity == "hour":
        return local.isoformat(timespec="seconds")
    d = local.date()
    if granularity == "week":
        return (d - timedelta(days=d.weekday())).isoformat()
    if granularity == "month":
        return f"{d.year:04d}-{d.month:02d}"
    return d.isoformat()


def oracle_hours(lo: int, hi: int, zone: ZoneInfo, keep) -> list[int]:
    """UTC hours in [lo, hi) whose local start time (zoneinfo, per hour) passes keep."""
    return [h for h in range(lo, hi) if keep(datetime.fromtimestamp(h * 3600, zone))]


def oracle_points(h0, h1, zone, granularity, hourly) -> list[list]:
    sums: OrderedDict[str, int] = OrderedDict()
    for k, h in enumerate(range(h0, h1)):
        label = oracle_label(datetime.fromtimestamp(h * 3600, zone), granularity)
        sums[label] = sums.get(label, 0) + int(hourly[k])
    return [[label, total] for label, total in sums.items()]


def random_case(rng: random.Random):
    tz = rng.choice(ORACLE_ZONES)
    granularity = rng.choice(GRANULARITIES)
    day = date(2012, 1, 1) + timedelta(days=rng.randrange(365 * 18))
    if granularity == "hour" or rng.random() < 0.3:
        start = datetime.combine(day, datetime.min.time()) + timedelta(hours=rng.randrange(24))
        end = start + timedelta(hours=rng.randrange(0, 24 * 12))
        return tz, granularity, start.isoformat(), end.isoformat(), (start, end)
    span = {"day": 60, "week": 200, "month": 500}[granularity]
    end_day = day + timedelta(days=rng.randrange(span))
    return tz, granularity, day.isoformat(), end_day.isoformat(), (day, end_day)


@pytest.mark.parametrize("seed", range(120))
def test_against_brute_force_oracle(seed):
    rng = random.Random(seed)
    tz, granularity, from_s, to_s, (a, b) = random_case(rng)
    zone = ZoneInfo(tz)
    plan = plan_range(from_s, to_s, granularity, tz)
    assert_contiguous(plan)

    # Bounds: exactly the UTC hours whose local start falls in the inclusive range.
    lo, hi = plan.h0 - 72, plan.h1 + 72
    if isinstance(a, datetime):
        expected = oracle_hours(lo, hi, zone, lambda t: a <= t.replace(tzinfo=None) <= b)
    else:
        expected = oracle_hours(lo, hi, zone, lambda t: a <= t.date() <= b)
    assert expected == list(range(plan.h0, plan.h1))

    hourly = np.array([rng.randrange(-5, 10**6) for _ in range(plan.h1 - plan.h0)], dtype=np.int64)
    points = bucket_points(plan, hourly)
    assert len(points) == len(plan.buckets)
    nonempty = [p for p, (_, b0, b1) in zip(points, plan.buckets, strict=True) if b1 > b0]
    assert nonempty == oracle_points(plan.h0, plan.h1, zone, granularity, hourly)
    assert sum(v for _, v in points) == int(hourly.sum())
    if granularity != "hour":  # calendar labels sort; every bucket between is present
        labels = [label for label, _ in points]
        assert labels == sorted(set(labels))


@pytest.mark.parametrize("seed", range(20))
def test_aware_datetimes_against_oracle(seed):
    rng = random.Random(1000 + seed)
    tz = rng.choice(ORACLE_ZONES)
    granularity = rng.choice(GRANULARITIES)
    start = datetime(2012, 1, 1, tzinfo=UTC) + timedelta(minutes=rng.randrange(60 * 24 * 365 * 18))
    end = start + timedelta(minutes=rng.randrange(60 * 24 * 20))
    offset = timedelta(minutes=rng.choice([0, 60, -300, 330, 600]))
    from_s = start.astimezone(timezone(offset)).isoformat()
    to_s = end.astimezone(timezone(offset)).isoformat()
    plan = plan_range(from_s, to_s, granularity, tz)
    assert (plan.h0, plan.h1) == (int(start.timestamp()) // 3600, int(end.timestamp()) // 3600 + 1)
    hourly = np.arange(plan.h1 - plan.h0, dtype=np.int64)
    nonempty = [
        p
        for p, (_, b0, b1) in zip(bucket_points(plan, hourly), plan.buckets, strict=True)
        if b1 > b0
    ]
    assert nonempty == oracle_points(plan.h0, plan.h1, ZoneInfo(tz), granularity, hourly)


def test_compare_previous_period_against_oracle():
    rng = random.Random(7)
    for _ in range(30):
        tz = rng.choice(ORACLE_ZONES)
        first = date(2013, 1, 1) + timedelta(days=rng.randrange(365 * 15))
        last = first + timedelta(days=rng.randrange(40))
        prev = compare_plan(
            plan_range(first.isoformat(), last.isoformat(), "day", tz), "previous_period"
        )
        n = (last - first).days + 1
        want_first, want_last = first - timedelta(days=n), first - timedelta(days=1)
        assert (prev.from_label, prev.to_label) == (want_first.isoformat(), want_last.isoformat())
        zone = ZoneInfo(tz)
        expected = oracle_hours(
            prev.h0 - 72,
            prev.h1 + 72,
            zone,
            lambda t, a=want_first, b=want_last: a <= t.date() <= b,
        )
        assert expected == list(range(prev.h0, prev.h1))


# ---------------------------------------------------------------------------- efficiency


def test_zone_is_sampled_per_day_not_per_hour(monkeypatch):
    calls = 0
    real = timerange._Timeline._offset

    def counting(self, t):
        nonlocal calls
        calls += 1
        return real(self, t)

    monkeypatch.setattr(timerange._Timeline, "_offset", counting)
    plan = plan_range("2016-01-01", "2026-01-07", "day", "Europe/London")
    assert len(plan.buckets) == 3660
    # ~3664 daily samples plus ~17 bisection steps per clock change (20 in the range),
    # far below the 87,840 hours a per-hour check would cost.
    assert calls < 3660 + 20 * 40
    calls = 0
    plan_range("2016-01-01", "2026-01-07", "month", "Europe/London")
    assert calls < 3660 + 20 * 40


def test_plans_are_kept_within_a_bound_and_equal_fresh_ones():
    """A dashboard repeats ranges (kept: the same answer, no work); anyone may send
    thousands of distinct ones (the cache stays bounded, large plans are never kept)."""
    timerange._plans.clear()
    first = plan_range("2026-03-01", "2026-03-31", "day", "Europe/Paris")
    assert plan_range("2026-03-01", "2026-03-31", "day", "Europe/Paris") is first
    assert first == timerange._plan_range("2026-03-01", "2026-03-31", "day", "Europe/Paris",
                                          max_days=3660, max_hour_buckets=24 * 366)
    for day in range(1, 301):
        plan_range("2020-01-01", (date(2020, 1, 1) + timedelta(days=day)).isoformat())
    assert len(timerange._plans) == timerange.CACHED_PLANS
    assert plan_range("2026-03-01", "2026-03-31", "day", "Europe/Paris") is not first
    timerange._plans.clear()
    plan_range("2016-01-01", "2025-12-31")  # 3,653 buckets: not kept
    assert len(timerange._plans) == 0

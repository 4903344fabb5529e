"""Event fan-out rules without servers: the built-ins' exact increments, bucket edges,
rules files and their errors, and how a refused event is named (api/rules.py,
api/ingest.py ``build_event_batch``). The real servers are in tests/test_events.py."""

from __future__ import annotations

import calendar
import pickle
from typing import Any

import pytest

from tally.api.ingest import build_event_batch
from tally.api.rules import BUILTIN, BadEvent, Rules, RulesError, load_rules, parse_rules
from tally.api.service import IngestError
from tally.cluster import cli
from tally.cluster.config import ConfigError, load_config
from tally.wire.batches import rows_batch

NOW = calendar.timegm((2026, 11, 20, 12, 0, 0))
TS = NOW - 3600


def received(**over: Any) -> dict[str, Any]:
    return {"type": "message.received", "tenant": "acme", "ts": TS, "channel": "email",
            "sentiment": "positive", **over}


def replied(**over: Any) -> dict[str, Any]:
    return {"type": "message.replied", "tenant": "acme", "ts": TS, "agent": "ann",
            "channel": "chat", "response_seconds": 95, **over}


def rows(events: list[Any], rules: Rules = BUILTIN) -> list[list[Any]]:
    out = rules.fan_out(events)
    assert out.error is None, out.error
    return out.rows


def refusal(events: list[Any], rules: Rules = BUILTIN) -> IngestError:
    with pytest.raises(IngestError) as info:
        build_event_batch(events, rules, NOW)
    return info.value


# ---- the built-in rules -------------------------------------------------------------


def test_message_received_makes_one_increment_tagged_by_channel_and_sentiment() -> None:
    assert rows([received()]) == [
        ["acme", "messages.received", {"channel": "email", "sentiment": "positive"}, TS, 1],
    ]


def test_message_replied_makes_handled_bucket_sum_and_count() -> None:
    assert rows([replied(response_seconds=95)]) == [
        ["acme", "messages.handled", {"agent": "ann"}, TS, 1],
        ["acme", "response_time", {"bucket": "lt_30m"}, TS, 1],
        ["acme", "response_seconds.sum", {"agent": "ann"}, TS, 95],
        ["acme", "response_seconds.count", {"agent": "ann"}, TS, 1],
    ]


@pytest.mark.parametrize(("seconds", "bucket"), [
    (0, "lt_30m"), (1799, "lt_30m"), (1799.99, "lt_30m"),
    (1800, "lt_1h"), (3599, "lt_1h"),
    (3600, "lt_4h"), (4 * 3600 - 1, "lt_4h"),
    (4 * 3600, "lt_24h"), (86399.5, "lt_24h"),
    (86400, "gt_24h"), (10 * 86400, "gt_24h"),
])
def test_response_time_buckets_at_their_edges(seconds: float, bucket: str) -> None:
    # an edge belongs to the bucket above it: lt_30m means strictly under 30 minutes
    made = rows([replied(response_seconds=seconds)])
    assert made[1] == ["acme", "response_time", {"bucket": bucket}, TS, 1]


def test_a_float_response_time_is_summed_rounded_to_whole_seconds() -> None:
    made = rows([replied(response_seconds=95.6)])
    assert made[2][4] == 96 and type(made[2][4]) is int


def test_extra_fields_are_ignored_and_channel_is_not_required_on_replies() -> None:
    extra = replied(priority="high", note={"any": ["thing"]})
    del extra["channel"]
    assert len(rows([extra])) == 4


def test_rows_are_in_event_order_with_their_origin_and_rule() -> None:
    out = BUILTIN.fan_out([received(), replied(), received(channel="chat")])
    assert out.origin == [0, 1, 1, 1, 1, 2]
    assert out.rule == ["messages.received", "messages.handled", "response_time",
                        "response_seconds.sum", "response_seconds.count", "messages.received"]


def test_events_build_the_same_batch_as_the_rows_they_stand_for() -> None:
    events = [received(), replied(response_seconds=4000), received()]
    incoming = build_event_batch(events, BUILTIN, NOW)
    assert incoming.batch == rows_batch(rows(events), NOW)
    assert incoming.batch.increments == 6


def test_the_rules_travel_to_an_actor_intact() -> None:
    copy = pickle.loads(pickle.dumps(BUILTIN))
    assert copy == BUILTIN and copy.fan_out([replied()]).rows == rows([replied()])


# ---- refusals name the event and the field --------------------------------------------


@pytest.mark.parametrize(("event", "field", "says"), [
    (5, None, "event 1: an event is a map {type, tenant, ts, ...fields}, not an integer"),
    ({"tenant": "acme", "ts": TS}, "type", "event 1: type is missing"),
    (received(type=3), "type", "event 1: type 3 is an integer; type must be a string"),
    (received(type="message.deleted"), "type",
     "event 1: no rule for type 'message.deleted' (built-in rules cover: message.received, "
     "message.replied)"),
    ({"type": "message.received", "ts": TS}, "tenant", "event 1: tenant is missing"),
    (received(ts="yesterday"), "ts",
     "event 1: ts 'yesterday' is a string; ts must be integer Unix seconds"),
    (received(ts=True), "ts", "event 1: ts True is a bool"),
    (received(ts=1.5), "ts", "event 1: ts 1.5 is a float"),
    (received(channel=None), "channel",
     "event 1 (message.received): field 'channel' is nil; rule 'messages.received' needs it "
     "as a string (tag 'channel')"),
    (received(sentiment=0.8), "sentiment",
     "event 1 (message.received): field 'sentiment' is a float (0.8); rule "
     "'messages.received' makes it tag 'sentiment', and tag values are strings"),
    ({k: v for k, v in replied().items() if k != "agent"}, "agent",
     "event 1 (message.replied): field 'agent' is missing; rule 'messages.handled'"),
    ({k: v for k, v in replied().items() if k != "response_seconds"}, "response_seconds",
     "event 1 (message.replied): field 'response_seconds' is missing; rule 'response_time' "
     "needs it as a number"),
    (replied(response_seconds=-1), "response_seconds",
     "event 1 (message.replied): field 'response_seconds' is -1; rule 'response_time' needs "
     "a number >= 0"),
    (replied(response_seconds="95"), "response_seconds",
     "field 'response_seconds' is a string ('95'); rule 'response_time' needs an integer or "
     "a finite float"),
    (replied(response_seconds=False), "response_seconds", "is a bool (False)"),
    (replied(response_seconds=float("nan")), "response_seconds", "is not finite"),
    (replied(response_seconds=float("inf")), "response_seconds", "is not finite"),
])
def test_a_bad_event_is_refused_naming_its_index_and_field(
    event: Any, field: str | None, says: str
) -> None:
    out = BUILTIN.fan_out([received(), event, received()])
    assert isinstance(out.error, BadEvent)
    assert (out.error.event, out.error.field) == (1, field)
    assert says in out.error.message
    assert out.origin == [0]  # rows of the events before it only
    err = refusal([received(), event, received()])
    assert (err.code, err.row) == ("bad_row", 1) and says in err.message


@pytest.mark.parametrize(("event", "says"), [
    (received(tenant="Acme"), "event 2: tenant 'Acme' is invalid"),
    (received(ts=NOW + 3601), f"event 2: ts {NOW + 3601} is 3601 s ahead of the server clock"),
    (received(ts=-5), "event 2: ts -5 is negative"),
    (received(channel="x" * 201),
     "event 2: tag 'channel' value is 201 characters; at most 200 (in the increment of rule "
     "'messages.received')"),
    (replied(response_seconds=2**63),
     "event 2: value 9223372036854775808 is outside int64 (in the increment of rule "
     "'response_seconds.sum')"),
])
def test_a_bad_increment_made_by_a_rule_names_the_event_not_the_row(
    event: dict[str, Any], says: str
) -> None:
    # event 0 makes 4 rows and event 1 one, so the bad row's own index would be 5 or more
    err = refusal([replied(), received(), event])
    assert (err.code, err.row) == ("bad_row", 2)
    assert err.message.startswith(says), err.message
    assert "row" not in err.message


def test_the_first_bad_event_wins_whichever_layer_finds_it() -> None:
    # event 1's tenant is found by the row validation, event 2's type by fan-out
    err = refusal([received(), received(tenant="BAD"), received(type="nope")])
    assert err.row == 1 and "tenant 'BAD'" in err.message
    err = refusal([received(), received(type="nope"), received(tenant="BAD")])
    assert err.row == 1 and "no rule for type 'nope'" in err.message


def test_an_int64_overflow_across_events_names_the_event_that_overflows() -> None:
    huge = 2**62
    err = refusal([replied(), replied(response_seconds=huge), replied(response_seconds=huge)])
    assert err.row == 2 and "outside int64" in err.message


def test_events_must_be_a_list_and_an_empty_list_is_nothing() -> None:
    assert refusal({"type": "x"}).code == "bad_request"  # type: ignore[arg-type]
    assert "events is missing" in refusal(None).message  # type: ignore[arg-type]
    assert build_event_batch([], BUILTIN, NOW).batch.increments == 0


# ---- rules files ----------------------------------------------------------------------

ORDERS = """
[[rule]]
name = "orders"
event = "order.placed"
metric = "orders.placed"
tags = ["country"]

[[rule]]
event = "order.placed"
metric = "orders.items"
tags = {plan = "plan_name"}
value = "items"
min = 0

[[rule]]
event = "order.placed"
metric = "orders.by_size"
[rule.bucket]
field = "amount_cents"
tag = "size"
edges = [1000, 10000]
labels = ["small", "medium", "large"]
"""


def order(**over: Any) -> dict[str, Any]:
    return {"type": "order.placed", "tenant": "shop", "ts": TS, "country": "fr",
            "plan_name": "pro", "items": 3, "amount_cents": 1000, **over}


def test_a_rules_file_declares_tags_renamed_tags_values_and_buckets() -> None:
    rules = parse_rules(ORDERS, "orders.toml")
    assert rows([order()], rules) == [
        ["shop", "orders.placed", {"country": "fr"}, TS, 1],
        ["shop", "orders.items", {"plan": "pro"}, TS, 3],
        ["shop", "orders.by_size", {"size": "medium"}, TS, 1],
    ]
    assert rows([order(amount_cents=999)], rules)[2][2] == {"size": "small"}
    assert rows([order(amount_cents=10000)], rules)[2][2] == {"size": "large"}
    # names: given, or "<event> -> <metric>"
    assert [r.name for r in rules.rules] == [
        "orders", "order.placed -> orders.items", "order.placed -> orders.by_size"]


def test_a_rules_file_replaces_the_built_ins_unless_it_says_builtin() -> None:
    alone = parse_rules(ORDERS, "orders.toml")
    err = refusal([received()], alone)
    assert err.row == 0 and "no rule for type 'message.received'" in err.message
    assert "rules file" not in err.message and "orders.toml cover: order.placed" in err.message
    both = parse_rules("builtin = true\n" + ORDERS, "orders.toml")
    assert both.event_types == ["message.received", "message.replied", "order.placed"]
    assert len(rows([received(), replied(), order()], both)) == 1 + 4 + 3
    only_builtin = parse_rules("builtin = true\n", "b.toml")
    assert only_builtin.rules == BUILTIN.rules


def test_a_value_field_below_min_refuses_the_event() -> None:
    rules = parse_rules(ORDERS)
    err = refusal([order(), order(items=-2)], rules)
    assert err.row == 1 and "field 'items' is -2" in err.message and ">= 0" in err.message


def test_a_rules_file_loads_from_disk_and_a_missing_one_names_the_path(tmp_path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(ORDERS)
    assert load_rules(str(path)).source == f"rules file {path}"
    with pytest.raises(RulesError, match="rules file .*nope.toml: No such file"):
        load_rules(str(tmp_path / "nope.toml"))


RULE = '[[rule]]\nname = "r"\nevent = "e"\nmetric = "m"\n'


@pytest.mark.parametrize(("text", "complaint"), [
    ("[[rule", "not valid TOML"),
    ("rules = 1\n", "unknown top-level keys rules"),
    ("builtin = 'yes'\n", "key 'builtin': must be true or false"),
    ("", "no [[rule]] entries and builtin = false"),
    ("rule = 3\n", "key 'rule': must be an array of tables"),
    ('[[rule]]\nevent = "e"\n', "rule 1: key 'metric': is missing"),
    ('[[rule]]\nmetric = "m"\n', "rule 1: key 'event': is missing"),
    ('[[rule]]\nevent = ""\nmetric = "m"\n', "rule 1 (' -> m'): key 'event': must be a string"),
    ('[[rule]]\nevent = "e"\nmetric = "bad metric"\n',
     "rule 1 ('e -> bad metric'): key 'metric': metric 'bad metric' is invalid"),
    (RULE + 'vaule = "x"\n', "rule 1 ('r'): unknown keys vaule"),
    (RULE + 'name2 = 1\n', "unknown keys name2"),
    ('[[rule]]\nname = ""\nevent = "e"\nmetric = "m"\n', "rule 1: key 'name': must be"),
    (RULE + "tags = 3\n", "rule 1 ('r'): key 'tags': must be a list of field names or a table"),
    (RULE + 'tags = ["Channel"]\n', "key 'tags': tag key 'Channel' is invalid"),
    (RULE + 'tags = ["tenant"]\n', "key 'tags': 'tenant' is part of every event's envelope"),
    (RULE + 'tags = [""]\n', "key 'tags': must name an event field"),
    (RULE + 'tags = {a = "x", b = 2}\n', "key 'tags': must name an event field"),
    (RULE + "tags = [{}]\n".format(", ".join(f'"t{k}"' for k in range(17))),
     "key 'tags': 17 tags with the bucket; at most 16"),
    (RULE + 'value = 1\n', "rule 1 ('r'): key 'value': must name an event field"),
    (RULE + 'value = "ts"\n', "key 'value': 'ts' is part of every event's envelope"),
    (RULE + 'min = 0\n', "key 'min': applies to the 'value' and 'bucket' fields"),
    (RULE + 'value = "v"\nmin = "0"\n', "key 'min': must be a finite number"),
    (RULE + 'value = "v"\nmin = nan\n', "key 'min': must be a finite number"),
    (RULE + "bucket = 1\n", "key 'bucket': must be a table"),
    (RULE + '[rule.bucket]\ntag = "b"\nedges = [1]\nlabels = ["a", "b"]\n',
     "key 'bucket.field': is missing"),
    (RULE + '[rule.bucket]\nfield = "f"\ntag = "b"\nedges = [1]\nlabels = ["a", "b"]\nx = 1\n',
     "key 'bucket': unknown keys x"),
    (RULE + '[rule.bucket]\nfield = "f"\ntag = "B"\nedges = [1]\nlabels = ["a", "b"]\n',
     "key 'bucket.tag': tag key 'B' is invalid"),
    (RULE + '[rule.bucket]\nfield = "f"\ntag = "b"\nedges = []\nlabels = ["a"]\n',
     "key 'bucket.edges': must be a non-empty list of finite numbers"),
    (RULE + '[rule.bucket]\nfield = "f"\ntag = "b"\nedges = [1, "2"]\nlabels = ["a"]\n',
     "key 'bucket.edges': must be a non-empty list"),
    (RULE + '[rule.bucket]\nfield = "f"\ntag = "b"\nedges = [2, 1]\nlabels = ["a", "b", "c"]\n',
     "key 'bucket.edges': must be strictly ascending"),
    (RULE + '[rule.bucket]\nfield = "f"\ntag = "b"\nedges = [1, 2]\nlabels = ["a", "b"]\n',
     "key 'bucket.labels': must be a list of 3 labels"),
    (RULE + '[rule.bucket]\nfield = "f"\ntag = "b"\nedges = [1]\nlabels = ["a", "a"]\n',
     "key 'bucket.labels': has a label twice"),
    (RULE + '[rule.bucket]\nfield = "f"\ntag = "b"\nedges = [1]\nlabels = ["a", 2]\n',
     "key 'bucket.labels': tag 'b' has a int value"),
    (RULE + 'tags = ["b"]\n[rule.bucket]\nfield = "f"\ntag = "b"\nedges = [1]\n'
     'labels = ["a", "c"]\n', "key 'bucket': tag 'b' is also in 'tags'"),
    (RULE + RULE, "rule 2 ('r'): key 'name': rule 1 has the same name"),
    (RULE + '[[rule]]\nevent = "e"\nmetric = "m"\n',
     "rule 2 ('e -> m'): key 'metric': rule 1 already makes 'm' from 'e' events"),
    ('builtin = true\n[[rule]]\nevent = "message.received"\nmetric = "messages.received"\n',
     "rule 1 ('message.received -> messages.received'): key 'metric': built-in rule 1 "
     "already makes"),
    ('builtin = true\n[[rule]]\nname = "response_time"\nevent = "x"\nmetric = "y"\n',
     "rule 1 ('response_time'): key 'name': built-in rule 3 has the same name"),
    ("[[rule]]\n[[rule]]\n", "rule 1: key 'event': is missing"),
])
def test_a_bad_rules_file_is_refused_naming_the_rule_and_the_key(
    text: str, complaint: str
) -> None:
    with pytest.raises(RulesError) as info:
        parse_rules(text, "rules.toml")
    assert str(info.value).startswith("rules.toml")
    assert complaint in str(info.value), str(info.value)


# ---- tally serve --rules -----------------------------------------------------------------


def test_rules_come_from_the_flag_the_variable_or_the_config_file(tmp_path) -> None:
    good = tmp_path / "rules.toml"
    good.write_text(ORDERS)
    assert load_config({"rules": str(good)}, None, {}).rules == str(good)
    assert load_config({}, None, {"TALLY_RULES": str(good)}).rules == str(good)
    config = tmp_path / "tally.toml"
    config.write_text(f"rules = {str(good)!r}\n")
    assert load_config({}, str(config), {}).rules == str(good)
    assert load_config({}, None, {}).rules is None  # the built-in rules


def test_a_bad_rules_file_stops_tally_serve_with_exit_2_naming_rule_and_key(
    tmp_path, capsys
) -> None:
    bad = tmp_path / "rules.toml"
    bad.write_text('[[rule]]\nname = "orders"\nevent = "order.placed"\nmetric = "o"\n'
                   'tags = ["Country"]\n')
    with pytest.raises(ConfigError, match="rule 1 \\('orders'\\): key 'tags'"):
        load_config({"rules": str(bad)}, None, {})
    assert cli.main(["serve", "--rules", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tally: error: rules file {bad}: rule 1 ('orders'): key 'tags': ")
    assert cli.main(["serve", "--rules", str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml: No such file" in capsys.readouterr().err

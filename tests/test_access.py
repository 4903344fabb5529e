"""The tokens file and the grants it yields, without servers."""

from __future__ import annotations

import pickle

import pytest

from tally.api.access import AccessFileError, Denied, load_access, parse_access

GOOD = """
[[token]]
secret = "acme-query-0123456789"
tenants = ["acme"]
scopes = ["query"]
name = "acme dashboard"

[[token]]
secret = "ops-admin-0123456789"
tenants = ["*"]
scopes = ["admin", "ingest"]
"""


def test_a_presented_secret_gets_its_grant() -> None:
    access = parse_access(GOOD)
    dash = access.grant_for("acme-query-0123456789")
    assert dash.name == "acme dashboard"
    assert dash.allows("acme") and not dash.allows("globex")
    dash.require_scope("query")
    with pytest.raises(Denied) as e:
        dash.require_scope("ingest")
    assert (e.value.code, e.value.status) == ("forbidden", 403)
    assert "lacks the 'ingest' scope" in e.value.message
    ops = access.grant_for("ops-admin-0123456789")
    assert ops.name == "token 2" and ops.allows("anyone")


@pytest.mark.parametrize("secret", [None, "", "acme-query-012345678", "ACME-QUERY-0123456789"])
def test_missing_or_unknown_secrets_are_unauthorized(secret: str | None) -> None:
    with pytest.raises(Denied) as e:
        parse_access(GOOD).grant_for(secret)
    assert (e.value.code, e.value.status) == ("unauthorized", 401)


def test_tenants_of_a_batch_are_refused_at_their_first_row() -> None:
    dash = parse_access(GOOD).grant_for("acme-query-0123456789")
    dash.require_tenants([("acme", 0)])
    with pytest.raises(Denied) as e:
        dash.require_tenants([("acme", 0), ("initech", 9), ("globex", 4)])
    assert e.value.row == 4
    assert e.value.message == "row 4: token 'acme dashboard' has no access to tenant 'globex'"


def test_the_access_list_carries_no_secret() -> None:
    blob = pickle.dumps(parse_access(GOOD))  # what crosses to the gateway actors
    assert b"acme-query-0123456789" not in blob and b"ops-admin" not in blob


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "no [[token]] entries"),
        ("[[token]\n", "not valid TOML"),
        ("[tokens]\n", "unknown top-level keys tokens"),
        ('[[token]]\nsecret = "short"\ntenants = ["a"]\nscopes = ["query"]\n',
         "token 1: secret must be a string of at least 16"),
        ('[[token]]\nsecret = "0123456789abcdefg"\ntenants = ["a"]\nscopes = ["read"]\n',
         "token 1: scopes must be a non-empty list of ingest, query, admin"),
        ('[[token]]\nsecret = "0123456789abcdefg"\ntenants = []\nscopes = ["query"]\n',
         "token 1: tenants must be a non-empty list"),
        ('[[token]]\nsecret = "0123456789abcdefg"\ntenants = ["Acme"]\nscopes = ["query"]\n',
         "token 1: tenant 'Acme' is invalid"),
        ('[[token]]\nsecret = "0123456789abcdefg"\ntenants = ["*", "a"]\nscopes = ["query"]\n',
         'token 1: tenants ["*"] stands alone'),
        ('[[token]]\nsecret = "0123456789abcdefg"\ntenants = ["a"]\nscopes = ["query"]\n'
         'expires = 3\n', "token 1: unknown keys expires"),
        ('[[token]]\nsecret = "0123456789abcdefg"\ntenants = ["a"]\nscopes = ["query"]\n'
         '[[token]]\nsecret = "0123456789abcdefg"\ntenants = ["b"]\nscopes = ["query"]\n',
         "token 2: the same secret as token 1"),
    ],
)
def test_a_bad_tokens_file_is_refused_naming_the_entry(text: str, complaint: str) -> None:
    with pytest.raises(AccessFileError) as e:
        parse_access(text, "tokens.toml")
    assert complaint in str(e.value)
    assert str(e.value).startswith("tokens.toml")


def test_an_unreadable_tokens_file_names_the_path(tmp_path) -> None:
    with pytest.raises(AccessFileError, match="tokens file .*nope.toml: No such file"):
        load_access(str(tmp_path / "nope.toml"))


def test_a_batch_by_gateway_number_names_each_tenant_at_its_first_row() -> None:
    # the registry's tenant numbers give what a pass over the batch's ids gives
    import time

    import numpy as np

    from tally.api.ingest import batch_tenants
    from tally.api.series_table import ConnectionTable
    from tally.wire.frames import SeriesTable
    from tally.wire.registry import SeriesRegistry

    registry = SeriesRegistry(4)
    registry.numbers(["zeta|m|"])  # a tenant the batch does not name
    table = ConnectionTable()
    entries = [[f"t{k % 7}", "m", {"k": str(k)}] for k in range(300)]
    assert table.define(SeriesTable(0, entries), registry)["op"] == "defined"
    rng = np.random.default_rng(3)
    now = time.time()
    for _ in range(20):
        i = rng.integers(0, 300, 2000).astype("<u4")
        ts = np.full(2000, int(now) - 60, "<i8")
        batch = table.batch(registry, i.tobytes(), ts.tobytes(), np.ones(2000, "<i8").tobytes(),
                            now)
        by_number = batch_tenants(batch, registry)
        assert sorted(by_number) == sorted(batch_tenants(batch))
        firsts = {f"t{k}": int(np.flatnonzero(i % 7 == k)[0]) for k in range(7)
                  if (i % 7 == k).any()}
        assert dict(by_number) == firsts

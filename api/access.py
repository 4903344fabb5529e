"""Who may do what: the tokens file, checked without I/O on every request.

The file is TOML, as in the design::

    [[token]]
    secret = "..."            # sent as Bearer token / in hello
    tenants = ["acme"]        # or ["*"]
    scopes = ["query"]        # any of ingest, query, admin
    name = "acme-dashboard"   # optional: named in logs and error messages

Only SHA-256 digests of the secrets leave the process that read the file
(the gateway actors get an ``AccessList`` of digests), and a presented secret
is compared with every digest in constant time, so neither the time an answer
takes nor the order of the file tells an attacker anything about a secret.

``admin`` is the operator's scope (``/metrics``); it does not imply the other
two, so a scraper's token cannot read or write counts.
"""

from __future__ import annotations

import hashlib
import hmac
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tally.wire.series import InvalidSeries, check_tenant
from tally.wire.vocabulary import ErrorCode

SCOPES = ("ingest", "query", "admin")
ALL_TENANTS = "*"
MIN_SECRET = 16  # characters; a shorter secret is guessable over the network


class AccessFileError(ValueError):
    """The tokens file cannot be used; the message names the entry and the field."""


class Denied(Exception):
    """A request refused for access reasons.

    ``code`` is ``unauthorized`` (no token, or one nobody issued: HTTP 401) or
    ``forbidden`` (a valid token without the tenant or scope: HTTP 403).
    ``row`` is the first row of an ingest batch whose tenant is not allowed.
    """

    def __init__(self, code: str, message: str, row: int | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.row = code, message, row

    @property
    def status(self) -> int:
        return 401 if self.code == ErrorCode.UNAUTHORIZED else 403


@dataclass(frozen=True, slots=True)
class Grant:
    """What one token allows; ``tenants`` None means every tenant."""

    name: str
    scopes: frozenset[str]
    tenants: frozenset[str] | None

    def require_scope(self, scope: str) -> None:
        if scope not in self.scopes:
            raise Denied(
                "forbidden",
                f"token {self.name!r} lacks the {scope!r} scope (it has: "
                f"{', '.join(sorted(self.scopes)) or 'none'})",
            )

    def allows(self, tenant: str) -> bool:
        return self.tenants is None or tenant in self.tenants

    def require_tenant(self, tenant: str) -> None:
        if not self.allows(tenant):
            raise Denied("forbidden", f"token {self.name!r} has no access to tenant {tenant!r}")

    def require_tenants(
        self, tenants_by_row: list[tuple[str, int]] | Callable[[], list[tuple[str, int]]]
    ) -> None:
        """Refuse an ingest batch naming a tenant the token lacks, at its first such row.
        A callable is only called when the token is limited to some tenants (finding
        each tenant's first row is a pass over the batch)."""
        if self.tenants is None:
            return
        if callable(tenants_by_row):
            tenants_by_row = tenants_by_row()
        bad = [(row, t) for t, row in tenants_by_row if t not in self.tenants]
        if bad:
            row, tenant = min(bad)
            raise Denied(
                "forbidden",
                f"row {row}: token {self.name!r} has no access to tenant {tenant!r}",
                row=row,
            )


OPEN = Grant("open access", frozenset(SCOPES), None)


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


@dataclass(frozen=True)
class AccessList:
    """Digests of the issued secrets with their grants; picklable, holds no secret."""

    entries: tuple[tuple[bytes, Grant], ...]

    def grant_for(self, secret: str | None) -> Grant:
        """The grant of a presented secret, or ``Denied("unauthorized")``.

        Every entry is compared, whatever matched, so the time taken does not
        depend on which entry (if any) the secret belongs to.
        """
        if not secret:
            raise Denied(ErrorCode.UNAUTHORIZED,
                    "a token is required (Authorization: Bearer <token>)")
        presented = _digest(secret)
        found: Grant | None = None
        for digest, grant in self.entries:
            if hmac.compare_digest(presented, digest) and found is None:
                found = grant
        if found is None:
            raise Denied(ErrorCode.UNAUTHORIZED, "unknown token")
        return found


def parse_access(text: str, source: str = "tokens file") -> AccessList:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise AccessFileError(f"{source}: not valid TOML: {e}") from None
    unknown = set(doc) - {"token"}
    if unknown:
        raise AccessFileError(
            f"{source}: unknown top-level keys {', '.join(sorted(unknown))}; expected [[token]]"
        )
    tokens = doc.get("token")
    if not isinstance(tokens, list) or not tokens:
        raise AccessFileError(f"{source}: no [[token]] entries")
    entries: list[tuple[bytes, Grant]] = []
    seen: dict[bytes, int] = {}
    for n, entry in enumerate(tokens, start=1):
        where = f"{source}: token {n}"
        digest, grant = _parse_entry(entry, where, n)
        if digest in seen:
            raise AccessFileError(f"{where}: the same secret as token {seen[digest]}")
        seen[digest] = n
        entries.append((digest, grant))
    return AccessList(tuple(entries))


def _parse_entry(entry: Any, where: str, n: int) -> tuple[bytes, Grant]:
    if not isinstance(entry, dict):
        raise AccessFileError(f"{where}: must be a table")
    unknown = set(entry) - {"secret", "tenants", "scopes", "name"}
    if unknown:
        raise AccessFileError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
    secret = entry.get("secret")
    if not isinstance(secret, str) or len(secret) < MIN_SECRET:
        raise AccessFileError(f"{where}: secret must be a string of at least {MIN_SECRET} "
                              "characters (e.g. python3 -c 'import secrets; "
                              "print(secrets.token_urlsafe(32))')")
    name = entry.get("name", f"token {n}")
    if not isinstance(name, str) or not name:
        raise AccessFileError(f"{where}: name must be a non-empty string")
    scopes = entry.get("scopes")
    if not isinstance(scopes, list) or not scopes or not all(s in SCOPES for s in scopes):
        raise AccessFileError(f"{where}: scopes must be a non-empty list of {', '.join(SCOPES)}; "
                              f"got {scopes!r}")
    tenants = entry.get("tenants")
    if not isinstance(tenants, list) or not tenants:
        raise AccessFileError(f"{where}: tenants must be a non-empty list of tenants, or [\"*\"]")
    if ALL_TENANTS in tenants:
        if len(tenants) > 1:
            raise AccessFileError(f"{where}: tenants [\"*\"] stands alone (it means every tenant)")
        allowed = None
    else:
        try:
            allowed = frozenset(check_tenant(t) for t in tenants)
        except InvalidSeries as e:
            raise AccessFileError(f"{where}: {e}") from None
    return _digest(secret), Grant(name, frozenset(scopes), allowed)


def load_access(path: str) -> AccessList:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise AccessFileError(f"tokens file {path}: {e.strerror or e}") from None
    return parse_access(text, f"tokens file {path}")

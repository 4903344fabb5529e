"""Every error the client raises, beside the argument errors (``TypeError``, ``ValueError``).

Three families, because a caller does three different things about them:

- ``BatchRejected``: the server refused one batch for good; the client goes
  on, and the caller decides what to do about the increments it names.
- ``ClientFailed`` (``ProtocolMismatch``, ``ProducerConflict``) and
  ``Unauthorized``: the client stopped for good, from misconfiguration or a
  bug; every later call raises the same error, since retrying would only hide it.
- ``TallyTimeout`` and ``ClientClosed``: a wait ran out, or the client is
  closed; nothing kept was dropped by it.
"""

from __future__ import annotations

from typing import Any

from tally.wire.vocabulary import ErrorCode, short_repr

__all__ = [
    "BatchRejected",
    "Broken",
    "ClientClosed",
    "ClientFailed",
    "ProducerConflict",
    "ProtocolMismatch",
    "ServerError",
    "TallyError",
    "TallyTimeout",
    "Unauthorized",
]

Tags = dict[str, str] | None
Increment = tuple[str, str, Tags, int, int]  # (tenant, metric, tags, ts, value), as on the wire


def short(msg: Any) -> str:
    """A message or value for an error text, cut to a readable length."""
    return short_repr(msg, 300)


def _code(code: Any) -> ErrorCode | str:
    try:
        return ErrorCode(code)
    except ValueError:  # a code newer than this client: kept as sent
        return code


class TallyError(Exception):
    """Base of every error raised by the client (besides argument errors)."""


class ServerError(TallyError):
    """An ``error`` frame from the server; ``code`` is the wire error code.

    ``code`` is an ``ErrorCode`` when the server sent one this client knows
    (a ``StrEnum``, so it also compares equal to the plain string), else the
    string as sent.
    """

    def __init__(self, frame: dict[str, Any]) -> None:
        super().__init__(f"{frame.get('code')}: {frame.get('message')}")
        self.frame = frame
        self.code: ErrorCode | str = _code(frame.get("code", ""))
        self.row: int | None = frame.get("row")


class BatchRejected(ServerError):
    """The server refused a batch for good (``bad_row``, ``bad_request``, ``unauthorized``).

    None of its ``increments`` were applied and the client will not resend
    them. ``row`` indexes the batch, which is meaningless to the caller, so
    ``increment`` carries that row as ``(tenant, metric, tags, ts, value)``,
    or, for a batch of events, ``event`` the event the server named.
    """

    def __init__(
        self,
        frame: dict[str, Any],
        *,
        seq: int,
        increments: int,
        increment: Increment | None = None,
        event: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(frame)
        self.seq = seq
        self.increments = increments
        self.increment = increment
        self.event = event
        what = f"; the bad increment: {increment!r}" if increment is not None else ""
        if event is not None:
            what = f"; the bad event: {short(event)}"
        self.args = (
            f"batch seq {seq} ({increments} increments) refused for good, none applied: "
            f"{frame.get('code')}: {frame.get('message')}{what}",
        )


class Unauthorized(ServerError):
    """The server refused the token; the client stopped and does not retry."""


class ClientFailed(TallyError):
    """The client stopped for good; its kept increments are not sent any more."""


class ProtocolMismatch(ClientFailed):
    """The server does not speak what this client needs (v1 with durable acks)."""


class ProducerConflict(ClientFailed):
    """Another client is using this producer name: the seqs would collide."""


class ClientClosed(TallyError):
    """The client was closed (or is closing)."""


class TallyTimeout(TallyError, TimeoutError):
    """A wait ran out; nothing was dropped (kept batches are still being sent)."""


class Broken(Exception):
    """The connection cannot go on; the shell closes it, then reconnects and resends.

    Internal: raised by the core to its shell, never to a caller.
    """

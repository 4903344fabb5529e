"""The service's log: one JSON object a line, written for an operator to read.

Routine work (checkpoints, batches) is counted in ``/metrics``, not logged;
the log keeps what someone must act on or look back at: start-up, errors,
slow and failed checkpoints, clients the server cut off, and one summary line
a minute from the supervisor. Every actor process calls ``configure`` so its
lines carry a time, a level and a pid; Ray forwards them to ``tally serve``'s
stderr, where ``ray_output_env`` keeps Ray's colours and ``(Actor pid=…)``
prefixes out when that is not a terminal: a file of these lines stays one
JSON object a line that grep and jq read alike.

A line that can repeat at the rate of traffic or of checkpoints (a store
outage, a client sending garbage in a loop) goes through ``Throttle``: the
first is logged at once, the next only after a quiet period and saying how
many were left out, so an outage costs a few lines, not thousands.

This module imports neither Ray nor anything above it: ``tally serve`` calls
``ray_output_env`` before Ray is imported, and every layer from ``actors`` up
logs through it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, MutableMapping
from datetime import UTC, datetime
from typing import Any

# Lines of one kind that repeat (a store that stays down, a slow store) come at
# most once per this many seconds per shard; the summary line counts them all.
REPEAT_SECONDS = 60.0


class JsonLines(logging.Formatter):
    """``{"ts", "level", "pid", ...}``: a message that is a JSON object keeps its
    fields; any other (a library's) becomes ``message``, with ``logger``."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        fields: dict[str, Any] | None = None
        if message.startswith("{"):
            try:
                parsed = json.loads(message)
            except ValueError:
                parsed = None
            if isinstance(parsed, dict):
                fields = parsed
        if fields is None:
            fields = {"logger": record.name, "message": message}
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "pid": record.process,
            **fields,
        }
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class _Handler(logging.StreamHandler):
    """stderr, in JsonLines, counting the errors it writes (for the summary line)."""

    errors = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR:
            _Handler.errors += 1
        super().emit(record)


def configure() -> None:
    """This process logs INFO and up to stderr as JSON lines; calling it again is harmless."""
    root = logging.getLogger()
    if any(isinstance(h, _Handler) for h in root.handlers):
        return
    handler = _Handler(sys.stderr)
    handler.setFormatter(JsonLines())
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)


def errors_logged() -> int:
    """Lines at level error or above this process has written since it started."""
    return _Handler.errors


def event(logger: logging.Logger, level: int, name: str, **fields: Any) -> None:
    """One line ``{"event": name, ...fields}``."""
    if logger.isEnabledFor(level):
        logger.log(level, json.dumps({"event": name, **fields}, default=str))


class Throttle:
    """At most one line per key every ``every`` seconds.

    ``admit`` answers None for a line to leave out (it is counted), or how
    many of that key were left out since the last one logged, for the line to
    say. Lines left out at the end of a burst are told by the next line of
    their key; the summary line and the metrics count every one meanwhile.
    """

    def __init__(self, every: float = REPEAT_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.every = every
        self._clock = clock
        self._last: dict[Any, float] = {}
        self._held: dict[Any, int] = {}

    def admit(self, key: Any) -> int | None:
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self.every:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._held.pop(key, 0)

    def reset(self, key: Any) -> None:
        """The next line of ``key`` is logged at once (a new episode, not a repeat)."""
        self._last.pop(key, None)
        self._held.pop(key, None)


def ray_output_env(environ: MutableMapping[str, str], terminal: bool) -> None:
    """How Ray forwards the actors' lines to ``tally serve``; call before importing Ray.

    Ray folds similar lines of several processes into one ``[repeated Nx
    across cluster]`` (numbers ignored: two shards' errors become one line,
    with a colour code): never here. Off a terminal it also leaves out the
    colour codes and the ``(ShardActor pid=…)`` prefix it puts before every
    forwarded line, so each line is the actor's JSON line as written (it
    carries its own pid). A variable the operator set is left alone. Ray
    reads the last two when it is imported, the colour when it prints.
    """
    environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not terminal:
        environ.setdefault("RAY_COLOR_PREFIX", "0")
        environ.setdefault("RAY_DISABLE_WORKER_LOG_PREFIX", "1")


def stderr_is_terminal() -> bool:
    try:
        return os.isatty(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):
        return False

"""Store URLs, as given to ``tally serve --store``: one place that knows every form."""

from __future__ import annotations

import os

from tally.checkpoint.redact import redact_url
from tally.checkpoint.store import Store

__all__ = ["ACCEPTED_FORMS", "open_store", "redact_url"]

ACCEPTED_FORMS = (
    "sqlite:///relative/path (relative to the current directory), "
    "sqlite:////absolute/path, mongodb://..., mongodb+srv://..., memory://"
)


def _refuse(url: str, why: str) -> ValueError:
    return ValueError(f"store URL {redact_url(url)!r} {why}; accepted forms: {ACCEPTED_FORMS}")


def open_store(url: str, runs: bool = False) -> Store:
    """The store a URL names; ValueError naming the URL and the accepted forms otherwise.

    ``runs``: the caller is a shard, which folds; a store that can keeps its
    checkpoints as runs (checkpoint/runs.py: SQLite).

    Imports are local so that using SQLite needs neither pymongo nor mongomock
    to import, and a relative SQLite path is resolved against the current
    directory now, not whenever the file is first opened.
    """
    if not isinstance(url, str):
        raise TypeError(f"store URL must be a string, not {type(url).__name__}")
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///") :]  # "/abs" for sqlite:////abs, "rel" for sqlite:///rel
        if not path or path.endswith("/"):
            raise _refuse(url, "names no database file")
        if "?" in path:
            raise _refuse(url, "has query parameters, which the SQLite store does not take")
        from tally.checkpoint.sqlite import SqliteStore

        return SqliteStore(os.path.abspath(path), runs=runs)
    if url.startswith("sqlite:"):
        raise _refuse(url, "is not a SQLite file URL (in-memory SQLite is not shared or durable)")
    if url.startswith(("mongodb://", "mongodb+srv://")):
        from tally.checkpoint.mongo import MongoStore

        return MongoStore(url)
    if url == "memory://":
        from tally.checkpoint.memory import MemoryStore

        return MemoryStore()
    if url.startswith("memory:"):
        raise _refuse(url, "takes nothing after memory://")
    raise _refuse(url, "has an unknown scheme")

"""Every series a gateway process has seen, by number: what a wide batch needs per series.

A batch over 100,000 series cannot afford a Python step per series per frame:
routing (the shard of each series), the access check (the tenant of each),
the query index and the shards' own lookups would each cost one. So a gateway
gives every series id it sees a small number (a *gateway number*, ``gn``) once,
and keeps what each step needs in arrays indexed by it: the owner shard, the
tenant's number, the id itself. A connection's series table
(``wire/frames.py``, the ``series`` op) is then an int array into these, and a
frame over it is numpy from the socket to the shards.

Numbers are never reused while the registry lives. It is bounded: once
``limit`` series are known it starts over under a new ``epoch``, and whoever
holds numbers (a connection's table, a shard channel's) sees the epoch change
and resolves its series ids again.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import repeat
from typing import Any

import numpy as np

from tally.wire.series import shard_of

DEFAULT_LIMIT = 4_000_000


class SeriesRegistry:
    """sid -> gateway number, and per number: sid, owner shard, tenant number."""

    def __init__(self, shards: int, limit: int = DEFAULT_LIMIT) -> None:
        self.shards = shards
        self.limit = limit
        self.epoch = 0
        self._reset()

    def _reset(self) -> None:
        self.number: dict[str, int] = {}
        self.sid = np.empty(1024, object)
        self.owner = np.zeros(1024, np.int32)
        self.tenant = np.zeros(1024, np.int32)
        self.tenant_number: dict[str, int] = {}
        self.tenant_names: list[str] = []
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def numbers(self, sids: list[str]) -> np.ndarray:
        """The gateway numbers of ``sids`` (valid series ids), numbering new ones.

        Starts over first (a new ``epoch``) when the new ones would pass the limit:
        numbers handed out before are then meaningless, and their holders ask again.
        """
        found = np.fromiter(map(self.number.get, sids, repeat(-1)), np.int64, len(sids))
        new = np.flatnonzero(found < 0)
        if len(new):
            if self.count + len(new) > self.limit:
                self.epoch += 1
                self._reset()
                return self.numbers(sids)
            self._grow(self.count + len(new))
            number, owner, tenant = self.number, self.owner, self.tenant
            for k in new.tolist():
                sid = sids[k]
                g = number.get(sid)  # (named twice in this call)
                if g is None:
                    g = number[sid] = self.count
                    self.count += 1
                    self.sid[g] = sid
                    owner[g] = shard_of(sid, self.shards)
                    tenant[g] = self._tenant(sid.split("|", 1)[0])
                found[k] = g
        return found

    def _tenant(self, name: str) -> int:
        t = self.tenant_number.get(name)
        if t is None:
            t = self.tenant_number[name] = len(self.tenant_names)
            self.tenant_names.append(name)
        return t

    def _grow(self, need: int) -> None:
        size = len(self.sid)
        if need <= size:
            return
        size = max(need, size * 2)
        for name in ("sid", "owner", "tenant"):
            old = getattr(self, name)
            grown = np.empty(size, old.dtype) if old.dtype == object else np.zeros(size, old.dtype)
            grown[: len(old)] = old
            setattr(self, name, grown)

    def sids_of(self, gn: np.ndarray) -> Sids:
        """The ids of gateway numbers, read only when asked (``Sids``)."""
        return Sids(self.sid, gn)


class Sids:
    """Series ids as numbers into a table of ids, each read only when asked.

    A wide batch names tens of thousands of series, and most of the steps it
    goes through (aggregating, splitting per shard, applying) need their numbers,
    not their ids. Gathering the ids into an array of their own takes a
    reference to each string, scattered in memory: a cache miss per series, a
    large part of a frame's cost. A ``Sids`` indexes like that array (an int
    gives an id; a slice or an index array gives another ``Sids``) and reads a
    string only when one is asked for: a definition the first time a socket
    names a series, an error message, a series a shard does not hold yet.

    The table must not change under the numbers it is read through: a gateway
    registry's numbers are never reused within an epoch, and it starts over in
    new arrays (``SeriesRegistry._reset``), as a shard's socket does.
    """

    __slots__ = ("table", "at")

    def __init__(self, table: np.ndarray, at: np.ndarray) -> None:
        self.table = table  # object array of ids
        self.at = at  # each id's index into table

    def __len__(self) -> int:
        return len(self.at)

    def __getitem__(self, k: Any) -> Any:
        if isinstance(k, int | np.integer):
            return self.table[self.at[k]]
        return Sids(self.table, self.at[k])

    def __iter__(self) -> Iterator[str]:
        return iter(self.tolist())

    def tolist(self) -> list[str]:
        return self.table[self.at].tolist()  # type: ignore[no-any-return]


class SeriesNumbers:
    """Series ids a connection numbered 0, 1, 2, ... (its series table, or the series
    its row frames named), and their gateway numbers, resolved once per new id.

    A frame over such a table is then numpy from the socket to the shards: its
    increments name table entries, and the entries' gateway numbers give owner
    shards and ids without a dict lookup per series. After the registry starts
    over (a new epoch) every id is resolved again, on the next frame that asks.
    """

    __slots__ = ("sids", "_gn", "_of")

    def __init__(self) -> None:
        self.sids: list[str] = []
        self._gn = np.empty(0, np.int64)
        self._of: tuple[SeriesRegistry, int] | None = None  # the registry and epoch of _gn

    def __len__(self) -> int:
        return len(self.sids)

    def gateway_numbers(self, registry: SeriesRegistry) -> np.ndarray:
        """Each entry's gateway number in ``registry``'s current epoch."""
        while True:
            epoch = registry.epoch
            if self._of is None or self._of[0] is not registry or self._of[1] != epoch:
                self._gn, self._of = np.empty(0, np.int64), (registry, epoch)
            if len(self._gn) == len(self.sids):
                return self._gn
            new = registry.numbers(self.sids[len(self._gn):])
            if registry.epoch == epoch:
                self._gn = np.concatenate((self._gn, new))
            # (else it started over while numbering these: all of them again)

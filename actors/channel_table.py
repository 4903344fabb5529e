"""Series named by number on a gateway's socket to a shard, both ends of it.

A wide batch's part for one shard names tens of thousands of series. Sent as
id strings, each was packed by the gateway, unpacked by the shard and looked
up in the shard's dict, frame after frame: most of a shard's time for such a
batch. So a gateway that has gateway numbers for a batch (wire/registry.py)
sends each series id once per socket (``defs``) and afterwards only numbers;
the shard keeps, per socket, each number's id and the series number it last
resolved to, checked against ``LiveSeries.gen`` so a number the shard has
since given to another series is never trusted.

The gateway's side (``Sent``) remembers which numbers this socket was told.
Numbers are of one registry epoch: a part of a newer epoch starts both sides
over (``ep``), and a part of an older one (built before the registry started
over) goes with its ids, as every part used to.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tally.actors.live_series import LiveSeries
from tally.wire.batches import Batch
from tally.wire.registry import Sids


class Sent:
    """The gateway's side: which gateway numbers this socket has been told, in which epoch."""

    def __init__(self) -> None:
        self.epoch = -1
        self.told = np.zeros(0, np.bool_)

    def fields(self, batch: Batch) -> dict[str, Any]:
        """The part as a numbered wire map, or as ``Batch.to_wire`` when it cannot be."""
        gn = batch.gn
        if gn is None or batch.gn_epoch < self.epoch or not len(gn):
            return batch.to_wire()
        if batch.gn_epoch > self.epoch:
            self.epoch, self.told = batch.gn_epoch, np.zeros(0, np.bool_)
        top = int(gn.max()) + 1
        if top > len(self.told):
            grown = np.zeros(max(top, 2 * len(self.told), 1024), np.bool_)
            grown[: len(self.told)] = self.told
            self.told = grown
        new = np.flatnonzero(~self.told[gn])
        self.told[gn[new]] = True
        sids = batch.sids
        defs = ([sids[k] for k in new.tolist()] if isinstance(sids, list)
                else sids[new].tolist())
        wire = batch.to_wire(with_sids=False)
        wire.update({"gn": gn.astype("<u4").tobytes(), "ep": self.epoch, "defs": defs,
                     "dpos": new.astype("<u4").tobytes()})
        return wire


class Known:
    """The shard's side, per socket: each gateway number's id and cached series number."""

    def __init__(self) -> None:
        self.epoch = -1
        self.sid = np.empty(0, object)
        self.told = np.zeros(0, np.bool_)  # which numbers have an id (a gather, not a scan)
        self.g = np.zeros(0, np.int64)  # series number last resolved (-1: none)
        self.gen = np.zeros(0, np.int64)  # LiveSeries.gen of that number then

    def batch(self, wire: Any) -> Batch | None:
        """The part ``Sent.fields`` made (or ``Batch.to_wire``'s); None if not one."""
        if type(wire) is not dict or "gn" not in wire:
            return Batch.from_wire(wire)
        gn_bytes, ep, defs, dpos = (wire.get(k) for k in ("gn", "ep", "defs", "dpos"))
        if (type(gn_bytes) is not bytes or len(gn_bytes) % 4 or type(ep) is not int
                or type(defs) is not list or type(dpos) is not bytes
                or len(dpos) != 4 * len(defs) or not all(type(s) is str for s in defs)):
            return None
        gn = np.frombuffer(gn_bytes, "<u4").astype(np.int64)
        pos = np.frombuffer(dpos, "<u4").astype(np.int64)
        if len(pos) and int(pos.max()) >= len(gn):
            return None
        if ep != self.epoch:
            self.epoch = ep
            self.sid = np.empty(0, object)
            self.told = np.zeros(0, np.bool_)
            self.g = self.gen = np.zeros(0, np.int64)
        if len(gn) and int(gn.max()) >= len(self.sid):
            self._grow(int(gn.max()) + 1)
        if len(pos):
            self.sid[gn[pos]] = defs
            self.told[gn[pos]] = True
            self.g[gn[pos]] = -1
        if not self.told[gn].all():
            return None  # a number this socket was never told: the caller asks Ray
        return Batch.from_wire({**wire, "sids": Sids(self.sid, gn)}, gn=gn)

    def _grow(self, need: int) -> None:
        size = max(need, 2 * len(self.sid), 1024)
        sid = np.empty(size, object)
        sid[: len(self.sid)] = self.sid
        told = np.zeros(size, np.bool_)
        told[: len(self.told)] = self.told
        g = np.full(size, -1, np.int64)
        g[: len(self.g)] = self.g
        gen = np.zeros(size, np.int64)
        gen[: len(self.gen)] = self.gen
        self.sid, self.told, self.g, self.gen = sid, told, g, gen

    def numbers(self, batch: Batch, live: LiveSeries) -> np.ndarray | None:
        """The series numbers of the batch's sids (-1: not held), from the cache where it
        is still right; the rest looked up and cached. None for a batch without numbers."""
        gn = batch.gn
        if gn is None:
            return None
        g = self.g[gn]
        held = g >= 0
        if held.any():
            gs = g[held]
            ok = gs < len(live.gen)
            ok[ok] = live.gen[gs[ok]] == self.gen[gn[held][ok]]
            stale = np.flatnonzero(held)[~ok]
            g[stale] = -1
        ask = np.flatnonzero(g < 0)
        if len(ask):
            sids = batch.sids
            names = [sids[k] for k in ask] if isinstance(sids, list) else sids[ask].tolist()
            found = live.numbers(names)
            g[ask] = found
            now_held = found >= 0
            cached = gn[ask[now_held]]
            self.g[cached] = found[now_held]
            self.gen[cached] = live.gen[found[now_held]]
        return g

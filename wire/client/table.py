"""The producer's series table, defined on each connection with ``series`` frames.

A producer writing over many series (``tally import`` of a wide file) would
otherwise send most of them again in every batch, and the gateway would decode
and resolve each again: more work than the increments themselves. Instead each
series gets a number once, for the producer's life; a batch's ``i`` column holds
those numbers and its frame carries no table. On every connection the entries
are defined (``{"op": "series", "base", "series"}``) before the first batch that
needs them, so a batch kept for a resend is valid on any later connection: the
table only grows, and a new connection is told all of it again.
See docs/protocol.md ("series").
"""

from __future__ import annotations

from itertools import repeat

import msgpack
import numpy as np

MAX_ENTRIES = 2_097_152  # the server's limit per connection (docs/protocol.md)
MAX_ENTRIES_PER_FRAME = 100_000
_PACKER = msgpack.Packer(use_bin_type=True)


class ProducerTable:
    """Packed series entries by number, and how many the current connection was told."""

    __slots__ = ("number", "entries", "defined", "limit")

    def __init__(self, limit: int = MAX_ENTRIES) -> None:
        self.number: dict[bytes, int] = {}  # packed entry -> its number
        self.entries: list[bytes] = []  # packed ``[tenant, metric, tags|nil]`` by number
        self.defined = 0  # entries the current connection holds
        self.limit = limit

    def __len__(self) -> int:
        return len(self.entries)

    def numbers(self, entries: list[bytes]) -> np.ndarray | None:
        """Each packed entry's number (new ones are added), or None when they would not
        all fit under the server's limit (nothing is added then: the batch carries its
        own table instead)."""
        number = self.number
        # (map() with a default looks each up in C: no Python step per known entry)
        found = np.fromiter(map(number.get, entries, repeat(-1)), np.int64, len(entries))
        absent = np.flatnonzero(found < 0)
        if len(absent):
            new = list(dict.fromkeys(map(entries.__getitem__, absent.tolist())))
            if len(self.entries) + len(new) > self.limit:
                return None
            start = len(self.entries)
            number.update(zip(new, range(start, start + len(new)), strict=True))
            self.entries += new
            found[absent] = np.fromiter(map(number.__getitem__, map(
                entries.__getitem__, absent.tolist())), np.int64, len(absent))
        return found.astype(np.uint32)

    def definitions(self, max_bytes: int) -> list[bytes]:
        """The ``series`` frames that tell the connection every entry it lacks, each at
        most ``max_bytes`` (and ``MAX_ENTRIES_PER_FRAME`` entries); none are left after."""
        frames = []
        start = self.defined
        while start < len(self.entries):
            end, size = start, 64  # (the map, its keys and headers)
            while end < len(self.entries) and end - start < MAX_ENTRIES_PER_FRAME and (
                    size + len(self.entries[end]) <= max_bytes or end == start):
                size += len(self.entries[end])
                end += 1
            body = b"".join((
                _PACKER.pack_map_header(3), _PACKER.pack("op"), _PACKER.pack("series"),
                _PACKER.pack("base"), _PACKER.pack(start), _PACKER.pack("series"),
                _PACKER.pack_array_header(end - start), *self.entries[start:end],
            ))
            frames.append(len(body).to_bytes(4, "big") + body)
            start = end
        self.defined = start
        return frames

    def entry(self, n: int) -> list | None:
        """Entry number ``n`` unpacked, to name an increment in an error (slow path)."""
        return msgpack.unpackb(self.entries[n], raw=False) if 0 <= n < len(self.entries) else None

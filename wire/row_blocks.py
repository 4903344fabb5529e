"""Row frames read with numpy, without building a Python object per row.

msgpack-decoding a ``rows`` array builds a list, two strings, a map of tags and
two ints for every row, and the batch loop then looks each row's series up: that
was the whole cost of a row frame in the gateway. But a
producer sends the same few thousand series over and over, and a series is the
same bytes every time it is sent. So this scanner finds where every row starts,
where its series ends and its ts begins, and what its two integers are, with
byte arithmetic over the whole array at once; rows are then told apart by the
raw bytes of their series, and each distinct series is decoded once (and once
per connection, with the cache).

It reads exactly the msgpack a row is made of -- a 5-array of two strings, a nil
or a map of strings, and two integers, in any of their encodings -- and checks
every byte of the array is accounted for. Anything else (a float ts, a bin
tenant, a row of 4 fields, bytes that do not add up) returns None, and the
frame goes to the general decoder, which gives the usual answer, error included.
So a frame is never read differently on this path, only faster.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack
import numpy as np

from tally.wire.registry import SeriesNumbers
from tally.wire.series import InvalidSeries, series_key

_MAX_TAGS = 32  # a map of more tags goes to the general decoder
_MAX_HASHED = 256  # series of more bytes are told apart with a dict of their bytes
_TABLE_WORDS = 16  # series of up to 128 bytes are found again without a Python step
# Series one connection's caches keep before starting over: well above the 100,000 active
# series of a wide producer, whose every frame would otherwise start them over.
SERIES_PER_CONNECTION = 300_000
# zeros after the array: reads up to 9 bytes past a position, and the hashed windows
# of a series near the end, stay inside
_PAD = _MAX_HASHED + 16


def _int_tables() -> tuple[np.ndarray, ...]:
    """Per msgpack type byte: encoded size of an int (0: not an int), payload width,
    signedness, and the value of the one-byte fixints."""
    size = np.zeros(256, np.int64)
    width = np.zeros(256, np.int64)
    signed = np.zeros(256, np.bool_)
    fixed = np.zeros(256, np.int64)
    size[:0x80] = 1
    fixed[:0x80] = np.arange(0x80)
    size[0xE0:] = 1
    fixed[0xE0:] = np.arange(0xE0, 0x100) - 0x100
    for t, w, s in ((0xCC, 1, False), (0xCD, 2, False), (0xCE, 4, False), (0xCF, 8, False),
                    (0xD0, 1, True), (0xD1, 2, True), (0xD2, 4, True), (0xD3, 8, True)):
        size[t], width[t], signed[t] = 1 + w, w, s
    return size, width, signed, fixed


_INT_SIZE, _INT_WIDTH, _INT_SIGNED, _INT_FIXED = _int_tables()
_EIGHT = np.arange(1, 9)
_FOUR = np.arange(1, 5)
_INT64_MAX = np.uint64(2**63 - 1)
# odd multipliers, one per 8-byte word of a series, for a hash that is always checked
_MIX = np.random.default_rng(2026).integers(1, 2**63, _MAX_HASHED // 8 + 1,
                                            dtype=np.uint64) | np.uint64(1)




def _masks() -> np.ndarray:
    """Per byte length n: the 8-byte words keeping bytes [0, n) of a little-endian row."""
    kept = np.arange(_MAX_HASHED + 1)[:, None] > np.arange(_MAX_HASHED + 8)[None, :]
    return np.ascontiguousarray(kept.astype(np.uint8) * np.uint8(0xFF)).view("<u8")


_MASKS = _masks()


@dataclass(slots=True, eq=False)
class RowBlock:
    """The ``rows`` of one frame, read and every series validated. Row ``k`` names the
    series numbered ``numbers[group[k]]`` in ``table`` (the connection's numbering when
    the block was read); ``ts`` and ``v`` are int64. ``aliased``: two entries of
    ``numbers`` may be one series (its tags sent in two orders)."""

    table: SeriesNumbers
    numbers: np.ndarray
    group: np.ndarray
    aliased: bool
    ts: np.ndarray
    v: np.ndarray
    data: np.ndarray  # the bytes the scanner read, holding the msgpack array at ``span``
    span: tuple[int, int]

    def __len__(self) -> int:
        return len(self.group)

    def by_sid(self) -> tuple[list[str], np.ndarray]:
        """The distinct series ids, sorted, and each row's index among them: the rows as
        a ``Batch`` built without a gateway's registry wants them."""
        used, back = np.unique(self.numbers, return_inverse=True)
        names = [self.table.sids[k] for k in used.tolist()]
        order = sorted(range(len(names)), key=names.__getitem__)
        rank = np.empty(len(names), np.int64)
        rank[order] = np.arange(len(names))
        return [names[k] for k in order], rank[back.reshape(-1)][self.group]

    @property
    def sids(self) -> list[str]:
        return self.by_sid()[0]

    def rows(self) -> list:
        """The rows as the general decoder gives them (the slow path's input)."""
        start, end = self.span
        return msgpack.unpackb(memoryview(self.data)[start:end], raw=False,
                               strict_map_key=False)


class SeriesBytes:
    """The valid series one connection has sent, known by their msgpack bytes.

    Each distinct series id gets a number in ``table``, whose gateway numbers a
    gateway resolves once per series (``SeriesNumbers``), so a block goes from here
    to the shards without a step per series. Series bytes map to it twice: in a dict
    (every series), and in numpy arrays sorted by the hash ``_distinct`` computes,
    holding each entry's words so a frame's series are found and checked without a
    Python step each (series of up to ``_TABLE_WORDS`` words). Bounded: it starts
    over when ``limit`` series bytes are known (one series sent with its tags in many
    orders is as many entries).
    """

    def __init__(self, limit: int = SERIES_PER_CONNECTION) -> None:
        self.limit = limit
        self._clear()

    def _clear(self) -> None:
        # a new numbering: blocks read before keep theirs, which stays as it was
        self.table = SeriesNumbers()
        self.aliased = False  # some series is known by more than one byte string
        self.number: dict[str, int] = {}
        self.by_bytes: dict[bytes, int] = {}
        self.hashes = np.empty(0, np.uint64)
        self.numbers = np.empty(0, np.int64)
        self.lengths = np.empty(0, np.int64)
        self.words = np.empty((0, _TABLE_WORDS), np.uint64)

    def numbers_of(self, view: memoryview, start: np.ndarray, length: np.ndarray,
                   found: _Found | None) -> np.ndarray | None:
        """The number of each series ``view[start:start+length]`` (distinct ones), or None
        when one is not valid (the general path names the row) or not UTF-8 (it answers
        ``bad_frame``). ``found``: their hashes and words, from ``_distinct``."""
        if len(self.by_bytes) >= self.limit:  # (at least one entry per series id)
            self._clear()
        nums = np.full(len(start), -1, np.int64)
        tabled = found is not None and found.words.shape[1] <= _TABLE_WORDS
        if tabled and len(self.hashes):
            assert found is not None
            width = found.words.shape[1]
            at = np.minimum(np.searchsorted(self.hashes, found.hashes), len(self.hashes) - 1)
            hit = (self.hashes[at] == found.hashes) & (self.lengths[at] == length)
            hit &= (self.words[at, :width] == found.words).all(axis=1)
            nums[hit] = self.numbers[at[hit]]
        missed = np.flatnonzero(nums < 0)
        for j, a, n in zip(missed.tolist(), start[missed].tolist(), length[missed].tolist(),
                           strict=True):
            prefix = view[a:a + n].tobytes()
            num = self.by_bytes.get(prefix)
            if num is None:
                try:
                    tenant, metric, tags = msgpack.unpackb(b"\x93" + prefix, raw=False,
                                                           strict_map_key=False)
                    sid = series_key(tenant, metric, tags).sid
                except (UnicodeDecodeError, InvalidSeries):
                    return None
                num = self.number.get(sid)
                if num is None:
                    num = self.number[sid] = len(self.table.sids)
                    self.table.sids.append(sid)
                else:
                    self.aliased = True
                self.by_bytes[prefix] = num
            nums[j] = num
        if tabled and len(missed):
            assert found is not None
            self._table(found, length, nums, missed)
        return nums

    def _table(self, found: _Found, length: np.ndarray, nums: np.ndarray,
               new: np.ndarray) -> None:
        hashes = found.hashes[new]
        fresh = ~np.isin(hashes, self.hashes)  # a hash taken by other bytes stays in the dict
        new = new[fresh]
        words = np.zeros((len(new), _TABLE_WORDS), np.uint64)
        words[:, :found.words.shape[1]] = found.words[new]
        hashes = np.concatenate((self.hashes, found.hashes[new]))
        order = np.argsort(hashes)
        self.hashes = hashes[order]
        self.numbers = np.concatenate((self.numbers, nums[new]))[order]
        self.lengths = np.concatenate((self.lengths, length[new]))[order]
        self.words = np.concatenate((self.words, words))[order]

    def block(self, nums: np.ndarray, group: np.ndarray, ts: np.ndarray, v: np.ndarray,
              data: np.ndarray, span: tuple[int, int]) -> RowBlock:
        """The block of rows naming series ``nums[group]`` (numbers of this connection)."""
        return RowBlock(self.table, nums, group, self.aliased, ts, v, data, span)


def _strings(b: np.ndarray, q: np.ndarray, ok: np.ndarray, end: int) -> np.ndarray:
    """Skip one msgpack str at each ``q`` (fixstr, str 8, str 16); ``ok`` &= it was one."""
    t = b[q]
    fixlen = t - np.uint8(0xA0)  # wraps: below 32 exactly for a fixstr
    fix = fixlen < 32
    longer = (t == 0xD9) | (t == 0xDA)
    if longer.any():
        s8 = t == 0xD9
        b1 = b[q + 1].astype(np.int64)
        length = np.where(fix, fixlen, np.where(s8, b1, (b1 << 8) | b[q + 2]))
        q = q + np.where(fix, 1, np.where(s8, 2, 3)) + length
        ok &= fix | longer
    else:  # the usual frame: every string under 32 bytes
        q = q + 1 + fixlen
        ok &= fix
    ok &= q <= end
    return np.minimum(q, end)


def _ints(b: np.ndarray, q: np.ndarray, ok: np.ndarray, end: int
          ) -> tuple[np.ndarray, np.ndarray]:
    """Read one msgpack int at each ``q`` into int64; ``ok`` &= it was one that fits."""
    t = b[q]
    small = t < 0x80
    if small.all():  # the usual value column: positive fixints
        q = q + 1
        ok &= q <= end
        return np.minimum(q, end), t.astype(np.int64)
    u32 = t == 0xCE
    if (small | u32).all():  # the usual ts column: uint32 (and the odd fixint)
        word = np.ascontiguousarray(b[q[:, None] + _FOUR]).view(">u4").ravel()
        q = q + np.where(u32, 5, 1)
        ok &= q <= end
        return np.minimum(q, end), np.where(u32, word, t).astype(np.int64)
    size = _INT_SIZE[t]
    width = _INT_WIDTH[t]
    raw = np.ascontiguousarray(b[q[:, None] + _EIGHT]).view(">u8").ravel().astype(np.uint64)
    shift = np.where(width > 0, 64 - 8 * width, 0).astype(np.uint64)
    u = raw >> shift
    s = (u << shift).view(np.int64) >> shift.astype(np.int64)
    value = np.where(width == 0, _INT_FIXED[t], np.where(_INT_SIGNED[t], s, u.view(np.int64)))
    q = q + size
    ok &= (size > 0) & ~((t == 0xCF) & (u > _INT64_MAX)) & (q <= end)
    return np.minimum(q, end), value


def _rows_at(b: np.ndarray, p: np.ndarray, end: int) -> tuple[np.ndarray, ...]:
    """Read a row at each candidate start ``p``: (start, ok, series end, ts, v, row end),
    for the candidates that still look like rows after their tenant and metric."""
    ok = np.ones(len(p), np.bool_)
    q = _strings(b, p + 1, ok, end)  # tenant
    q = _strings(b, q, ok, end)  # metric
    t = b[q]
    fixmap = (t & np.uint8(0xF0)) == 0x80
    map16 = t == 0xDE
    pairs = np.where(fixmap, t & np.uint8(0x0F), 0).astype(np.int64)
    if map16.any():
        pairs = np.where(map16, (b[q + 1].astype(np.int64) << 8) | b[q + 2], pairs)
    ok &= (fixmap | map16 | (t == 0xC0)) & (pairs <= _MAX_TAGS)
    if not ok.all():  # a 0x95 inside a row: drop it now, not after every column
        keep = np.flatnonzero(ok)
        p, q, pairs, map16, ok = p[keep], q[keep], pairs[keep], map16[keep], ok[keep]
    q = q + np.where(map16, 3, 1)
    for k in range(int(pairs.max(initial=0))):
        more = pairs > k
        if more.all():
            q = _strings(b, _strings(b, q, ok, end), ok, end)
        else:
            sub = np.flatnonzero(more)
            okk = ok[sub]
            q[sub] = _strings(b, _strings(b, q[sub], okk, end), okk, end)
            ok[sub] = okk
    series_end = q
    q, ts = _ints(b, series_end, ok, end)
    q, v = _ints(b, q, ok, end)
    return p, ok, series_end, ts, v, q


def _chain(p: np.ndarray, ok: np.ndarray, row_end: np.ndarray, count: int
           ) -> np.ndarray | None:
    """Which candidates are the rows: the chain from the first (``p[0]``, the array's
    first byte), each row starting where the one before ended, ``count`` long; the
    array ends where the last one does. Candidates inside a row (a 0x95 byte in a ts)
    or after the array are not on it."""
    m = len(p)
    if m < count:  # a row that does not start as a 5-array
        return None
    if m == count:  # the usual case: no byte inside a row looked like a row start
        if ok.all() and np.array_equal(row_end[:-1], p[1:]):
            return np.arange(m)
        return None
    at = np.searchsorted(p, row_end)
    hit = at < m
    hit[hit] = p[at[hit]] == row_end[hit]
    nxt = np.append(np.where(hit & ok, at, m), m)  # m: a dead end
    visited = np.zeros(1, np.int64)
    jump = nxt
    while len(visited) < count:  # pointer doubling: steps [0, 2^k), then [2^k, 2^k+1)
        visited = np.concatenate((visited, jump[visited]))
        jump = jump[jump]
    visited = visited[:count]
    if visited[-1] == m or not ok[visited].all():
        return None
    return visited


@dataclass(slots=True)
class _Found:
    """The hash and the zero-padded 8-byte words of each distinct series of a frame."""

    hashes: np.ndarray
    words: np.ndarray


def _distinct(b: np.ndarray, start: np.ndarray, length: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, _Found]:
    """Group equal byte strings ``b[start:start+length]``: (a row of each, group of each).

    Hashes the zero-padded bytes and then checks every row's bytes against its group's
    first: equal hashes of different bytes are never taken for the same series.
    """
    width = (int(length.max()) + 7) // 8
    windows = np.lib.stride_tricks.as_strided(b, (len(b) - 8 * width + 1, 8 * width), (1, 1))
    words = windows[start].view("<u8")  # (rows, width): little-endian, byte 0 lowest
    words &= np.take(_MASKS[:, :width], length, axis=0)  # zero bytes past each series' end
    hashed = length.astype(np.uint64)
    for k in range(width):
        hashed += words[:, k] * _MIX[k]
    order = np.argsort(hashed)  # equal hashes together, in any order: any one stands for all
    ordered = hashed[order]
    new = np.empty(len(order), np.bool_)
    new[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=new[1:])
    first = order[new]
    group = np.empty(len(order), np.int64)
    group[order] = np.cumsum(new) - 1
    rep = first[group]
    if np.array_equal(words, words[rep]) and np.array_equal(length, length[rep]):
        return first, group, _Found(hashed[first], words[first])
    raise _Collision


class _Collision(Exception):
    pass


def _distinct_by_dict(view: memoryview, start: np.ndarray, end: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    seen: dict[bytes, int] = {}
    first: list[int] = []
    group = np.empty(len(start), np.int64)
    for k, (a, z) in enumerate(zip(start.tolist(), end.tolist(), strict=True)):
        key = view[a:z].tobytes()
        g = seen.get(key)
        if g is None:
            g = seen[key] = len(first)
            first.append(k)
        group[k] = g
    return np.asarray(first, np.int64), group


def scan_rows(payload: bytes | memoryview, start: int, series: SeriesBytes
              ) -> RowBlock | None:
    """Read the msgpack array at ``payload[start]`` as rows, or None (not only rows of
    the shapes above: the general decoder reads it). The array ends where its last row
    does (the block's ``span`` says where); the bytes after it are the caller's."""
    view = memoryview(payload)
    bound = len(view)  # no row reads past it
    head = view[start]
    if 0x90 <= head <= 0x9F:
        count, first = head & 0x0F, start + 1
    elif head == 0xDC and bound - start >= 3:
        count, first = int.from_bytes(view[start + 1:start + 3], "big"), start + 3
    elif head == 0xDD and bound - start >= 5:
        count, first = int.from_bytes(view[start + 1:start + 5], "big"), start + 5
    else:
        return None
    if count == 0 or first >= bound or view[first] != 0x95:
        return None
    b = np.empty(bound + _PAD, np.uint8)
    b[:bound] = np.frombuffer(view, np.uint8, bound)
    b[bound:] = 0
    p = first + np.flatnonzero(b[first:bound] == 0x95)
    if len(p) > (bound - first) // 2:  # strings full of 0x95 bytes: the general decoder
        return None  # (each candidate costs ~80 bytes of arrays: at most ~40 per byte)
    p, ok, series_end, ts, v, row_end = _rows_at(b, p, bound)
    if not len(p) or p[0] != first:  # the first row is not one: a chain from elsewhere
        return None  # (a chain from a later candidate would read a row hidden in it)
    rows = _chain(p, ok, row_end, count)
    if rows is None:
        return None
    a, z = p[rows] + 1, series_end[rows]
    found = None
    try:
        if int((z - a).max()) > _MAX_HASHED:
            raise _Collision
        firsts, group, found = _distinct(b, a, z - a)
    except _Collision:
        firsts, group = _distinct_by_dict(view, a, z)
    nums = series.numbers_of(view, a[firsts], (z - a)[firsts], found)
    if nums is None:
        return None
    span = (start, int(row_end[rows[-1]]))
    return series.block(nums, group, ts[rows], v[rows], b, span)  # no second copy

"""checkpoint/ids.py: a shard's store finds its series' row ids compactly, and never
takes one series' id for another's, even when their ids' hashes are equal."""

from __future__ import annotations

import numpy as np

from tally.checkpoint.ids import RowIds


class SameHash(str):
    """An id string whose hash collides with every other of its kind."""

    def __hash__(self) -> int:
        return 42


def test_ids_held_are_found_and_others_are_not() -> None:
    ids = RowIds()
    assert ids.get(["a|m|", "b|m|"]).tolist() == [-1, -1]
    ids.add({f"t|m|k={n}": n + 1 for n in range(0, 1000, 2)})
    ids.add({f"t|m|k={n}": n + 1 for n in range(1, 1000, 2)})
    ids.add({})
    asked = [f"t|m|k={n}" for n in range(999, -1, -7)] + ["t|m|k=1000"]
    assert ids.get(asked).tolist() == [int(s.rsplit("=", 1)[1]) + 1 for s in asked[:-1]] + [-1]
    assert len(ids) == 1000


def test_two_ids_with_one_hash_are_never_mistaken_for_each_other() -> None:
    ids = RowIds()
    first, second, third = SameHash("a|m|"), SameHash("b|m|"), SameHash("c|m|")
    ids.add({first: 7, second: 8})  # one string per hash is held: the other stays out
    ids.add({third: 9})
    got = ids.get([first, second, third, "a|m|"])
    assert got[0] == 7 and got[3] == -1  # (a plain "a|m|" hashes otherwise)
    assert got[1] == -1 and got[2] == -1  # not held: looked up in the store instead
    assert len(ids) == 1
    assert np.array_equal(ids.get([]), np.empty(0, np.int64))

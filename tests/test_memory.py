"""Giving a large checkpoint's memory back to the OS (actors/memory.py)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from tally.actors import memory
from tally.actors.metrics import private_bytes, resident_bytes


def test_the_policy_trims_once_idle_else_at_most_every_interval_and_only_after_writes():
    now = [100.0]
    policy = memory.TrimPolicy(seconds=30, clock=lambda: now[0])
    assert not policy.due(idle=True)  # nothing written since: nothing to give back
    policy.wrote(100_000)
    assert not policy.due(idle=False)  # busy: the next checkpoint reuses the pages
    assert policy.due(idle=True)  # idle: at once
    assert not policy.due(idle=True)  # given back already
    policy.wrote(10)
    now[0] += 29
    assert not policy.due(idle=False)
    now[0] += 1
    assert policy.due(idle=False)  # 30 s since the last trim, though busy
    assert not policy.due(idle=False)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc are Linux's")
def test_trim_gives_freed_heap_pages_back():
    if not memory.available():
        pytest.skip("not glibc")
    assert memory.tune() and memory.tune()  # idempotent
    memory.trim()
    base = private_bytes()
    # many small blocks (the kind a checkpoint's dicts are made of), then freed; a few
    # long-lived ones among them keep the heap's top in place, as live state does
    junk, kept = [], []
    for k in range(200_000):
        junk.append(np.zeros(64, np.int64).tobytes() * 2)
        if k % 100 == 0:
            kept.append(bytes(1100))
    grown = private_bytes()
    del junk
    freed = private_bytes()
    seconds = memory.trim()
    after = private_bytes()
    assert grown - base > 50e6
    assert freed - base > (grown - base) / 2  # free() alone kept the pages
    assert after - base < (grown - base) / 4, (base, grown, freed, after)
    assert 0 <= seconds < 1
    assert resident_bytes() >= after

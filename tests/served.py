"""Start ``tally serve`` as a user would: the console script, in its own process group.

The launcher is ``bench/spawn.py`` (``tally bench`` uses it too); the names
here are what the end-to-end tests import.
"""

from __future__ import annotations

from tally.bench.spawn import TALLY, free_port, port_free
from tally.bench.spawn import Spawned as Served

__all__ = ["TALLY", "Served", "free_port", "port_free"]

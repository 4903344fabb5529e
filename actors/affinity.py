"""Which CPUs tally's processes run on, when ``--cpu-affinity gateways`` asks for it.

Process tuning, beside the allocator's (memory.py): the gateways and the shards pin
themselves as they start, and the command line only names the modes.

On a node with few cores a TCP gateway and the shards it feeds share them,
and each write to a shard's socket wakes that shard: the kernel often runs
it on the gateway's own core, and the gateway, the busiest process, waits
inside those writes (a profile of the gateway shows it). Pinned, each TCP
gateway keeps a core of its own and the shards share the rest; an HTTP-only
gateway, mostly idle, stays where the kernel puts it, so a query can take any
free core. Off by default: a node that runs other work beside tally may want
its cores free.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable

log = logging.getLogger("tally.affinity")

MODES = ("off", "gateways")


def cpus_for(available: Iterable[int], tcp_gateways: int, gateway: int | None
             ) -> list[int] | None:
    """The CPUs of the node's gateway number ``gateway`` (its TCP gateways come first), or
    (``None``) of a shard there. None: leave it where it is, as an HTTP-only gateway, or
    anything on a node without a CPU to spare beyond the TCP gateways'."""
    cpus = sorted(available)
    if tcp_gateways < 1 or len(cpus) <= tcp_gateways:
        return None
    if gateway is None:
        return cpus[tcp_gateways:]
    return [cpus[gateway]] if 0 <= gateway < tcp_gateways else None


def pin(tcp_gateways: int, gateway: int | None, who: str) -> list[int] | None:
    """Pin every thread of this process (Ray's and the event loop's included; threads
    started later inherit it) to its CPUs; returns them, or None if left alone."""
    cpus = cpus_for(os.sched_getaffinity(0), tcp_gateways, gateway)
    if cpus is None:
        return None
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:  # a thread that ended meanwhile
            continue
    log.info(json.dumps({"event": "cpu_affinity", "process": who, "cpus": cpus}))
    return cpus

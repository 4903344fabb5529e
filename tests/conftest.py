"""Session-wide fixtures: servers that are slow to start are started once."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings
from inproc import InProcessTally
from secantus import SecantusServer, find_secantusd

# Every property test's defaults (an explicit @settings overrides only what it names).
# Hypothesis fails an example that takes over 200 ms (deadline) and a test whose data
# is slow to generate (too_slow): wall-clock limits that say nothing about tally and that
# a loaded 2-core CI machine exceeds now and then. A real hang is still a failure.
settings.register_profile(
    "tally", deadline=None, suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("tally")


@pytest.fixture(scope="session")
def secantus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecantusServer]:
    executable = find_secantusd()
    if executable is None:
        pytest.skip(
            "secantusd-py is not installed (pip install secantusdb, part of the test extra): "
            "MongoStore cannot be tested against a MongoDB-wire server"
        )
    server = SecantusServer(executable, tmp_path_factory.mktemp("secantus"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def tally(tmp_path) -> Iterator[InProcessTally]:
    """A tally with in-process shards over SQLite, its TCP and HTTP servers on free ports
    (a test file may define its own ``tally`` with other options)."""
    server = InProcessTally(tmp_path).start()
    yield server
    server.stop()

"""Session-wide fixtures: servers that are slow to start are started once."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from secantus import SecantusServer, find_secantusd


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

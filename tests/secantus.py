"""A SecantusDB server for tests: MongoStore against a real MongoDB-wire-protocol server.

SecantusDB speaks MongoDB's wire protocol, so MongoStore is tested against a
real server (real BSON types, real duplicate-key errors, real int64 overflow
refusals) rather than only against mongomock's imitation.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tally.bench.spawn import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent

SECANTUS_EXECUTABLE = "secantusd-py"
STARTUP_TIMEOUT = 60.0
PORT_ATTEMPTS = 5


class PortTaken(RuntimeError):
    """The free port picked for the server was bound by another process first."""


def find_secantusd() -> str | None:
    """The server next to this interpreter (the venv's bin), else on PATH."""
    beside = Path(sys.executable).parent / SECANTUS_EXECUTABLE
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(SECANTUS_EXECUTABLE)


class SecantusServer:
    """One ``secantusd-py`` process on a free port with its data in ``workdir``."""

    def __init__(self, executable: str, workdir: Path) -> None:
        self.executable = executable
        self.workdir = workdir
        self.port = free_port()
        self.log_path = workdir / "secantusd.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}"

    def url(self, database: str) -> str:
        return f"{self.base_url}/{database}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as e:
            return f"(no log: {e})"

    def start(self) -> None:
        # The port is picked free here and bound by the server a moment later: another
        # process can take it meanwhile. That start fails alone (the server exits saying
        # so), and the next tries another free port.
        for attempt in range(1, PORT_ATTEMPTS + 1):
            self._launch()
            try:
                self._wait_until_ready()
                return
            except PortTaken:
                if attempt == PORT_ATTEMPTS:
                    raise
                self.port = free_port()

    def _launch(self) -> None:
        # An empty config file: without --config the server reads
        # ./secantusd.toml or ~/.secantus/secantusd.toml, which would make
        # the test depend on whatever the machine has there.
        config = self.workdir / "secantusd.toml"
        config.write_text("")
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    self.executable,
                    "--storage-path",
                    str(self.workdir / "data"),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--config",
                    str(config),
                    # configureFailPoint, for store-outage tests
                    "--enable-test-commands",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def _wait_until_ready(self) -> None:
        import pymongo
        from pymongo.errors import PyMongoError

        assert self.process is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                if "Address already in use" in self.log_tail():
                    raise PortTaken(f"port {self.port} was taken before {self.executable} "
                                    "bound it")
                raise RuntimeError(
                    f"{self.executable} exited with {self.process.returncode} before serving:\n"
                    + self.log_tail()
                )
            client = pymongo.MongoClient(self.base_url, serverSelectionTimeoutMS=500)
            try:
                client.admin.command("ping")
                return
            except PyMongoError as e:
                last_error = e
            finally:
                client.close()
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(
            f"{self.executable} did not answer ping on port {self.port} within "
            f"{STARTUP_TIMEOUT:.0f}s (last error: {last_error}):\n" + self.log_tail()
        )

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=15)

"""Running ``tally serve`` as a child process, for tools that need a service of their own
(``tally bench``, the end-to-end tests): start it, wait until healthy, stop it as an
operator would (SIGTERM to the process), or kill it outright."""

from __future__ import annotations

import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

TALLY = str(Path(sys.executable).with_name("tally"))
# what ``tally serve`` prints once every gateway listens (cluster/boot.py)
SERVING = re.compile(rb"^tally: serving HTTP on http://\S+:(\d+) and TCP on \S+:(\d+);", re.M)
_logs = itertools.count(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class Spawned:
    """One ``tally serve`` child; ``stop()`` sends SIGTERM and returns the exit code."""

    def __init__(self, workdir: Path, store: str, *extra: str, shards: int = 3,
                 http_port: int = 0, tcp_port: int = 0) -> None:
        self.workdir = workdir
        self.store, self.extra, self.shards = store, extra, shards
        # Port 0: the gateways bind any free port and `tally serve` says which (read back
        # in start()). A port picked here and bound later by the child could be taken
        # meanwhile (Ray starts a dozen processes that bind free ports of their own).
        # A restart (kill(), then start()) binds the ports of the first start again.
        self.http_port, self.tcp_port = http_port, tcp_port
        self.log_path = workdir / f"serve-{os.getpid()}-{next(_logs)}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def args(self) -> list[str]:
        return [
            TALLY, "serve", "--store", self.store, "--shards", str(self.shards),
            "--http-port", str(self.http_port), "--tcp-port", str(self.tcp_port), *self.extra,
        ]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 90) -> Spawned:
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.args, cwd=self.workdir, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        serving = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tally serve exited {self.proc.returncode}:\n{self.output()}")
            if serving is None:  # printed once every gateway listens, with their ports
                serving = SERVING.search(self.log_path.read_bytes())
                if serving is None:
                    time.sleep(0.1)
                    continue
                self.http_port, self.tcp_port = int(serving[1]), int(serving[2])
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.3)
        self.kill()
        raise RuntimeError(f"tally serve not healthy after {timeout} s:\n{self.output()}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        assert self.proc is not None
        # The process, as `kill PID`, docker and Kubernetes do; Ray's own
        # processes share its group and would die of a group-wide SIGTERM
        # before the final checkpoint (Ctrl-C is fine: Ray blocks SIGINT there).
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        finally:
            self.log.close()
        return code

    def kill(self) -> None:
        """SIGKILL the process group, then wait until its Ray workers (which have
        groups of their own and outlive it by a second or two) free the ports."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
            deadline = time.monotonic() + 30
            while not (port_free(self.http_port) and port_free(self.tcp_port)):
                if time.monotonic() > deadline:
                    raise RuntimeError("the killed service still holds its ports after 30 s")
                time.sleep(0.2)

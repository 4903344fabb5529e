"""The client as a producer gets it: ``tally.client`` alone, without the server.

- Importing ``tally.client`` loads no server dependency (Ray, FastAPI,
  pymongo, ...) and no server module (``tally.actors``, ``tally.api``, ...).
- The two distributions built from this repository hold ``tally/`` and their
  metadata only: nothing else lands at the top of site-packages.
- The client distribution (``./wire``) installs into an empty venv with only
  msgpack and numpy beside it, and from there counts exactly against a real
  ``tally serve`` (started from the development venv).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from served import Served

REPO = Path(__file__).resolve().parents[1]

SERVER_DEPENDENCIES = (
    "ray", "fastapi", "starlette", "uvicorn", "pydantic", "pymongo", "bson", "mongomock",
    "plotly", "rich", "httpx", "prometheus_client", "sparklines",
)
SERVER_MODULES = ("tally.actors", "tally.api", "tally.checkpoint", "tally.cluster", "tally.bench")


def server_side(modules: list[str]) -> list[str]:
    """The modules in ``modules`` that belong to the server, not to a producer."""
    return sorted(
        m for m in modules
        if m.split(".")[0] in SERVER_DEPENDENCIES
        or any(m == s or m.startswith(s + ".") for s in SERVER_MODULES)
    )


def test_importing_the_client_loads_nothing_of_the_server() -> None:
    # A fresh interpreter: this one has imported half the server already.
    code = "import json, sys, tally.client; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd="/", timeout=60)
    modules = json.loads(out.stdout)
    assert "tally.client" in modules and "msgpack" in modules
    assert server_side(modules) == []


def test_the_public_api_is_what_all_names() -> None:
    import tally.client

    assert set(tally.client.__all__) >= {
        "TallyClient", "AsyncTallyClient", "Connection", "TallyError", "ServerError",
        "BatchRejected", "Unauthorized", "ClientFailed", "ProtocolMismatch",
        "ProducerConflict", "ClientClosed", "TallyTimeout",
    }
    for name in tally.client.__all__:
        assert getattr(tally.client, name) is not None
    assert issubclass(tally.client.TallyTimeout, TimeoutError)


# ------------------------------------------------------------------------- distributions


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both wheels, built as CI's install builds them (isolated), from a copy of the tree.

    A copy, because setuptools writes ``build/`` and ``*.egg-info`` beside the
    sources it builds.
    """
    root = tmp_path_factory.mktemp("wheels")
    src = root / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis",
        "tally-data", "node_modules"))
    dist = root / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist),
         str(src / "wire"), str(src)],
        check=True, capture_output=True, timeout=600,
    )
    found = {p.name.split("-")[0]: p for p in dist.glob("*.whl")}
    assert set(found) == {"tally", "tally_client"}, found
    return found


def test_both_wheels_hold_tally_and_their_metadata_only(wheels: dict[str, Path]) -> None:
    tops: dict[str, set[str]] = {}
    for dist, wheel in wheels.items():
        names = zipfile.ZipFile(wheel).namelist()
        tops[dist] = {n.split("/")[0] for n in names}
        assert tops[dist] == {"tally", f"{dist}-0.1.0.dist-info"}, (dist, sorted(tops[dist]))
        # `tally` is a namespace shared by the two: neither may own it
        assert "tally/__init__.py" not in names
    client = set(zipfile.ZipFile(wheels["tally_client"]).namelist())
    assert {"tally/client/__init__.py", "tally/client/core.py", "tally/wire/frames.py",
            "tally/wire/vocabulary.py"} <= client
    assert not [n for n in client if n.startswith("tally/wire/client/")]  # not twice
    server = zipfile.ZipFile(wheels["tally"]).namelist()
    assert not [n for n in server if n.startswith(("tally/wire/", "tally/client/"))]


# --------------------------------------------------------------- the client, installed alone

SNIPPET = """
import asyncio, sys, time
from tally.client import AsyncTallyClient, Connection, TallyClient

port, ts = int(sys.argv[1]), int(sys.argv[2])

with TallyClient("127.0.0.1", port, producer="alone-sync") as tally:
    for _ in range(1000):
        tally.inc("alone", "logins", tags={"via": "sync"}, ts=ts)
    tally.inc("alone", "logins", 7, ts=ts, tags={"via": "sync"})
    tally.flush()

async def main():
    async with AsyncTallyClient("127.0.0.1", port, producer="alone-async") as tally:
        for _ in range(500):
            await tally.inc("alone", "logins", 2, ts=ts, tags={"via": "async"})

asyncio.run(main())

with Connection("127.0.0.1", port, producer="alone-rows") as conn:
    assert conn.send_rows([["alone", "logins", {"via": "rows"}, ts, 3]])["rows"] == 1
    assert conn.send_columnar([("alone", "logins", {"via": "rows"})], [0, 0], [ts, ts],
                              [4, 5])["rows"] == 2

server = sorted(m for m in sys.modules if m.split(".")[0] in DEPS
                or m.startswith(("tally.actors", "tally.api", "tally.checkpoint",
                                 "tally.cluster", "tally.bench")))
assert not server, server
try:
    import tally.actors
except ModuleNotFoundError:
    print("ok")
else:
    raise AssertionError(f"the server is importable in the client's venv: {tally.actors}")
"""


@pytest.fixture
def client_venv(tmp_path: Path, wheels: dict[str, Path]) -> Iterator[Path]:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", str(wheels["tally_client"])],
                   check=True, capture_output=True, timeout=600, env=_clean_env())
    yield python


def _clean_env() -> dict[str, str]:
    """This environment, less what would let the venv see the development install."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def readme_python_blocks() -> list[str]:
    """The ```python blocks of the README, in order."""
    text = (REPO / "README.md").read_text()
    return [part.split("```", 1)[0] for part in text.split("```python\n")[1:]]


@pytest.mark.e2e
def test_the_client_installs_alone_and_counts_exactly(client_venv: Path, tmp_path: Path) -> None:
    listed = subprocess.run(
        [str(client_venv), "-m", "pip", "list", "--format=json"], check=True,
        capture_output=True, text=True, env=_clean_env(), timeout=120,
    )
    names = {p["name"].lower().replace("_", "-") for p in json.loads(listed.stdout)}
    assert names - {"pip", "setuptools"} == {"tally-client", "msgpack", "numpy"}, names

    ts = int(time.time()) - 3600
    served = Served(tmp_path, "memory://", shards=2).start()
    try:
        run = subprocess.run(
            [str(client_venv), "-c", f"DEPS = {SERVER_DEPENDENCIES!r}\n{SNIPPET}",
             str(served.tcp_port), str(ts)],
            capture_output=True, text=True, cwd=tmp_path, env=_clean_env(), timeout=300,
        )
        assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr
        day = time.strftime("%Y-%m-%d", time.gmtime(ts))
        r = httpx.get(served.url + "/v1/breakdown", params={
            "tenant": "alone", "metric": "logins", "by": "via", "from": day, "to": day},
            timeout=30)
        assert r.status_code == 200, r.text
        groups = {g["value"]: g["total"] for g in r.json()["groups"]}
        assert groups == {"sync": 1007, "async": 1000, "rows": 12}, r.json()

        # The README's tour, as a producer would paste it, from the client's venv
        tour = readme_python_blocks()
        assert len(tour) >= 2 and all("from tally.client import" in b for b in tour)
        for block in tour:
            run = subprocess.run(
                [str(client_venv), "-c", block.replace("8781", str(served.tcp_port))],
                capture_output=True, text=True, cwd=tmp_path, env=_clean_env(), timeout=300,
            )
            assert run.returncode == 0, block + run.stdout + run.stderr
        now = time.time()  # the tour counts at "now": yesterday too, should it span midnight
        days = [time.strftime("%Y-%m-%d", time.gmtime(t)) for t in (now - 86400, now)]
        r = httpx.get(served.url + "/v1/breakdown", params={
            "tenant": "acme", "metric": "messages.handled", "by": "agent",
            "from": days[0], "to": days[1]}, timeout=30)
        assert r.status_code == 200, r.text
        # 3 from inc, 1 from the message.replied event's fan-out
        assert r.json()["groups"] == [{"value": "ann", "total": 4}], r.json()
    finally:
        assert served.stop() == 0, served.output()

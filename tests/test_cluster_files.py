"""The ``ray up`` cluster files in cluster/ray/, read the way Ray 2.60 reads them.

Before any cloud call, ``ray up`` fills a cluster file in with its provider's
defaults (``prepare_config``) and checks the result against Ray's own schema,
``ray/autoscaler/ray-schema.json``, plus a few cross-field rules
(``validate_config``). These tests run that same code, offline: for the
``local`` provider the whole bootstrap ``ray up`` does (``_bootstrap_config``
without its config cache), for AWS everything short of the provider's own
bootstrap, which needs credentials. Broken copies must fail it, so the test
can fail.

Then what tally needs of the files beyond Ray's schema: every ``ray start``
reads tally.env first (one token mode on every node), the head runs the
autoscaler, the Ray settings they export exist, no secret is written in
them, and tally.env.example is a working tally configuration that defines
every variable the files use. No cluster is started.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
from dataclasses import fields
from pathlib import Path
from typing import Any

import click
import jsonschema
import pytest
import yaml
from ray._raylet import Config
from ray.autoscaler._private.commands import _bootstrap_config
from ray.autoscaler._private.util import prepare_config, validate_config, with_envs

from tally.cluster.boot import RAY_SYSTEM_CONFIG
from tally.cluster.config import ConfigError, ServeConfig, load_config

FILES = Path(__file__).resolve().parents[1] / "cluster" / "ray"
AWS = FILES / "aws.yaml"
ONPREM = FILES / "onprem.yaml"
ENV_EXAMPLE = FILES / "tally.env.example"
UNIT = FILES / "tally.service"

SOURCE_ENV = ". ~/tally-deploy/tally.env &&"
# Variables tally.env holds for the cluster files rather than for `tally serve`.
DEPLOY_ONLY = {"TALLY_PIP_SPEC", "TALLY_PYTHON"}


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def resolve_aws(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` checks before its first AWS call (bootstrap_aws needs credentials)."""
    resolved = prepare_config(copy.deepcopy(config))
    validate_config(resolved)
    return resolved


def resolve_local(config: dict[str, Any]) -> dict[str, Any]:
    """All of `ray up`'s bootstrap for the local provider: it makes no network call."""
    return _bootstrap_config(copy.deepcopy(config), no_config_cache=True)


CLUSTER_FILES = {"aws": (AWS, resolve_aws), "onprem": (ONPREM, resolve_local)}


@pytest.fixture(params=sorted(CLUSTER_FILES))
def resolved(request: pytest.FixtureRequest) -> dict[str, Any]:
    path, resolve = CLUSTER_FILES[request.param]
    return resolve(load(path))


def start_commands(config: dict[str, Any]) -> list[str]:
    return config["head_start_ray_commands"] + config["worker_start_ray_commands"]


def test_cluster_files_validate_as_ray_up_reads_them(resolved: dict[str, Any]) -> None:
    types = resolved["available_node_types"]
    assert resolved["head_node_type"] in types
    # merge_setup_commands ran: the common setup precedes the per-role lists
    assert resolved["worker_setup_commands"][: len(resolved["setup_commands"])] == (
        resolved["setup_commands"]
    )
    assert sum(t.get("min_workers", 0) for t in types.values()) >= 1


def _typo_key(config: dict[str, Any]) -> None:
    config["head_start_commands"] = config.pop("head_start_ray_commands")


def _fractional_cpus(config: dict[str, Any]) -> None:
    config["available_node_types"]["tally.worker"]["resources"] = {"CPU": 0.5}


def _more_min_workers_than_max(config: dict[str, Any]) -> None:
    config["available_node_types"]["tally.worker"]["min_workers"] = config["max_workers"] + 1


def _node_types_on_local(config: dict[str, Any]) -> None:
    config["available_node_types"] = {"w": {"resources": {}, "node_config": {}}}


def _no_worker_ips(config: dict[str, Any]) -> None:
    del config["provider"]["worker_ips"]


@pytest.mark.parametrize(
    ("name", "breakage", "error"),
    [
        ("aws", _typo_key, jsonschema.ValidationError),
        ("aws", _fractional_cpus, jsonschema.ValidationError),
        ("aws", _more_min_workers_than_max, ValueError),
        ("onprem", _typo_key, jsonschema.ValidationError),
        ("onprem", _node_types_on_local, click.ClickException),
        ("onprem", _no_worker_ips, click.ClickException),
    ],
)
def test_a_broken_copy_fails_validation(name: str, breakage: Any, error: type) -> None:
    path, resolve = CLUSTER_FILES[name]
    config = load(path)
    resolve(config)  # the file itself passes...
    breakage(config)
    with pytest.raises(error):
        resolve(config)  # ...and the broken copy does not


def test_ray_starts_after_tally_env_on_every_node(resolved: dict[str, Any]) -> None:
    head, workers = resolved["head_start_ray_commands"], resolved["worker_start_ray_commands"]
    for commands in (head, workers):
        assert commands[0] == "ray stop"  # a re-run starts clean
        starts = [c for c in commands if "ray start" in c]
        assert len(starts) == 1
        # RAY_AUTH_MODE / RAY_AUTH_TOKEN_PATH, the same on every node, before Ray starts
        assert starts[0].startswith(SOURCE_ENV), starts[0]
    (head_start,) = [c for c in head if "ray start" in c]
    assert "ray start --head --port=6379" in head_start
    # without it, Ray warns that the head will never launch workers
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    (worker_start,) = [c for c in workers if "ray start" in c]
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker_start


def test_exported_ray_settings_exist_and_detect_node_loss_fast(
    resolved: dict[str, Any],
) -> None:
    exported: dict[str, str] = {}
    for command in start_commands(resolved):
        for name, value in re.findall(r"\bRAY_(\w+)=(\S+)", command):
            assert hasattr(Config, name), f"RAY_{name} is not a Ray 2.60 setting"
            exported[name] = value
    period = int(exported["health_check_period_ms"])
    timeout = int(exported["health_check_timeout_ms"])
    threshold = int(exported["health_check_failure_threshold"])
    assert period * threshold <= 10_000  # a crashed node: refused at once, each check
    assert (period + timeout) * threshold <= 20_000  # a vanished node: every check times out


@pytest.mark.parametrize("path", [AWS, ONPREM], ids=["aws", "onprem"])
def test_the_head_starts_ray_with_tallys_system_config(path: Path) -> None:
    """What `tally serve` gives the Ray it starts itself, a cluster's head gives every node."""
    config = load(path)
    resolved = resolve_aws(config) if path == AWS else resolve_local(config)
    (head_start,) = [c for c in resolved["head_start_ray_commands"] if "ray start" in c]
    given = re.search(r"--system-config='([^']*)'", head_start)
    assert given is not None and json.loads(given.group(1)) == RAY_SYSTEM_CONFIG


def test_onprem_keeps_the_v1_autoscaler() -> None:
    """`ray up` prepends `export RAY_enable_autoscaler_v2=1;`: the file's own export comes later."""
    resolved = resolve_local(load(ONPREM))
    (head_start,) = [c for c in resolved["head_start_ray_commands"] if "ray start" in c]
    as_run = with_envs([head_start], {"RAY_enable_autoscaler_v2": "1"})[0]
    assert re.findall(r"RAY_enable_autoscaler_v2=(\d)", as_run)[-1] == "0"
    assert "--num-cpus=0" in head_start


def test_aws_pool_image_ports_and_head() -> None:
    config = load(AWS)
    resolved = resolve_aws(config)
    types = resolved["available_node_types"]
    worker, head = types["tally.worker"], types[resolved["head_node_type"]]
    # a fixed pool: never scaled down for idleness (tally's actors request no CPUs)
    assert worker["min_workers"] == worker["max_workers"] == resolved["max_workers"]
    assert head["resources"] == {"CPU": 0}
    # one image for both types, set: "" or "latest_dlami" would make Ray pick its
    # default, an Ubuntu 18.04 Deep Learning AMI (Python too old for tally)
    images = {t["node_config"].get("ImageId", "") for t in types.values()}
    assert len(images) == 1
    assert images.isdisjoint({"", "latest_dlami"})
    assert "boto3" in " ".join(resolved["head_setup_commands"])
    (rule,) = config["provider"]["security_group"]["IpPermissions"]
    assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 8780, 8781)
    assert all(r["CidrIp"] != "0.0.0.0/0" for r in rule["IpRanges"])
    assert config["provider"]["cache_stopped_nodes"] is False


def test_no_secret_is_written_in_the_files() -> None:
    hex_token = re.compile(r"\b[0-9a-f]{32,}\b")
    for path in (AWS, ONPREM, UNIT):
        text = path.read_text()
        assert not re.search(r"mongodb(\+srv)?://", text), path
        assert not re.search(r"\bTALLY_STORE=", text), path
        assert not hex_token.search(text), path
    example = ENV_EXAMPLE.read_text()
    assert not hex_token.search(example)
    passwords = re.findall(r"mongodb(?:\+srv)?://[^:/@\s]+:([^@\s]+)@", example)
    assert passwords == ["CHANGE-ME"]


def _env_names(text: str) -> tuple[set[str], set[str]]:
    """(names exported, names only shown in comments) of a shell env file."""
    exported = set(re.findall(r"^export (\w+)=", text, re.M))
    commented = set(re.findall(r"^# export (\w+)=", text, re.M))
    return exported, commented - exported


def test_env_example_defines_what_the_files_use() -> None:
    exported, optional = _env_names(ENV_EXAMPLE.read_text())
    for path in (AWS, ONPREM):
        config = load(path)
        commands = [
            c
            for key in ("setup_commands", "head_setup_commands",
                        "head_start_ray_commands", "worker_start_ray_commands")
            for c in config.get(key, [])
        ]
        used = set(re.findall(r"\$\{?(TALLY_\w+)", " ".join(commands)))
        assert used, path
        assert used <= exported | optional, (path, used - exported - optional)
    settings = {f"TALLY_{f.name.upper()}" for f in fields(ServeConfig)}
    for name in exported | optional:
        if name.startswith("TALLY_"):
            assert name in settings | DEPLOY_ONLY, f"{name} is no tally setting"


def test_env_example_is_a_working_tally_configuration(tmp_path: Path) -> None:
    """Sourced by bash as the nodes do, it joins the cluster, listens beyond loopback
    with tokens, and `tally serve` accepts it (load_config checks the tokens file)."""
    deploy = tmp_path / "tally-deploy"
    deploy.mkdir()
    (deploy / "tally.env").write_text(ENV_EXAMPLE.read_text())
    (deploy / "tokens.toml").write_text(
        '[[token]]\nsecret = "an-ingest-secret-of-some-length"\n'
        'tenants = ["*"]\nscopes = ["ingest"]\n'
    )
    out = subprocess.run(
        ["bash", "-c", f"set -eu; {SOURCE_ENV} env"],
        env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, check=True,
    ).stdout
    env = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_AUTH_TOKEN_PATH"] == f"{deploy}/ray_auth_token"
    assert env["TALLY_PIP_SPEC"].startswith(f"{deploy}/dist/tally-")
    assert env["PIP_FIND_LINKS"] == f"{deploy}/dist"  # where tally-client's wheel is found
    cfg = load_config({}, None, env)
    assert cfg.address == "auto"
    assert cfg.host == "0.0.0.0"
    assert cfg.tokens == f"{deploy}/tokens.toml"
    assert cfg.store.startswith("mongodb://") and "w=majority" in cfg.store
    assert cfg.shards == 64
    assert cfg.checkpoint_interval == 60


def test_shards_are_placed_round_robin_over_alive_nodes_workers_first():
    from tally.cluster.supervisor import HEAD, shard_placement

    nodes = [
        {"NodeID": "h", "Alive": True, "Resources": {HEAD: 1.0, "CPU": 2.0}},
        {"NodeID": "b", "Alive": True, "Resources": {"CPU": 2.0}},
        {"NodeID": "x", "Alive": False, "Resources": {"CPU": 2.0}},
        {"NodeID": "a", "Alive": True, "Resources": {"CPU": 2.0}},
    ]
    assert shard_placement(nodes, 4) == ["a", "b", "h", "a"]
    assert shard_placement(nodes, 2) == ["a", "b"]  # the head carries none while it can
    with pytest.raises(RuntimeError, match="no alive node"):
        shard_placement(nodes[2:3], 1)


@pytest.mark.parametrize("bad", ["0", "65", "-1"])
def test_gateways_per_node_out_of_range_is_refused_by_name(bad):
    with pytest.raises(ConfigError, match=rf"gateways-per-node: {bad}; from 1 to 64"):
        load_config({"gateways_per_node": bad}, None, {})
    assert load_config({}, None, {"TALLY_GATEWAYS_PER_NODE": "3"}).gateways_per_node == 3


@pytest.mark.parametrize("bad", ["65", "-1"])
def test_http_gateways_per_node_out_of_range_is_refused_by_name(bad):
    with pytest.raises(ConfigError, match=rf"http-gateways-per-node: {bad}; from 0 to 64"):
        load_config({"http_gateways_per_node": bad}, None, {})
    cfg = load_config({}, None, {"TALLY_HTTP_GATEWAYS_PER_NODE": "2"})
    assert (cfg.gateways_per_node, cfg.http_gateways_per_node) == (1, 2)


def test_which_ports_a_nodes_gateways_take():
    """Without HTTP gateways all take both; with them, the first N take TCP (the first of
    them StatsD too), the M after take HTTP, and each group shares its port when it can."""
    from tally.cluster.supervisor import ServicePlan

    def plan(n: int, m: int) -> ServicePlan:
        return ServicePlan("sqlite:///x", 2, 2.0, 10, None, "127.0.0.1", 8780, 8781,  # type: ignore[arg-type]
                           detached=False, gateways_per_node=n, http_gateways_per_node=m)

    both = plan(2, 0)
    assert [both.listens(k) for k in range(both.per_node)] == [(True, True)] * 2
    assert [both.sharing(k) for k in range(2)] == [True, True]
    split = plan(2, 1)
    assert [split.listens(k) for k in range(split.per_node)] == [
        (False, True), (False, True), (True, False)]
    assert [split.sharing(k) for k in range(3)] == [True, True, False]
    assert plan(1, 0).sharing(0) is False


def test_a_nodes_gateways_have_names_of_their_own():
    from tally.cluster.supervisor import gateway_name

    node = "ab" * 28
    assert gateway_name(node) == gateway_name(node, 0) == "tally-gateway-abababababababab"
    assert gateway_name(node, 2) == "tally-gateway-abababababababab-2"


def test_cpu_affinity_gives_each_tcp_gateway_a_core_and_the_rest_to_the_others():
    from tally.actors.affinity import cpus_for

    cpus = [4, 0, 2, 6]  # (as sched_getaffinity gives them: a set)
    assert cpus_for(cpus, 1, 0) == [0] and cpus_for(cpus, 1, None) == [2, 4, 6]
    assert [cpus_for(cpus, 2, k) for k in (0, 1)] == [[0], [2]]
    assert cpus_for(cpus, 2, 2) is None  # an HTTP-only gateway: where the kernel puts it
    assert cpus_for(cpus, 4, 0) is None and cpus_for(cpus, 4, None) is None  # none to spare
    assert cpus_for([0], 1, 0) is None
    assert cpus_for(cpus, 0, None) is None  # off


def test_cpu_affinity_takes_only_its_modes():
    assert load_config({}, None, {"TALLY_CPU_AFFINITY": "gateways"}).cpu_affinity == "gateways"
    assert load_config({}, None, {}).cpu_affinity == "off"
    with pytest.raises(ConfigError, match="cpu-affinity: 'all'; one of off, gateways"):
        load_config({"cpu_affinity": "all"}, None, {})

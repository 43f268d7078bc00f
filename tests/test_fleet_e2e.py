"""End to end: a real ``edgeos fleet serve`` process and three real ``edgeos node run``
processes, over TLS on loopback, once on SQLite and once on PostgreSQL.

The nodes enroll with join tokens of their own; the operator (the real ``edgeos fleet``
CLI for logging in, publishing, rollouts and revocation; the Python client for reading)
deploys a model and an agent that calls it, then rolls out a model version whose outputs
are NaN: the node of the first wave refuses it at its health check, the gate halts the
rollout and rolls that node back, and the other nodes never see the version. A good
version then reaches every node, wave by wave. Last, one node is revoked: it says so at
its next sync and keeps running its agent on what it last committed.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from edgeos.errors import EdgeOSError
from edgeos.fleet.client import FleetClient
from edgeos.fleet.rollouts import wave_order
from edgeos.node.process import ServerProcess, free_port, node_process
from tests import onnx_models

pytestmark = pytest.mark.slow

GROUP = "stores"
NODES = 3
#: The fleet's sync interval: the longest a node's long poll lasts, so also how soon a
#: node learns of a change that moves no revision (its revocation).
SYNC_INTERVAL_S = 2.0
#: Deadline of one step (enrollment, one rollout, one node catching up) on a slow machine.
STEP_S = 45.0
#: How much of each process's log a failure message shows (the end of it).
LOG_TAIL = 6000

T = TypeVar("T")


# -- artifacts ---------------------------------------------------------------------------
def model_dir(root: Path, version: str, *, nan: bool = False, seed: int = 0) -> Path:
    """``stock@version``: model.yaml and one ONNX file taking ``features`` FP32 [batch, 4]."""
    directory = root / f"stock-{version}"
    directory.mkdir(parents=True)
    (directory / "model.yaml").write_text(
        yaml.safe_dump({"name": "stock", "version": version, "task": "regression"})
    )
    path = directory / "stock.onnx"
    if nan:
        nan_model(path)
    else:
        onnx_models.mlp(path, seed=seed)
    return directory


def nan_model(path: Path) -> Path:
    """features FP32 [batch, 4] -> log(features - 10): NaN for every smoke-test input.

    The same input as the good versions: the agent's calls do not fail while this version
    is briefly the default on the node checking it; only its outputs are wrong, and the
    node's smoke test is what refuses it.
    """
    graph = helper.make_graph(
        [
            helper.make_node("Sub", ["features", "ten"], ["shifted"]),
            helper.make_node("Log", ["shifted"], ["probabilities"]),
        ],
        "nan",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(np.array(10.0, dtype=np.float32), "ten")],
    )
    return onnx_models._save(graph, path)


AGENT_STEPS = """\
def score(ctx, data):
    outputs = ctx.model("stock").infer({"features": [[0.1, 0.2, 0.3, 0.4]]})
    return {"outputs": sorted(outputs)}
"""


def agent_dir(root: Path) -> Path:
    """``checker@1``: every second, one call of the default ``stock`` model."""
    directory = root / "checker-1"
    directory.mkdir(parents=True)
    manifest = {
        "name": "checker", "version": "1", "steps": ["score"], "models": ["stock"],
        "triggers": [{"interval": "1s"}], "retry": {"max_attempts": 1},
    }  # fmt: skip
    (directory / "agent.yaml").write_text(yaml.safe_dump(manifest))
    (directory / "agent.py").write_text(AGENT_STEPS)
    return directory


# -- processes ---------------------------------------------------------------------------
def tail(text: str) -> str:
    return text if len(text) <= LOG_TAIL else f"[...]\n{text[-LOG_TAIL:]}"


@dataclass
class Fleet:
    """The fleet process, an admin client of it, and the operator's CLI login under tmp."""

    process: ServerProcess
    api: FleetClient
    login_file: Path

    @property
    def url(self) -> str:
        return self.process.url

    def cli(self, *args: str) -> str:
        """``edgeos fleet ARGS`` with the stored login; its output, or AssertionError."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEOS_FLEET_")}
        env.update(EDGEOS_FLEET_CONFIG=str(self.login_file), COLUMNS="200", NO_COLOR="1")
        done = subprocess.run(
            [sys.executable, "-m", "edgeos", "fleet", *args],
            env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert done.returncode == 0, (
            f"`edgeos fleet {' '.join(args)}` exited {done.returncode}:\n{done.stdout}{done.stderr}"
        )
        return done.stdout

    def rollout(self, artifact: str, waves: str, *gates: str, soak: str = "0s") -> dict[str, Any]:
        """``edgeos fleet rollout create`` to the group; the new rollout's status."""
        args = ["rollout", "create", artifact, "--target", f"group={GROUP}", "--waves", waves,
                "--soak", soak, *(f"--gate={g}" for g in gates), "--json"]  # fmt: skip
        doc: dict[str, Any] = json.loads(self.cli(*args))
        return doc

    def status(self, rollout_id: str) -> dict[str, Any]:
        doc: dict[str, Any] = self.api.request("GET", f"/api/v1/rollouts/{rollout_id}")
        return doc


@dataclass
class Node:
    """One node process and, once it has enrolled, its device id."""

    name: str
    process: ServerProcess
    device_id: str = ""

    def status(self) -> dict[str, Any]:
        doc: dict[str, Any] = httpx.get(
            f"{self.process.url}/api/status", headers=self.process.headers, timeout=10
        ).json()
        return doc

    def log(self) -> str:
        return self.process.log()


@dataclass
class Cluster:
    """The fleet and its nodes, and how the test waits on them and explains a failure."""

    fleet: Fleet
    nodes: list[Node]

    def logs(self) -> str:
        parts = [f"--- fleet log ---\n{tail(self.fleet.process.log())}"]
        parts += [f"--- {n.name} ({n.device_id or 'not enrolled'}) log ---\n{tail(n.log())}"
                  for n in self.nodes]  # fmt: skip
        return "\n".join(parts)

    def wait(
        self, what: str, observe: Callable[[], T], done: Callable[[T], bool],
        timeout: float = STEP_S,
    ) -> T:  # fmt: skip
        """Poll ``observe`` until ``done`` holds; AssertionError with what it saw last."""
        deadline = time.monotonic() + timeout
        seen: Any = "nothing yet"
        while True:
            try:
                value = seen = observe()
                if done(value):
                    return value
            except (httpx.HTTPError, EdgeOSError, KeyError, TypeError, ValueError) as exc:
                seen = exc  # a process between states (or not answering yet): look again
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout:g} s; last seen:\n{seen!r}")
            time.sleep(0.1)

    def finished(self, rollout: dict[str, Any]) -> dict[str, Any]:
        """The status of ``rollout`` once it is no longer running."""
        return self.wait(
            f"rollout {rollout['id']} of {rollout['artifact']} finished",
            partial(self.fleet.status, rollout["id"]), lambda doc: doc["status"] != "running",
        )  # fmt: skip

    @contextlib.contextmanager
    def explained(self) -> Iterator[None]:
        """Whatever fails inside carries the end of every process's log."""
        try:
            yield
        except Exception as exc:
            exc.add_note(self.logs())
            raise


@pytest.fixture
def cluster(tmp_path: Path, fleet_db_url: str) -> Iterator[Cluster]:
    """A fleet process and three node processes enrolled in it (stopped afterwards)."""
    with contextlib.ExitStack() as stack:
        data, port = tmp_path / "fleet", free_port()
        command = [
            sys.executable, "-m", "edgeos", "fleet", "serve", "--data", str(data),
            "--db", fleet_db_url, "--port", str(port), "--sync-interval", f"{SYNC_INTERVAL_S:g}s",
        ]  # fmt: skip
        # Unverified only while waiting for it to answer: serve creates the CA at its first
        # start, and every client afterwards trusts it through the admin token's pin.
        # Wide columns: what serve prints at its first start stays one line per item.
        server = stack.enter_context(
            ServerProcess(
                command, f"https://127.0.0.1:{port}", ready_path="/api/v1/health",
                env={"COLUMNS": "200"}, verify=False,
            )
        )  # fmt: skip
        token = (data / "admin-token").read_text().strip()
        api = stack.enter_context(FleetClient.login(server.url, token))
        fleet = Fleet(server, api, tmp_path / "operator" / "fleet.json")
        fleet.cli("login", fleet.url, "--token", token)

        nodes = []
        for index in range(NODES):
            join = fleet.api.create_join_token(GROUP, ttl_s=600)["token"]
            # In the environment, as an operator would keep it off the command line.
            process = node_process(tmp_path / f"node-{index}", EDGEOS_JOIN_TOKEN=join)
            process.command += ["--fleet", fleet.url]
            nodes.append(Node(f"node-{index}", stack.enter_context(process)))
        yield Cluster(fleet, nodes)


# -- the test ----------------------------------------------------------------------------
def rows(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The node's fleet artifacts by ``kind/name``."""
    return {f"{a['kind']}/{a['name']}": a for a in status["fleet_link"]["artifacts"]}


def runs_succeeded(status: dict[str, Any], agent: str = "checker") -> int:
    found = [a for a in status["agents"] if a["name"] == agent]
    return int(found[0]["runs"].get("succeeded", 0)) if found else 0


def model(status: dict[str, Any]) -> tuple[str | None, int]:
    """The stock model's default version and how many versions the node has."""
    found = [m for m in status["models_registered"] if m["name"] == "stock"]
    return (found[0]["default"], found[0]["versions"]) if found else (None, 0)


def runs_model(status: dict[str, Any], version: str) -> bool:
    """Whether ``stock@version`` is the node's default and its fleet row says active."""
    row = rows(status).get("model/stock", {})
    active = (row.get("version"), row.get("state")) == (version, "active")
    return active and model(status)[0] == version


def more_runs_than(count: int) -> Callable[[dict[str, Any]], bool]:
    """A condition on a node's status: its agent has succeeded more than ``count`` times."""
    return lambda status: runs_succeeded(status) > count


def test_a_fleet_process_halts_a_bad_model_and_rolls_a_good_one_out_to_three_nodes(
    cluster: Cluster, tmp_path: Path
) -> None:
    with cluster.explained():
        enroll(cluster)
        first = deploy(cluster, tmp_path / "artifacts")
        halt_a_bad_version(cluster, tmp_path / "artifacts", first)
        roll_a_good_version_out(cluster, tmp_path / "artifacts")
        revoke(cluster, cluster.nodes[-1])


def enroll(cluster: Cluster) -> None:
    """Every node online, in the group, with a device id of its own."""
    for node in cluster.nodes:
        status = cluster.wait(
            f"{node.name} online", node.status,
            lambda s: s["fleet_link"]["link"] == "online" and s["fleet_link"]["last_sync"],
        )  # fmt: skip
        link = status["fleet_link"]
        assert link["group"] == GROUP, link
        node.device_id = link["device_id"]
    ids = {n.device_id for n in cluster.nodes}
    assert len(ids) == NODES
    devices = cluster.fleet.api.devices(group=GROUP)
    assert {d["id"] for d in devices} == ids
    assert {d["status"] for d in devices} == {"active"}


def deploy(cluster: Cluster, artifacts: Path) -> dict[str, Any]:
    """Publish stock@1 and the agent that calls it, roll both out to every node at once;
    returns stock@1's rollout."""
    fleet = cluster.fleet
    fleet.cli("publish", "model", str(model_dir(artifacts, "1", seed=1)))
    fleet.cli("publish", "agent", str(agent_dir(artifacts)))
    # The model first: an agent naming a model the node does not have is refused.
    first = fleet.rollout("model/stock@1", "100")
    agent = fleet.rollout("agent/checker@1", "100")
    for rollout in (first, agent):
        done = cluster.finished(rollout)
        assert done["status"] == "completed", done
    for node in cluster.nodes:
        status = cluster.wait(
            f"{node.name} runs stock@1 and checker@1 whose runs succeed", node.status,
            lambda s: runs_model(s, "1") and rows(s).get("agent/checker", {}).get("state")
            == "active" and runs_succeeded(s) > 0,
        )  # fmt: skip
        assert [(a["name"], a["version"]) for a in status["agents"]] == [("checker", "1")]
        assert status["agents"][0]["runs"].get("failed", 0) == 0, status["agents"]
    return first


def halt_a_bad_version(cluster: Cluster, artifacts: Path, first: dict[str, Any]) -> None:
    """stock@2 outputs NaN: the node of wave 1 (ceil(3 x 33%) = one of three) refuses it
    at its health check, the rollout halts and rolls it back; nobody else hears of it."""
    fleet, nodes = cluster.fleet, cluster.nodes
    fleet.cli("publish", "model", str(model_dir(artifacts, "2", nan=True)))
    wave_one = wave_order(n.device_id for n in nodes)[0]
    before_bad = time.time()
    bad = fleet.rollout("model/stock@2", "33,100", "failure_rate<=+0.1", soak="2s")
    assert [w["devices"] for w in bad["wave_list"]] == [1, 3], bad
    halted = cluster.finished(bad)
    assert halted["status"] == "halted", halted
    reason = halted["reason"] or ""
    for part in (f"device {wave_one} reports model/stock@2 failed", "health check failed",
                 "NaN", "rolled back 1 devices"):  # fmt: skip
        assert part in reason, reason
    assert [w["state"] for w in halted["wave_list"]] == ["halted", "not started"], halted
    # The engine halted it by itself; nobody asked.
    [halt] = fleet.api.audit(action="rollout.halt")
    assert (halt["actor"], halt["target"]) == ("fleet:rollouts", f"rollout/{bad['id']}"), halt
    # What an operator sees: the halt and its reason, in the CLI's words.
    shown = fleet.cli("rollout", "status", bad["id"])
    assert "halted" in shown, shown
    assert wave_one in shown, shown

    [first_node] = [n for n in nodes if n.device_id == wave_one]
    status = cluster.wait(
        f"{first_node.name} (wave 1) back on stock@1", first_node.status,
        lambda s: runs_model(s, "1"),
    )  # fmt: skip
    # Refused and removed: the node keeps only the version it went back to.
    assert model(status) == ("1", 1), status["models_registered"]
    assert "model/stock@2: health check failed" in first_node.log()
    assigned = fleet.api.device(wave_one)["assignments"]
    assert [(a["name"], a["version"]) for a in assigned if a["kind"] == "model"] == [("stock", "1")]
    for node in nodes:
        if node is first_node:
            continue
        status = node.status()
        row = rows(status)["model/stock"]
        # Never assigned stock@2: its row was last written by stock@1's switch, the
        # registry never held version 2, and the node never mentioned it.
        assert (row["version"], row["state"]) == ("1", "active"), row
        assert row["updated_at"] < before_bad, (row, before_bad)
        assert model(status) == ("1", 1), status["models_registered"]
        assert "stock@2" not in node.log(), node.name
        [mine] = [a for a in fleet.api.device(node.device_id)["assignments"]
                  if a["kind"] == "model"]  # fmt: skip
        assert (mine["version"], mine["rollout_id"]) == ("1", first["id"]), mine

    # The agent kept running on every node through it all.
    counts = {n.name: runs_succeeded(n.status()) for n in nodes}
    for node in nodes:
        cluster.wait(
            f"{node.name}'s agent still succeeding after the halt", node.status,
            more_runs_than(counts[node.name]),
        )  # fmt: skip


def roll_a_good_version_out(cluster: Cluster, artifacts: Path) -> None:
    """stock@3 (other weights) passes wave 1's gate and reaches every node."""
    fleet = cluster.fleet
    fleet.cli("publish", "model", str(model_dir(artifacts, "3", seed=3)))
    good = fleet.rollout("model/stock@3", "33,100", "failure_rate<=+0.1", soak="2s")
    completed = cluster.finished(good)
    assert completed["status"] == "completed", completed
    assert [w["active"] for w in completed["wave_list"]] == [1, 3], completed
    assert all(w["verdict"]["passed"] for w in completed["wave_list"]), completed
    for node in cluster.nodes:
        status = cluster.wait(f"{node.name} on stock@3", node.status, lambda s: runs_model(s, "3"))
        assert rows(status)["model/stock"]["previous_version"] == "1"
        assert model(status) == ("3", 2), status["models_registered"]


def revoke(cluster: Cluster, victim: Node) -> None:
    """Revoked through the CLI: the node hears it at its next sync (within the sync
    interval, its long poll) and keeps running its agent on what it last committed."""
    cluster.fleet.cli("devices", "revoke", victim.device_id)
    status = cluster.wait(
        f"{victim.name} revoked", victim.status,
        lambda s: s["fleet_link"]["link"] == "revoked", timeout=SYNC_INTERVAL_S + 5,
    )  # fmt: skip
    link = status["fleet_link"]
    assert "running the last committed state" in (link["last_error"] or ""), link
    assert cluster.fleet.api.device(victim.device_id)["status"] == "revoked"
    status = cluster.wait(
        f"{victim.name}'s agent running after the revocation", victim.status,
        more_runs_than(runs_succeeded(status) + 1),
    )  # fmt: skip
    assert runs_model(status, "3")

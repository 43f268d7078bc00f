"""Applying a fleet's desired state on a node: stage, switch, health check, commit or roll back.

Real artifacts (ONNX models built here, agent bundles run by a real executor, policy
YAML), a real node database and registry; the bytes come from a small
:class:`ArtifactSource` instead of the fleet's TUF repository.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from edgeos.agents import manage, store
from edgeos.agents.executor import Executor
from edgeos.agents.retention import apply_retention
from edgeos.errors import ModelNotFoundError, UnavailableError, VerificationError
from edgeos.manifests.agent import AgentManifest
from edgeos.protocol.fleet import DesiredArtifact
from edgeos.runtime import ModelHost, ModelRegistry
from edgeos.state import Database
from edgeos.state.writer import GroupWriter
from edgeos.sync import state
from edgeos.sync.apply import Applier
from edgeos.sync.health import HealthProbe
from edgeos.sync.kinds import HealthLimits, Interrupted
from edgeos.sync.policy import PolicyCache
from edgeos.telemetry import MetricsRegistry
from tests import onnx_models

ROOT = Path(__file__).resolve().parents[1]
LIMITS = HealthLimits(model_check_s=20, agent_check_s=10, agent_runs=1)


# -- artifacts ---------------------------------------------------------------------------
def tgz(files: dict[str, bytes]) -> bytes:
    """A tar.gz of files at the top level, as the fleet packs a directory."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def nan_model(path: Path) -> Path:
    """x FP32 [batch, 4] -> log(x - 10): NaN for every input the smoke test gives."""
    graph = helper.make_graph(
        [
            helper.make_node("Sub", ["x", "ten"], ["shifted"]),
            helper.make_node("Log", ["shifted"], ["y"]),
        ],
        "nan",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(__import__("numpy").array(10.0, dtype="float32"), "ten")],
    )
    return onnx_models._save(graph, path)


def model_archive(tmp: Path, version: str, *, bad: bool = False) -> bytes:
    path = tmp / f"stock-{version}.onnx"
    (nan_model if bad else onnx_models.mlp)(path)
    manifest = {"name": "stock", "version": version, "task": "classification"}
    return tgz({"model.yaml": yaml.safe_dump(manifest).encode(), "model.onnx": path.read_bytes()})


GOOD_STEPS = """
def work(ctx, data):
    return {"ok": True}
"""
BAD_STEPS = """
def work(ctx, data):
    raise RuntimeError("sensor offline")
"""


def agent_archive(version: str, code: str = GOOD_STEPS, **manifest: Any) -> bytes:
    doc = {
        "name": "counter", "version": version, "steps": ["work"],
        "triggers": [{"interval": "100ms"}], "retry": {"max_attempts": 1},
        "budgets": {"max_concurrent_runs": 4, "model_calls_per_minute": 600},
        **manifest,
    }  # fmt: skip
    return tgz(
        {"agent.yaml": yaml.safe_dump(doc).encode(), "agent.py": textwrap.dedent(code).encode()}
    )


def policy_text(version: str, **fields: Any) -> bytes:
    return yaml.safe_dump(
        {"kind": "policy", "name": "stores", "version": version, **fields}
    ).encode()


def want(kind: str, name: str, version: str) -> DesiredArtifact:
    suffix = "yaml" if kind == "policy" else "tar.gz"
    target = f"{kind}s/{name}/{version}.{suffix}"
    return DesiredArtifact.model_validate(
        {"kind": kind, "name": name, "version": version, "target": target}
    )


class Source:
    """Artifact bytes by (kind, name, version); counts fetches; can fail on demand."""

    def __init__(self, **blobs: bytes) -> None:
        self.blobs = blobs
        self.fetched: list[str] = []
        self.error: Exception | None = None

    def fetch(self, artifact: DesiredArtifact) -> bytes:
        self.fetched.append(f"{artifact.kind}/{artifact.name}@{artifact.version}")
        if self.error is not None:
            raise self.error
        return self.blobs[f"{artifact.kind}:{artifact.version}"]


# -- fixtures ----------------------------------------------------------------------------
#: A node's database, model registry and data directory.
Node = tuple[Database, ModelRegistry, Path]


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    data = tmp_path / "node"
    with Database(data / "node.db") as db:
        yield db, ModelRegistry(db, data / "models"), data


def applier(node: Node, **kwargs: Any) -> Applier:
    db, registry, data = node
    return Applier(db, registry, data, limits=LIMITS, **kwargs)


def rows(db: Database) -> dict[str, tuple[str, str, str | None]]:
    return {f"{r.kind}/{r.name}": (r.version, r.state, r.previous_version) for r in state.rows(db)}


def with_executor(db: Database, fn: Any, *args: Any) -> Any:
    """Run ``fn(*args)`` in a thread while a real executor runs the node's agents."""

    async def go() -> Any:
        writer = GroupWriter(db).start()
        executor = Executor(db, writer, scan_interval=0.05)
        await executor.start()
        try:
            return await asyncio.to_thread(fn, *args)
        finally:
            await executor.stop()
            writer.stop()

    return asyncio.run(go())


# -- models ------------------------------------------------------------------------------
def test_a_model_version_is_staged_switched_checked_and_committed(
    node: Node, tmp_path: Path
) -> None:
    db, registry, _ = node
    source = Source(
        **{"model:1": model_archive(tmp_path, "1"), "model:2": model_archive(tmp_path, "2")}
    )
    apply = applier(node)

    [first] = apply.apply([want("model", "stock", "1")], source)
    assert (first.state, first.switched) == ("active", True)
    assert registry.default_version("stock") == "1"

    [second] = apply.apply([want("model", "stock", "2")], source)
    assert second.state == "active"
    assert registry.default_version("stock") == "2"
    assert [m.version for m in registry.versions("stock")] == ["1", "2"]  # previous kept
    assert rows(db) == {"model/stock": ("2", "active", "1")}
    assert [(a.version, a.state) for a in apply.actual()] == [("2", "active")]

    # Nothing to do for what already runs: not even a download.
    assert apply.plan([want("model", "stock", "2")]) == []
    apply.apply([want("model", "stock", "2")], source)
    assert source.fetched == ["model/stock@1", "model/stock@2"]


def test_a_model_whose_outputs_are_nan_is_rolled_back(node: Node, tmp_path: Path) -> None:
    db, registry, _ = node
    source = Source(
        **{
            "model:1": model_archive(tmp_path, "1"),
            "model:2": model_archive(tmp_path, "2", bad=True),
        }
    )
    metrics = MetricsRegistry()
    host = ModelHost(registry, metrics=metrics)
    apply = applier(node, host=host)
    apply.apply([want("model", "stock", "1")], source)
    since = state.health_since(db)

    [outcome] = apply.apply([want("model", "stock", "2")], source)
    assert (outcome.state, outcome.switched) == ("failed", True)
    assert outcome.reason is not None
    assert "output 'y' holds 4 NaN or infinite value(s)" in outcome.reason
    assert "rolled back to version 1" in outcome.reason
    assert registry.default_version("stock") == "1"
    with pytest.raises(ModelNotFoundError):
        registry.get("stock", "2")  # the refused version is gone
    assert host.infer("stock", {"features": [[0.1, 0.2, 0.3, 0.4]]}).version == "1"
    assert rows(db) == {"model/stock": ("2", "failed", "1")}
    assert [(a.version, a.state) for a in apply.actual()] == [("2", "failed"), ("1", "active")]
    assert state.health_since(db) > since  # health counts restart after the rollback

    # Refused once, not tried again while the fleet asks for the same version.
    assert apply.plan([want("model", "stock", "2")]) == []
    apply.apply([want("model", "stock", "2")], source)
    assert source.fetched.count("model/stock@2") == 1
    # The fleet rolls the device back: the failed report gives way to the good version.
    apply.apply([want("model", "stock", "1")], source)
    assert rows(db) == {"model/stock": ("1", "active", None)}

    probe = HealthProbe(db, metrics)
    probe.collect()
    host.infer("stock", {"features": [[0.1, 0.2, 0.3, 0.4]]})
    health = probe.collect()
    assert health.inference_p99_ms is not None
    assert health.inference_p99_ms > 0
    host.close()


def test_a_bad_first_version_leaves_no_model_behind(node: Node, tmp_path: Path) -> None:
    _, registry, _ = node
    [outcome] = applier(node).apply(
        [want("model", "stock", "1")], Source(**{"model:1": model_archive(tmp_path, "1", bad=True)})
    )
    assert outcome.state == "failed"
    assert "rolled back to nothing" in (outcome.reason or "")
    assert registry.catalog() == []
    assert [(a.version, a.state) for a in applier(node).actual()] == [("1", "failed")]


def test_a_refused_download_fails_and_an_unavailable_one_waits(node: Node, tmp_path: Path) -> None:
    db, registry, _ = node
    source = Source(**{"model:1": model_archive(tmp_path, "1")})
    apply = applier(node)

    source.error = UnavailableError("the fleet does not answer")
    [outcome] = apply.apply([want("model", "stock", "1")], source)
    assert outcome.state == "pending"
    assert rows(db) == {}  # nothing recorded: tried again on the next pass

    source.error = VerificationError("TUF refused target models/stock/1.tar.gz: tampered")
    [outcome] = apply.apply([want("model", "stock", "1")], source)
    assert outcome.state == "failed"
    assert outcome.reason == "download refused: TUF refused target models/stock/1.tar.gz: tampered"
    assert registry.catalog() == []


def test_a_model_archive_that_names_another_version_is_refused_at_staging(
    node: Node, tmp_path: Path
) -> None:
    _, registry, _ = node
    source = Source(**{"model:3": model_archive(tmp_path, "2")})
    [outcome] = applier(node).apply([want("model", "stock", "3")], source)
    assert outcome.state == "failed"
    assert outcome.reason is not None
    assert outcome.reason.startswith("refused at staging:")
    assert "field 'version'" in outcome.reason
    assert registry.catalog() == []


# -- policies ----------------------------------------------------------------------------
def test_a_policy_that_does_not_parse_is_refused_and_the_last_good_one_stays(node: Node) -> None:
    _, _, data = node
    cache = PolicyCache(data / "fleet" / "policies")
    assert cache.current().name == "safe-defaults"
    source = Source(
        **{
            "policy:1": policy_text("1", budgets={"max_concurrent_runs": 2, "cost_per_day": 5}),
            "policy:2": policy_text("2", budgets={"max_concurrent_runs": 0}),  # below 1
            "policy:3": b"kind: policy\nname: [stores\n",  # not YAML
        }
    )
    apply = applier(node)
    [ok] = apply.apply([want("policy", "stores", "1")], source)
    assert ok.state == "active"
    manifest = AgentManifest.model_validate({"name": "a", "version": "1", "steps": ["s"]})
    tightened = cache.tighten(manifest)
    assert tightened.budgets.max_concurrent_runs == 2
    assert tightened.budgets.cost_per_day == 5
    assert tightened.budgets.max_steps == manifest.budgets.max_steps  # not capped

    for version, problem in (("2", "budgets.max_concurrent_runs"), ("3", "not valid YAML")):
        [refused] = apply.apply([want("policy", "stores", version)], source)
        assert refused.state == "failed"
        assert refused.reason is not None
        assert problem in refused.reason, refused.reason
        assert f"policy/stores@{version}" in refused.reason
        assert cache.current().version == "1"
    assert sorted(p.name for p in (data / "fleet" / "policies").iterdir()) == ["stores.yaml"]


def test_unassigned_artifacts_stay_installed_and_reported(node: Node, tmp_path: Path) -> None:
    db, _, data = node
    source = Source(**{"model:1": model_archive(tmp_path, "1"), "policy:1": policy_text("1")})
    apply = applier(node)
    apply.apply([want("model", "stock", "1"), want("policy", "stores", "1")], source)
    apply.apply([want("model", "stock", "1")], source)
    assert {r.name: r.assigned for r in state.rows(db)} == {"stock": True, "stores": False}
    assert (data / "fleet" / "policies" / "stores.yaml").exists()
    assert {(a.kind, a.state) for a in apply.actual()} == {
        ("model", "active"),
        ("policy", "active"),
    }


# -- agents ------------------------------------------------------------------------------
def test_an_agent_whose_first_run_fails_is_rolled_back(node: Node) -> None:
    db, _, _ = node
    source = Source(**{"agent:1": agent_archive("1"), "agent:2": agent_archive("2", BAD_STEPS)})
    apply = applier(node)

    [first] = with_executor(db, apply.apply, [want("agent", "counter", "1")], source)
    assert first.state == "active", first.reason
    assert any(r.state == "succeeded" for r in store.runs(db, agent="counter"))

    [second] = with_executor(db, apply.apply, [want("agent", "counter", "2")], source)
    assert second.state == "failed"
    assert second.reason is not None
    assert "sensor offline" in second.reason
    assert "rolled back to version 1" in second.reason
    installed = store.agent(db, "counter")
    assert installed.version == "1"
    assert rows(db) == {"agent/counter": ("2", "failed", "1")}
    assert any(r.agent_version == "2" and r.state == "failed" for r in store.runs(db))


def test_an_agent_without_a_previous_version_is_removed_when_it_fails(node: Node) -> None:
    db, _, _ = node
    source = Source(**{"agent:1": agent_archive("1", BAD_STEPS)})
    [outcome] = with_executor(db, applier(node).apply, [want("agent", "counter", "1")], source)
    assert outcome.state == "failed"
    assert store.agents(db) == []


def test_a_stop_during_a_health_check_undoes_the_switch_and_it_is_tried_again(node: Node) -> None:
    db, _, _ = node
    source = Source(**{"agent:1": agent_archive("1"), "agent:2": agent_archive("2")})
    stopping = threading.Event()
    apply = applier(node, stopping=stopping)
    with_executor(db, apply.apply, [want("agent", "counter", "1")], source)

    # No executor now: the check waits for a run that never comes, until the stop.
    threading.Timer(0.3, stopping.set).start()
    with pytest.raises(Interrupted):
        apply.apply([want("agent", "counter", "2")], source)
    assert store.agent(db, "counter").version == "1"
    assert rows(db) == {"agent/counter": ("1", "active", None)}
    assert apply.plan([want("agent", "counter", "2")]) == [want("agent", "counter", "2")]


# -- a crash in the middle of a switch ---------------------------------------------------------
SWITCH_AND_HANG = """
import sys
from pathlib import Path

from edgeos.protocol.fleet import DesiredArtifact
from edgeos.runtime import ModelRegistry
from edgeos.state import Database
from edgeos.sync.apply import Applier
from edgeos.sync.kinds import HealthLimits

data, blob = Path(sys.argv[1]), Path(sys.argv[2]).read_bytes()
db = Database(data / "node.db").open()
applier = Applier(db, ModelRegistry(db, data / "models"), data,
                  limits=HealthLimits(agent_check_s=120))

class Source:
    def fetch(self, artifact):
        return blob

# No executor runs here: the health check waits for the first run until it is killed.
applier.apply([DesiredArtifact(kind="agent", name="counter", version="2",
                               target="agents/counter/2.tar.gz")], Source())
"""


def test_a_kill_in_the_middle_of_a_switch_comes_back_on_the_last_known_good(
    node: Node, tmp_path: Path
) -> None:
    db, _, data = node
    source = Source(**{"agent:1": agent_archive("1")})
    with_executor(db, applier(node).apply, [want("agent", "counter", "1")], source)
    good = store.agent(db, "counter")
    blob = tmp_path / "counter-2.tar.gz"
    blob.write_bytes(agent_archive("2"))

    child = subprocess.Popen(
        [sys.executable, "-c", SWITCH_AND_HANG, str(data), str(blob)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while store.agent(db, "counter").version != "2":
            assert child.poll() is None, child.communicate()[1].decode()
            assert time.monotonic() < deadline, "the child never switched"
            time.sleep(0.05)
        assert rows(db)["agent/counter"][1] == "switching"
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=10)

    # The node starts again: before anything runs, the switch is rolled back.
    [rolled] = applier(node).recover()
    assert (rolled.version, rolled.previous_version) == ("2", "1")
    agent = store.agent(db, "counter")
    assert (agent.version, agent.bundle_dir) == ("1", good.bundle_dir)
    [row] = state.rows(db)
    assert (row.version, row.state, row.previous_version) == ("2", "failed", "1")
    assert row.reason is not None
    assert "stopped during the switch" in row.reason
    assert applier(node).recover() == []  # once only


def test_a_crash_after_a_model_switch_comes_back_on_the_previous_default(
    node: Node, tmp_path: Path
) -> None:
    db, registry, _ = node
    source = Source(
        **{"model:1": model_archive(tmp_path, "1"), "model:2": model_archive(tmp_path, "2")}
    )
    apply = applier(node)
    apply.apply([want("model", "stock", "1")], source)

    class Killed(BaseException):  # what a kill looks like to the code it stops: no cleanup
        pass

    def die(staged: Any, switched_at: float) -> None:
        raise Killed

    apply.kinds["model"].check = die  # type: ignore[method-assign]
    with pytest.raises(Killed):
        apply.apply([want("model", "stock", "2")], source)
    assert registry.default_version("stock") == "2"  # switched, never checked

    applier(node).recover()
    assert registry.default_version("stock") == "1"
    assert [m.version for m in registry.versions("stock")] == ["1"]
    assert rows(db) == {"model/stock": ("2", "failed", "1")}


# -- the policy in force -----------------------------------------------------------------
POLICY_STEPS = """
def work(ctx, data):
    m = ctx.manifest
    return {"cost_per_day": m.budgets.cost_per_day, "concurrent": m.budgets.max_concurrent_runs,
            "threshold": m.escalation.confidence_threshold}
"""


def test_the_policy_in_force_tightens_budgets_escalation_and_retention(
    node: Node, tmp_path: Path
) -> None:
    db, _, data = node
    policy = policy_text(
        "1",
        budgets={"max_concurrent_runs": 1, "cost_per_day": 2},
        escalation={"confidence_threshold": 0.9},
        retention={"runs": "1s"},
    )
    applier(node).apply([want("policy", "stores", "1")], Source(**{"policy:1": policy}))
    cache = PolicyCache(data / "fleet" / "policies")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "agent.yaml").write_text(
        yaml.safe_dump({"name": "counter", "version": "1", "steps": ["work"],
                        "budgets": {"cost_per_day": 50}, "escalation": {"confidence_threshold": 0.5}})
    )  # fmt: skip
    (bundle / "agent.py").write_text(textwrap.dedent(POLICY_STEPS))
    manage.add_agent(db, bundle, data / "agents", models=[], connectors=[])

    async def go() -> Any:
        writer = GroupWriter(db).start()
        executor = Executor(db, writer, scan_interval=0.05)
        executor.policy = cache.tighten
        await executor.start()
        try:
            return await executor.wait(await executor.submit("counter"))
        finally:
            await executor.stop()
            writer.stop()

    run = asyncio.run(go())
    assert run.state == "succeeded"
    assert run.outcome == {"cost_per_day": 2.0, "concurrent": 1, "threshold": 0.9}
    later = time.time() + 5
    assert apply_retention(db, now=later).runs == 0  # the manifest keeps runs 30 days
    assert apply_retention(db, now=later, tighten=cache.tighten).runs == 1  # the policy: 1 s

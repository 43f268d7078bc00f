"""Traces of runs: one trace per run, from its steps to the external call an effect made.

The end-to-end tests run real node processes: the agent's effect goes to a loopback HTTP
receiver that records the ``traceparent`` it got, spans go to the node database and to a
loopback OTLP/HTTP receiver that decodes the protobuf it is sent, and a run killed with
SIGKILL and resumed keeps its one trace.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from typer.testing import CliRunner

from edgeos.agents import manage, store
from edgeos.agents.context import ModelCall, StepRecord
from edgeos.cli.main import app
from edgeos.errors import ConfigError
from edgeos.node.process import node_process
from edgeos.runtime import HostConfig, ModelHost, ModelRegistry
from edgeos.settings import load_settings
from edgeos.state import Database, journal
from edgeos.telemetry import buffer, tracing
from tests.loopback import LoopbackServer, QuietHandler
from tests.test_agents import make_bundle, running
from tests.test_agents_supervisor import MODEL_AGENT
from tests.test_connectors import Receiver
from tests.test_footprint import imported
from tests.test_personal_redaction import EMAIL, holders, setup_node

TOKEN = "sk-live-trace-9f8e7d6c5b4a"


class OtlpReceiver(LoopbackServer):
    """A loopback OTLP/HTTP collector: keeps every export request it is sent, decoded."""

    def __init__(self) -> None:
        super().__init__(_OtlpHandler)
        self.bodies: list[bytes] = []
        self.lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"{self.base_url}/v1/traces"

    def spans(self) -> list[Any]:
        found = []
        with self.lock:
            for body in self.bodies:
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                for resource in request.resource_spans:
                    for scope in resource.scope_spans:
                        found.extend(scope.spans)
        return found


class _OtlpHandler(QuietHandler):
    server: OtlpReceiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        assert self.path == "/v1/traces"
        assert self.headers.get("Content-Type") == "application/x-protobuf"
        with self.server.lock:
            self.server.bodies.append(body)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()


def wait_for(check: Any, timeout: float = 15.0, what: str = "the condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {timeout:.0f} s")


def spans_by_name(spans: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in spans}


def test_a_run_is_traced_from_its_decision_to_the_call_it_made(tmp_path: Path) -> None:
    receiver, collector = Receiver(), OtlpReceiver()
    try:
        data, crm = setup_node(tmp_path, receiver)
        # The binding also carries a secret, which must reach the receiver and no span.
        bindings = yaml.safe_load((data / "connectors.yaml").read_text())
        bindings["messaging"]["headers"] = {"Authorization": "Bearer ${secret:api_token}"}
        (data / "connectors.yaml").write_text(yaml.safe_dump(bindings))
        stored = subprocess.run(
            [sys.executable, "-m", "edgeos", "secrets", "set", "api_token",
             "--scope", "messaging", "--data-dir", str(data)],
            input=TOKEN, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert stored.returncode == 0, stored.stderr
        with node_process(data, EDGEOS_TRACE_OTLP_ENDPOINT=collector.endpoint) as node:
            started = httpx.post(
                f"{node.url}/api/agents/inventory/runs",
                json={"input": {"crm": str(crm), "customer": "c-7"}},
                headers=node.headers,
            )
            assert started.status_code == 201, started.text
            run_id = started.json()["run_id"]

            def traced() -> dict[str, Any] | None:
                doc = httpx.get(f"{node.url}/api/runs/{run_id}", headers=node.headers).json()
                names = {s["name"] for s in doc["trace"]}
                return doc if {"run inventory", "deliver messaging.send"} <= names else None

            shown = wait_for(traced, what="the run's whole trace")
        api_text = json.dumps(shown)
    finally:
        receiver.stop()
        collector.stop()

    trace = tracing.trace_id(run_id)
    assert shown["trace_id"] == trace
    spans = spans_by_name(shown["trace"])
    run, step = spans["run inventory"], spans["step act"]
    effect, deliver = spans["effect messaging.send"], spans["deliver messaging.send"]
    # The chain, parents first: run -> step -> effect decided -> its delivery.
    assert [s["name"] for s in shown["trace"]] == [
        "run inventory", "step act", "effect messaging.send", "deliver messaging.send",
    ]  # fmt: skip
    assert [s["depth"] for s in shown["trace"]] == [0, 1, 2, 3]
    assert run["span_id"] == tracing.run_span_id(run_id)
    assert run["parent_id"] is None
    assert step["parent_id"] == run["span_id"]
    key = effect["attributes"]["edgeos.effect.key"]
    assert effect["span_id"] == tracing.effect_span_id(key)
    assert effect["parent_id"] == step["span_id"]
    assert deliver["parent_id"] == effect["span_id"]
    assert deliver["attributes"]["http.response.status_code"] == 201
    assert all(s["trace_id"] == trace and s["status"] != "error" for s in shown["trace"])
    assert run["duration_ms"] >= step["duration_ms"] > 0

    # The receiver got the delivery span as its parent, in the run's trace.
    [request] = receiver.requests
    assert request.headers["traceparent"] == f"00-{trace}-{deliver['span_id']}-01"
    assert request.body["to"] == EMAIL
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"

    # The journal records the trace id with the run's start.
    with Database(data / "node.db") as db:
        [start] = [r for r in journal.for_run(db, run_id) if r.kind == "run_started"]
        assert start.payload["trace_id"] == trace
        for needle in (EMAIL, TOKEN):  # neither in any span (the outbox row keeps the address)
            assert not [h for h in holders(db, needle) if h.startswith("spans.")]

    # The collector got the same spans as OTLP protobuf (flushed as the node stopped).
    exported = collector.spans()
    assert {s.name for s in exported} >= set(spans)
    assert {s.trace_id.hex() for s in exported} == {trace}
    exported_deliver = next(s for s in exported if s.name == "deliver messaging.send")
    assert exported_deliver.span_id.hex() == deliver["span_id"]
    assert exported_deliver.parent_span_id.hex() == effect["span_id"]
    wire = b"".join(collector.bodies)
    for needle in (EMAIL, TOKEN):
        assert needle.encode() not in wire
        assert needle not in api_text

    # `edgeos runs show` prints the trace as a timeline next to the journal.
    out = CliRunner().invoke(app, ["runs", "show", run_id, "--data-dir", str(data)])
    assert out.exit_code == 0, out.output
    assert f"trace {trace}" in out.output
    lines = [line for line in out.output.splitlines() if "ms" in line and "messaging.send" in line]
    assert len(lines) == 2
    assert lines[1].index("deliver") > lines[0].index("effect")
    assert EMAIL not in out.output


WAITING = """
import pathlib, time

def first(ctx, data):
    return data

def second(ctx, data):
    # Waits for the test's signal: the node is killed while this step runs.
    while not pathlib.Path(data["release"]).exists():
        time.sleep(0.02)
    return {"done": True}
"""


def test_a_run_killed_and_resumed_keeps_one_trace(tmp_path: Path) -> None:
    data = tmp_path / "node"
    data.mkdir()
    release = tmp_path / "release"
    bundle = make_bundle(
        tmp_path, code=WAITING, steps=["first", "second"], connectors=[],
        budgets={"step_timeout": 60},
    )  # fmt: skip
    with Database(data / "node.db") as db:
        manage.add_agent(db, bundle, data / "agents", models=[], connectors=[])
        run_id = manage.queue_run(db, "inventory", {"release": str(release)})
    trace = tracing.trace_id(run_id)

    def spans() -> list[tracing.SpanRecord]:
        with Database(data / "node.db") as db:
            return tracing.spans_of_trace(db.reader(), trace)

    node = node_process(data).start()
    try:
        wait_for(lambda: any(s.name == "step first" for s in spans()), what="the first step's span")
        node.kill()  # SIGKILL while the second step runs: no shutdown code
    finally:
        node.kill()
    with Database(data / "node.db") as db:
        assert store.run(db, run_id).state == "running"
    release.write_text("go")
    with node_process(data) as node:
        wait_for(lambda: any(s.name == "run inventory" for s in spans()), what="the resumed run")
    kept = spans()
    with Database(data / "node.db") as db:
        assert store.run(db, run_id).state == "succeeded"
        every = db.reader().execute("SELECT trace_id, attributes FROM spans").fetchall()
        [start] = [r for r in journal.for_run(db, run_id) if r.kind == "run_started"]
    assert start.payload["trace_id"] == trace
    # One trace: every span of the run, from either process, is in it.
    assert {t for t, attrs in every if json.loads(attrs).get("edgeos.run.id") == run_id} == {trace}
    names = [s.name for s in kept]
    assert names == ["run inventory", "step first", "step second"]
    run_span = kept[0]
    assert run_span.span_id == tracing.run_span_id(run_id)
    # The step the first process ran and the one the second ran hang under the same root.
    assert {s.parent_id for s in kept[1:]} == {run_span.span_id}
    assert run_span.start_ns <= kept[1].start_ns < kept[2].end_ns <= run_span.end_ns


FLAKY_MODEL_AGENT = MODEL_AGENT.replace(
    "def act(ctx, data):\n    return data",
    "def act(ctx, data):\n    if ctx.attempt == 1:\n        raise RuntimeError('flaky')\n"
    "    return data",
)


def test_model_calls_and_failed_attempts_are_spans_of_their_step(
    db: Database, registry: ModelRegistry, mlp_file: Path, tmp_path: Path
) -> None:
    spec = tmp_path / "risk.yaml"
    spec.write_text(yaml.safe_dump({"task": "classification", "labels": ["ok", "stockout"],
                                    "cost_per_call": 0.01}))  # fmt: skip
    registry.add(mlp_file, name="risk", manifest=spec)
    bundle = make_bundle(tmp_path, code=FLAKY_MODEL_AGENT, models=["risk"], connectors=[])
    manage.add_agent(db, bundle, tmp_path / "agents", models=["risk"], connectors=[])
    host = ModelHost(registry, HostConfig())
    tracing.configure(tracing.TraceConfig(batch_delay_s=0.01), db.transaction)

    async def go() -> str:
        async with running(db, host=host) as ex:
            run = await ex.wait(await ex.submit("inventory"))
            assert run.state == "succeeded", run.error
            return run.id

    try:
        run_id = asyncio.run(go())
        tracing.flush()
    finally:
        tracing.shutdown()
        host.close()
    spans = tracing.spans_of_trace(db.reader(), tracing.trace_id(run_id))
    shown = [("  " * s.depth + s.name, s.status) for s in spans]
    assert shown == [
        ("run inventory", "unset"),
        ("  step sense", "unset"),
        ("  step reason", "unset"),
        ("    model risk", "unset"),
        ("    model risk", "unset"),
        ("  step act", "error"),  # the first attempt failed, the second succeeded
        ("  step act", "unset"),
        ("  step learn", "unset"),
    ]
    reason = next(s for s in spans if s.name == "step reason")
    calls = [s for s in spans if s.name == "model risk"]
    for call in calls:
        assert reason.start_ns <= call.start_ns <= call.end_ns <= reason.end_ns
        assert call.attributes["edgeos.model.version"] == "1"
        assert call.attributes["edgeos.cost"] == 0.01
    attempts = [s.attributes["edgeos.step.attempt"] for s in spans if s.name == "step act"]
    assert attempts == [1, 2]


def test_a_routed_call_is_a_venue_decision_span_without_its_reasons(tmp_path: Path) -> None:
    decision = {
        "model": "stockout-risk", "privacy": "internal", "slo_ms": 50.0, "min_quality": None,
        "cascade": 0.8, "venue": "edge", "escalated_to": "cloud", "confidence": 0.61,
        "all_cloud_cost": 0.002, "alternatives": [{"venue": "cloud"}],
        "reasons": ["cloud did not answer (https://user:pw@venue.example refused)"],
    }  # fmt: skip
    record = StepRecord()
    record.model_calls.append(ModelCall("stockout-risk-xl", "3", 12.5, 0.001, time.time(),
                                        venue=decision))  # fmt: skip
    with Database(tmp_path / "node.db") as db:
        tracing.configure(tracing.TraceConfig(batch_delay_s=0.01), db.transaction)
        try:
            with tracing.step_span("run-9", agent="a", step="reason", index=1, attempt=1,
                                   record=record):  # fmt: skip
                pass
            tracing.flush()
        finally:
            tracing.shutdown()
        step, venue = tracing.spans_of_trace(db.reader(), tracing.trace_id("run-9"))
    assert (step.name, venue.name) == ("step reason", "venue stockout-risk -> edge")
    assert venue.parent_id == step.span_id
    assert venue.attributes == {
        "edgeos.model": "stockout-risk-xl", "edgeos.model.version": "3",
        "edgeos.model.latency_ms": 12.5, "edgeos.cost": 0.001,
        "edgeos.routing.venue": "edge", "edgeos.routing.escalated_to": "cloud",
        "edgeos.routing.privacy": "internal", "edgeos.routing.slo_ms": 50.0,
        "edgeos.routing.cascade": 0.8, "edgeos.routing.confidence": 0.61,
        "edgeos.routing.all_cloud_cost": 0.002, "edgeos.routing.alternatives": 1,
    }  # fmt: skip
    assert 12.4 < venue.duration_ms < 12.6


def test_the_local_store_keeps_only_the_newest_spans(tmp_path: Path) -> None:
    with Database(tmp_path / "node.db") as db:
        tracing.configure(tracing.TraceConfig(keep_spans=10, batch_delay_s=0.01), db.transaction)
        try:
            runs = [f"run-{i:03d}" for i in range(40)]
            for i, run_id in enumerate(runs):
                tracing.run_finished(
                    run_id, agent="a", version="1", trigger="manual", state="succeeded",
                    created_at=1000.0 + i, finished_at=1000.5 + i,
                )  # fmt: skip
                if i % 7 == 0:
                    tracing.flush()
            tracing.flush()
        finally:
            tracing.shutdown()
        rows = db.reader().execute("SELECT trace_id FROM spans").fetchall()
    assert len(rows) == 10
    assert {t for (t,) in rows} == {tracing.trace_id(r) for r in runs[-10:]}


def test_kept_spans_are_offered_to_the_fleet_uplink(tmp_path: Path) -> None:
    offered: list[tuple[str, dict[str, Any], str | None]] = []

    def sink(kind: str, payload: dict[str, Any], **how: Any) -> bool:
        offered.append((kind, payload, how["trace_id"]))
        return True

    buffer.set_sink(sink)
    with Database(tmp_path / "node.db") as db:
        tracing.configure(tracing.TraceConfig(batch_delay_s=0.01), db.transaction)
        try:
            tracing.run_finished(
                "run-1", agent="a", version="1", trigger="event:pos.sale", state="failed",
                created_at=1000.0, finished_at=1002.5,
            )  # fmt: skip
            tracing.flush()
        finally:
            tracing.shutdown()
            buffer.set_sink(None)
    [(kind, span, trace)] = offered
    assert (kind, trace) == ("trace", tracing.trace_id("run-1"))
    assert span["span_id"] == tracing.run_span_id("run-1")
    assert (span["status"], span["end_ns"] - span["start_ns"]) == ("error", 2_500_000_000)
    assert span["attributes"]["edgeos.run.trigger"] == "event"  # not the event's name


def test_a_node_with_tracing_off_never_loads_the_sdk(tmp_path: Path) -> None:
    data = tmp_path / "node"
    data.mkdir()
    bundle = make_bundle(tmp_path, code=WAITING, steps=["first"], connectors=[])
    with Database(data / "node.db") as db:
        manage.add_agent(db, bundle, data / "agents", models=[], connectors=[])
        run_id = manage.queue_run(db, "inventory", {})
    node = node_process(data, EDGEOS_TRACING="false")
    node.command = [node.command[0], "-X", "importtime", *node.command[1:]]
    with node:

        def done() -> bool:
            with Database(data / "node.db") as db:
                return store.run(db, run_id).state == "succeeded"

        wait_for(done, what="the run")
        log = node.log()
    modules = imported(log)
    assert "edgeos.telemetry.tracing" in modules
    assert not [m for m in modules if m.startswith("opentelemetry")]
    with Database(data / "node.db") as db:
        assert db.reader().execute("SELECT count(*) FROM spans").fetchone()[0] == 0
        [start] = [r for r in journal.for_run(db, run_id) if r.kind == "run_started"]
    assert start.payload["trace_id"] == tracing.trace_id(run_id)  # ready for when it is on


def test_ids_are_derived_and_traceparent_is_w3c() -> None:
    run_id = "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"
    trace = tracing.trace_id(run_id)
    assert len(trace) == 32
    assert trace == tracing.trace_id(run_id) != tracing.trace_id("other")
    assert len(tracing.run_span_id(run_id)) == 16
    assert tracing.run_of_key(f"{run_id}:3:0") == run_id
    assert tracing.run_of_key("not-a-run-key") is None
    assert tracing.run_of_key("a:b:0") is None
    span = tracing.effect_span_id(f"{run_id}:3:0")
    assert tracing.traceparent(trace, span) == f"00-{trace}-{span}-01"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"EDGEOS_TRACE_OTLP_ENDPOINT": "collector:4318"}, "trace_otlp_endpoint"),
        ({"EDGEOS_TRACE_KEEP_SPANS": "0"}, "trace_keep_spans"),
        ({"EDGEOS_TRACING": "maybe"}, "EDGEOS_TRACING"),
    ],
)
def test_bad_trace_settings_are_refused_by_name(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings({"data_dir": tmp_path}, environ=env)

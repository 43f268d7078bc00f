"""ctx.llm in agents: generative calls routed across venues, priced per token, journaled and
replayed, and tool calls that become effects only through the connector contracts."""

from __future__ import annotations

import asyncio
import json
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from edgeos.agents import manage, store
from edgeos.agents.replay import replay
from edgeos.cli.main import app
from edgeos.connectors.config import parse_connectors
from edgeos.connectors.contracts import Contract, node_contracts
from edgeos.connectors.personal import pseudonym
from edgeos.connectors.vault import Vault, load_key
from edgeos.errors import ManifestError
from edgeos.manifests.model import GenerationSpec, ModelSpec
from edgeos.node.process import ServerProcess, node_process
from edgeos.routing.build import build_router
from edgeos.routing.chat import ChatRequest, route_chat
from edgeos.routing.config import load_venues
from edgeos.routing.decide import Needs
from edgeos.routing.deferral import queue
from edgeos.routing.stats import agent_costs
from edgeos.routing.venues import RoutingError
from edgeos.runtime import HostConfig, ModelHost, ModelRegistry
from edgeos.runtime.genai_store import register_generative
from edgeos.settings import load_settings
from edgeos.state import Database, journal, outbox
from edgeos.telemetry import MetricsRegistry
from tests.genai_support import tiny_model
from tests.loopback import LoopbackServer, QuietHandler
from tests.test_agents import running
from tests.test_connectors import Receiver

IN_PRICE, OUT_PRICE = 0.00001, 0.00003

MESSAGING: dict[str, Any] = {
    "capability": "messaging",
    "version": "1.0.0",
    "operations": {
        "send": {
            "input": {
                "type": "object",
                "required": ["to", "text"],
                "additionalProperties": False,
                "properties": {
                    "to": {"type": "string", "minLength": 1, "maxLength": 6, "x-personal": True},
                    "text": {"type": "string", "minLength": 1, "maxLength": 16},
                },
            },
            "side_effect": True,
            "idempotent": True,
        }
    },
}

STEP = """
def draft(ctx, data):
    schema = data.get("schema")
    reply = ctx.llm(data["model"]).chat(
        [{"role": "user", "content": data["ask"]}], schema=schema,
        tools=data.get("tools", [] if schema else ["messaging.send"]),
        max_tokens=90, privacy=data["privacy"], parallel_tool_calls=data.get("parallel", True),
    )
    for call in reply.tool_calls:
        ctx.effect(call.name, call.arguments)
    if reply.tool_calls:  # its text holds the arguments, personal ones too: not for the journal
        return {"calls": [call.name for call in reply.tool_calls]}
    return {"text": reply.text, "parsed": reply.parsed}
"""


def leaves(value: Any) -> list[Any]:
    """Every string and number in ``value``, at any depth."""
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in leaves(v)]
    if isinstance(value, list):
        return [leaf for v in value for leaf in leaves(v)]
    return [value]


def setup_node(
    data_dir: Path, messages_url: str, venues: dict[str, Any], isolation: str = "thread"
) -> dict[str, Contract]:
    """A node data directory: the messaging contract and its binding, ``venues.yaml``, and
    the drafting agent (its steps on a thread or in a worker process); returns the node's
    contracts."""
    (data_dir / "contracts").mkdir(parents=True, exist_ok=True)
    (data_dir / "contracts" / "messaging.yaml").write_text(yaml.safe_dump(MESSAGING))
    bindings = {
        "messaging": {
            "type": "http", "base_url": messages_url,
            "operations": {"send": {"path": "/messages"}},
            "implements": {"capability": "messaging", "version": "1.0.0"},
        }
    }  # fmt: skip
    (data_dir / "connectors.yaml").write_text(yaml.safe_dump(bindings))
    (data_dir / "venues.yaml").write_text(yaml.safe_dump({"venues": venues}))
    contracts = node_contracts(data_dir, parse_connectors(bindings, "connectors.yaml"))
    bundle = data_dir.parent / "bundle"
    bundle.mkdir(parents=True, exist_ok=True)
    doc = {"name": "drafter-agent", "version": "1.0", "steps": ["draft"], "models": ["drafter"],
           "connectors": ["messaging"], "retry": {"max_attempts": 1},
           "routing": {"models": ["writer"]}, "isolation": {"mode": isolation}}  # fmt: skip
    (bundle / "agent.yaml").write_text(yaml.safe_dump(doc))
    (bundle / "agent.py").write_text(textwrap.dedent(STEP))
    with Database(data_dir / "node.db") as db:
        manage.add_agent(db, bundle, data_dir / "agents", models=["drafter"],
                         connectors=["messaging"], contracts=contracts)  # fmt: skip
    return contracts


def grant_node_key(data_dir: Path, venue: str, node: ServerProcess) -> None:
    """Store ``node``'s API token in the vault of the node at ``data_dir``, as the API key
    of its venue ``venue`` (``${secret:VENUE_key}``)."""
    assert node.token is not None
    with Database(data_dir / "node.db") as db:
        Vault(db, load_key(data_dir)).set(f"{venue}_key", node.token, scopes=[f"venues.{venue}"])


def register_drafter(db: Database, data_dir: Path, model: Path) -> ModelRegistry:
    registry = ModelRegistry(db, data_dir / "models")
    spec = ModelSpec(kind="generative", generation=GenerationSpec(max_running=1, max_queued=4))
    register_generative(registry, model, name="drafter", manifest=spec)
    return registry


@pytest.fixture(scope="module")
def external(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A second node process serving the tiny model through its own /v1: a real
    OpenAI-compatible endpoint off the device."""
    model = tiny_model(tmp_path_factory.getbasetemp())
    data_dir = tmp_path_factory.mktemp("external") / "node"
    with Database(data_dir / "node.db") as db:
        register_drafter(db, data_dir, model)
    with node_process(data_dir) as process:
        yield process


def wait_run(http: httpx.Client, run_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        run: dict[str, Any] = http.get(f"/api/runs/{run_id}").json()
        if run["state"] in ("succeeded", "failed"):
            return run
        assert time.monotonic() < deadline, run
        time.sleep(0.05)


def test_tool_calls_become_effects_delivered_once_and_replay_does_not_generate(
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    external: ServerProcess,
    receiver: Receiver,
) -> None:
    model = tiny_model(tmp_path_factory.getbasetemp())  # built already for ``external``
    data_dir = tmp_path / "node"
    venues = {
        "edge": {"type": "local"},
        "lab": {"type": "openai", "url": f"{external.url}/v1", "price_per_input_token": IN_PRICE,
                "price_per_output_token": OUT_PRICE, "api_key": "${secret:lab_key}",
                "models": {"writer": {"model": "drafter"}, "drafter": {}}},
    }  # fmt: skip
    setup_node(data_dir, receiver.url, venues)
    grant_node_key(data_dir, "lab", external)
    with Database(data_dir / "node.db") as db:
        register_drafter(db, data_dir, model)
    # One call an answer: the tiny model, never taught when to stop calling, would run
    # out of context making more.
    asks = [
        {"model": "drafter", "privacy": "internal", "ask": "Tell Bob the oat milk is back.",
         "parallel": False},
        {"model": "writer", "privacy": "public", "ask": "Tell Ann her order shipped.",
         "parallel": False},
        {"model": "writer", "privacy": "local-only", "ask": "Tell Eve her card was declined.",
         "parallel": False},
    ]  # fmt: skip
    with node_process(data_dir) as node, node.client() as http:
        runs = []
        for ask in asks:
            started = http.post("/api/agents/drafter-agent/runs", json={"input": ask})
            assert started.status_code == 201, started.text
            runs.append(wait_run(http, started.json()["run_id"]))
        deadline = time.monotonic() + 20
        while len(receiver.seen("/messages")) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # a second delivery, if there were one, would have come by now
        page = http.get("/metrics").text
    on_edge, on_lab, private = runs
    assert on_edge["state"] == "succeeded", on_edge
    assert on_lab["state"] == "succeeded", on_lab
    # local-only data never leaves the device, and only a venue off it serves "writer".
    assert private["state"] == "failed"
    assert "privacy local-only: the data never leaves the device" in private["error"]

    # Each proposed tool call was emitted through ctx, passed the contract, and was
    # delivered exactly once with its idempotency key.
    seen = receiver.seen("/messages")
    assert len(seen) == 2
    with Database(data_dir / "node.db") as db:
        for run, request in zip((on_edge, on_lab), seen, strict=True):
            (entry,) = outbox.for_run(db, run["id"])
            assert request.headers["Idempotency-Key"] == entry.key
            assert request.body == entry.payload
            assert set(entry.payload) == {"to", "text"}
        records = {
            run["id"]: [r.payload for r in journal.for_run(db, run["id"])
                        if r.kind == "venue_decided"]
            for run in (on_edge, on_lab)
        }  # fmt: skip
        (edge_call,) = records[on_edge["id"]]
        (lab_call,) = records[on_lab["id"]]
        assert (edge_call["venue"], edge_call["kind"], edge_call["cost"]) == ("edge", "chat", 0.0)
        # Both serve "drafter": the device is the cheapest; the lab is priced by its tokens.
        (weighed,) = edge_call["alternatives"]
        assert (weighed["venue"], weighed["eligible"]) == ("lab", True)
        assert weighed["cost"] > 0
        assert lab_call["venue"] == "lab"
        assert lab_call["venue_model"] == "drafter"
        for call in (edge_call, lab_call):
            assert call["prompt_tokens"] > 0
            assert call["completion_tokens"] > 0
            assert call["latency_ms"] > 0
            assert call["prompt_digest"]
            assert call["output_digest"]
            assert json.loads(call["text"])["name"] == "messaging.send"
        expected = lab_call["prompt_tokens"] * IN_PRICE + lab_call["completion_tokens"] * OUT_PRICE
        assert lab_call["cost"] == pytest.approx(expected)
        assert store.run(db, on_lab["id"]).cost == pytest.approx(expected)
        (costs,) = agent_costs(db)
        calls, cost = costs.by_venue["lab"]
        assert calls == 1
        assert cost == pytest.approx(expected)
        assert costs.tokens["lab"] == (lab_call["prompt_tokens"], lab_call["completion_tokens"])

        # Replay serves the journaled answers: the external node is stopped, and nothing
        # is generated (no generative host is even opened).
        external.stop()
        settings = load_settings({"data_dir": data_dir})
        for run in (on_edge, on_lab):
            report = replay(db, run["id"], settings=settings)
            assert report.same, report.lines()
    shown = CliRunner().invoke(app, ["runs", "show", on_lab["id"], "--data-dir", str(data_dir)],
                               env={"COLUMNS": "250"})  # fmt: skip
    assert shown.exit_code == 0, shown.output
    assert "writer ran on lab (drafter" in shown.output
    assert f"{lab_call['prompt_tokens']} tokens in, " in shown.output
    tokens = f'edgeos_routing_tokens_total{{agent="drafter-agent",venue="lab",direction="input"}} {lab_call["prompt_tokens"]}'
    assert tokens in page
    assert f'edgeos_routing_cost_total{{agent="drafter-agent",venue="lab"}} {expected:g}' in page


def test_parallel_tool_calls_are_effects_each_delivered_once(
    tmp_path: Path, endpoint: MisbehavingEndpoint, receiver: Receiver
) -> None:
    data_dir = tmp_path / "node"
    setup_node(data_dir, receiver.url, lab(endpoint))
    calls = [
        {"name": "messaging.send", "arguments": {"to": to, "text": text}}
        for to, text in (("Ann", "Shipped."), ("Bob", "Back in."), ("Ann", "Thanks."))
    ]
    endpoint.content = json.dumps(calls)
    with node_process(data_dir) as node, node.client() as http:
        started = http.post("/api/agents/drafter-agent/runs", json={"input": ASK})
        run = wait_run(http, started.json()["run_id"])
        deadline = time.monotonic() + 20
        while len(receiver.seen("/messages")) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # a second delivery, if there were one, would have come by now
    assert (run["state"], run["outcome"]) == ("succeeded", {"calls": ["messaging.send"] * 3})
    seen = receiver.seen("/messages")
    with Database(data_dir / "node.db") as db:
        entries = outbox.for_run(db, run["id"])
        records = journal.for_run(db, run["id"])
    # Each call its own effect, with its own key, delivered once.
    assert [e.payload for e in entries] == [c["arguments"] for c in calls]
    assert len({e.key for e in entries}) == 3
    assert sorted(r.headers["Idempotency-Key"] for r in seen) == sorted(e.key for e in entries)
    # The journal holds every call's recipient as a pseudonym.
    (answer,) = [json.loads(r.payload["text"]) for r in records if r.kind == "venue_decided"]
    assert [a["arguments"]["to"] for a in answer] == [pseudonym(n) for n in ("Ann", "Bob", "Ann")]
    assert "Bob" not in leaves([r.payload for r in records])


class MisbehavingEndpoint(LoopbackServer):
    """An OpenAI-compatible endpoint on loopback that ignores the schema it is asked for
    and answers what the test sets in ``content``."""

    def __init__(self) -> None:
        super().__init__(_Answer)
        self.content = ""
        self.requests: list[dict[str, Any]] = []

    @property
    def url(self) -> str:
        return f"{self.base_url}/v1"


class _Answer(QuietHandler):
    server: MisbehavingEndpoint

    def _send(self, doc: dict[str, Any]) -> None:
        data = json.dumps(doc).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._send({"object": "list", "data": []})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)
        self._send({
            "id": "x", "object": "chat.completion", "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": self.server.content}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        })  # fmt: skip


def run_cases(
    data_dir: Path,
    contracts: dict[str, Contract],
    endpoint: MisbehavingEndpoint,
    cases: list[tuple[str, dict[str, Any]]],
) -> list[tuple[Any, list[outbox.OutboxEntry], int]]:
    """Run the agent once per (answer of the endpoint, input) in an in-process executor:
    each run, its outbox entries, and the chat requests the endpoint had by its end."""
    results: list[tuple[Any, list[outbox.OutboxEntry], int]] = []
    with Database(data_dir / "node.db") as db:
        host = ModelHost(ModelRegistry(db, data_dir / "models"), HostConfig())
        router = build_router(host, load_venues(data_dir / "venues.yaml"))

        async def go() -> None:
            async with running(db, host=host, contracts=contracts) as executor:
                executor.router = router
                for content, data in cases:
                    endpoint.content = content
                    run = await executor.wait(await executor.submit("drafter-agent", data=data))
                    results.append((run, outbox.for_run(db, run.id), len(endpoint.requests)))

        try:
            asyncio.run(go())
        finally:
            router.close()
            host.close()
    return results


@pytest.fixture
def endpoint() -> Iterator[MisbehavingEndpoint]:
    server = MisbehavingEndpoint()
    yield server
    server.stop()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.stop()


ASK: dict[str, Any] = {"model": "writer", "privacy": "public", "ask": "Tell Ann her order shipped."}


def lab(endpoint: MisbehavingEndpoint) -> dict[str, Any]:
    return {"lab": {"type": "openai", "url": endpoint.url, "price_per_input_token": IN_PRICE,
                    "models": {"writer": {}}}}  # fmt: skip


@pytest.mark.parametrize("isolation", ["thread", "process"])
def test_a_tool_call_is_only_a_proposal_checked_at_the_contract_boundary(
    tmp_path: Path, isolation: str, endpoint: MisbehavingEndpoint, receiver: Receiver
) -> None:
    data_dir = tmp_path / "node"
    contracts = setup_node(data_dir, receiver.url, lab(endpoint), isolation)
    cases = [
        ('{"name": "messaging.send", "arguments": {"to": "Ann", "text": "Shipped."}}', ASK),
        # Arguments off the contract: "to" is not a string, "text" is missing.
        ('{"name": "messaging.send", "arguments": {"to": 5}}', ASK),
        ('{"name": "payments.refund", "arguments": {"amount": 500}}', ASK),
        ("Sure, I will send it.", ASK),
        # A tool through a connector the agent does not list: no venue is even asked.
        ("", {**ASK, "tools": ["payments.refund"]}),
    ]
    valid, bad, unoffered, prose, unlisted = run_cases(data_dir, contracts, endpoint, cases)
    run, effects, _ = valid
    assert (run.state, run.error) == ("succeeded", None)
    assert [(e.connector, e.operation, e.payload) for e in effects] == [
        ("messaging", "send", {"to": "Ann", "text": "Shipped."})
    ]
    # The recipient is personal: the outbox keeps it to deliver, the journal never in clear.
    with Database(data_dir / "node.db") as db:
        records = journal.for_run(db, run.id)
    (answer,) = [json.loads(r.payload["text"]) for r in records if r.kind == "venue_decided"]
    assert answer["arguments"] == {"to": pseudonym("Ann"), "text": "Shipped."}
    assert "Ann" not in leaves([r.payload for r in records] + [answer])
    for run, effects, _ in (bad, unoffered, prose, unlisted):
        assert run.state == "failed"
        assert effects == []
    assert "messaging@1.0.0 send input" in bad[0].error
    assert "/to: fails 'type' (the value is personal: not shown)" in bad[0].error
    assert "'payments.refund', not a tool it was offered (messaging.send)" in unoffered[0].error
    assert "the answer is not JSON" in prose[0].error
    assert "connector 'payments', which the agent.yaml does not list" in unlisted[0].error
    assert unlisted[2] == prose[2]
    # The tool was offered to the venue as the contract's input schema, to decode under.
    # An array of calls (parallel calls, the default): a venue answering one call is heard.
    schema = endpoint.requests[0]["response_format"]["json_schema"]["schema"]
    assert (schema["type"], schema["minItems"]) == ("array", 1)
    assert schema["items"]["properties"]["name"] == {"enum": ["messaging.send"]}
    assert schema["items"]["properties"]["arguments"] == MESSAGING["operations"]["send"]["input"]


def test_an_answer_held_to_a_schema_is_parsed_and_validated(
    tmp_path: Path, endpoint: MisbehavingEndpoint, receiver: Receiver
) -> None:
    data_dir = tmp_path / "node"
    contracts = setup_node(data_dir, receiver.url, lab(endpoint))
    schema = {"type": "object", "required": ["tone"], "additionalProperties": False,
              "properties": {"tone": {"enum": ["warm", "plain"]}}}  # fmt: skip
    cases = [
        ('{"tone": "warm"}', {**ASK, "schema": schema}),
        ('{"tone": "angry"}', {**ASK, "schema": schema}),
        ('{"tone": "warm"', {**ASK, "schema": schema}),
        # Not a JSON Schema: refused before any venue is asked.
        ("", {**ASK, "schema": {"type": "sentence"}}),
    ]
    good, off, cut, invalid = run_cases(data_dir, contracts, endpoint, cases)
    assert good[0].state == "succeeded"
    assert good[0].outcome["parsed"] == {"tone": "warm"}
    sent = endpoint.requests[0]["response_format"]["json_schema"]["schema"]
    assert sent == schema
    assert "'angry' is not one of ['warm', 'plain']" in off[0].error
    assert "the answer is not JSON" in cut[0].error
    assert "schema: not a valid JSON Schema" in invalid[0].error
    assert invalid[2] == cut[2]
    for run, effects, _ in (off, cut, invalid):
        assert run.state == "failed"
        assert effects == []


def test_a_call_whose_only_venue_is_down_parks_the_run(
    tmp_path: Path, endpoint: MisbehavingEndpoint, receiver: Receiver
) -> None:
    data_dir = tmp_path / "node"
    contracts = setup_node(data_dir, receiver.url, lab(endpoint))
    endpoint.stop()  # nothing listens on its port now
    ((run, effects, _),) = run_cases(data_dir, contracts, endpoint, [("", ASK)])
    assert run.state == "waiting_venue"
    assert effects == []
    with Database(data_dir / "node.db") as db:
        (waiting,) = queue(db)
    assert (waiting.id, waiting.model, waiting.awaiting) == (f"{run.id}:0:0", "writer", ["lab"])


def test_the_venue_cheapest_by_its_tokens_wins_and_a_lost_one_fails_over(tmp_path: Path) -> None:
    short, long = MisbehavingEndpoint(), MisbehavingEndpoint()
    short.content = long.content = "Hello Ann."
    (tmp_path / "venues.yaml").write_text(yaml.safe_dump({"venues": {
        # Cheap output, dear input: for short prompts with long answers.
        "short": {"type": "openai", "url": short.url, "price_per_input_token": 1e-4,
                  "price_per_output_token": 1e-6, "timeout": "2s", "models": {"writer": {}}},
        "long": {"type": "openai", "url": long.url, "price_per_input_token": 1e-6,
                 "price_per_output_token": 1e-4, "timeout": "2s", "models": {"writer": {}}},
    }}))  # fmt: skip
    metrics = MetricsRegistry()
    with Database(tmp_path / "node.db") as db:
        host = ModelHost(ModelRegistry(db, tmp_path / "models"), HostConfig())
        router = build_router(host, load_venues(tmp_path / "venues.yaml"), metrics=metrics)
        ask = ({"role": "user", "content": "Tell Ann."},)
        try:
            drafted = route_chat(router, "shop", "writer", ChatRequest(ask, max_tokens=200),
                                 Needs("public"))  # fmt: skip
            summary = ChatRequest(({"role": "user", "content": "order " * 400},), max_tokens=5)
            summed = route_chat(router, "shop", "writer", summary, Needs("public"))
            with pytest.raises(RoutingError, match="privacy local-only: the data never leaves"):
                route_chat(router, "shop", "writer", ChatRequest(ask), Needs("local-only"))
            short.stop()
            failed_over = route_chat(router, "shop", "writer", ChatRequest(ask, max_tokens=200),
                                     Needs("public"))  # fmt: skip
        finally:
            long.stop()
            router.close()
            host.close()
    # Priced by the expected tokens: the short prompt with a long answer goes to "short",
    # the long prompt with a short answer to "long"; each charged its counted tokens.
    assert drafted.venue == "short"
    assert drafted.cost == pytest.approx(10 * 1e-4 + 5 * 1e-6)
    (other,) = drafted.record["alternatives"]
    assert other["venue"] == "long"
    assert other["cost"] == pytest.approx(3 * 1e-6 + 200 * 1e-4)  # 3 prompt tokens expected
    assert summed.venue == "long"
    assert summed.cost == pytest.approx(10 * 1e-6 + 5 * 1e-4)
    assert failed_over.venue == "long"
    assert failed_over.record["reasons"][0].startswith("short did not answer")
    assert len(short.requests) == 1
    page = metrics.render()
    assert 'edgeos_routing_tokens_total{agent="shop",venue="long",direction="output"} 10' in page
    assert 'edgeos_routing_calls_total{agent="shop",venue="short"} 1' in page


def test_an_openai_venue_needs_its_url_and_a_local_one_has_no_price(tmp_path: Path) -> None:
    path = tmp_path / "venues.yaml"
    path.write_text("venues:\n  llm: {type: openai, models: {m: {}}}\n")
    with pytest.raises(ManifestError, match=r"field 'venues.llm': .*an openai venue needs its url"):
        load_venues(path)
    path.write_text("venues:\n  edge: {type: local, price_per_output_token: 0.1}\n")
    with pytest.raises(ManifestError, match=r"'venues.edge': .*a local venue costs nothing"):
        load_venues(path)


@pytest.fixture
def own_external(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A test's own endpoint off the device serving the tiny model (the module's is
    stopped by the replay test)."""
    data_dir = tmp_path / "external"
    with Database(data_dir / "node.db") as db:
        register_drafter(db, data_dir, tiny_model(tmp_path_factory.getbasetemp()))
    with node_process(data_dir) as process:
        yield process


def test_the_openai_api_relays_a_routed_model_and_streams_its_venue_through(
    tmp_path: Path, own_external: ServerProcess
) -> None:
    openai = pytest.importorskip("openai")
    external = own_external
    data_dir = tmp_path / "node"
    data_dir.mkdir()
    venues = {"lab": {"type": "openai", "url": f"{external.url}/v1",
                      "price_per_call": 0.001, "price_per_input_token": 1e-5,
                      "price_per_output_token": 2e-5, "api_key": "${secret:lab_key}",
                      "models": {"writer": {"model": "drafter"}}}}  # fmt: skip
    (data_dir / "venues.yaml").write_text(yaml.safe_dump({"venues": venues}))
    grant_node_key(data_dir, "lab", external)
    ask: Any = [{"role": "user", "content": "Tell Bob the oat milk is back."}]
    settings: dict[str, Any] = {"messages": ask, "max_tokens": 30, "temperature": 1.0}
    direct = openai.OpenAI(base_url=f"{external.url}/v1", api_key=external.token, max_retries=0)
    for seed in range(10):  # a seed whose answer is some text
        settings["seed"] = seed
        expected = direct.chat.completions.create(model="drafter", **settings)
        if len(expected.choices[0].message.content or "") > 10:
            break
    with node_process(data_dir) as node:
        client = openai.OpenAI(base_url=f"{node.url}/v1", api_key=node.token, max_retries=0)
        whole = client.chat.completions.create(model="writer", **settings)
        chunks = list(client.chat.completions.create(model="writer", stream=True, **settings))
        with pytest.raises(openai.NotFoundError):  # neither here nor at a venue
            client.chat.completions.create(model="nobody", **settings)
        client.close()
        page = httpx.get(f"{node.url}/metrics", headers=node.headers).text
    direct.close()
    # Served by the venue's model, the same answer whole and streamed piece by piece.
    text = expected.choices[0].message.content
    assert text
    assert whole.choices[0].message.content == text
    assert whole.model == "drafter"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == text
    assert len([p for p in pieces if p]) > 2
    assert chunks[-1].choices[0].finish_reason == expected.choices[0].finish_reason
    # What the venue charges is counted: the whole answer's tokens at its prices, and the
    # stream (whose usage the client did not ask for) at its price per call.
    assert whole.usage is not None
    tokens = {"input": whole.usage.prompt_tokens, "output": whole.usage.completion_tokens}
    charged = 2 * 0.001 + tokens["input"] * 1e-5 + tokens["output"] * 2e-5
    line = 'edgeos_routing_cost_total{agent="(relayed)",venue="lab"} '
    (cost,) = [float(row[len(line) :]) for row in page.splitlines() if row.startswith(line)]
    assert cost == pytest.approx(charged)
    for direction, count in tokens.items():
        labels = f'agent="(relayed)",venue="lab",direction="{direction}"'
        assert f"edgeos_routing_tokens_total{{{labels}}} {count}" in page

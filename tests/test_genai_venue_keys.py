"""API keys of OpenAI-compatible venues: named in venues.yaml as vault secrets, sent as
``Authorization: Bearer`` to a paid API (here a loopback server standing for one), read
again at each call so a rotation applies, and never written anywhere by the node."""

from __future__ import annotations

import json
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgeos.agents import manage
from edgeos.connectors.vault import Vault, load_key
from edgeos.errors import ManifestError
from edgeos.node.process import node_process
from edgeos.routing.config import load_venues
from edgeos.state import Database
from tests.loopback import LoopbackServer, QuietHandler
from tests.stored import stored_bytes
from tests.test_genai_agents import wait_run

KEY, ROTATED = "sk-paid-4f9a0c2e71d3b865", "sk-paid-rotated-aa17c0de55"

STEP = """
def draft(ctx, data):
    reply = ctx.llm("writer").chat([{"role": "user", "content": data["ask"]}], privacy="public")
    return {"text": reply.text}
"""


class PaidAPI(LoopbackServer):
    """A paid OpenAI-compatible API on loopback: it answers only requests that carry its
    current key as ``Authorization: Bearer``, and 401 in OpenAI's shape otherwise."""

    def __init__(self, key: str, *, delay: float = 0.0) -> None:
        super().__init__(_Paid)
        self.key = key
        #: Seconds each chat call takes to answer.
        self.delay = delay
        self.authorizations: list[str | None] = []
        #: Chat calls answered.
        self.chats = 0
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"{self.base_url}/v1"


class _Paid(QuietHandler):
    server: PaidAPI

    def _send(self, status: int, doc: dict[str, Any]) -> None:
        data = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        given = self.headers.get("Authorization")
        self.server.authorizations.append(given)
        if given == f"Bearer {self.server.key}":
            return True
        error = {"message": "Incorrect API key provided", "type": "invalid_request_error",
                 "param": None, "code": "invalid_api_key"}  # fmt: skip
        self._send(401, {"error": error})
        return False

    def do_GET(self) -> None:
        if self._authorized():
            self._send(200, {"object": "list", "data": [{"id": "writer", "object": "model"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self._authorized():
            time.sleep(self.server.delay)
            with self.server._lock:
                self.server.chats += 1
            self._send(200, {
                "id": "chatcmpl-1", "object": "chat.completion", "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "Your order shipped."}}],
                "usage": {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16},
            })  # fmt: skip


@pytest.fixture
def paid() -> Iterator[PaidAPI]:
    server = PaidAPI(KEY)
    yield server
    server.stop()


def venues(url: str, api_key: str) -> dict[str, Any]:
    return {"venues": {"paid": {
        "type": "openai", "url": url, "api_key": api_key, "price_per_input_token": 1e-6,
        "models": {"writer": {}},
    }}}  # fmt: skip


def test_a_key_written_in_venues_yaml_is_refused_without_quoting_it(tmp_path: Path) -> None:
    path = tmp_path / "venues.yaml"
    path.write_text(yaml.safe_dump(venues("http://127.0.0.1:9/v1", KEY)))
    with pytest.raises(ManifestError) as refused:
        load_venues(path)
    message = str(refused.value)
    assert "field 'venues.paid.api_key': " in message
    assert "give the API key as ${secret:NAME}" in message
    assert "--scope venues.<venue name>" in message
    assert KEY not in message
    path.write_text(yaml.safe_dump(venues("http://127.0.0.1:9/v1", "${secret:paid_key}")))
    assert load_venues(path).venues["paid"].api_key_secret == "paid_key"
    doc = venues("http://127.0.0.1:9/v1", "${secret:paid_key}")
    doc["venues"]["paid"]["type"] = "v2"
    path.write_text(yaml.safe_dump(doc))
    assert load_venues(path).venues["paid"].api_key_secret == "paid_key"
    doc["venues"]["paid"] = {"type": "fleet", "api_key": "${secret:paid_key}",
                             "models": {"m": {}}}  # fmt: skip
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ManifestError, match="api_key is for openai and v2 venues"):
        load_venues(path)


def test_the_key_from_the_vault_reaches_the_paid_api_and_nothing_else(
    tmp_path: Path, paid: PaidAPI
) -> None:
    data_dir = tmp_path / "node"
    data_dir.mkdir()
    (data_dir / "venues.yaml").write_text(yaml.safe_dump(venues(paid.url, "${secret:paid_key}")))
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    doc = {"name": "writer-agent", "version": "1.0", "steps": ["draft"],
           "routing": {"models": ["writer"]}, "retry": {"max_attempts": 1}}  # fmt: skip
    (bundle / "agent.yaml").write_text(yaml.safe_dump(doc))
    (bundle / "agent.py").write_text(textwrap.dedent(STEP))
    with Database(data_dir / "node.db") as db:
        manage.add_agent(db, bundle, data_dir / "agents", models=[], connectors=[])
        vault = Vault(db, load_key(data_dir))
        vault.set("paid_key", KEY, scopes=["venues.paid"])
        with node_process(data_dir) as node, node.client() as http:
            runs = []
            for key in (KEY, ROTATED):
                # The paid API's key is replaced, and the vault's with it: the node reads
                # the vault at each call and sends the new one.
                paid.key = key
                vault.rotate("paid_key", key)
                started = http.post("/api/agents/writer-agent/runs", json={"input": {
                    "ask": "Tell Ann her order shipped."}})  # fmt: skip
                assert started.status_code == 201, started.text
                runs.append(wait_run(http, started.json()["run_id"]))
            page = http.get("/metrics").text
            shown = [http.get(f"/api/runs/{run['id']}").text for run in runs]
            node.stop()
            log = node.log()
    for run in runs:
        assert (run["state"], run["outcome"]) == ("succeeded", {"text": "Your order shipped."})
    assert f"Bearer {KEY}" in paid.authorizations
    assert paid.authorizations[-1] == f"Bearer {ROTATED}"
    assert None not in paid.authorizations  # no request went without the key
    # Neither key is anywhere the node writes: the journal, spans and telemetry in its
    # database (the vault holds them encrypted), its log, its metrics, its API.
    stored = stored_bytes(data_dir.glob("node.db*"))
    for secret in (KEY, ROTATED):
        assert secret.encode() not in stored
        assert secret not in log
        assert secret not in page
        assert not any(secret in text for text in shown)


def test_a_key_not_granted_to_the_venue_is_never_sent(tmp_path: Path, paid: PaidAPI) -> None:
    from edgeos.routing.build import build_router
    from edgeos.routing.chat import ChatRequest, route_chat
    from edgeos.routing.decide import Needs
    from edgeos.routing.venues import RoutingError
    from edgeos.runtime import HostConfig, ModelHost, ModelRegistry

    (tmp_path / "venues.yaml").write_text(yaml.safe_dump(venues(paid.url, "${secret:paid_key}")))
    with Database(tmp_path / "node.db") as db:
        vault = Vault(db, load_key(tmp_path))
        vault.set("paid_key", KEY, scopes=["supplier"])  # a connector's scope, not the venue's
        host = ModelHost(ModelRegistry(db, tmp_path / "models"), HostConfig())
        router = build_router(host, load_venues(tmp_path / "venues.yaml"),
                              secrets=lambda name, scope: vault.get(name, scope=scope))  # fmt: skip
        try:
            ask = ChatRequest(({"role": "user", "content": "Tell Ann."},))
            with pytest.raises(RoutingError) as failed:
                route_chat(router, "shop", "writer", ask, Needs("public"))
        finally:
            router.close()
            host.close()
    assert paid.authorizations == []
    state = router.monitor.state("paid")
    assert "not granted to scope 'venues.paid'" in (state.last_error or "")
    assert KEY not in str(failed.value)

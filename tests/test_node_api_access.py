"""Who may call a node's HTTP API: every route but the health checks wants a token.

Against a real ``edgeos node run`` process: the local token, named tokens made and revoked
with the CLI while the node runs, scopes (one agent's runs only), expiry, forged tokens,
the error shapes of both APIs, who the journal says answered, and that the node keeps no
token in the clear."""

from __future__ import annotations

import os
import stat
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from edgeos.agents import manage
from edgeos.cli.main import app
from edgeos.connectors.vault import Vault, load_key
from edgeos.demo.train import DemoModels
from edgeos.errors import AuthenticationError, ConfigError, EdgeOSError
from edgeos.limits import BudgetExceeded
from edgeos.manifests.model import validate_model_name
from edgeos.memory.export import HASHING_NAME
from edgeos.node import spending, tokens
from edgeos.node.process import ServerProcess, node_process
from edgeos.routing.build import build_router
from edgeos.routing.config import load_venues
from edgeos.routing.decide import Needs
from edgeos.runtime import HostConfig, ModelHost, ModelRegistry
from edgeos.state import Database, journal
from tests import onnx_models
from tests.memory_support import hashing_model
from tests.routing_support import SMALL, XL
from tests.stored import stored_bytes
from tests.test_agents import ESCALATING, make_bundle
from tests.test_agents_audit import wait_for
from tests.test_genai_venue_keys import KEY, PaidAPI

runner = CliRunner()

#: One route of each kind, as (method, path, scope it needs).
ROUTES = [
    ("GET", "/api/status", "read"),
    ("GET", "/api/agents", "read"),
    ("GET", "/metrics", "read"),
    ("GET", "/v2/models/none", "infer"),
    ("GET", "/v1/models", "infer"),
    ("POST", "/api/agents/inventory/runs", "run"),
    ("POST", "/api/events/pos.sales", "run"),
    ("GET", "/api/approvals", "approve"),
]


def cli(data: Path, *args: str, ok: bool = True, **env: str) -> str:
    """What the command printed, and the message of the error it ended with (the console
    script prints it; the runner hands it over)."""
    result = runner.invoke(app, [*args, "--data-dir", str(data)], env={"COLUMNS": "200", **env})
    assert (result.exit_code == 0) == ok, result.output
    error = "" if result.exception is None else str(result.exception)
    return result.output + error


def make_token(data: Path, name: str, *scopes: str, expires: str | None = None) -> str:
    """A new token of the node at ``data``; a scope starting with -- is another option."""
    args = ["node", "token", "create", name]
    args += [s if s.startswith("--") else f"--scope={s}" for s in scopes]
    if expires:
        args.append(f"--expires={expires}")
    # The token alone on the last line of standard output (the rest goes to stderr).
    return cli(data, *args).strip().splitlines()[-1]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("access")
    data = root / "node"
    data.mkdir()
    (data / "connectors.yaml").write_text(
        yaml.safe_dump({"supplier": {"type": "http", "base_url": "http://127.0.0.1:9",
                                     "operations": {"reorder": {"method": "POST", "path": "/o"}}}})
    )  # fmt: skip
    with Database(data / "node.db") as db:
        for name in ("inventory", "pricing"):
            bundle = make_bundle(
                root / name, code=ESCALATING, name=name,
                triggers=[{"manual": True}, {"webhook": True}, {"event": "pos.sales"}],
            )  # fmt: skip
            manage.add_agent(db, bundle, data / "agents", models=[], connectors=["supplier"])
    with node_process(data) as running:
        yield running


def data_dir(node: ServerProcess) -> Path:
    assert node.token_file is not None
    return node.token_file.parent


def test_health_is_open_and_everything_else_wants_a_token(node: ServerProcess) -> None:
    assert httpx.get(f"{node.url}/v2/health/live").status_code == 200
    assert httpx.get(f"{node.url}/v2/health/ready").status_code == 200
    for method, path, _ in ROUTES:
        for headers in ({}, {"Authorization": "Basic dXNlcjpwYXNz"}, {"Authorization": "Bearer"}):
            refused = httpx.request(method, f"{node.url}{path}", headers=headers, json={})
            assert refused.status_code == 401, (method, path, headers)
            assert refused.headers["www-authenticate"] == 'Bearer realm="edgeos-node"'
        forged = httpx.request(
            method, f"{node.url}{path}", headers=tokens.bearer(tokens.new_secret()), json={}
        )
        assert forged.status_code == 401
    # Each API's own error shape: OpenAI clients read error.message and error.code.
    openai_shape = httpx.get(f"{node.url}/v1/models").json()["error"]
    assert openai_shape["code"] == "invalid_api_key"
    assert "Authorization: Bearer" in openai_shape["message"]
    assert "api-token" in httpx.get(f"{node.url}/api/status").json()["error"]
    # A path the node does not serve says nothing either without a token.
    assert httpx.get(f"{node.url}/api/nothing-here").status_code == 401


def test_the_local_token_is_private_and_grants_everything(node: ServerProcess) -> None:
    path = tokens.local_token_path(data_dir(node))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert node.token == path.read_text().strip()
    with node.client(timeout=10.0) as client:
        for method, path_, _ in ROUTES:
            if method == "GET":
                assert client.get(path_).status_code in (200, 404), path_  # 404: no such model


def test_the_local_token_rotates_without_a_restart(node: ServerProcess) -> None:
    data = data_dir(node)
    old = node.token
    path = tokens.local_token_path(data)
    assert "refused from now on" in cli(data, "node", "token", "rotate-local")
    new = path.read_text().strip()
    assert new != old
    assert new.startswith(tokens.PREFIX)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert httpx.get(f"{node.url}/api/status", headers=tokens.bearer(old)).status_code == 401
    assert httpx.get(f"{node.url}/api/status", headers=tokens.bearer(new)).status_code == 200
    # Without the file, no local token is accepted at all (named ones still are).
    reader = make_token(data, "after-rotation", "read")
    path.unlink()
    assert httpx.get(f"{node.url}/api/status", headers=tokens.bearer(new)).status_code == 401
    assert httpx.get(f"{node.url}/api/status", headers=tokens.bearer(reader)).status_code == 200
    assert "does not exist" in cli(data, "node", "token", "rotate-local", ok=False)
    path.write_text(new + "\n")  # as it was, for the tests after this one
    path.chmod(0o600)
    node.token = new


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_a_rotated_local_token_keeps_its_owner(tmp_path: Path) -> None:
    # root rotates the token of a node that runs as its own user: that user must still read it.
    tokens.ensure_local_token(tmp_path)
    path = tokens.local_token_path(tmp_path)
    os.chown(path, 65534, 65534)
    tokens.rotate_local_token(tmp_path)
    assert (path.stat().st_uid, path.stat().st_gid) == (65534, 65534)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_named_token_gets_its_scopes_and_nothing_more(node: ServerProcess) -> None:
    data = data_dir(node)
    reader = make_token(data, "dashboard", "read")
    assert reader.startswith(tokens.PREFIX)
    with httpx.Client(base_url=node.url, headers=tokens.bearer(reader), timeout=10) as client:
        assert client.get("/api/status").status_code == 200
        assert client.get("/metrics").status_code == 200
        for method, path, scope in ROUTES:
            if scope != "read":
                denied = client.request(method, path, json={})
                assert denied.status_code == 403, path
        denied = client.get("/api/approvals").json()["error"]
        assert "token 'dashboard' lacks the scope approve (it has: read)" in denied
        assert client.get("/v1/models").json()["error"]["code"] == "insufficient_scope"
    # An OpenAI client gets its models with an infer token as its API key.
    infer = make_token(data, "openai-client", "infer")
    with httpx.Client(base_url=node.url, headers=tokens.bearer(infer)) as client:
        assert client.get("/v1/models").status_code == 200
        assert client.get("/api/status").status_code == 403


def test_run_scope_for_one_agent_starts_its_runs_only(node: ServerProcess) -> None:
    pos = make_token(data_dir(node), "pos-terminal", "run:inventory")
    with httpx.Client(base_url=node.url, headers=tokens.bearer(pos), timeout=10) as client:
        hook = client.post("/api/agents/inventory/webhook", json={"sku": "POS-1"})
        assert hook.status_code == 202
        assert client.post("/api/agents/inventory/runs", json={"input": {}}).status_code == 201
        other = client.post("/api/agents/pricing/webhook", json={"sku": "POS-1"})
        assert other.status_code == 403
        assert "run (or run:pricing)" in other.json()["error"]
        # Events may start any agent's runs: they need the whole run scope.
        assert client.post("/api/events/pos.sales", json={}).status_code == 403
        assert client.get(f"/api/runs/{hook.json()['run_id']}").status_code == 403


def test_revoked_and_expired_tokens_are_refused_at_the_next_request(
    node: ServerProcess,
) -> None:
    data = data_dir(node)
    token = make_token(data, "kiosk", "read")
    short = make_token(data, "visitor", "read", expires="1s")
    with httpx.Client(base_url=node.url, timeout=10) as client:
        assert client.get("/api/status", headers=tokens.bearer(token)).status_code == 200
        assert client.get("/api/status", headers=tokens.bearer(short)).status_code == 200
        assert "revoked" in cli(data, "node", "token", "revoke", "kiosk")
        refused = client.get("/api/status", headers=tokens.bearer(token))
        assert refused.status_code == 401
        assert refused.json()["error"] == "API token 'kiosk' was revoked"
        time.sleep(1.1)
        expired = client.get("/api/status", headers=tokens.bearer(short))
        assert (expired.status_code, expired.json()["error"]) == (
            401,
            "API token 'visitor' expired",
        )
    listing = cli(data, "node", "token", "list")
    assert "kiosk" in listing
    assert "revoked" in listing
    assert "visitor" in listing
    assert "expired" in listing
    # The name is free again once revoked; an active name is not.
    make_token(data, "kiosk", "read")
    assert "is active" in cli(data, "node", "token", "create", "kiosk", "--scope=read", ok=False)


def test_the_journal_names_the_token_that_answered(node: ServerProcess) -> None:
    data = data_dir(node)
    manager = make_token(data, "manager-app", "approve", "run:inventory")
    with httpx.Client(base_url=node.url, headers=tokens.bearer(manager), timeout=10) as client:
        run_id = client.post("/api/agents/inventory/runs", json={"input": {"sku": "ANS-1"}})
        run_id = run_id.json()["run_id"]
        escalation = wait_for(
            lambda: next(
                (e for e in client.get("/api/approvals").json() if e["run_id"] == run_id), None
            )
        )
        answered = client.post(
            f"/api/approvals/{escalation['id']}", json={"choice": "no", "by": "alice"}
        )
        assert answered.json() == {"answered": True}
    with Database(data / "node.db") as db:
        (record,) = [r for r in journal.for_run(db, run_id) if r.kind == "escalation_answered"]
    # The caller may name the person; the token is the authenticated part, always there.
    assert record.payload["by"] == "alice via manager-app"


def test_bad_token_requests_change_nothing(node: ServerProcess) -> None:
    data = data_dir(node)
    with Database(data / "node.db") as db:
        before = tokens.tokens(db)
    assert "unknown scope 'admin'" in cli(
        data, "node", "token", "create", "x", "--scope=admin", ok=False
    )
    assert "unknown scope 'run:'" in cli(
        data, "node", "token", "create", "x", "--scope=run:", ok=False
    )
    assert "token name" in cli(
        data, "node", "token", "create", "bad name", "--scope=read", ok=False
    )
    assert "local" in cli(data, "node", "token", "create", "local", "--scope=read", ok=False)
    assert "--expires" in cli(
        data, "node", "token", "create", "x", "--scope=read", "--expires=soon", ok=False
    )
    assert "no API token is named 'ghost'" in cli(
        data, "node", "token", "revoke", "ghost", ok=False
    )
    with Database(data / "node.db") as db:
        assert tokens.tokens(db) == before


def test_the_node_keeps_no_named_token_in_the_clear(node: ServerProcess) -> None:
    data = data_dir(node)
    secret = make_token(data, "scanner-check", "read")
    with httpx.Client(base_url=node.url, headers=tokens.bearer(secret)) as client:
        assert client.get("/api/status").status_code == 200
    files = [path for path in data.rglob("*") if path.is_file()]
    assert secret.encode() not in stored_bytes(files)
    with Database(data / "node.db") as db:
        assert tokens.digest(secret) in {
            row[0] for row in db.reader().execute("SELECT digest FROM api_tokens")
        }


def test_status_asks_with_the_local_token_or_says_what_is_needed(node: ServerProcess) -> None:
    data = data_dir(node)
    assert "running" in cli(data, "node", "status", "--url", node.url)
    no_read = make_token(data, "infer-only", "infer")
    refused = cli(data, "node", "status", "--url", node.url, ok=False, EDGEOS_NODE_TOKEN=no_read)
    assert "lacks the scope read" in refused
    assert "EDGEOS_NODE_TOKEN" in refused
    assert os.environ.get("EDGEOS_NODE_TOKEN") is None  # the runner's env did not leak


def test_another_node_is_a_v2_venue_with_a_token_from_the_vault(
    node: ServerProcess, tmp_path: Path, demo_models: DemoModels
) -> None:
    # The venue node serves the small demo model; the device reaches it with an infer
    # token kept in its vault, granted to the venue alone.
    venue_data = data_dir(node)
    with Database(venue_data / "node.db") as db:
        ModelRegistry(db, venue_data / "models").add(
            demo_models.models[SMALL], name=SMALL, manifest=demo_models.manifests[SMALL]
        )
    token = make_token(venue_data, "edge-device", "infer")
    (tmp_path / "venues.yaml").write_text(
        yaml.safe_dump({"venues": {
            "lab": {"type": "v2", "url": node.url, "api_key": "${secret:lab_key}",
                    "models": {XL: {"model": SMALL}}},
            "nokey": {"type": "v2", "url": node.url, "models": {"nokey-xl": {"model": SMALL}}},
        }})
    )  # fmt: skip
    with np.load(demo_models.eval_set) as data:
        x = {"features": np.asarray(data["features"][:1], dtype=np.float32)}
    with Database(tmp_path / "node.db") as db:
        vault = Vault(db, load_key(tmp_path))
        vault.set("lab_key", token, scopes=["venues.lab"])
        host = ModelHost(ModelRegistry(db, tmp_path / "models"), HostConfig())
        router = build_router(host, load_venues(tmp_path / "venues.yaml"),
                              secrets=lambda name, scope: vault.get(name, scope=scope))  # fmt: skip
        try:
            # XL is not on this device: only the venue can answer, with the token.
            answered = router.route("shop", XL, x, Needs("internal"))
            assert answered.venue == "lab"
            assert np.asarray(answered.outputs["probabilities"]).shape == (1, 2)
            # The same node without a token refuses, and says so without quoting anything.
            with pytest.raises(AuthenticationError, match="this API needs a token"):
                router.route("shop", "nokey-xl", x, Needs("internal"))
            cli(venue_data, "node", "token", "revoke", "edge-device")
            with pytest.raises(AuthenticationError, match="'edge-device' was revoked"):
                router.route("shop", XL, x, Needs("internal"))
        finally:
            router.close()
            host.close()


def test_a_token_for_one_model_uses_that_model_and_sees_no_other(tmp_path: Path) -> None:
    data = tmp_path / "node"
    with Database(data / "node.db") as db:
        registry = ModelRegistry(db, data / "models")
        registry.add(onnx_models.mlp(tmp_path / "risk.onnx"), name="risk")
        registry.add(onnx_models.mlp(tmp_path / "other.onnx", seed=1), name="other")
        embedder = hashing_model(tmp_path)
        registry.add(embedder, manifest=embedder.with_suffix(".yaml"))
    risk_only = make_token(data, "risk-app", "infer:risk")
    body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 4],
                        "data": [0.1, 0.2, 0.3, 0.4]}]}  # fmt: skip
    with (
        node_process(data) as node,
        httpx.Client(base_url=node.url, headers=tokens.bearer(risk_only), timeout=10) as client,
    ):
        assert client.post("/v2/models/risk/infer", json=body).status_code == 200
        assert client.get("/v2/models/risk/versions/1").status_code == 200
        refused = client.post("/v2/models/other/infer", json=body)
        assert refused.status_code == 403
        assert "infer (or infer:other)" in refused.json()["error"]
        assert client.get("/v2/models/other").status_code == 403
        assert client.get("/v2").status_code == 200  # the server's metadata names no model
        # Under /v1 the model is in the body: the same rule, in OpenAI's shape.
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["risk"]
        assert client.get("/v1/models/other").status_code == 403
        embed = {"model": HASHING_NAME, "input": "oat milk"}
        denied = client.post("/v1/embeddings", json=embed)
        assert denied.status_code == 403
        assert denied.json()["error"]["code"] == "insufficient_scope"
        # Other scopes are not implied.
        assert client.get("/api/status").status_code == 403
        # A token for the embedding model embeds.
        embeds = make_token(data, "search", f"infer:{HASHING_NAME}")
        answer = client.post("/v1/embeddings", json=embed, headers=tokens.bearer(embeds))
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["data"][0]["embedding"]) == 128


def paid_venue_node(root: Path, paid: PaidAPI) -> Path:
    """A node's data directory whose one venue is ``paid``, at 0.01 a call, its key in the
    vault."""
    data = root / "node"
    data.mkdir()
    (data / "venues.yaml").write_text(yaml.safe_dump({"venues": {"paid": {
        "type": "openai", "url": paid.url, "api_key": "${secret:paid_key}",
        "price_per_call": 0.01, "models": {"writer": {}},
    }}}))  # fmt: skip
    with Database(data / "node.db") as db:
        Vault(db, load_key(data)).set("paid_key", KEY, scopes=["venues.paid"])
    return data


def test_a_tokens_budget_caps_what_its_relayed_calls_spend(tmp_path: Path) -> None:
    # A paid OpenAI-compatible API (a loopback server standing for one) at 0.01 a call;
    # an app's token may spend 0.025 a day through the node's relay.
    paid = PaidAPI(KEY)
    try:
        data = paid_venue_node(tmp_path, paid)
        app_token = make_token(data, "shop-app", "infer", "read", "--cost-per-day=0.025")
        ask = {"model": "writer", "messages": [{"role": "user", "content": "Tell Ann."}]}
        with node_process(data) as node:
            app_client = httpx.Client(base_url=node.url, headers=tokens.bearer(app_token))
            with app_client:
                # Under the budget before each call: three calls pass (0, 0.01, 0.02 spent).
                for _ in range(3):
                    answer = app_client.post("/v1/chat/completions", json=ask)
                    assert answer.status_code == 200, answer.text
                refused = app_client.post("/v1/chat/completions", json=ask)
                assert refused.status_code == 429
                error = refused.json()["error"]
                assert error["code"] == "insufficient_quota"
                assert "token 'shop-app' budget cost_per_day 0.025 reached" in error["message"]
                # It eases when the first call leaves the sliding day.
                assert 86_000 < int(refused.headers["retry-after"]) <= 86_400
                page = app_client.get("/metrics").text
            # Three calls charged to the app; the refused one never reached the paid API.
            assert 'edgeos_routing_calls_total{agent="(token shop-app)",venue="paid"} 3' in page
            assert 'edgeos_routing_cost_total{agent="(token shop-app)",venue="paid"} 0.03' in page
            # The local token has no budget.
            with node.client() as local:
                assert local.post("/v1/chat/completions", json=ask).status_code == 200
        # Kept across a restart of the node: still refused.
        with node_process(data) as node, httpx.Client(base_url=node.url) as client:
            again = client.post("/v1/chat/completions", json=ask, headers=tokens.bearer(app_token))
            assert again.status_code == 429
        listing = cli(data, "node", "token", "list")
        assert "0.03 / 0.025" in listing
    finally:
        paid.stop()


def test_calls_made_together_cannot_spend_past_a_tokens_budget(tmp_path: Path) -> None:
    # Eight calls at once at 0.01 each, a budget of 0.025 and a paid API that takes half a
    # second: while calls are in flight, what they may cost counts as spent, so three go
    # through (as three calls one after another would) and five are refused up front.
    paid = PaidAPI(KEY, delay=0.5)
    try:
        data = paid_venue_node(tmp_path, paid)
        app_token = make_token(data, "shop-app", "infer", "--cost-per-day=0.025")
        ask = {"model": "writer", "messages": [{"role": "user", "content": "Tell Ann."}]}
        with node_process(data) as node:

            def call(_: int) -> httpx.Response:
                with httpx.Client(base_url=node.url, headers=tokens.bearer(app_token)) as c:
                    return c.post("/v1/chat/completions", json=ask, timeout=30)

            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(call, range(8)))
            codes = Counter(a.status_code for a in answers)
            assert codes == {200: 3, 429: 5}, [a.text for a in answers]
            refused = next(a for a in answers if a.status_code == 429)
            assert int(refused.headers["retry-after"]) <= 1  # in flight: ends in seconds
            # The refused calls never reached the paid API.
            assert paid.chats == 3
            # Once they are charged, the budget is spent: refused for the day.
            after = call(0)
            assert after.status_code == 429
            assert int(after.headers["retry-after"]) > 86_000
        assert "0.03 / 0.025" in cli(data, "node", "token", "list")
    finally:
        paid.stop()


def test_approve_for_one_agent_sees_and_answers_its_questions_only(node: ServerProcess) -> None:
    data = data_dir(node)
    runs = {}
    with node.client(timeout=10) as local:
        for agent in ("inventory", "pricing"):
            started = local.post(f"/api/agents/{agent}/runs", json={"input": {"sku": "ONE-1"}})
            runs[agent] = started.json()["run_id"]

        def both_asked() -> dict[str, str] | None:
            open_ = {e["run_id"]: e["id"] for e in local.get("/api/approvals").json()}
            return open_ if set(runs.values()) <= set(open_) else None

        questions = wait_for(both_asked)
    pricing_desk = make_token(data, "pricing-desk", "approve:pricing")
    with httpx.Client(base_url=node.url, headers=tokens.bearer(pricing_desk)) as client:
        listed = {e["run_id"] for e in client.get("/api/approvals").json()}
        assert runs["pricing"] in listed
        assert runs["inventory"] not in listed
        other = client.post(f"/api/approvals/{questions[runs['inventory']]}", json={"choice": "no"})
        assert other.status_code == 403
        assert "approve (or approve:inventory)" in other.json()["error"]
        own = client.post(f"/api/approvals/{questions[runs['pricing']]}", json={"choice": "no"})
        assert own.json() == {"answered": True}
        # It starts nothing, not even the agent whose questions it answers.
        assert client.post("/api/agents/pricing/runs", json={}).status_code == 403
    with node.client() as local:  # the other question is still open
        still = {e["id"] for e in local.get("/api/approvals").json()}
    assert questions[runs["inventory"]] in still
    assert "unknown scope 'approve:'" in cli(
        data, "node", "token", "create", "x", "--scope=approve:", ok=False
    )


def test_the_node_records_when_each_token_was_last_used(node: ServerProcess) -> None:
    data = data_dir(node)
    used = make_token(data, "used-daily", "read")
    make_token(data, "never-used", "read")

    def last_used(name: str) -> float | None:
        with Database(data / "node.db") as db:
            (found,) = [t for t in tokens.tokens(db) if t.name == name and t.state == "active"]
            return found.last_used_at

    before = time.time()
    with httpx.Client(base_url=node.url, headers=tokens.bearer(used)) as client:
        assert client.get("/api/status").status_code == 200
        first = last_used("used-daily")
        assert first is not None
        assert first >= before - 1
        # Within a minute the record stays as it was: no write per request.
        assert client.get("/api/status").status_code == 200
        assert last_used("used-daily") == first
    assert last_used("never-used") is None
    listing = cli(data, "node", "token", "list")
    never = next(line for line in listing.splitlines() if "never-used" in line)
    assert "never" in never.replace("never-used", "")


def test_status_counts_the_named_tokens_by_state(node: ServerProcess) -> None:
    data = data_dir(node)
    make_token(data, "counted", "read")
    make_token(data, "gone", "read")
    cli(data, "node", "token", "revoke", "gone")
    with Database(data / "node.db") as db:
        expected = Counter(t.state for t in tokens.tokens(db))
    with node.client() as client:
        shown = client.get("/api/status").json()["api_tokens"]
    assert shown == dict(expected)
    assert shown["active"] >= 1
    assert shown["revoked"] >= 1
    text = cli(data, "node", "status", "--url", node.url)
    assert f"named: {shown['active']} active" in text


def test_scopes_for_one_agent_or_model_take_every_name_their_manifests_allow() -> None:
    for scope in ("run:restock", "run:store-7.restock", "approve:a_b", "read", "infer",
                  "infer:all-minilm-l6-v2", "infer:m"):  # fmt: skip
        assert tokens.parse_scope(scope) == scope
    for bad in ("run:Restock", "run:", "read:restock", "infer:M", "admin", "approve:-x"):
        with pytest.raises(ConfigError, match="unknown scope"):
            tokens.parse_scope(bad)
    # The same names as model manifests take.
    for name in ("stockout-risk", "a.b_c-9", "Upper", "-lead", "x" * 64, "x" * 65, ""):
        assert accepted(validate_model_name, name) == accepted(tokens.parse_scope, f"infer:{name}")


def accepted(check: Callable[[str], object], text: str) -> bool:
    try:
        check(text)
    except EdgeOSError:
        return False
    return True


def test_a_refusal_for_calls_in_flight_says_to_retry_in_a_second(tmp_path: Path) -> None:
    with Database(tmp_path / "node.db") as db:
        made, _ = tokens.create(db, "shop-app", ["infer"], cost_per_day=0.025)
        principal = tokens.Principal(
            made.name, frozenset(made.scopes), made.digest, made.cost_per_day
        )
        for _ in range(2):
            spending.record_spend(db, principal, 0.01)
        holds = spending.Holds()
        release = holds.take(db, principal, 0.01)  # 0.02 spent, 0.01 in flight
        with pytest.raises(BudgetExceeded) as refused:
            holds.take(db, principal, 0.01)
        assert refused.value.retry_after == 1.0  # the call in flight ends soon, not a day
        release()
        release()  # twice does nothing
        holds.take(db, principal, 0.01)()  # under the budget again: it passes

"""Fields a contract marks personal: pseudonyms in records, values only where delivered.

The end-to-end test runs a node process whose agent sends a customer's e-mail address
through a binding whose contract marks ``to`` personal: the receiver gets the address,
and the node's database holds it only in the outbox row (nowhere once retention removed
the run), its log, ``edgeos runs show``, its metrics and its health report never.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from edgeos.agents import manage, store
from edgeos.agents.replay import replay
from edgeos.agents.retention import apply_retention
from edgeos.cli.main import app
from edgeos.connectors.contracts import Contract, ContractError
from edgeos.connectors.personal import is_pseudonym, like, matches, pseudonym, redact
from edgeos.node.process import node_process
from edgeos.state import Database, journal, outbox
from edgeos.sync.health import HealthProbe
from tests.stored import journal_payloads, stored_bytes
from tests.test_agents import make_bundle, running
from tests.test_connectors import Receiver
from tests.test_delivery import Clock, enqueue, make_worker, row, stored_result

EMAIL = "ada.lovelace+edge@example.org"

SEND_INPUT: dict[str, Any] = {
    "type": "object",
    "required": ["to", "text"],
    "properties": {
        "to": {"type": "string", "pattern": "^[^@]+@[^@]+$", "x-personal": True},
        "text": {"type": "string"},
        "cc": {"type": "array", "items": {"type": "string", "x-personal": True}},
    },
}
MESSAGING = {
    "capability": "messaging",
    "version": "1.0",
    "operations": {
        "send": {
            "input": SEND_INPUT,
            "output": {
                "type": "object",
                "properties": {"body": {"properties": {"echo": {"x-personal": True}}}},
            },
            "idempotent": True,
        }
    },
}


def messaging() -> Contract:
    return Contract.model_validate(MESSAGING)


# -- pseudonyms -------------------------------------------------------------------------------
def test_personal_fields_become_pseudonyms_at_any_depth() -> None:
    schema = {
        "type": "object",
        "properties": {
            "customer": {"type": "object", "properties": {"email": {"x-personal": True}}},
            "lines": {"type": "array", "items": {"properties": {"card": {"x-personal": True}}}},
            "sku": {"type": "string"},
        },
        "patternProperties": {"^phone_": {"x-personal": True}},
        "additionalProperties": {"properties": {"name": {"x-personal": True}}},
    }
    value: dict[str, Any] = {
        "customer": {"email": EMAIL, "tier": "gold"},
        "lines": [{"card": "4111", "qty": 1}, {"card": "4111", "qty": 2}],
        "sku": "A-1",
        "phone_home": "+44 20 7946 0000",
        "contact": {"name": "Ada", "city": "London"},
    }
    shown = redact(schema, value)
    assert shown["customer"] == {"email": pseudonym(EMAIL), "tier": "gold"}
    assert [line["card"] for line in shown["lines"]] == [pseudonym("4111")] * 2  # equal stays equal
    assert (shown["sku"], shown["contact"]["city"]) == ("A-1", "London")
    assert is_pseudonym(shown["phone_home"])
    assert is_pseudonym(shown["contact"]["name"])
    assert redact(schema, shown) == shown  # pseudonyms are not pseudonymised again
    assert value["customer"]["email"] == EMAIL  # the value itself is left alone
    assert redact({"x-personal": True}, {"a": 1}) == pseudonym({"a": 1})
    assert redact({"type": "object"}, value) is value


def test_a_journaled_pseudonym_matches_the_value_it_stands_for() -> None:
    journaled = redact(SEND_INPUT, {"to": EMAIL, "text": "hi"})
    assert matches(journaled, {"to": EMAIL, "text": "hi"})
    assert not matches(journaled, {"to": "someone@else.example", "text": "hi"})
    assert not matches(journaled, {"to": EMAIL, "text": "hello"})
    now = {"to": "someone@else.example", "text": "hello"}
    assert like(journaled, now) == {"to": pseudonym("someone@else.example"), "text": "hello"}


def test_a_contract_violation_never_quotes_a_personal_value() -> None:
    with pytest.raises(ContractError) as info:
        messaging().check("send", {"to": "ada at example.org", "text": 3})
    assert str(info.value) == (
        "messaging@1.0 send input: /text: 3 is not of type 'string'; "
        "/to: fails 'pattern' (the value is personal: not shown)"
    )


# -- the executor, replay and the delivery worker ----------------------------------------------
SEND = """
def act(ctx, data):
    ctx.effect("messaging.send", {"to": data["to"], "text": "back in stock", "cc": [data["to"]]})
    return {"sent": 1}
"""


def test_the_journal_holds_pseudonyms_and_the_outbox_the_value(
    db: Database, tmp_path: Path
) -> None:
    bundle = make_bundle(tmp_path, code=SEND, steps=["act"], connectors=["messaging"])
    manage.add_agent(db, bundle, tmp_path / "agents", models=[], connectors=["messaging"])
    contracts = {"messaging": messaging()}
    done: list[str] = []

    async def go() -> None:
        async with running(db, contracts=contracts) as ex:
            run = await ex.wait(await ex.submit("inventory", data={"to": EMAIL}))
            done.append(run.id)

    asyncio.run(go())
    (run_id,) = done
    (effect,) = outbox.for_run(db, run_id)
    assert effect.payload["to"] == EMAIL  # delivered with the value
    (enqueued,) = [r for r in journal.for_run(db, run_id) if r.kind == "effect_enqueued"]
    assert enqueued.payload["payload"] == {
        "to": pseudonym(EMAIL), "text": "back in stock", "cc": [pseudonym(EMAIL)],
    }  # fmt: skip
    assert replay(db, run_id).same  # the same address now has the same pseudonym

    # A change that sends elsewhere shows as a difference, with pseudonyms on both sides.
    agent = store.agent(db, "inventory")
    code = Path(agent.bundle_dir) / "agent.py"
    code.write_text(SEND.replace('data["to"], "text"', '"b@example.org", "text"'))
    report = replay(db, run_id)
    assert not report.same
    assert pseudonym("b@example.org") in report.differences[0]
    assert "b@example.org" not in " ".join(report.lines())


class Echo:
    """A connector that fails once quoting the payload, as receivers' errors do, then
    answers with the address echoed."""

    name = "messaging"
    idempotency_keys = True

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    async def deliver(self, operation: str, payload: dict[str, Any], key: str) -> Any:
        from edgeos.connectors import DeliveryError

        self.calls.append(payload)
        if len(self.calls) == 1:
            raise DeliveryError(
                self.name, operation, f"mailbox {payload['to']} is full", retryable=True
            )
        return {"status": 201, "body": {"echo": payload["to"], "id": "m-1"}}

    async def close(self) -> None:
        return None


def test_delivery_masks_personal_values_in_errors_and_pseudonymises_results(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    clock = Clock()
    enqueue(db, "run1:0:0", "messaging", "send", {"to": EMAIL, "text": "hi"})
    echo = Echo()

    async def go() -> str | None:
        worker = make_worker(db, {"messaging": echo}, clock, contracts={"messaging": messaging()})
        await worker.drain_once()
        error = row(db, "run1:0:0").last_error
        clock.advance(1.0)
        await worker.drain_once()
        return error

    error = asyncio.run(go())
    assert [c["to"] for c in echo.calls] == [EMAIL, EMAIL]
    assert error == "connector 'messaging' operation 'send': mailbox [personal] is full"
    assert row(db, "run1:0:0").state == "delivered"
    assert stored_result(db, "run1:0:0")["body"] == {"echo": pseudonym(EMAIL), "id": "m-1"}
    assert EMAIL not in caplog.text
    assert "mailbox [personal] is full" in caplog.text


# -- end to end: a node process ----------------------------------------------------------------
CRM_STEP = """
import json, pathlib

def act(ctx, data):
    # The address comes from the shop's own records, looked up where it is used: the
    # step's output (journaled) never holds it.
    crm = json.loads(pathlib.Path(data["crm"]).read_text())
    ctx.effect("messaging.send", {"to": crm[data["customer"]], "text": "back in stock"})
    return {"sent": 1, "customer": data["customer"]}
"""


def setup_node(tmp_path: Path, receiver: Receiver) -> tuple[Path, Path]:
    data = tmp_path / "node"
    (data / "contracts").mkdir(parents=True)
    (data / "contracts" / "messaging.yaml").write_text(yaml.safe_dump(MESSAGING))
    binding = {
        "type": "http",
        "base_url": receiver.url,
        "implements": {"capability": "messaging", "version": "1.0"},
        "operations": {"send": {"method": "POST", "path": "/orders"}},
    }
    (data / "connectors.yaml").write_text(yaml.safe_dump({"messaging": binding}))
    crm = tmp_path / "crm.json"  # outside the node's data directory
    crm.write_text(json.dumps({"c-7": EMAIL}))
    bundle = make_bundle(
        tmp_path, code=CRM_STEP, steps=["act"], connectors=["messaging"],
        requires={"messaging": ">=1.0,<2.0"},
    )  # fmt: skip
    from edgeos.connectors.config import load_connectors
    from edgeos.connectors.contracts import node_contracts

    contracts = node_contracts(data, load_connectors(data / "connectors.yaml"))
    with Database(data / "node.db") as db:
        manage.add_agent(
            db, bundle, data / "agents", models=[], connectors=["messaging"], contracts=contracts
        )
    return data, crm


def holders(db: Database, needle: str) -> list[str]:
    """``table.column`` of every stored value that contains ``needle``."""
    conn = db.reader()
    found = []
    tables = [t for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    for table in tables:
        for column in [c[1] for c in conn.execute(f"PRAGMA table_info({table})")]:
            hits = conn.execute(
                f'SELECT count(*) FROM "{table}" WHERE instr(CAST("{column}" AS BLOB), ?) > 0',
                (needle.encode(),),
            ).fetchone()[0]
            if hits:
                found.append(f"{table}.{column}")
    # Large journal payloads are stored deflated: instr cannot see into them.
    payloads = journal_payloads(db.path)
    if needle.encode() in payloads and "journal.payload" not in found:
        found.append("journal.payload")
    return found


def files_holding(directory: Path, needle: bytes) -> list[str]:
    return [
        str(p.relative_to(directory))
        for p in sorted(directory.rglob("*"))
        if p.is_file() and needle in stored_bytes([p])
    ]


def test_a_personal_value_is_delivered_and_recorded_nowhere_else(tmp_path: Path) -> None:
    receiver = Receiver()
    try:
        data, crm = setup_node(tmp_path, receiver)
        with node_process(data, EDGEOS_LOG_LEVEL="debug") as node:
            started = httpx.post(
                f"{node.url}/api/agents/inventory/runs",
                json={"input": {"crm": str(crm), "customer": "c-7"}},
                headers=node.headers,
            )
            assert started.status_code == 201, started.text
            run_id = started.json()["run_id"]
            deadline = time.monotonic() + 10
            while not receiver.applied and time.monotonic() < deadline:
                time.sleep(0.05)
            api = httpx.get(f"{node.url}/api/runs/{run_id}", headers=node.headers).text
            metrics = httpx.get(f"{node.url}/metrics", headers=node.headers).text
            log = node.log()
    finally:
        receiver.stop()
    assert [r.body["to"] for r in receiver.requests] == [EMAIL]
    assert EMAIL not in log
    assert EMAIL not in api
    assert pseudonym(EMAIL) in api
    assert EMAIL not in metrics
    shown = CliRunner().invoke(app, ["runs", "show", run_id, "--data-dir", str(data)])
    assert shown.exit_code == 0, shown.output
    assert "effect_enqueued" in shown.output
    assert EMAIL not in shown.output

    with Database(data / "node.db") as db:
        # Live, the address is in one place: the outbox row it was delivered from.
        assert holders(db, EMAIL) == ["outbox.payload"]
        db.checkpoint()
        # One copy in the file too: the row's earlier versions were overwritten as it changed.
        assert stored_bytes([data / "node.db"]).count(EMAIL.encode()) == 1
        assert outbox.for_run(db, run_id)[0].state == "delivered"
        assert replay(db, run_id).same
        # The health report a node sends its fleet carries figures, never payloads.
        assert EMAIL not in HealthProbe(db).collect().model_dump_json()
        # Past the run's retention, it is gone, and overwritten on disk.
        removed = apply_retention(db, now=time.time() + 31 * 86400)
        assert removed.runs == 1
        assert holders(db, EMAIL) == []
        db.checkpoint()
    assert files_holding(data, EMAIL.encode()) == []

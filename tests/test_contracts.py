"""Capability contracts: loading, binding, agents' version ranges, and effects at the boundary."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgeos.agents import manage, store
from edgeos.agents.replay import replay
from edgeos.connectors.config import parse_connectors
from edgeos.connectors.contracts import (
    Contract,
    ContractError,
    load_contract,
    load_contracts,
    node_contracts,
    satisfies,
)
from edgeos.errors import ManifestError
from edgeos.state import Database, journal, outbox
from tests.test_agents import make_bundle, running

REORDER_INPUT = {
    "type": "object",
    "required": ["sku", "qty"],
    "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}},
}


def contract_doc(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "capability": "supplier",
        "version": "1.2.0",
        "operations": {
            "reorder": {
                "input": REORDER_INPUT,
                "output": {"type": "object"},
                "side_effect": True,
                "idempotent": True,
                "timeout": "10s",
                "rate_limit_per_minute": 60,
                "scopes": ["orders:write"],
            }
        },
    }
    doc.update(changes)
    return doc


def write_contract(data_dir: Path, doc: dict[str, Any] | None = None) -> Path:
    doc = doc or contract_doc()
    path = data_dir / "contracts" / f"{doc['capability']}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc))
    return path


def binding(version: str | None = "1.2.0", **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": "http",
        "base_url": "http://127.0.0.1:9",
        "scopes": ["orders:write"],
        "operations": {"reorder": {"path": "/orders"}},
        **changes,
    }
    if version is not None:
        body["implements"] = {"capability": "supplier", "version": version}
    return body


def contracts_for(data_dir: Path, **bindings: dict[str, Any]) -> dict[str, Contract]:
    configs = parse_connectors(bindings, "connectors.yaml")
    return node_contracts(data_dir, configs)


# -- loading ----------------------------------------------------------------------------
def test_a_contract_loads_with_its_operations(tmp_path: Path) -> None:
    contract = load_contract(write_contract(tmp_path))
    op = contract.operations["reorder"]
    assert contract.label == "supplier@1.2.0"
    assert (op.side_effect, op.idempotent, op.timeout) == (True, True, 10.0)
    assert (op.rate_limit_per_minute, op.scopes) == (60, ["orders:write"])
    assert load_contracts(tmp_path / "contracts") == {"supplier": contract}
    assert load_contracts(tmp_path / "nothing") == {}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"version": "one"}, "field 'version': Value error, 'one' is not a version"),
        ({"operations": {}}, "a contract needs operations (effects), events (senses), or both"),
        (
            {"operations": {"reorder": {"input": {"x-personal": "yes"}}}},
            "field 'operations.reorder.input': Value error, x-personal at / must be true or false",
        ),
        (
            {"operations": {"reorder": {"input": {"anyOf": [{"x-personal": True}]}}}},
            "x-personal at /anyOf/0 would be ignored: mark the fields reached through",
        ),
        (
            {"events": {"sale.made": {"data": {}}}, "operations": {}},
            "event name 'sale.made': use 1-64 of A-Z a-z 0-9 _ - (no dots)",
        ),
        (
            {"operations": {"reorder": {"input": {"type": "banana"}}}},
            "field 'operations.reorder.input': Value error, not a valid JSON Schema "
            "(Draft 2020-12) at /type",
        ),
        (
            {"operations": {"reorder": {"input": {}, "timeout": "soon"}}},
            "field 'operations.reorder.timeout'",
        ),
        ({"operations": {"reorder": {"input": {}, "retries": 3}}}, "unknown field"),
        ({"operations": {"reorder": {}}}, "field 'operations.reorder.input': required"),
    ],
)
def test_a_bad_contract_names_file_and_field(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    path = write_contract(tmp_path, contract_doc(**change))
    with pytest.raises(ManifestError, match=r"supplier\.yaml") as info:
        load_contract(path)
    assert message in str(info.value)


def test_the_capability_must_match_the_file_name(tmp_path: Path) -> None:
    path = write_contract(tmp_path)
    path = path.rename(path.with_name("vendor.yaml"))
    with pytest.raises(ManifestError, match="'capability': 'supplier' must match the file name"):
        load_contract(path)


def test_version_ranges() -> None:
    assert satisfies("1.2.0", ">=1.0,<2.0")
    assert satisfies("1.2", "==1.2.0")
    assert not satisfies("2.0.0", ">=1.0,<2.0")
    assert not satisfies("1.10", "<1.9")
    assert satisfies("1.10", "!=1.1")


# -- bindings -----------------------------------------------------------------------------
def test_a_binding_implements_the_node_contract(tmp_path: Path) -> None:
    write_contract(tmp_path)
    bound = contracts_for(tmp_path, supplier=binding(), other=binding(version=None))
    assert {name: c.label for name, c in bound.items()} == {"supplier": "supplier@1.2.0"}
    # No binding implements anything: the contracts directory is not even read.
    assert contracts_for(tmp_path / "empty", supplier=binding(version=None)) == {}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (binding("1.3.0"), "field 'supplier.implements.version': '1.3.0', but the node's"),
        (
            binding(operations={"cancel": {"path": "/c"}}),
            "field 'supplier.operations': supplier@1.2.0 needs reorder",
        ),
    ],
)
def test_a_binding_that_does_not_match_its_contract_is_refused(
    tmp_path: Path, body: dict[str, Any], message: str
) -> None:
    write_contract(tmp_path)
    with pytest.raises(ManifestError, match=r"connectors\.yaml") as info:
        contracts_for(tmp_path, supplier=body)
    assert message in str(info.value)


def test_a_binding_naming_a_missing_contract_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"supplier\.implements\.capability': no contract"):
        contracts_for(tmp_path, supplier=binding())


def test_implements_is_checked_in_connectors_yaml() -> None:
    body = binding()
    body["implements"] = {"capability": "supplier", "version": "latest"}
    with pytest.raises(ManifestError, match=r"supplier\.implements\.version"):
        parse_connectors({"supplier": body}, "connectors.yaml")


# -- agent add ------------------------------------------------------------------------------
def add(db: Database, tmp_path: Path, contracts: dict[str, Contract], **manifest: Any) -> None:
    bundle = make_bundle(tmp_path, **manifest)
    manage.add_agent(
        db,
        bundle,
        tmp_path / "agents",
        models=[],
        connectors=["supplier", "other"],
        contracts=contracts,
    )


def test_agent_add_accepts_a_satisfied_range(db: Database, tmp_path: Path) -> None:
    write_contract(tmp_path)
    add(db, tmp_path, contracts_for(tmp_path, supplier=binding()), requires={"supplier": ">=1.0"})
    assert store.agent(db, "inventory").manifest.requires == {"supplier": ">=1.0"}


@pytest.mark.parametrize(
    ("requires", "bound", "message"),
    [
        (
            {"supplier": ">=2.0,<3.0"},
            True,
            "field 'requires.supplier': needs '>=2.0,<3.0', but supplier implements supplier@1.2.0",
        ),
        (
            {"supplier": ">=1.0,<2.0"},
            False,
            "field 'requires.supplier': no connector the agent lists implements supplier",
        ),
        ({"erp": "==1.0"}, True, "field 'requires.erp': no connector the agent lists"),
    ],
)
def test_agent_add_refuses_unsatisfied_requirements(
    db: Database, tmp_path: Path, requires: dict[str, str], bound: bool, message: str
) -> None:
    write_contract(tmp_path)
    contracts = contracts_for(tmp_path, supplier=binding()) if bound else {}
    with pytest.raises(ManifestError, match=r"agent\.yaml") as info:
        add(db, tmp_path, contracts, requires=requires)
    assert message in str(info.value)
    assert store.agents(db) == []


def test_a_bad_range_is_a_manifest_error(db: Database, tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"field 'requires\.supplier'.*not a version range"):
        add(db, tmp_path, {}, requires={"supplier": "~1.0"})


# -- effects at the boundary ---------------------------------------------------------------
def test_check_names_contract_operation_and_field(tmp_path: Path) -> None:
    contract = load_contract(write_contract(tmp_path))
    contract.check("reorder", {"sku": "A", "qty": 3})
    contract.check("unknown", {"anything": True})  # not described: not checked
    with pytest.raises(ContractError) as info:
        contract.check("reorder", {"sku": 7, "qty": -1})
    assert str(info.value) == (
        "supplier@1.2.0 reorder input: /qty: -1 is less than the minimum of 1; "
        "/sku: 7 is not of type 'string'"
    )
    with pytest.raises(ContractError, match="reorder output: /: 3 is not of type 'object'"):
        contract.check("reorder", 3, direction="output")


def run_once(db: Database, tmp_path: Path, qty: int) -> tuple[str, str | None, list[Any]]:
    write_contract(tmp_path)
    code = (
        "def act(ctx, data):\n"
        f"    ctx.effect('supplier.reorder', {{'sku': 'A-1', 'qty': {qty}}})\n"
        "    return data\n"
    )
    add(db, tmp_path, {}, code=code, steps=["act"])
    contracts = contracts_for(tmp_path, supplier=binding())
    result: list[Any] = []

    async def go() -> None:
        async with running(db, contracts=contracts) as ex:
            run = await ex.wait(await ex.submit("inventory"))
            result.extend([run.id, run.state, run.error])

    asyncio.run(go())
    run_id, state, error = result
    failures = [r for r in journal.for_run(db, run_id) if r.kind == "step_failed"]
    assert len(failures) == (0 if state == "succeeded" else 1)  # permanent: not retried
    return state, error, outbox.for_run(db, run_id)


def test_an_effect_that_breaks_the_contract_fails_the_step(db: Database, tmp_path: Path) -> None:
    state, error, effects = run_once(db, tmp_path, qty=-1)
    assert state == "failed"
    assert "StepError: effect 'supplier.reorder': supplier@1.2.0 reorder input: " in (error or "")
    assert "/qty: -1 is less than the minimum of 1" in (error or "")
    assert effects == []


def test_an_effect_within_the_contract_is_enqueued(db: Database, tmp_path: Path) -> None:
    state, error, effects = run_once(db, tmp_path, qty=5)
    assert (state, error) == ("succeeded", None)
    assert [e.payload for e in effects] == [{"sku": "A-1", "qty": 5}]


# -- scopes ---------------------------------------------------------------------------------
def test_a_binding_not_granted_a_scope_its_contract_requires_is_refused(tmp_path: Path) -> None:
    write_contract(tmp_path)
    with pytest.raises(ManifestError) as info:
        contracts_for(tmp_path, supplier=binding(scopes=["orders:read"]))
    assert str(info.value).endswith(
        "connectors.yaml: field 'supplier.scopes': binding 'supplier' is not granted scope "
        "'orders:write', which supplier@1.2.0 requires for reorder"
    )
    with pytest.raises(ManifestError, match="not granted scope 'orders:write'"):
        contracts_for(tmp_path, supplier=binding(scopes=[]))


def test_a_binding_holds_its_own_name_as_a_scope(tmp_path: Path) -> None:
    doc = contract_doc()
    doc["operations"]["reorder"]["scopes"] = ["supplier"]
    write_contract(tmp_path, doc)
    assert list(contracts_for(tmp_path, supplier=binding(scopes=[]))) == ["supplier"]
    config = parse_connectors({"supplier": binding(scopes=["b.write", "a:read"])}, "c.yaml")
    assert config["supplier"].granted_scopes == ("supplier", "a:read", "b.write")


@pytest.mark.parametrize("scope", ["orders write", "", "/etc", "x" * 65])
def test_bad_scopes_are_refused_in_contracts_and_bindings(tmp_path: Path, scope: str) -> None:
    doc = contract_doc()
    doc["operations"]["reorder"]["scopes"] = [scope]
    with pytest.raises(ManifestError, match=r"field 'operations\.reorder\.scopes'.*scope"):
        load_contract(write_contract(tmp_path, doc))
    with pytest.raises(ManifestError, match=r"field 'supplier\.scopes': scope"):
        parse_connectors({"supplier": binding(scopes=[scope])}, "connectors.yaml")


def test_retry_safety_follows_the_flags(tmp_path: Path) -> None:
    def op(**flags: Any) -> bool:
        doc = contract_doc()
        doc["operations"]["reorder"].update(flags)
        return Contract.model_validate(doc).operations["reorder"].retry_safe

    assert not op(side_effect=True, idempotent=False)
    assert op(side_effect=True, idempotent=True)
    assert op(side_effect=False, idempotent=False)


# -- events: the sense side -----------------------------------------------------------------
SALES = {
    "type": "object",
    "required": ["row"],
    "properties": {
        "row": {
            "type": "object",
            "required": ["day"],
            "properties": {
                "day": {"type": "string", "pattern": "^[0-9]+$"},
                "card": {"type": "string", "x-personal": True},
            },
        }
    },
}


def pos_contract(data_dir: Path) -> None:
    doc = {"capability": "pos", "version": "1.0", "events": {"sales": {"data": SALES}}}
    write_contract(data_dir, doc)


def pos_binding(*events: str) -> dict[str, Any]:
    return {
        "type": "files",
        "implements": {"capability": "pos", "version": "1.0"},
        "watch": {event: {"path": "sales.csv", "csv": True} for event in events},
    }


def test_a_source_binding_implements_the_events_of_its_contract(tmp_path: Path) -> None:
    pos_contract(tmp_path)
    bound = contracts_for(tmp_path, pos=pos_binding("pos.sales", "pos.other"))
    assert bound["pos"].event_names == {"pos.sales": "sales"}
    with pytest.raises(ManifestError) as info:
        contracts_for(tmp_path, pos=pos_binding("sales"))
    assert "field 'pos': pos@1.0 needs the events pos.sales (as watch or subscribe names)" in str(
        info.value
    )


def test_an_agent_triggered_by_an_event_its_contract_lacks_is_refused(
    db: Database, tmp_path: Path
) -> None:
    pos_contract(tmp_path)
    contracts = contracts_for(tmp_path, other=pos_binding("pos.sales"))
    with pytest.raises(ManifestError) as info:
        add(db, tmp_path, contracts, requires={"pos": ">=1.0,<2.0"}, connectors=["other"],
            triggers=[{"event": "pos.sale"}])  # fmt: skip
    assert "field 'triggers': event 'pos.sale' is not an event of pos@1.0 (its events: " in str(
        info.value
    )
    add(db, tmp_path, contracts, requires={"pos": ">=1.0,<2.0"}, connectors=["other"],
        triggers=[{"event": "pos.sales"}])  # fmt: skip
    assert store.agent(db, "inventory").manifest.requires == {"pos": ">=1.0,<2.0"}


def test_events_are_checked_against_their_contract_before_a_run_starts(
    db: Database, tmp_path: Path
) -> None:
    pos_contract(tmp_path)
    contracts = contracts_for(tmp_path, other=pos_binding("pos.sales"))
    code = "def sense(ctx, data):\n    return {'day': data['row']['day']}\n"
    add(db, tmp_path, contracts, code=code, steps=["sense"], triggers=[{"event": "pos.sales"}])
    sale = {"path": "sales.csv", "line": 1, "row": {"day": "12", "card": "4111-2222-3333-4444"}}
    runs: list[str] = []

    async def go() -> None:
        async with running(db, contracts=contracts) as ex:
            with pytest.raises(ContractError) as info:
                await ex.emit("pos.sales", {"row": {"day": "twelve", "card": "4111"}})
            assert str(info.value) == (
                "pos@1.0 sales event: /row/day: 'twelve' does not match '^[0-9]+$'"
            )
            assert info.value.http_status == 422
            for run_id in await ex.emit("pos.sales", sale):
                runs.append((await ex.wait(run_id)).state)
                runs.append(run_id)

    asyncio.run(go())
    state, run_id = runs
    assert state == "succeeded"
    assert store.run(db, run_id).input == sale  # the run reads the real data
    started = journal.for_run(db, run_id)[0]
    assert started.payload["input"]["row"]["day"] == "12"
    assert started.payload["input"]["row"]["card"].startswith("[personal:")
    assert b"4111-2222" not in journal_bytes(db)
    assert replay(db, run_id).same  # from the run's own input, not the journal's pseudonyms


def test_a_refused_event_is_logged_and_skipped_by_its_source(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from edgeos.connectors.events import start_sources, stop_sources

    csv = tmp_path / "sales.csv"
    csv.write_text("day,card\nnope,4111-0000\n7,4111-0000\n")
    configs = parse_connectors({"pos": pos_binding("pos.sales")}, "c.yaml", base_dir=tmp_path)
    pos_contract(tmp_path)
    contract = node_contracts(tmp_path, configs)["pos"]
    emitted: list[Any] = []

    async def emit(event: str, data: Any) -> list[str]:
        contract.check("sales", data, direction="event")
        emitted.append(data["row"])
        return []

    async def go() -> None:
        sources = await start_sources(configs, emit, state_dir=tmp_path / "state")
        for _ in range(200):
            if emitted:
                break
            await asyncio.sleep(0.01)
        await stop_sources(sources)

    asyncio.run(go())
    assert emitted == [{"day": "7", "card": "4111-0000"}]  # the bad row did not hold it up
    (refusal,) = [r for r in caplog.records if "refused" in r.getMessage()]
    assert "pos.sales refused: pos@1.0 sales event: /row/day: 'nope' does not match" in (
        refusal.getMessage()
    )
    assert "4111-0000" not in caplog.text


def journal_bytes(db: Database) -> bytes:
    conn = db.reader()
    rows = conn.execute("SELECT payload FROM journal").fetchall()
    return b"\n".join(journal.payload_bytes(r[0], conn) for r in rows)

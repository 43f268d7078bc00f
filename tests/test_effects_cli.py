"""``edgeos effects``: effects set aside for review are listed, shown, retried or discarded,
each decision journaled; the real delivery worker then acts on the outcome."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from edgeos.cli.main import app
from edgeos.connectors import DeliveryError
from edgeos.errors import ConfigError, ConflictError, NotFoundError
from edgeos.state import Database, journal
from edgeos.state.outbox import get
from tests.test_delivery import Clock, Unsure, enqueue, make_worker, supplier_contract

runner = CliRunner()


class Refuses(Unsure):
    """A target that refuses every call for good."""

    async def deliver(self, operation: str, payload: dict[str, Any], key: str) -> Any:
        self.calls += 1
        raise DeliveryError(self.name, operation, "422 unknown sku", retryable=False)


def _deliver(db: Database, connectors: dict[str, Any], clock: Clock) -> None:
    contract = supplier_contract(side_effect=True, idempotent=False)
    contracts = dict.fromkeys(connectors, contract)
    worker = make_worker(db, connectors, clock, contracts=contracts)
    asyncio.run(worker.drain_once())


@pytest.fixture
def node(tmp_path: Path) -> tuple[Path, Unsure]:
    """A node whose outbox holds an effect needing review, a dead one, and one waiting for
    a binding; the review one's target now answers."""
    db_path = tmp_path / "node.db"
    plant = Unsure(fails=1)
    with Database(db_path) as db:
        enqueue(db, "run1:0:0", "plant", "orders", at=1.0)
        with db.transaction() as conn:  # as the executor journals it: pseudonymized
            journal.append(conn, "run1", "effect_enqueued", {"key": "run1:0:0", "connector": "plant",
                           "operation": "orders", "payload": {"sku": "A-1", "qty": 3}}, at=1.0)  # fmt: skip
        enqueue(db, "run2:0:0", "store", "orders", run_id="run2", at=2.0)
        enqueue(db, "run3:0:0", "unbound", "orders", run_id="run3", at=3.0)
        store = Refuses()
        store.name = "store"
        _deliver(db, {"plant": plant, "store": store}, Clock())
        assert get(db, "run1:0:0").state == "dead"  # type: ignore[union-attr]
    return tmp_path, plant


def effects(data: Path, *args: str) -> Any:
    result = runner.invoke(app, ["effects", *args, "--data-dir", str(data)])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def test_list_and_show_tell_review_from_dead(node: tuple[Path, Unsure]) -> None:
    data, _ = node
    every = effects(data, "list").output
    assert all(k in every for k in ("run1:0:0", "run2:0:0", "run3:0:0"))
    review = effects(data, "list", "--state", "needs-review").output
    assert "run1:0:0" in review
    assert "run2:0:0" not in review
    dead = effects(data, "list", "--state", "dead").output
    assert "run1:0:0" in dead  # needing review is a kind of dead
    assert "run2:0:0" in dead
    assert "run3:0:0" in effects(data, "list", "--state", "pending").output
    shown = effects(data, "show", "run1:0:0").output
    assert "state      needs-review" in shown
    assert "check at the target whether it was applied" in shown
    assert '{"qty": 3, "sku": "A-1"}' in shown
    assert "effect_dead" in shown
    with pytest.raises(ConfigError, match="effect state 'stuck'"):
        effects(data, "list", "--state", "stuck")
    with pytest.raises(NotFoundError, match="no effect 'nope'"):
        effects(data, "show", "nope")


def test_retry_sends_it_again_and_discard_sets_it_aside(node: tuple[Path, Unsure]) -> None:
    data, plant = node
    assert "pending again" in effects(data, "retry", "run1:0:0").output
    discarded = effects(
        data, "discard", "run2:0:0", "--reason", "sku withdrawn; reordered by phone"
    )
    assert "discarded" in discarded.output
    with Database(data / "node.db") as db:
        retried = get(db, "run1:0:0")
        assert retried is not None
        assert (retried.state, retried.attempts) == ("pending", 0)
        store = Refuses()
        store.name = "store"
        _deliver(db, {"plant": plant, "store": store}, Clock(1e12))
        assert get(db, "run1:0:0").state == "delivered"  # type: ignore[union-attr]
        assert plant.calls == 2  # sent again once, same key
        assert store.calls == 0  # a discarded effect is never tried again
        kinds = [(r.kind, r.payload) for r in journal.for_run(db, "run1")]
        assert [k for k, _ in kinds] == ["effect_enqueued", "effect_dead", "effect_retried",
                                         "effect_delivered"]  # fmt: skip
        assert kinds[2][1]["by"].startswith("user:")
        assert kinds[2][1]["was"] == "needs-review"
        [*_, (kind, payload)] = [(r.kind, r.payload) for r in journal.for_run(db, "run2")]
        assert (kind, payload["reason"]) == (
            "effect_discarded",
            "sku withdrawn; reordered by phone",
        )
        assert journal.verify(db).ok
    # A decision made stays made; bad input changes nothing.
    with pytest.raises(ConflictError, match="run1:0:0 is delivered"):
        effects(data, "retry", "run1:0:0")
    with pytest.raises(ConflictError, match="run2:0:0 is discarded"):
        effects(data, "discard", "run2:0:0", "--reason", "again")
    with pytest.raises(ConfigError, match="--reason"):
        effects(data, "discard", "run3:0:0", "--reason", "  ")
    assert "run3:0:0" in effects(data, "list", "--state", "pending").output


def test_errors_reach_the_user_as_messages(node: tuple[Path, Unsure]) -> None:
    data, _ = node
    done = subprocess.run(
        [sys.executable, "-m", "edgeos", "effects", "retry", "nope", "--data-dir", str(data)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    assert "no effect 'nope'" in done.stderr
    assert "Traceback" not in done.stderr

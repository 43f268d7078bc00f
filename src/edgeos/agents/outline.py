"""A finished run's outline for the fleet: what the run did, never what it was about.

When a run finishes, the executor offers its outline to the telemetry uplink as a
``log`` record whose ``type`` is ``"run"`` (:func:`offer`; a no-op without a fleet link).
The fleet lists these on its dashboard (a device's recent runs, a run's journal beside
its trace). A notable run (failed or cancelled, with a failed attempt, or one that asked
a person) is always sent; a routine one goes with its trace's sampling decision
(``telemetry_trace_percent``), so a busy agent's runs cost no more bandwidth than the
traces the node was told to send.

The outline is built from the journal by a whitelist: names the manifests declare
(agent, steps, connectors, operations), counts, states, durations and flags. Inputs,
outputs, effect payloads, questions, answers, notes and error texts are left out, so
neither personal values nor secrets are in it; the uplink masks vault secrets again
before anything leaves.
"""

from __future__ import annotations

from typing import Any

from edgeos.agents.store import Run
from edgeos.state import Database, journal
from edgeos.telemetry import tracing
from edgeos.telemetry.buffer import enqueue

#: The ``type`` of the log record that carries an outline.
RUN_RECORD = "run"
#: The most journal entries an outline keeps (a long run's first ones, then a count).
MAX_ENTRIES = 100

# What each kind of journal record keeps: structural fields only.
_KEPT: dict[str, tuple[str, ...]] = {
    "step_completed": ("index", "attempt", "duration_ms", "next"),
    "step_failed": ("index", "attempt"),
    "venue_decided": ("index", "venue", "escalated_to"),
    "effect_enqueued": ("connector", "operation"),
    "effect_delivered": ("connector", "operation", "attempts"),
    "effect_dead": ("connector", "operation", "attempts", "needs_review"),
    "escalation_raised": ("timeout",),
    "escalation_answered": ("override", "timed_out"),
    "memory_written": (),
    "memory_recalled": (),
    "run_paused": (),
    "run_resumed": (),
    "run_finished": ("outcome", "limit"),
}


def _who(by: Any) -> str:
    """Who answered, as a kind: ``fleet`` (an operator there), ``timeout`` or ``local``."""
    text = str(by or "")
    return text if text == "timeout" else "fleet" if text.startswith("fleet:") else "local"


def _entry(record: journal.JournalRecord, started: float) -> dict[str, Any] | None:
    kept = _KEPT.get(record.kind)
    if kept is None:
        return None
    payload = record.payload
    entry: dict[str, Any] = {"kind": record.kind, "at_s": round(record.at - started, 3)}
    if record.step:
        entry["step"] = record.step
    entry.update({k: payload[k] for k in kept if isinstance(payload.get(k), str | int | float)})
    if record.kind == "step_completed":
        entry["effects"] = len(payload.get("effects") or ())
        entry["model_calls"] = len(payload.get("model_calls") or ())
    elif record.kind == "escalation_raised":
        entry["options"] = len(payload.get("options") or ())
    elif record.kind == "escalation_answered":
        entry["by"] = _who(payload.get("by"))
    return entry


def run_outline(db: Database, run: Run) -> dict[str, Any]:
    """The outline of ``run`` (see the module docstring), JSON-able."""
    records = journal.for_run(db, run.id)
    entries = [e for e in (_entry(r, run.created_at) for r in records) if e is not None]
    kinds = [e["kind"] for e in entries]
    finished = run.finished_at or run.updated_at
    return {
        "type": RUN_RECORD,
        "run_id": run.id,
        "trace_id": tracing.trace_id(run.id),
        "agent": run.agent,
        "version": run.agent_version,
        "trigger": run.trigger.split(":", 1)[0],
        "state": run.state,
        "started_at": run.created_at,
        "finished_at": finished,
        "duration_ms": round(max(finished - run.created_at, 0.0) * 1000, 3),
        "steps": kinds.count("step_completed"),
        "failures": kinds.count("step_failed"),
        "effects": kinds.count("effect_enqueued"),
        "escalations": kinds.count("escalation_raised"),
        "overrides": sum(1 for e in entries if e.get("override") is True),
        "cost": run.cost,
        "journal": entries[:MAX_ENTRIES],
        "journal_entries": len(entries),
    }


def notable(outline: dict[str, Any]) -> bool:
    """Whether an outline is always sent: its run did not succeed, had a failed attempt,
    or asked a person."""
    return bool(outline["state"] != "succeeded" or outline["failures"] or outline["escalations"])


def offer(db: Database, run: Run) -> bool:
    """Offer the outline of the finished ``run`` to the fleet (a routine one sampled with
    its trace); True when it was kept."""
    doc = run_outline(db, run)
    trace = None if notable(doc) else doc["trace_id"]
    return enqueue("log", doc, at=run.finished_at or run.updated_at, trace_id=trace)

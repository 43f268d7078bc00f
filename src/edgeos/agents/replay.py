"""Replay: run a finished run's reasoning again from its journaled inputs.

Each completed step is run once more with the input, time, randomness and human answers
it had, and the memory it recalled (the same records, whatever memory holds now; see
:mod:`edgeos.memory.replayed`); effects are captured, not delivered, and memory is not
written. Any decision that comes out differently (a step's output, where it went next,
an effect's payload, what it recalls or remembers) is reported, which is how a model or
code change shows its consequences on real past decisions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeos.agents import store
from edgeos.agents.bundle import load_bundle
from edgeos.agents.context import EscalationPending, Goto, RunContext, StepError, plain
from edgeos.connectors.personal import like, matches
from edgeos.errors import EdgeOSError
from edgeos.memory.replayed import ReplayedMemory
from edgeos.settings import NodeSettings
from edgeos.state import Database, journal
from edgeos.state.journal import digest


@dataclass
class ReplayReport:
    """What replay found."""

    run_id: str
    steps: int = 0
    differences: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def same(self) -> bool:
        """True when every replayed decision matched the journal."""
        return not self.differences

    def lines(self) -> list[str]:
        """A readable report."""
        head = f"replayed {self.steps} step(s) of run {self.run_id}: "
        head += "every decision matches" if self.same else f"{len(self.differences)} difference(s)"
        return [head, *self.notes, *(f"  - {d}" for d in self.differences)]


def replay(db: Database, run_id: str, *, settings: NodeSettings | None = None) -> ReplayReport:
    """Replay one run; models are called live through a fresh host when the run used them."""
    run = store.run(db, run_id)
    agent = store.agent(db, run.agent)
    report = ReplayReport(run_id)
    if agent.version != run.agent_version:
        report.notes.append(
            f"note: the run used {run.agent} {run.agent_version}; replaying with the installed "
            f"{agent.version}"
        )
    bundle = load_bundle(Path(agent.bundle_dir))
    records = journal.for_run(db, run_id)
    effects = {
        r.payload["key"]: r.payload["payload"] for r in records if r.kind == "effect_enqueued"
    }
    answers = store.answers_for(db, run_id)
    # What each step recalled and remembered, by step index.
    recalls = {
        r.payload["index"]: r.payload["recalls"] for r in records if r.kind == "memory_recalled"
    }
    remembered = {
        r.payload.get("index"): r.payload["remembered"]
        for r in records
        if r.kind == "memory_written"
    }
    # Where each step's ctx.infer calls ran and what they answered: served, not called again.
    routed: dict[int, list[dict[str, Any]]] = {}
    for r in records:
        if r.kind == "venue_decided":
            routed.setdefault(r.payload["index"], []).append(r.payload)
    host = _host(db, settings) if bundle.manifest.models else None
    # From the run's row, not its run_started record: the journal holds personal fields of
    # an event's data as pseudonyms, the row the input the first step was given.
    carry: Any = run.input
    try:
        for record in records:
            if record.kind != "step_completed":
                continue
            p = record.payload
            step_input, carry = carry, p["output"]
            if digest(step_input) != p["input_digest"]:
                report.differences.append(
                    f"step {p['index']} '{p['step']}': the journal does not hold its input"
                )
                continue
            fn = bundle.steps.get(p["step"])
            if fn is None:
                report.differences.append(f"step '{p['step']}' no longer exists")
                continue
            memory = ReplayedMemory(
                db, run.agent, bundle.manifest.memory, recalls=recalls.get(p["index"], []),
                remembered=remembered.get(p["index"], []), now=p["now"], step=p["step"],
                step_index=p["index"], error=StepError,
            )  # fmt: skip
            ctx = RunContext(
                run_id=run_id, manifest=bundle.manifest, step=p["step"], step_index=p["index"],
                attempt=p["attempt"], now=p["now"], seed=run.seed, answers=answers, host=host,
                memory=memory, routed=routed.get(p["index"], []),
            )  # fmt: skip
            report.steps += 1
            where = f"step {p['index']} '{p['step']}'"
            try:
                result = fn(ctx, step_input)
            except EscalationPending as pending:
                report.differences.append(f"{where} now asks a person: {pending.question}")
                continue
            except Exception as exc:  # the agent's code now fails where it succeeded
                report.differences.append(f"{where} now raises {type(exc).__name__}: {exc}")
                continue
            _compare(report, where, p, result, ctx, effects, bundle.manifest.steps)
            report.differences += [f"{where} {d}" for d in memory.finish()]
            report.notes += [f"note: {where} {n}" for n in memory.notes]
    finally:
        if host is not None:
            host.close()
    return report


def _compare(
    report: ReplayReport,
    where: str,
    recorded: dict[str, Any],
    result: Any,
    ctx: RunContext,
    effects: dict[str, Any],
    steps: list[str],
) -> None:
    nxt: str | None
    if isinstance(result, Goto):
        output, nxt = plain(result.data), result.step
    else:
        output = plain(result)
        position = steps.index(recorded["step"])
        nxt = steps[position + 1] if position + 1 < len(steps) else None
    if not matches(recorded["output"], output):
        report.differences.append(
            f"{where} output differs: journaled {recorded['output']!r}, now {output!r}"
        )
    if nxt != recorded["next"]:
        report.differences.append(f"{where} goes to {nxt!r}, journaled {recorded['next']!r}")
    now_keys = [e.key for e in ctx.record.effects]
    if now_keys != recorded["effects"]:
        report.differences.append(
            f"{where} decides {len(now_keys)} effect(s), journaled {len(recorded['effects'])}"
        )
    for effect in ctx.record.effects:
        journaled = effects.get(effect.key, effect.payload)
        # The journal holds personal fields as pseudonyms: a field matches when the value
        # now has the same pseudonym, and the report shows the pseudonym, not the value.
        if not matches(journaled, effect.payload):
            report.differences.append(
                f"{where} effect {effect.connector}.{effect.operation} payload differs: "
                f"journaled {journaled!r}, now {like(journaled, effect.payload)!r}"
            )


def _host(db: Database, settings: NodeSettings | None) -> Any:
    from edgeos.runtime import HostConfig, ModelHost, ModelRegistry

    if settings is None:
        raise EdgeOSError("replaying a run that calls models needs the node's settings")
    return ModelHost(ModelRegistry(db, settings.model_store), HostConfig())

"""The durable executor: runs agents step by step, committing each step before the next.

A run is a row in ``runs`` plus its journal records. Each step's outcome (its input,
output, model calls, and the effects it decided, written to the outbox in the same
transaction) is committed before the next step starts, through a group writer that lets
concurrent runs share a disk flush. After a crash every unfinished run resumes at its
first uncommitted step; a step that was cut off is simply run again, and since its
effects were never committed, nothing it decided is lost or done twice.

A write the disk refuses (full, or failing) is retried with backoff until it commits: the
run waits at that point instead of failing, and goes on by itself once there is room.
Only ``submit`` fails at once (with a retryable 503 error), so that a run is never
acknowledged before it is durable.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from edgeos.agents import outline, store
from edgeos.agents.bundle import AgentBundle, load_bundle
from edgeos.agents.context import EscalationPending, Goto, RunContext, StepError, plain
from edgeos.agents.isolated import IsolatedRunner
from edgeos.agents.retention import apply_retention
from edgeos.agents.store import FINAL_STATES, InstalledAgent, Run, dumps
from edgeos.agents.supervisor import Supervisor
from edgeos.errors import ConflictError, EdgeOSError, InvalidRequestError, NotFoundError
from edgeos.limits import LimitExceeded
from edgeos.manifests.cron import CronSchedule
from edgeos.memory.context import purge as purge_run_context
from edgeos.retry import backoff_delay
from edgeos.routing import deferral
from edgeos.routing.decide import CallDeferred
from edgeos.routing.deferral import WAITING_VENUE
from edgeos.state import Database, journal, outbox
from edgeos.state.database import DiskFullError
from edgeos.state.ids import new_id
from edgeos.state.journal import digest
from edgeos.state.writer import GroupWriter, WriteFn
from edgeos.telemetry import buffer, tracing
from edgeos.threads import IdleThreadPool

if TYPE_CHECKING:
    from edgeos.connectors.contracts import Contract
    from edgeos.manifests.agent import AgentManifest
    from edgeos.memory.retention import Removed
    from edgeos.routing.router import Router
    from edgeos.runtime import ModelHost

log = logging.getLogger("edgeos.agents")
#: Seconds between checks whether the journal's dictionary is due (two small queries).
DICTIONARY_CHECK_S = 30.0

T = TypeVar("T")


@dataclass
class _Schedule:
    agent: str
    trigger: str
    interval: float | None
    cron: CronSchedule | None
    next_at: float


class Executor:
    """Drives every run of every installed agent on this node."""

    def __init__(
        self,
        db: Database,
        writer: GroupWriter,
        *,
        host: ModelHost | None = None,
        on_effects: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.time,
        scan_interval: float = 1.0,
        retention_interval: float = 600.0,
        contracts: Mapping[str, Contract] | None = None,
    ) -> None:
        self.db = db
        #: The contract of each binding that implements one: effects are checked against it.
        self.contracts: Mapping[str, Contract] = contracts or {}
        self.writer = writer
        self.host = host
        self.on_effects = on_effects or (lambda: None)
        self.clock = clock
        self.scan_interval = scan_interval
        #: How often finished runs and memory past their retention are removed.
        self.retention_interval = retention_interval
        # Each agent's runs at once and the threads of their steps (:meth:`_capacity`).
        self._capacities: dict[str, _Capacity] = {}
        self._driving: dict[str, asyncio.Task[None]] = {}
        self._bundles: dict[str, AgentBundle] = {}
        self._guards: dict[str, Supervisor] = {}
        self._paused_cache: dict[str, tuple[bool, float]] = {}
        self._next_retention = 0.0
        self._next_dictionary = 0.0
        # Worker processes of agents with isolation: process, by bundle directory.
        self._isolated: dict[str, IsolatedRunner] = {}
        self._schedules: dict[tuple[str, int], _Schedule] = {}
        #: The fleet's policies, when the node follows a fleet: every manifest a run uses
        #: goes through it (budgets, escalation, retention: the stricter value wins).
        self.policy: Callable[[AgentManifest], AgentManifest] | None = None
        #: Where ``ctx.infer`` calls run (edgeos.routing), set by the node.
        self.router: Router | None = None
        self._background: list[asyncio.Task[None]] = []
        # Memory being embedded again after an embedding model changed (memory.reembed).
        self._reembedding: asyncio.Future[int] | None = None
        self._stopping = False
        self._finished = asyncio.Event()

    # -- life cycle -------------------------------------------------------------------
    async def start(self) -> None:
        """Resume every unfinished run, then keep scanning for work and triggers."""
        self._stopping = False
        for run_id in store.active_run_ids(self.db):
            self._spawn(run_id)
        self._background.append(asyncio.get_running_loop().create_task(self._scan_forever()))

    async def stop(self, grace: float = 5.0) -> None:
        """Stop taking work and let steps in flight finish for ``grace`` seconds.

        A step still running after that is left as it is: its run resumes at that step on
        the next start, which is safe because nothing it did was committed. Safe to call twice.
        """
        self._stopping = True
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self._background.clear()
        if self._reembedding is not None:  # it stops after its batch in flight
            await asyncio.wait([self._reembedding], timeout=grace)
        pending = list(self._driving.values())
        if pending:
            _, late = await asyncio.wait(pending, timeout=grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        for capacity in self._capacities.values():
            capacity.threads.shutdown(wait=False, cancel_futures=True)
        self._capacities.clear()
        # Stopping a worker waits (briefly) for its process to exit: off the event loop.
        runners, self._isolated = list(self._isolated.values()), {}
        await asyncio.gather(*(asyncio.to_thread(r.stop) for r in runners))

    # -- runs -------------------------------------------------------------------------
    async def submit(
        self, agent_name: str, *, trigger: str = "manual", data: Any = None, shown: Any = None
    ) -> str:
        """Start a run of an agent; returns its id once the start is durable.

        ``shown`` is the input as the journal holds it, when that differs from ``data``
        (personal fields pseudonymised); None journals ``data``.
        """
        agent = store.agent(self.db, agent_name)
        if agent.paused:
            raise ConflictError(f"agent '{agent_name}' is paused; resume it to start runs")
        run_id = await self.writer.write(
            partial(
                create_run,
                agent=agent,
                trigger=trigger,
                data=data,
                at=self.clock(),
                state="running",
                shown=shown,
            )
        )
        self._spawn(run_id)
        return run_id

    async def emit(self, event: str, data: Any = None) -> list[str]:
        """An event happened (a connector's, or one posted to the node's API): start a run of
        every active agent that has an ``event`` trigger for it. Returns the run ids.

        An event a bound contract describes (``<capability>.<event>``) is checked against
        its schema first: ContractError, naming the field, and no run starts. The journal
        holds its data with the fields the contract marks personal pseudonymised.
        """
        shown = data
        if self.contracts:
            from edgeos.connectors.contracts import event_contract

            described = event_contract(self.contracts, event)
            if described is not None:
                contract, name = described
                contract.check(name, data, direction="event")
                shown = contract.redact(name, data, direction="event")
        started = []
        for agent in store.agents(self.db):
            wants = any(t.event == event for t in agent.manifest.triggers)
            if wants and not agent.paused:
                run_id = await self.submit(
                    agent.name, trigger=f"event:{event}", data=data, shown=shown
                )
                started.append(run_id)
        return started

    async def wait(self, run_id: str, timeout: float = 30.0) -> Run:
        """Wait until a run is finished or parked (waiting for a person or a venue, or
        paused), or has moved to another node."""
        deadline = time.monotonic() + timeout
        while True:
            run = store.run(self.db, run_id)
            if run.state in (
                *FINAL_STATES,
                "waiting_human",
                WAITING_VENUE,
                "paused",
                store.MIGRATED,
            ):
                return run
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} still {run.state} after {timeout:.0f} s")
            task = self._driving.get(run_id)
            if task is not None:
                await asyncio.wait([task], timeout=min(0.5, max(0.0, deadline - time.monotonic())))
            else:
                await asyncio.sleep(0.02)

    def nudge(self) -> None:
        """Look for new work now (after an answer or a resume from the API)."""
        for run_id in store.active_run_ids(self.db, ("pending",)):
            self._spawn(run_id)

    def _spawn(self, run_id: str) -> None:
        if self._stopping or run_id in self._driving:
            return
        task = asyncio.get_running_loop().create_task(self._traced(run_id), name=f"run {run_id}")
        self._driving[run_id] = task
        task.add_done_callback(partial(self._driven, run_id))

    def _driven(self, run_id: str, task: asyncio.Task[None]) -> None:
        self._driving.pop(run_id, None)
        exc = None if task.cancelled() else task.exception()
        if exc is None:
            return
        if self._stopping and isinstance(exc, DiskFullError):
            # A write still refused at shutdown: nothing of it was kept; the run resumes
            # at that step on the next start.
            log.info("run %s stopped before its write could commit: %s", run_id, exc)
        else:  # the run stays as committed; the next start (or a nudge) resumes it
            log.error("run %s stopped: %s", run_id, exc, exc_info=exc)

    async def _write(self, fn: WriteFn[T]) -> T:
        """Commit a run's write; while the disk refuses it, wait and try again.

        Safe to repeat: a refused write left nothing in the file. Gives up only when the
        executor stops (the run then resumes at its next start).
        """
        attempt = 0
        while True:
            try:
                result = await self.writer.write(fn)
            except DiskFullError as exc:
                if self._stopping:
                    raise
                attempt += 1
                # Once per write, not per attempt: a full disk must not flood the log too.
                if attempt == 1:
                    log.warning("a run's write waits for the disk: %s", exc)
                await asyncio.sleep(backoff_delay(attempt, base=0.05, cap=WRITE_RETRY_CAP))
                continue
            if attempt:
                log.info("a run's write committed after %d refused attempt(s)", attempt)
            return result

    async def _traced(self, run_id: str) -> None:
        run = await self._drive(run_id) or store.run(self.db, run_id)
        if run.state not in FINAL_STATES:
            return
        if tracing.enabled():  # the run's root span, once it is over
            tracing.run_finished(
                run.id, agent=run.agent, version=run.agent_version, trigger=run.trigger,
                state=run.state, created_at=run.created_at,
                finished_at=run.finished_at or run.updated_at,
            )  # fmt: skip
        if not buffer.accepting():  # no fleet link: no outline to build (it reads the journal)
            return
        try:  # its outline for the fleet's dashboard
            await asyncio.to_thread(outline.offer, self.db, run)
        except Exception as exc:  # telemetry must never fail a run
            log.warning("run %s: outline not offered to the fleet: %s", run_id, exc)

    async def _drive(self, run_id: str) -> Run | None:
        """Take the run through its steps until it finishes, parks or the executor stops;
        the run as it ended when it was last read, or None (read it again to know)."""
        try:
            run = store.run(self.db, run_id)
            agent = store.agent(self.db, run.agent)
            bundle = self._bundle(agent)
        except EdgeOSError as exc:
            log.error("run %s cannot start: %s", run_id, exc)
            await self._write(
                partial(
                    finish_run, run_id=run_id, outcome="failed", error=str(exc), at=self.clock()
                )
            )
            return None
        slot = self._capacity(agent.name, bundle.manifest).slots
        queued = slot.locked()
        async with slot:
            if queued:  # read again: the run may have moved while it waited for its slot
                run = store.run(self.db, run_id)
            while not self._stopping:
                if run.state in (*FINAL_STATES, "waiting_human", WAITING_VENUE):
                    return run
                if self._paused(run.agent):
                    await self._write(partial(park_paused, run_id=run_id, at=self.clock()))
                    return None
                limit = bundle.manifest.budgets.max_steps
                if run.step_count >= limit or run.next_step is None:
                    error = f"loop brake: the run reached max_steps ({limit}) without finishing"
                    await self._write(
                        partial(
                            finish_run,
                            run_id=run_id,
                            outcome="failed",
                            error=error,
                            at=self.clock(),
                            limit="max_steps",
                        )
                    )
                    return None
                moved = await self._step(run, bundle)
                if moved is None:
                    return None
                run = moved
        return None

    async def _step(self, run: Run, bundle: AgentBundle) -> Run | None:
        """Run the run's next step to an outcome; the run as it now is, or None to stop."""
        manifest = bundle.manifest
        step = run.next_step
        assert step is not None
        answers = store.LazyAnswers(self.db, run.id)
        loop = asyncio.get_running_loop()
        guard = self._guard(manifest)
        pool = self._capacity(run.agent, manifest).threads
        attempt = 1
        while True:
            ctx = RunContext(
                run_id=run.id,
                manifest=manifest,
                step=step,
                step_index=run.step_count,
                attempt=attempt,
                now=self.clock(),
                seed=run.seed,
                answers=answers,
                host=self.host,
                before_model_call=guard.before_model_call,
                contracts=self.contracts,
                db=self.db,
                router=self.router,
            )
            started = time.perf_counter()
            span = tracing.step_span(
                run.id, agent=run.agent, step=step, index=run.step_count, attempt=attempt,
                record=ctx.record, parked=(EscalationPending, CallDeferred),
            )  # fmt: skip
            try:
                with span as traced:
                    result = await asyncio.wait_for(
                        loop.run_in_executor(pool, self._runner(bundle), step, ctx, run.carry),
                        timeout=manifest.budgets.step_timeout,
                    )
            except EscalationPending as pending:
                await self._write(
                    partial(park_for_person, run=run, step=step, pending=pending, at=self.clock())
                )
                return None
            except CallDeferred as deferred:  # the venue it needs is offline: wait for it
                await self._write(
                    partial(
                        deferral.park, call=deferred.call or f"{run.id}:{run.step_count}:0",
                        run_id=run.id, agent=run.agent, step=step, deferred=deferred,
                        wait_s=deferred.wait_s, default=deferred.default, at=self.clock(),
                    )
                )  # fmt: skip
                return None
            except LimitExceeded as exceeded:
                await self._write(
                    partial(
                        finish_run, run_id=run.id, outcome="failed", error=str(exceeded),
                        at=self.clock(), limit=exceeded.limit,
                    )
                )  # fmt: skip
                return None
            except TimeoutError:
                limit = manifest.budgets.step_timeout
                error = f"step '{step}' took longer than step_timeout ({limit:g} s)"
                trace, permanent = "", False
            except Exception as exc:  # the agent's own code failed
                error = f"{type(exc).__name__}: {exc}"
                trace = traceback.format_exc(limit=20)
                # Misusing ctx (an unlisted model or connector) fails the same way every time.
                permanent = isinstance(exc, StepError)
            else:
                duration = time.perf_counter() - started
                try:
                    outcome = await self._write(
                        partial(
                            complete_step,
                            run=run,
                            bundle=bundle,
                            ctx=ctx,
                            result=result,
                            duration=duration,
                            at=self.clock(),
                        )
                    )
                except ConflictError as exc:  # cancelled while the step ran: drop its result
                    log.info("%s", exc)
                    return None
                if ctx.record.effects:
                    traced.effects_committed(ctx.record.effects)
                    self.on_effects()
                return outcome
            final = permanent or attempt >= manifest.retry.max_attempts
            await self._write(
                partial(
                    journal.append, run_id=run.id, kind="step_failed",
                    payload={"step": step, "index": run.step_count, "attempt": attempt,
                             "error": error, "traceback": trace},
                    step=step, at=self.clock(),
                )
            )  # fmt: skip
            if final:
                await self._write(
                    partial(
                        finish_run, run_id=run.id, outcome="failed",
                        error=f"step '{step}' failed {attempt} time(s); last error: {error}",
                        at=self.clock(),
                    )
                )  # fmt: skip
                return None
            await asyncio.sleep(backoff_delay(attempt, base=manifest.retry.base_delay))
            attempt += 1

    # -- background -------------------------------------------------------------------
    async def _scan_forever(self) -> None:
        while True:
            try:
                await self._scan()
            except asyncio.CancelledError:
                raise
            except DiskFullError as exc:  # say why, without a traceback every second
                log.warning("scan skipped: %s", exc)
            except Exception:  # keep scanning; a bad row must not stop the node
                log.exception("scan failed")
            await asyncio.sleep(self.scan_interval)

    async def _scan(self) -> None:
        now = self.clock()
        for row in store.escalations(self.db, state="open"):
            if row.deadline <= now:
                await self.writer.write(
                    partial(
                        answer_escalation,
                        escalation_id=row.id,
                        choice=row.default,
                        by="timeout",
                        note="no answer in time",
                        at=now,
                    )
                )
        await self.writer.write(partial(resume_unpaused, at=now))
        if self.router is not None and deferral.waiting(self.db):
            online = self.router.reachable()
            await self.writer.write(partial(deferral.settle, online=online, at=now))
        self.nudge()
        self._fire_triggers(now)
        self._reembed()
        if now >= self._next_retention:
            self._next_retention = now + self.retention_interval
            done = await asyncio.to_thread(apply_retention, self.db, now=now, tighten=self.policy)
            if done.runs or done.feedback:
                log.info(
                    "retention removed %d runs, %d journal records and %d feedback rows",
                    done.runs, done.records, done.feedback,
                )  # fmt: skip
            gone = await asyncio.to_thread(self._retain_memory, now)
            if gone.expired or gone.evicted:
                log.info(
                    "retention removed %d expired and %d evicted memory records",
                    len(gone.expired), len(gone.evicted),
                )  # fmt: skip
        if now >= self._next_dictionary:
            self._next_dictionary = now + DICTIONARY_CHECK_S
            made = await asyncio.to_thread(journal.train_dictionary, self.db)
            if made is not None:
                log.info("journal dictionary %d trained: new records are stored with it", made)
            # Records from before the first dictionary, a few thousand at a time.
            await asyncio.to_thread(journal.recompress, self.db)

    def _retain_memory(self, now: float) -> Removed:
        """Remove agents' memory records past their TTL (recall already skips them) and
        hold each agent to its memory caps, under the fleet's policy when there is one."""
        from edgeos.memory.retention import retention_pass

        manifests = [a.manifest for a in store.agents(self.db)]
        return retention_pass(self.db, manifests, now, tighten=self.policy)

    def _reembed(self) -> None:
        """Embed memory again in the background where an agent's embedding model changed."""
        if self.host is None or (self._reembedding is not None and not self._reembedding.done()):
            return
        installed = store.agents(self.db)
        if not installed:
            return
        from edgeos.memory.reembed import catch_up, waiting

        names = set(waiting(self.db, self.host, [a.manifest for a in installed]))
        if names:
            # Under the fleet's policy: its memory caps hold for what grows meanwhile.
            tighten = self.policy or (lambda manifest: manifest)
            todo = [tighten(a.manifest) for a in installed if a.name in names]
            self._reembedding = asyncio.get_running_loop().run_in_executor(
                None, partial(catch_up, self.db, self.host, todo, stop=lambda: self._stopping)
            )
            self._reembedding.add_done_callback(_log_failure)

    def _fire_triggers(self, now: float) -> None:
        installed = {a.name: a for a in store.agents(self.db)}
        for agent in installed.values():
            for index, trigger in enumerate(agent.manifest.triggers):
                key = (agent.name, index)
                if trigger.interval is None and trigger.cron is None:
                    continue
                schedule = self._schedules.get(key)
                if schedule is None:
                    cron = CronSchedule.parse(trigger.cron) if trigger.cron else None
                    schedule = _Schedule(agent.name, trigger.kind, trigger.interval, cron, 0.0)
                    schedule.next_at = _next_fire(schedule, now)
                    self._schedules[key] = schedule
                if now >= schedule.next_at:
                    schedule.next_at = _next_fire(schedule, now)
                    if not agent.paused:
                        asyncio.get_running_loop().create_task(
                            self._submit_quietly(agent.name, schedule.trigger)
                        )
        for key in [k for k in self._schedules if k[0] not in installed]:
            del self._schedules[key]

    async def _submit_quietly(self, agent: str, trigger: str) -> None:
        try:
            await self.submit(agent, trigger=trigger, data={})
        except EdgeOSError as exc:
            log.warning("trigger %s of agent %s did not start a run: %s", trigger, agent, exc)

    # -- helpers ----------------------------------------------------------------------
    def _bundle(self, agent: InstalledAgent) -> AgentBundle:
        bundle = self._bundles.get(agent.bundle_dir)
        if bundle is None:
            bundle = self._bundles[agent.bundle_dir] = load_bundle(Path(agent.bundle_dir))
        if self.policy is not None:
            # Read per run, not cached: a policy the fleet delivers applies to the next run.
            bundle = replace(bundle, manifest=self.policy(bundle.manifest))
        return bundle

    def _paused(self, agent: str) -> bool:
        """Whether an agent is paused, read at most every 100 ms (checked before each step)."""
        now = time.monotonic()
        cached = self._paused_cache.get(agent)
        if cached is not None and now - cached[1] < 0.1:
            return cached[0]
        paused = store.is_paused(self.db, agent)
        self._paused_cache[agent] = (paused, now)
        return paused

    def _guard(self, manifest: AgentManifest) -> Supervisor:
        guard = self._guards.get(manifest.name)
        if guard is None or guard.manifest != manifest:
            guard = self._guards[manifest.name] = Supervisor(manifest)
        return guard

    def _runner(self, bundle: AgentBundle) -> StepRunner:
        """How the bundle's steps run: in this process's threads (the default), or with
        ``isolation: {mode: process}`` in a worker process of the agent version's own,
        under its memory and CPU limits (see :mod:`edgeos.agents.isolated`)."""
        if bundle.manifest.isolation.mode != "process":
            return partial(run_in_thread, bundle)
        key = str(bundle.directory)
        runner = self._isolated.get(key)
        if runner is None:
            # A new version of the agent: stop the old version's worker unless it is running
            # a step (then it lasts until stop()). Its runner stays, so a run still on the
            # old version restarts it if need be.
            name = bundle.manifest.name
            for old in self._isolated.values():
                if old.bundle.manifest.name == name:
                    asyncio.get_running_loop().run_in_executor(None, old.retire)
            runner = self._isolated[key] = IsolatedRunner(bundle, bundle.manifest.isolation)
        return runner

    def _capacity(self, name: str, manifest: AgentManifest) -> _Capacity:
        limit = manifest.budgets.max_concurrent_runs
        held = self._capacities.get(name)
        if held is None or held.limit != limit:
            # A new limit (an upgrade, or a fleet policy): runs holding the old slots
            # finish under them and steps under way in the old threads; new runs wait
            # under the new limit.
            if held is not None:
                held.threads.shutdown(wait=False)
            held = self._capacities[name] = _Capacity(
                limit, asyncio.Semaphore(limit),
                IdleThreadPool(limit, thread_name_prefix=f"edgeos-{name}"),
            )  # fmt: skip
        return held


@dataclass(frozen=True)
class _Capacity:
    """How many runs of an agent go at once (``max_concurrent_runs``): that many slots, and
    as many threads of its own for their steps, so that an agent whose steps block (a
    cloud call on a flaky link, a connector that hangs, a step past its timeout, whose
    thread cannot be stopped) holds only its own threads and never delays another
    agent's steps. The threads start as runs need them and end after a minute without."""

    limit: int
    slots: asyncio.Semaphore
    threads: IdleThreadPool


StepRunner = Callable[[str, RunContext, Any], Any]

# The longest wait between attempts at a write the disk refused: how soon a run goes on
# after space is freed.
WRITE_RETRY_CAP = 2.0


# Observations kept per agent and model for drift detection (reference + recent windows).
OBSERVATIONS_KEPT = 5000


def run_in_thread(bundle: AgentBundle, step: str, ctx: RunContext, data: Any) -> Any:
    """Run a step function directly (on the executor's worker thread)."""
    return bundle.steps[step](ctx, data)


def _log_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("embedding memory again failed", exc_info=future.exception())


def _next_fire(schedule: _Schedule, now: float) -> float:
    if schedule.interval is not None:
        return now + schedule.interval
    assert schedule.cron is not None
    return schedule.cron.next_after(datetime.fromtimestamp(now)).timestamp()


# -- the writes: each runs inside one group-commit transaction --------------------------
def create_run(
    conn: Any,
    *,
    agent: InstalledAgent,
    trigger: str,
    data: Any,
    at: float,
    state: str,
    shown: Any = None,
) -> str:
    """Create a run at its first step and journal its start; returns its id.

    The run's row keeps ``data``, which its first step reads; the journal records ``shown``
    when given (the input with personal fields pseudonymised), else ``data``.
    """
    run_id = new_id()
    seed = random.getrandbits(62)
    first = agent.manifest.steps[0]
    conn.execute(
        "INSERT INTO runs (id, agent, agent_version, trigger, input, state, next_step, "
        "step_count, carry, seed, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?)",
        (run_id, agent.name, agent.version, trigger, dumps(data), state, first, dumps(data),
         seed, at, at),
    )  # fmt: skip
    journal.append(
        conn, run_id, "run_started",
        {"agent": agent.name, "version": agent.version, "trigger": trigger,
         "input": data if shown is None else shown, "seed": seed,
         "trace_id": tracing.trace_id(run_id)},
        at=at,
    )  # fmt: skip
    return run_id


def complete_step(
    conn: Any,
    *,
    run: Run,
    bundle: AgentBundle,
    ctx: RunContext,
    result: Any,
    duration: float,
    at: float,
) -> Run:
    """Commit a step's outcome and its effects; returns the run as it now stands."""
    steps = bundle.manifest.steps
    step = ctx.step
    if isinstance(result, Goto):
        if result.step not in steps:
            raise StepError(f"step '{step}' asked to go to unknown step {result.step!r}")
        next_step: str | None = result.step
        data = plain(result.data)
    else:
        position = steps.index(step)
        next_step = steps[position + 1] if position + 1 < len(steps) else None
        data = plain(result)
    record = ctx.record
    finished = next_step is None
    # First: a run cancelled, or sealed away to another node, while the step ran writes
    # nothing more (a migrated run's journal refuses records, see edgeos.agents.migration).
    updated = conn.execute(
        "UPDATE runs SET state = ?, next_step = ?, step_count = step_count + 1, carry = ?, "
        "cost = cost + ?, updated_at = ?, finished_at = ?, outcome = ? "
        "WHERE id = ? AND step_count = ? AND state IN ('pending', 'running')",
        ("succeeded" if finished else "running", next_step, dumps(data), record.cost, at,
         at if finished else None, dumps(data) if finished else None, run.id, run.step_count),
    ).rowcount  # fmt: skip
    if updated != 1:
        raise ConflictError(
            f"run {run.id} was cancelled or moved on while step '{step}' ran; its result is dropped"
        )
    journal.append(
        conn, run.id, "step_completed",
        {"step": step, "index": run.step_count, "attempt": ctx.attempt, "now": ctx.now(),
         # The input is the previous step's output (or the run's input), journaled already:
         # a digest proves which it was without storing it twice.
         "input_digest": digest(run.carry), "output": data, "next": next_step,
         "effects": [e.key for e in record.effects],
         "model_calls": [[c.model, c.version, round(c.latency_ms, 3), c.cost]
                         for c in record.model_calls],
         "cost": record.cost, "duration_ms": round(duration * 1000, 3),
         "throttled_ms": round(record.throttled_s * 1000, 3)},
        step=step, at=at,
    )  # fmt: skip
    for decision in record.venue_decisions:
        journal.append(conn, run.id, "venue_decided", {"index": run.step_count, **decision},
                       step=step, at=at)  # fmt: skip
    for effect in record.effects:
        entry = outbox.OutboxEntry(
            effect.key, run.id, effect.connector, effect.operation, effect.payload
        )
        if outbox.enqueue(conn, entry, at=at):
            journal.append(
                conn, run.id, "effect_enqueued",
                {"key": effect.key, "connector": effect.connector,
                 "operation": effect.operation, "payload": effect.journaled},
                step=step, at=at,
            )  # fmt: skip
    for obs in record.observations:
        row_id = conn.execute(
            "INSERT INTO observations (agent, model, run_id, at, confidence, inputs) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (run.agent, obs.model, run.id, at, obs.confidence, obs.inputs),
        ).lastrowid
        if row_id and row_id % 256 == 0:  # bounded: drift needs only the recent past
            conn.execute(
                "DELETE FROM observations WHERE agent = ? AND model = ? AND id < ?",
                (run.agent, obs.model, row_id - OBSERVATIONS_KEPT),
            )
    for item in record.feedback:
        conn.execute(
            "INSERT INTO feedback (agent, run_id, at, decision, outcome) VALUES (?, ?, ?, ?, ?)",
            (run.agent, run.id, at, dumps(item["decision"]), dumps(item["outcome"])),
        )
    for write in record.writes:  # ctx.memory and ctx.context: with the step or not at all
        write(conn, at)
    if finished:
        journal.append(
            conn, run.id, "run_finished", {"outcome": "succeeded", "output": data}, at=at
        )
        purge_run_context(conn, run.id)
    return replace(
        run,
        state="succeeded" if finished else "running",
        next_step=next_step,
        step_count=run.step_count + 1,
        carry=data,
        cost=run.cost + record.cost,
        updated_at=at,
        finished_at=at if finished else None,
        outcome=data if finished else None,
    )


def finish_run(
    conn: Any,
    *,
    run_id: str,
    outcome: str,
    error: str | None,
    at: float,
    limit: str | None = None,
) -> None:
    """End a run (failed or cancelled) with an explicit journal record."""
    payload: dict[str, Any] = {"outcome": outcome, "error": error}
    if limit:
        payload["limit"] = limit
    conn.execute(
        "UPDATE runs SET state = ?, error = ?, updated_at = ?, finished_at = ?, next_step = NULL "
        "WHERE id = ?",
        (outcome, error, at, at, run_id),
    )
    journal.append(conn, run_id, "run_finished", payload, at=at)
    purge_run_context(conn, run_id)


def park_for_person(
    conn: Any, *, run: Run, step: str, pending: EscalationPending, at: float
) -> None:
    """Record a question to a person and park the run until it is answered."""
    conn.execute(
        "INSERT INTO escalations (id, run_id, step, question, options, proposal, "
        "default_choice, deadline, state) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'open') "
        "ON CONFLICT (id) DO NOTHING",
        (pending.escalation_id, run.id, step, pending.question, dumps(pending.options),
         dumps(pending.proposal), dumps(pending.default), at + pending.timeout),
    )  # fmt: skip
    conn.execute(
        "UPDATE runs SET state = 'waiting_human', updated_at = ? WHERE id = ?", (at, run.id)
    )
    journal.append(
        conn, run.id, "escalation_raised",
        {"id": pending.escalation_id, "question": pending.question, "options": pending.options,
         "proposal": pending.proposal, "default": pending.default, "timeout": pending.timeout},
        step=step, at=at,
    )  # fmt: skip


def answer_escalation(
    conn: Any,
    *,
    escalation_id: str,
    choice: Any,
    by: str,
    note: str | None = None,
    at: float,
) -> bool:
    """Answer an open escalation and let its run go on; False if it was already closed.

    A person's answer that differs from the agent's proposal counts as an override; a
    timeout applies the declared default and is not counted as one.
    """
    row = conn.execute(
        "SELECT run_id, step, options, proposal, state FROM escalations WHERE id = ?",
        (escalation_id,),
    ).fetchone()
    if row is None:
        raise NotFoundError(f"no escalation with id '{escalation_id}'")
    run_id, step, options_text, proposal_text, state = row
    if state != "open":
        return False
    options = store.loads(options_text)
    proposal = store.loads(proposal_text)
    match = [o for o in options if o == choice or str(o) == str(choice)]
    if not match:
        raise InvalidRequestError(
            f"{choice!r} is not an option of escalation {escalation_id} "
            f"(options: {', '.join(map(str, options))})"
        )
    answer = match[0]
    timed_out = by == "timeout"
    override = None if timed_out or proposal is None else answer != proposal
    conn.execute(
        "UPDATE escalations SET state = ?, answer = ?, note = ?, answered_by = ?, "
        "answered_at = ?, override = ? WHERE id = ?",
        ("timed_out" if timed_out else "answered", dumps(answer), note, by, at, override,
         escalation_id),
    )  # fmt: skip
    conn.execute(
        "UPDATE runs SET state = 'pending', updated_at = ? WHERE id = ? AND state = 'waiting_human'",
        (at, run_id),
    )
    if not timed_out:
        # A person's answer is a labelled example: the agent's proposal and the truth.
        conn.execute(
            "INSERT INTO feedback (agent, run_id, at, decision, correction) "
            "SELECT agent, id, ?, ?, ? FROM runs WHERE id = ?",
            (at, dumps({"escalation": escalation_id, "proposal": proposal}),
             dumps({"answer": answer, "by": by, "note": note}), run_id),
        )  # fmt: skip
    journal.append(
        conn, run_id, "escalation_answered",
        {"id": escalation_id, "answer": answer, "by": by, "note": note, "override": override,
         "timed_out": timed_out},
        step=step, at=at,
    )  # fmt: skip
    return True


def cancel_run(conn: Any, *, run_id: str, by: str, at: float) -> bool:
    """Cancel an unfinished run; effects it already committed are still delivered."""
    row = conn.execute("SELECT state FROM runs WHERE id = ?", (run_id,)).fetchone()
    if row is None:
        raise NotFoundError(f"no run with id '{run_id}'")
    if row[0] in FINAL_STATES:
        return False
    if row[0] == store.MIGRATED:
        raise ConflictError(f"run {run_id} continues on another node: cancel it there")
    conn.execute(
        "UPDATE escalations SET state = 'cancelled' WHERE run_id = ? AND state = 'open'", (run_id,)
    )
    finish_run(conn, run_id=run_id, outcome="cancelled", error=f"cancelled by {by}", at=at)
    return True


def park_paused(conn: Any, run_id: str, *, at: float) -> None:
    """Park a run because its agent is paused; it resumes when the agent does."""
    conn.execute("UPDATE runs SET state = 'paused', updated_at = ? WHERE id = ?", (at, run_id))
    journal.append(conn, run_id, "run_paused", {}, at=at)


def resume_unpaused(conn: Any, *, at: float) -> None:
    """Runs parked by a pause whose agent has been resumed become ready again."""
    rows = conn.execute(
        "SELECT runs.id FROM runs JOIN agents ON agents.name = runs.agent "
        "WHERE runs.state = 'paused' AND agents.paused = 0"
    ).fetchall()
    for (run_id,) in rows:
        conn.execute("UPDATE runs SET state = 'pending', updated_at = ? WHERE id = ?", (at, run_id))
        journal.append(conn, run_id, "run_resumed", {}, at=at)

"""Agent steps in a worker process: ``isolation: {mode: process}`` in ``agent.yaml``.

:class:`IsolatedRunner` is what the executor calls instead of running a step on its own
thread: same signature as ``executor.run_in_thread`` (``runner(step, ctx, data)``), same
outcomes, but the step's code runs in the agent's :class:`IsolatedWorker`, under the
memory and CPU limits of its manifest. A step that runs out of memory, spins or segfaults
ends its worker, never the node or the other agents.

What crosses the process boundary, and why it looks the same to the step and the node:

- **To the child**, with each step: the step's input, and what its ``ctx`` needs (the run,
  the step's time, the *state* of the step's seeded random generator, the answers given
  to its escalations, and the manifest). The child's ``ctx`` (``_worker.StepContext``)
  has the node's ``RunContext`` API, so the same bundle runs in either mode, and draws
  the same random numbers in both.
- **Back during the step**: model calls (``ctx.model(...)``, the routed ``ctx.infer``,
  whose ``CallDeferred`` parks the run as it would in a thread, and ``ctx.llm(...).chat``,
  whose tool calls come back as proposals), as callbacks. They are
  made here through the node's own ``ctx`` (so the supervisor's rate limit and cost
  budgets apply and the journal records the calls with their cost) and the child waits
  for the outputs. Arrays cross as dtype, shape and a list.
- **Back at the end**: the return value (or a ``Goto``, marked as such), the effects it
  asked for (recorded here through ``ctx.effect``, so their keys are the node's), or the
  question it asked a person who has not answered yet (raised here as
  ``EscalationPending``, which parks the run).

Failures are shaped for the executor's retry policy: an exception in the step raises
:class:`~edgeos.agents.isolation.StepFailed` naming the child's exception type and
message (a misuse of ``ctx`` raises ``StepError``, which is not retried); a dead worker
raises :class:`~edgeos.agents.isolation.WorkerCrashed`, retried like any failure, and the
next attempt gets a new worker after a backoff. Either way the child's traceback or the
tail of its stderr is chained as the cause, so the journal's ``step_failed`` record
shows the agent's code, not only edgeos's.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

from edgeos.agents._worker import decode_tensor, encode_tensor
from edgeos.agents.bundle import AgentBundle
from edgeos.agents.context import EscalationPending, Goto, RunContext, StepError
from edgeos.agents.isolation import IsolatedWorker, JSONObject, StepFailed, WorkerCrashed
from edgeos.errors import InvalidRequestError
from edgeos.limits import backoff_delay

if TYPE_CHECKING:
    from edgeos.manifests.agent import Isolation

#: Set in a worker's environment unless the node's own sets them: math libraries start a
#: thread per core, each reserving address space that counts against ``memory_mb``
#: (numpy alone does not import under 128 MB with its default OpenBLAS pool), and one step
#: at a time gains nothing from them.
WORKER_ENVIRONMENT = {
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


class WorkerReport(Exception):
    """What a worker process said about a failure: its traceback, or its last stderr lines.

    Never raised on its own: it is chained as the cause of the exception the executor
    sees, so the traceback the journal keeps ends in the agent's own code.
    """

    def __str__(self) -> str:
        return "\n" + str(self.args[0]).rstrip("\n")


class IsolatedRunner:
    """Runs one agent version's steps in a worker process of its own.

    Steps of concurrent runs of the agent take turns in the worker (one step at a time).
    The worker starts with the first step, and again after a crash, on the next step.
    """

    def __init__(
        self,
        bundle: AgentBundle,
        isolation: Isolation,
        *,
        backoff: Callable[[int], float] = backoff_delay,
        sleep: Callable[[float], None] = time.sleep,
        env: Mapping[str, str] | None = None,
    ) -> None:
        manifest = bundle.manifest
        self.bundle = bundle
        self.isolation = isolation
        self.worker = IsolatedWorker(
            bundle.directory / manifest.module,
            memory_mb=isolation.memory_mb,
            cpu_seconds=isolation.cpu_seconds,
            name=manifest.name,
            backoff=backoff,
            sleep=sleep,
            env=worker_environment(env),
        )

    def __call__(self, step: str, ctx: RunContext, data: Any) -> Any:
        """Run ``step`` in the worker; return what the step returned (or its ``Goto``)."""
        timeout = ctx.manifest.budgets.step_timeout
        try:
            outcome = self.worker.run_step(
                step,
                step_context(ctx),
                data,
                timeout,
                partial(serve_callback, ctx),
                # The executor gives up on the step after step_timeout: a call queued behind
                # other runs' steps must not start after that, nor a step run past it.
                deadline=time.monotonic() + timeout,
            )
        except StepFailed as failed:
            report = WorkerReport(failed.traceback) if failed.traceback else None
            if failed.permanent:
                raise StepError(failed.exc_message) from report
            raise failed from report
        except WorkerCrashed as crash:
            if crash.stderr_tail:
                raise crash from WorkerReport(f"stderr of the worker:\n{crash.stderr_tail}")
            raise
        return apply_outcome(ctx, outcome)

    def stop(self) -> None:
        """Stop the worker process (a step in progress is cut short and fails)."""
        self.worker.stop()

    def retire(self) -> bool:
        """Stop the worker process unless a step is running in it; True if it was idle."""
        return self.worker.stop_if_idle()


def worker_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a worker: the node's (or ``base``) plus :data:`WORKER_ENVIRONMENT`."""
    env = dict(os.environ if base is None else base)
    for name, value in WORKER_ENVIRONMENT.items():
        env.setdefault(name, value)
    return env


def step_context(ctx: RunContext) -> JSONObject:
    """What the child needs to build the step's ``ctx`` (see ``_worker.StepContext``)."""
    return {
        "run_id": ctx.run_id,
        "agent": ctx.agent,
        "step": ctx.step,
        "step_index": ctx.step_index,
        "attempt": ctx.attempt,
        "now": ctx.now(),
        # The generator's state, not its seed: RunContext keeps only the generator, and
        # the state reproduces it exactly, whatever its seeding.
        "random_state": ctx.random().getstate(),
        "answers": dict(ctx._answers),
        "manifest": ctx.manifest.dump(),
    }


def serve_callback(ctx: RunContext, message: JSONObject) -> JSONObject:
    """Answer a step's callback from the worker, through the node's own ``ctx``.

    An exception raised here is raised in the step; if the step lets it through, the
    worker re-raises it here (a cost budget then ends the run as it would in a thread).
    """
    kind = message.get("callback")
    model = str(message.get("model"))
    if kind == "infer":
        inputs = {str(name): decode_tensor(t) for name, t in dict(message["inputs"]).items()}
        version = message.get("version")
        outputs = ctx.model(model).infer(inputs, version=None if version is None else str(version))
        return {"outputs": {name: encode_tensor(value) for name, value in outputs.items()}}
    if kind == "route":
        inputs = {str(name): decode_tensor(t) for name, t in dict(message["inputs"]).items()}
        needs = dict(message.get("needs") or {})
        outputs = ctx.infer(
            model, inputs, privacy=needs.get("privacy"), slo_ms=needs.get("slo_ms"),
            min_quality=needs.get("min_quality"), cascade=needs.get("cascade"),
            fallback=needs.get("fallback"),
        )  # fmt: skip
        return {"outputs": {name: encode_tensor(value) for name, value in outputs.items()}}
    if kind == "chat":
        reply = ctx.llm(model).chat(
            list(message["messages"]), schema=message.get("schema"),
            tools=[str(t) for t in message.get("tools") or ()],
            max_tokens=message.get("max_tokens"), temperature=float(message["temperature"]),
            seed=message.get("seed"), privacy=message.get("privacy"),
            slo_ms=message.get("slo_ms"),
            parallel_tool_calls=bool(message.get("parallel_tool_calls", True)),
        )  # fmt: skip
        calls = [{"name": c.name, "arguments": c.arguments} for c in reply.tool_calls]
        return {"text": reply.text, "parsed": reply.parsed, "tool_calls": calls}
    if kind == "labels":
        ctx.model(model)  # the same check as for a call: the manifest must list it
        return {"labels": ctx._labels(model)}
    if kind == "memory":
        from edgeos.memory.handle import serve_callback as serve_memory

        return serve_memory(ctx.memory, message)
    if kind == "context":
        from edgeos.memory.context import serve_callback as serve_context

        return serve_context(ctx.context, message)
    raise InvalidRequestError(f"an agent worker asked for an unknown callback {kind!r}")


def apply_outcome(ctx: RunContext, outcome: JSONObject) -> Any:
    """Turn the child's account of a finished step into what the step would have done here."""
    ctx.record.escalations.extend(str(e) for e in outcome.get("escalations", []))
    pending = outcome.get("pending")
    if pending is not None:
        raise EscalationPending(
            str(pending["id"]),
            str(pending["question"]),
            list(pending["options"]),
            pending["default"],
            pending["proposal"],
            float(pending["timeout"]),
        )
    for effect in outcome.get("effects", []):
        ctx.effect(str(effect["target"]), effect["payload"])
    if "goto" in outcome:
        return Goto(str(outcome["goto"]), outcome.get("data"))
    return outcome.get("return")

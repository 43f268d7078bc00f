"""The child side of :class:`edgeos.agents.isolation.IsolatedWorker`.

Run as ``python -P _worker.py MODULE_PATH MEMORY_MB CPU_SECONDS`` (0: no limit). It
imports nothing but the standard library — not even edgeos — so the interpreter is small
when the memory limit is set and the agent's own imports are what count against it.
(numpy is imported only when a step calls a model, to rebuild the arrays it gets back.)

Protocol: one JSON object per line. The parent writes one of

- ``{"function": f, "payload": {...}}``: call ``module.f(payload)``;
- ``{"step": f, "context": {...}, "data": ...}``: call the agent step ``module.f(ctx, data)``
  with a :class:`StepContext` built from ``context`` (see :func:`run_step`);

on the child's stdin; the child answers on its original stdout with exactly one of

- ``{"ready": pid}`` once, after the limits are set and the module is imported;
- ``{"ok": result}`` when ``module.f(payload)`` returned a JSON object, or a step ended
  (returned, went to another step, or is waiting for a person; see :func:`run_step`);
- ``{"error": {"type", "message", "traceback"}}`` when it raised (or returned no JSON
  object); a failed import is reported the same way instead of ``ready``. A step's error
  also carries ``"permanent": true`` when the step misused ``ctx`` (:class:`StepError`),
  and ``"token": n`` when it is the parent's own error from callback ``n``, unhandled;
- ``{"missing": f}`` when the module has no callable ``f``.

While a step runs, the child may ask the parent for what only the node has (a model,
the agent's memory, the run's context):
it writes ``{"callback": kind, ...}`` and reads one line back, ``{"answer": value}`` or
``{"raise": {"type", "message", "token"}}`` (raised in the step as :class:`RemoteError`).

The child exits 0 when its stdin closes (the parent stopped it, or died), and
:data:`EXIT_MEMORY` after a ``MemoryError``: an interpreter that ran out of memory may be
in any state, so it is not trusted with another step.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import importlib.util
import json
import math
import os
import random
import resource
import sys
import traceback
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType, SimpleNamespace, TracebackType
from typing import IO, Any

#: Exit status after a MemoryError (the memory limit, as far as the parent can tell).
EXIT_MEMORY = 3
#: Exit status after a malformed request or bad arguments: a bug in edgeos, not the agent.
EXIT_PROTOCOL = 4
#: Exit status after the step module failed to import (the error was sent first).
EXIT_IMPORT = 5

_MIB = 1024 * 1024


def _cap(value: int, hard: int) -> int:
    """``value``, lowered to an inherited hard limit (an unprivileged process cannot raise it)."""
    return value if hard == resource.RLIM_INFINITY else min(value, hard)


def limit_memory(memory_mb: int) -> None:
    """Cap the address space; soft == hard so step code cannot lift it."""
    if memory_mb > 0:
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = _cap(memory_mb * _MIB, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def arm_cpu(cpu_seconds: int) -> None:
    """Allow the next step ``cpu_seconds`` more CPU seconds (at least; RLIMIT_CPU counts whole
    seconds of the process's lifetime, so the soft limit is re-armed before every step).

    The hard limit is left alone: once lowered it could never be raised for the next step.
    Past the soft limit the kernel sends SIGXCPU, whose default action ends the process.
    """
    if cpu_seconds > 0:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        used = usage.ru_utime + usage.ru_stime
        _, hard = resource.getrlimit(resource.RLIMIT_CPU)
        resource.setrlimit(resource.RLIMIT_CPU, (_cap(math.ceil(used + cpu_seconds), hard), hard))


def _load(path: Path) -> ModuleType:
    # The module's directory goes first on sys.path so it can import its sibling files.
    sys.path.insert(0, str(path.parent))
    name = path.stem if path.stem not in sys.modules else f"edgeos_step_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}: not a Python module")
    module = importlib.util.module_from_spec(spec)
    # Registered before running it, as a normal import does (dataclasses look it up).
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _error(exc: BaseException, tb: TracebackType | None = None) -> dict[str, Any]:
    """The error reply for ``exc``; ``tb`` (default: all of it) is the traceback to show."""
    fields: dict[str, Any] = {
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(
            traceback.format_exception(type(exc), exc, tb if tb is not None else exc.__traceback__)
        ),
    }
    if isinstance(exc, StepError):
        fields["permanent"] = True
    if isinstance(exc, RemoteError):
        fields["token"] = exc.token
    return {"error": fields}


class _Parent:
    """The conversation with the parent: requests in; replies and callbacks out."""

    def __init__(self, requests: IO[bytes], replies: IO[bytes]) -> None:
        self.requests = requests
        self.replies = replies

    def send(self, message: Mapping[str, Any]) -> None:
        self.replies.write(json.dumps(message).encode() + b"\n")
        self.replies.flush()

    def ask(self, kind: str, **fields: Any) -> Any:
        """A callback: the parent's answer, or :class:`RemoteError` if it raised."""
        self.send({"callback": kind, **fields})
        line = self.requests.readline()
        if not line:
            # The parent stopped us in the middle of a step: nobody is left to answer to,
            # and the step must not go on without its answer.
            os._exit(0)
        try:
            message = json.loads(line)
        except ValueError:
            message = None
        if isinstance(message, dict) and "answer" in message:
            return message["answer"]
        if isinstance(message, dict) and isinstance(message.get("raise"), dict):
            raised = message["raise"]
            raise RemoteError(
                str(raised.get("type", "Exception")),
                str(raised.get("message", "")),
                int(raised.get("token", 0)),
            )
        print(f"edgeos worker: bad callback answer from the parent: {line!r}", file=sys.stderr)
        os._exit(EXIT_PROTOCOL)


# -- agent steps: the ctx a step gets in a worker --------------------------------------


class StepError(Exception):
    """A step used ``ctx`` in a way its manifest does not allow.

    The child's twin of ``edgeos.agents.context.StepError``: the parent raises that for it,
    so the run fails at once, without retries, as it does when the step runs in a thread.
    """


class RemoteError(Exception):
    """The parent raised while serving a callback (a model call); raised inside the step.

    If the step lets it through, the parent re-raises its own original exception (a cost
    budget, an unknown model, ...), so the run ends exactly as it would in a thread.
    """

    def __init__(self, type_name: str, message: str, token: int) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.token = token


class EscalationPending(Exception):  # control flow, as in the parent: not an error
    """Raised inside ``ctx.escalate`` when nobody has answered yet: the run parks."""

    def __init__(self, fields: dict[str, Any]) -> None:
        super().__init__(fields["question"])
        self.fields = fields


@dataclasses.dataclass(frozen=True)
class Decision:
    """A classifier's answer (the child's twin of ``edgeos.agents.context.Decision``)."""

    label: str
    confidence: float
    scores: dict[str, float]
    escalated: bool = False


class ModelHandle:
    """``ctx.model(name)`` in a worker: each call is answered by the node's model host."""

    def __init__(self, ctx: StepContext, name: str) -> None:
        self._ctx = ctx
        self.name = name

    def infer(self, inputs: Mapping[str, Any], *, version: str | None = None) -> dict[str, Any]:
        """Run the model in the parent; returns its outputs (numpy arrays) by name."""
        answer = self._ctx._parent.ask(
            "infer",
            model=self.name,
            version=version,
            inputs={str(k): encode_tensor(v) for k, v in inputs.items()},
        )
        return {name: decode_tensor(t) for name, t in answer["outputs"].items()}

    def classify(
        self,
        inputs: Mapping[str, Any],
        *,
        question: str | None = None,
        default: str | None = None,
        routed: bool = False,
    ) -> Decision:
        """Run a classifier on one example and name the winning label (as in the parent)."""
        import numpy as np  # only steps that call models pay for it; they have it already

        outputs = self._ctx.infer(self.name, inputs) if routed else self.infer(inputs)
        scores = np.asarray(next(iter(outputs.values())), dtype=np.float64).reshape(-1)
        labels = [str(x) for x in self._ctx._parent.ask("labels", model=self.name)["labels"]]
        labels = labels or [str(i) for i in range(scores.size)]
        best = int(np.argmax(scores))
        decision = Decision(
            labels[best], float(scores[best]), dict(zip(labels, map(float, scores), strict=False))
        )
        threshold = self._ctx.manifest.escalation.confidence_threshold
        if threshold is None or decision.confidence >= threshold:
            return decision
        answer = self._ctx.escalate(
            question
            or f"{self.name} is unsure ({decision.confidence:.0%} {decision.label}): which is it?",
            labels,
            default=default if default is not None else decision.label,
            proposal=decision.label,
        )
        return Decision(str(answer), decision.confidence, decision.scores, escalated=True)


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """A tool call the model proposed (the child's twin of ``edgeos.routing.replies.ToolCall``)."""

    name: str
    arguments: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ChatReply:
    """A generative call's answer (the child's twin of ``edgeos.routing.replies.ChatReply``)."""

    text: str
    parsed: Any = None
    tool_calls: tuple[ToolCall, ...] = ()


class LLMHandle:
    """``ctx.llm(name)`` in a worker: the node routes, journals and checks each call."""

    def __init__(self, ctx: StepContext, name: str) -> None:
        self._ctx = ctx
        self.name = name

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        schema: Mapping[str, Any] | None = None,
        tools: Sequence[str] = (),
        max_tokens: int | None = None,
        temperature: float = 0.0,
        seed: int | None = None,
        privacy: str | None = None,
        slo_ms: float | None = None,
        parallel_tool_calls: bool = True,
    ) -> ChatReply:
        """Generate an answer to ``messages`` (see the node's ``ctx.llm``)."""
        answer = self._ctx._parent.ask(
            "chat", model=self.name, messages=plain(list(messages)), schema=plain(schema),
            tools=list(tools), max_tokens=max_tokens, temperature=temperature, seed=seed,
            privacy=privacy, slo_ms=slo_ms, parallel_tool_calls=parallel_tool_calls,
        )  # fmt: skip
        calls = tuple(ToolCall(c["name"], c["arguments"]) for c in answer["tool_calls"])
        return ChatReply(answer["text"], answer["parsed"], calls)


@dataclasses.dataclass(frozen=True)
class MemoryRecord:
    """A recalled record (the child's twin of ``edgeos.memory.store.MemoryRecord``)."""

    id: str
    text: str
    metadata: dict[str, Any]
    subject: str | None
    importance: float
    created_at: float
    expires_at: float | None
    similarity: float = 0.0
    score: float = 0.0


class Memory:
    """``ctx.memory`` in a worker: the node's memory, each call answered by the parent
    (which embeds, checks and buffers the writes with the step, as in a thread)."""

    def __init__(self, parent: _Parent) -> None:
        self._parent = parent

    def remember(
        self,
        text: str,
        metadata: Mapping[str, Any] | None = None,
        *,
        subject: str | None = None,
        ttl: float | str | None = None,
        importance: float = 0.5,
        vector: Sequence[float] | None = None,
    ) -> str:
        """Keep ``text`` for later recall; returns its id (written when the step commits)."""
        args = {"text": text, "metadata": metadata, "subject": subject, "ttl": ttl,
                "importance": importance, "vector": vector}  # fmt: skip
        return str(self._parent.ask("memory", op="remember", args=plain(args))["id"])

    def recall(
        self, query: str | Sequence[float], k: int = 5, *, where: Mapping[str, Any] | None = None
    ) -> list[MemoryRecord]:
        """The ``k`` records that best match ``query``, filtered by ``where`` first."""
        args = plain({"query": query, "k": k, "where": where})
        answer = self._parent.ask("memory", op="recall", args=args)
        return [MemoryRecord(**r) for r in answer["records"]]

    def forget(self, *, subject: str | None = None, id: str | None = None) -> None:
        """Erase records about ``subject``, or the record ``id``, when the step commits."""
        self._parent.ask("memory", op="forget", args={"subject": subject, "id": id})


@dataclasses.dataclass(frozen=True)
class Turn:
    """A turn of the run's conversation (the twin of ``edgeos.memory.context.Turn``)."""

    role: str
    text: str
    at: float


_ABSENT = object()


class RunScratch:
    """``ctx.context`` in a worker: the run's short-term context, kept by the parent."""

    def __init__(self, parent: _Parent) -> None:
        self._parent = parent

    def get(self, key: str, default: Any = None) -> Any:
        """The value under ``key``, or ``default``."""
        answer = self._parent.ask("context", op="get", key=key)
        return answer["value"] if answer.get("found") else default

    def set(self, key: str, value: Any) -> None:
        """Keep a JSON value under ``key`` for the rest of the run."""
        self._parent.ask("context", op="set", key=key, value=plain(value))

    def delete(self, key: str) -> None:
        """Drop ``key``."""
        self._parent.ask("context", op="delete", key=key)

    def keys(self) -> list[str]:
        """Every key, sorted."""
        return [str(k) for k in self._parent.ask("context", op="keys")["keys"]]

    def __getitem__(self, key: str) -> Any:
        value = self.get(key, _ABSENT)
        if value is _ABSENT:
            raise KeyError(key)
        return value

    def __setitem__(self, key: str, value: Any) -> None:
        self.set(key, value)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self.keys()

    def turns(self, last: int | None = None) -> list[Turn]:
        """The conversation so far, oldest first."""
        answer = self._parent.ask("context", op="turns", last=last)
        return [Turn(str(r), str(t), float(a)) for r, t, a in answer["turns"]]

    def add_turn(self, role: str, text: str) -> None:
        """Append a turn at the step's time."""
        self._parent.ask("context", op="add_turn", role=role, text=text)


class StepContext:
    """The ``ctx`` a step function receives in a worker: the node's ``RunContext`` API.

    Time and chance are the parent's (its ``now`` and the state of its seeded generator
    come with the request, so a run draws the same numbers in a worker as in a thread).
    Effects and escalations are kept here and sent back with the step's outcome; model
    calls go to the parent, which makes them through its own ``ctx`` (rate limits, cost
    budgets and the journal's record of model calls stay the node's).
    """

    def __init__(self, context: Mapping[str, Any], parent: _Parent) -> None:
        self.run_id: str = context["run_id"]
        self.agent: str = context["agent"]
        self.step: str = context["step"]
        self.step_index: int = context["step_index"]
        self.attempt: int = context["attempt"]
        self.manifest: Any = _namespace(context["manifest"])
        self._now = float(context["now"])
        version, internal, gauss = context["random_state"]
        self._rng = random.Random()
        self._rng.setstate((version, tuple(internal), gauss))
        self._answers: Mapping[str, Any] = context["answers"]
        self._parent = parent
        self.effects: list[dict[str, Any]] = []
        self.escalations: list[str] = []
        #: The agent's long-term memory and the run's short-term context, kept by the node.
        self.memory = Memory(parent)
        self.context = RunScratch(parent)

    def now(self) -> float:
        """The step's time (Unix seconds): fixed for the step, journaled, replayed."""
        return self._now

    def random(self) -> random.Random:
        """The step's random generator, seeded by the run and the step."""
        return self._rng

    def model(self, name: str) -> ModelHandle:
        """A registered model the manifest lists under ``models``."""
        if name not in self.manifest.models:
            raise StepError(
                f"agent '{self.agent}' step '{self.step}' called model {name!r}, which its "
                f"agent.yaml does not list under models"
            )
        return ModelHandle(self, name)

    def llm(self, name: str) -> LLMHandle:
        """A generative model (the node checks the manifest lists it)."""
        return LLMHandle(self, name)

    def infer(
        self,
        model: str,
        inputs: Mapping[str, Any],
        *,
        privacy: str | None = None,
        slo_ms: float | None = None,
        min_quality: float | None = None,
        cascade: float | None = None,
        fallback: str | None = None,
    ) -> dict[str, Any]:
        """Run ``model`` where edgeos decides (the node's router decides and journals it)."""
        answer = self._parent.ask(
            "route",
            model=model,
            inputs={str(k): encode_tensor(v) for k, v in inputs.items()},
            needs={"privacy": privacy, "slo_ms": slo_ms, "min_quality": min_quality,
                   "cascade": cascade, "fallback": fallback},
        )  # fmt: skip
        return {name: decode_tensor(t) for name, t in answer["outputs"].items()}

    def effect(self, target: str, payload: Mapping[str, Any]) -> str:
        """Ask for an effect ``"connector.operation"``; returns its idempotency key."""
        connector, _, operation = target.partition(".")
        if not connector or not operation:
            raise StepError(f"effect target {target!r} must be 'connector.operation'")
        if connector not in self.manifest.connectors:
            raise StepError(
                f"agent '{self.agent}' step '{self.step}' asked for an effect through "
                f"connector {connector!r}, which its agent.yaml does not list under connectors"
            )
        # The same key the parent gives it when it records the effect after the step.
        key = f"{self.run_id}:{self.step_index}:{len(self.effects)}"
        self.effects.append({"target": target, "payload": plain(payload)})
        return key

    def escalate(
        self,
        question: str,
        options: Sequence[Any],
        *,
        default: Any,
        proposal: Any = None,
        timeout: float | None = None,
    ) -> Any:
        """Ask a person; the run parks until an answer comes or ``timeout`` applies ``default``."""
        escalation_id = f"{self.run_id}:{self.step_index}:{len(self.escalations)}"
        self.escalations.append(escalation_id)
        if escalation_id in self._answers:
            return self._answers[escalation_id]
        if default not in options:
            raise StepError(f"escalation default {default!r} is not one of the options")
        raise EscalationPending(
            {
                "id": escalation_id,
                "question": question,
                "options": plain(list(options)),
                "default": plain(default),
                "proposal": plain(proposal),
                "timeout": float(
                    timeout if timeout is not None else self.manifest.escalation.timeout
                ),
            }
        )


def run_step(
    module: ModuleType, request: dict[str, Any], cpu_seconds: int, parent: _Parent
) -> dict[str, Any]:
    """Run ``module.step(ctx, data)``; the reply says how the step ended.

    ``{"ok": {...}}`` holds ``escalations`` (the ids asked, in order) and one of
    ``"return": value`` (with ``effects``: ``[{"target", "payload"}]``), ``"goto": step``
    with ``"data"`` (and ``effects``), or ``"pending": {id, question, options, default,
    proposal, timeout}`` when the step asked a person who has not answered yet.
    """
    name = request["step"]
    function = getattr(module, name, None) if isinstance(name, str) else None
    if not callable(function):
        return {"missing": name}
    ctx = StepContext(request["context"], parent)
    arm_cpu(cpu_seconds)
    try:
        result = function(ctx, request.get("data"))
    except EscalationPending as pending:
        return {"ok": {"pending": pending.fields, "escalations": ctx.escalations}}
    except MemoryError:
        raise  # not the step's error to report: the process is spent (see main)
    except Exception as exc:
        # Start the traceback at the step function: this frame is edgeos, not the agent.
        tb = exc.__traceback__
        return _error(exc, tb.tb_next if tb is not None and tb.tb_next is not None else tb)
    goto = _goto(result)
    outcome: dict[str, Any] = (
        {"goto": goto[0], "data": plain(goto[1])} if goto else {"return": plain(result)}
    )
    outcome["effects"] = ctx.effects
    outcome["escalations"] = ctx.escalations
    try:
        json.dumps(outcome)
    except (TypeError, ValueError) as exc:
        return _error(TypeError(f"{name} returned (or asked for an effect with) non-JSON: {exc}"))
    return {"ok": outcome}


def _goto(result: Any) -> tuple[str, Any] | None:
    """``(step, data)`` if the step returned a ``Goto``.

    A module can only build a Goto by importing ``edgeos.agents.context``; if it has not,
    the result is not one, and edgeos stays unimported here.
    """
    context = sys.modules.get("edgeos.agents.context")
    goto: Any = getattr(context, "Goto", None)
    if goto is not None and isinstance(result, goto):
        return str(result.step), result.data
    return None


def _namespace(value: Any) -> Any:
    """The manifest's JSON form with attribute access (``ctx.manifest.budgets.max_steps``)."""
    if isinstance(value, dict):
        return SimpleNamespace(**{k: _namespace(v) for k, v in value.items()})
    if isinstance(value, list):
        return [_namespace(v) for v in value]
    return value


def _is_numpy(value: Any) -> bool:
    return type(value).__module__ == "numpy" and hasattr(value, "tolist")


def plain(value: Any) -> Any:
    """JSON-ready copy of a value, as the node would store it.

    numpy arrays and scalars become Python values (as ``edgeos.agents.context.plain`` does);
    dataclasses, dates, enums and UUIDs become what the node's JSON writer (orjson) makes
    of them, so a result looks the same whether its step ran in a thread or here.
    """
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if _is_numpy(value):
        return value.tolist()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return plain(value.value)
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def encode_tensor(value: Any) -> dict[str, Any]:
    """An array as ``{"dtype", "shape", "data"}``; anything else as ``{"value": ...}``.

    Non-arrays cross as they are so the model host converts them to the model's dtype, as
    it does for a step in a thread (a list of floats must not arrive as float64).
    """
    if _is_numpy(value) and hasattr(value, "dtype"):
        return {
            "dtype": str(value.dtype),
            "shape": list(getattr(value, "shape", ())),
            "data": value.tolist(),
        }
    return {"value": plain(value)}


def decode_tensor(tensor: Mapping[str, Any]) -> Any:
    """The inverse of :func:`encode_tensor`."""
    if "value" in tensor:
        return tensor["value"]
    import numpy as np  # only steps that call models pay for it; they have it already

    return np.asarray(tensor["data"], dtype=tensor["dtype"]).reshape(tensor["shape"])


# -- the loop ----------------------------------------------------------------------------


def _run(module: ModuleType, request: dict[str, Any], cpu_seconds: int) -> dict[str, Any]:
    name = request["function"]
    function = getattr(module, name, None) if isinstance(name, str) else None
    if not callable(function):
        return {"missing": name}
    arm_cpu(cpu_seconds)
    try:
        result = function(request["payload"])
    except MemoryError:
        raise  # not the step's error to report: the process is spent (see main)
    except Exception as exc:
        return _error(exc)
    if not isinstance(result, dict):
        problem = TypeError(
            f"{name} must return a dict (a JSON object), got {type(result).__name__}"
        )
        return _error(problem)
    try:
        json.dumps(result)
    except (TypeError, ValueError) as exc:
        return _error(TypeError(f"{name} returned a dict that is not JSON: {exc}"))
    return {"ok": result}


def serve(module_path: Path, memory_mb: int, cpu_seconds: int) -> int:
    """Set the limits, import the module, answer requests until stdin closes."""
    limit_memory(memory_mb)
    # Crashes by signal (SIGXCPU, SIGSEGV) would otherwise leave core files behind.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    # Keep private copies of the protocol pipes, then point fds 0 and 1 elsewhere: a step
    # that prints (or reads stdin) must not corrupt the conversation with the parent.
    parent = _Parent(os.fdopen(os.dup(0), "rb"), os.fdopen(os.dup(1), "wb"))
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)

    try:
        module = _load(module_path)
    except MemoryError:
        raise
    except BaseException as exc:  # SyntaxError, SystemExit in module code, ...
        parent.send(_error(exc))
        return EXIT_IMPORT
    parent.send({"ready": os.getpid()})

    while line := parent.requests.readline():
        try:
            request = json.loads(line)
            if not isinstance(request, dict) or not ("function" in request or "step" in request):
                raise ValueError("not a request object")
        except ValueError as exc:
            print(f"edgeos worker: bad request from the parent: {exc}", file=sys.stderr)
            return EXIT_PROTOCOL
        if "step" in request:
            parent.send(run_step(module, request, cpu_seconds, parent))
        else:
            parent.send(_run(module, request, cpu_seconds))
    return 0


def main(argv: list[str]) -> int:
    """Entry point: ``MODULE_PATH MEMORY_MB CPU_SECONDS``."""
    try:
        module_path, memory_mb, cpu_seconds = Path(argv[0]), int(argv[1]), int(argv[2])
    except (IndexError, ValueError):
        print("usage: _worker.py MODULE_PATH MEMORY_MB CPU_SECONDS", file=sys.stderr)
        return EXIT_PROTOCOL
    try:
        return serve(module_path, memory_mb, cpu_seconds)
    except MemoryError:
        # os.write and os._exit allocate (almost) nothing, unlike print and sys.exit.
        os.write(2, b"edgeos worker: MemoryError (memory limit reached)\n")
        os._exit(EXIT_MEMORY)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

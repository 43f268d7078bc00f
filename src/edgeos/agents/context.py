"""What a step function sees: ``ctx``, its one door to models, effects, people, time and chance.

Everything a step learns from the world goes through ``ctx`` so that a run can be resumed
and replayed: time and randomness are fixed per step and journaled, effects are buffered
and written to the outbox only when the step completes, and a question to a person parks
the run until it is answered.
"""

from __future__ import annotations

import random as _random
import sys
import time as _time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edgeos.errors import EdgeOSError

if TYPE_CHECKING:
    import sqlite3

    from edgeos.connectors.contracts import Contract
    from edgeos.manifests.agent import AgentManifest
    from edgeos.memory.context import RunScratch
    from edgeos.memory.handle import AgentMemory
    from edgeos.routing.decide import Needs
    from edgeos.routing.deferral import DeferredCall
    from edgeos.routing.replies import ChatReply
    from edgeos.routing.router import Router
    from edgeos.runtime import ModelHost
    from edgeos.state import Database


class StepError(EdgeOSError):
    """A step used ``ctx`` in a way its manifest does not allow."""


@dataclass(frozen=True)
class Goto:
    """Return ``Goto("sense", data)`` from a step to continue at another step (a loop)."""

    step: str
    data: Any = None


@dataclass(frozen=True)
class Effect:
    """An effect a step decided; delivered after the step commits."""

    key: str
    connector: str
    operation: str
    payload: dict[str, Any]
    #: The payload as the journal holds it: personal fields of the binding's contract
    #: pseudonymised (the outbox keeps ``payload``, which is what is delivered).
    journaled: dict[str, Any]


@dataclass(frozen=True)
class ModelCall:
    """One model call made by a step, for the journal and the cost accounts."""

    model: str
    version: str
    latency_ms: float
    cost: float
    #: When the call returned (wall clock, not the step's fixed time): for its trace span.
    at: float = 0.0
    #: Where ``ctx.infer`` decided to run it (the router's record), for its trace span.
    venue: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Decision:
    """A classifier's answer: the label, how sure it is, and every class score."""

    label: str
    confidence: float
    scores: dict[str, float]
    escalated: bool = False


class EscalationPending(Exception):  # control flow, not an error: not an EdgeOSError
    """Raised inside ``ctx.escalate`` when nobody has answered yet: the run parks."""

    def __init__(
        self,
        escalation_id: str,
        question: str,
        options: list[Any],
        default: Any,
        proposal: Any,
        timeout: float,
    ) -> None:
        super().__init__(question)
        self.escalation_id = escalation_id
        self.question = question
        self.options = options
        self.default = default
        self.proposal = proposal
        self.timeout = timeout


@dataclass(frozen=True)
class Observation:
    """What a classifier saw and how sure it was: the raw material of drift detection."""

    model: str
    confidence: float
    inputs: bytes  # float32 values of the first input, flattened


@dataclass
class StepRecord:
    """What a step did through ``ctx``, collected for its journal record."""

    effects: list[Effect] = field(default_factory=list)
    model_calls: list[ModelCall] = field(default_factory=list)
    escalations: list[str] = field(default_factory=list)
    throttled_s: float = 0.0
    observations: list[Observation] = field(default_factory=list)
    feedback: list[dict[str, Any]] = field(default_factory=list)
    #: ``ctx.infer``'s venue decisions, with their outputs, for ``venue_decided`` records.
    venue_decisions: list[dict[str, Any]] = field(default_factory=list)
    #: Buffered database writes (memory, run context), applied in the step's commit.
    writes: list[Callable[[sqlite3.Connection, float], Any]] = field(default_factory=list)

    @property
    def cost(self) -> float:
        """Cost of the step's model calls."""
        return sum(c.cost for c in self.model_calls)


class ModelHandle:
    """``ctx.model(name)``: calls to one registered model."""

    def __init__(self, ctx: RunContext, name: str) -> None:
        self._ctx = ctx
        self.name = name

    def infer(self, inputs: Mapping[str, Any], *, version: str | None = None) -> dict[str, Any]:
        """Run the model; returns its outputs by name."""
        return self._ctx._infer(self.name, inputs, version)

    def classify(
        self,
        inputs: Mapping[str, Any],
        *,
        question: str | None = None,
        default: str | None = None,
        routed: bool = False,
    ) -> Decision:
        """Run a classifier on one example and name the winning label.

        When the agent's ``escalation.confidence_threshold`` is set and the model is less
        sure than that, a person is asked to choose (the model's label is the proposal).
        ``routed`` runs it where edgeos decides, under the agent's ``routing`` needs (as
        ``ctx.infer``), instead of on this node's host.
        """
        import numpy as np  # a model just ran, so numpy is loaded already

        outputs = self._ctx.infer(self.name, inputs) if routed else self.infer(inputs)
        scores = np.asarray(next(iter(outputs.values())), dtype=np.float64).reshape(-1)
        first = np.asarray(next(iter(inputs.values())), dtype=np.float32).reshape(-1)
        labels = self._ctx._labels(self.name) or [str(i) for i in range(scores.size)]
        best = int(np.argmax(scores))
        decision = Decision(
            labels[best], float(scores[best]), dict(zip(labels, map(float, scores), strict=False))
        )
        self._ctx.record.observations.append(
            Observation(self.name, decision.confidence, first.tobytes())
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


class LLMHandle:
    """``ctx.llm(name)``: generative calls to one model, wherever edgeos decides to run them."""

    def __init__(self, ctx: RunContext, name: str) -> None:
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
        """Generate an answer to OpenAI-style ``messages``.

        ``schema`` (a JSON Schema) holds the answer to it: ``reply.parsed`` is the parsed,
        validated value. ``tools`` names contract operations (``"messaging.send"``) the
        model may call, with their input schemas as parameters; each call it makes (several
        in one answer unless ``parallel_tool_calls`` is False) comes back in
        ``reply.tool_calls`` as a proposal the step may emit with
        ``ctx.effect(call.name, call.arguments)``, which checks it at the contract's
        boundary: each its own effect, delivered once. The call is routed like
        ``ctx.infer`` (the agent.yaml's ``routing`` gives the defaults), journaled with its
        prompt and output digests, tokens, latency, cost and venue, and served from the
        journal on replay.
        """
        return self._ctx._chat(
            self.name, messages, schema=schema, tools=tools, max_tokens=max_tokens,
            temperature=temperature, seed=seed, privacy=privacy, slo_ms=slo_ms,
            parallel=parallel_tool_calls,
        )  # fmt: skip


class RunContext:
    """The ``ctx`` a step function receives."""

    def __init__(
        self,
        *,
        run_id: str,
        manifest: AgentManifest,
        step: str,
        step_index: int,
        attempt: int,
        now: float,
        seed: int,
        answers: Mapping[str, Any],
        host: ModelHost | None,
        before_model_call: Callable[[str, float], float] | None = None,
        contracts: Mapping[str, Contract] | None = None,
        db: Database | None = None,
        memory: AgentMemory | None = None,
        router: Router | None = None,
        routed: list[dict[str, Any]] | None = None,
    ) -> None:
        self.run_id = run_id
        self.manifest = manifest
        self.agent = manifest.name
        self.step = step
        self.step_index = step_index
        self.attempt = attempt
        self._now = now
        self._seed = seed
        self._rng: _random.Random | None = None  # made when asked for: seeding is not free
        self._answers = answers
        self._host = host
        self._before_model_call = before_model_call
        self._contracts = contracts or {}
        self._db = db
        # Given: replay's, which serves what the run recalled and writes nothing.
        self._memory: AgentMemory | None = memory
        self._context: RunScratch | None = None
        self._router = router
        # Given: replay's journaled venue decisions of this step, served instead of calls.
        self._routed = None if routed is None else list(routed)
        self.record = StepRecord()

    def now(self) -> float:
        """The step's time (Unix seconds): fixed for the step, journaled, replayed."""
        return self._now

    def random(self) -> _random.Random:
        """The step's random generator, seeded by the run and the step."""
        if self._rng is None:
            self._rng = _random.Random(f"{self._seed}:{self.step_index}")
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
        """A generative model the manifest lists under ``models`` or ``routing.models``."""
        self._routable(name, "ctx.llm")
        return LLMHandle(self, name)

    def _routable(self, model: str, call: str) -> None:
        if model not in self.manifest.models and model not in self.manifest.routing.models:
            raise StepError(
                f"agent '{self.agent}' step '{self.step}' {call} model {model!r}, which its "
                f"agent.yaml lists neither under models nor under routing.models"
            )

    def _chat(
        self,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        *,
        schema: Mapping[str, Any] | None,
        tools: Sequence[str],
        max_tokens: int | None,
        temperature: float,
        seed: int | None,
        privacy: str | None,
        slo_ms: float | None,
        parallel: bool = True,
    ) -> ChatReply:
        from edgeos.errors import ConfigError
        from edgeos.routing.chat import ChatRequest, route_chat
        from edgeos.routing.decide import CallDeferred, Needs
        from edgeos.routing.replies import ReplyError, answer_schema, read_reply
        from edgeos.state.journal import digest

        where = f"agent '{self.agent}' step '{self.step}' ctx.llm({model!r}).chat"
        # Replay has no bindings: the tools' schemas are the ones the journal says were offered.
        journaled = (self._routed[0] if self._routed else {}) if self._routed is not None else None
        offered = {target: self._tool_schema(target, where, journaled) for target in tools}
        routing = self.manifest.routing
        try:
            wanted = answer_schema(schema, offered, parallel=parallel)
            needs = Needs(privacy or routing.privacy, routing.slo_ms if slo_ms is None else slo_ms,
                          routing.min_quality, None, routing.offline.fallback)  # fmt: skip
            request = ChatRequest(tuple(plain(list(messages))), max_tokens, temperature, seed,
                                  wanted)  # fmt: skip
        except (ReplyError, ConfigError) as exc:
            raise StepError(f"{where}: {exc}") from None
        prompt_digest = digest([request.messages, wanted, max_tokens, temperature, seed])
        if self._routed is not None and journaled is not None:
            if journaled.get("model") != model or journaled.get("prompt_digest") != prompt_digest:
                raise StepError(f"step '{self.step}' now asks {model!r} what the journal lacks")
            self._routed.pop(0)
            text = str(journaled["text"])
        else:
            router, before_call, call_key, waited = self._routed_call("ctx.llm")
            if waited is not None and waited.state == "defaulted":
                raise StepError(f"{where}: waited for {', '.join(waited.awaiting)} until the "
                                "deadline; a generative call has no default")  # fmt: skip
            try:
                routed = route_chat(router, self.agent, model, request, needs,
                                    before_call=before_call)  # fmt: skip
            except CallDeferred as deferred:
                deferred.call = call_key
                deferred.wait_s = routing.offline.wait
                raise
            text = routed.answer.text
            self.record.model_calls.append(ModelCall(
                routed.model, str(routed.record["version"]), routed.latency_ms, routed.cost,
                _time.time(), venue=routed.record,
            ))  # fmt: skip
            self.record.venue_decisions.append({
                **routed.record, "prompt_digest": prompt_digest, "output_digest": digest(text),
                "text": _journaled_answer(text, schema, offered), "tools": offered,
            })  # fmt: skip
        try:
            return read_reply(text, wanted if schema is not None else None, offered,
                              validate=journaled is None, parallel=parallel)  # fmt: skip
        except ReplyError as exc:
            raise StepError(f"{where}: {exc}") from None

    def _tool_schema(
        self, target: str, where: str, journaled: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        """A tool is a contract operation of a connector the agent may use: its input schema."""
        connector, _, operation = target.partition(".")
        if connector not in self.manifest.connectors:
            raise StepError(
                f"{where}: tool {target!r} goes through connector {connector!r}, which the "
                "agent.yaml does not list under connectors"
            )
        contract = self._contracts.get(connector)
        schema = None if contract is None else contract.schema_of(operation)
        if schema is None and journaled is not None:
            schema = journaled.get("tools", {}).get(target)
        if schema is None:
            raise StepError(
                f"{where}: tool {target!r} is no operation with an input schema of a contract "
                f"that connector {connector!r} implements"
            )
        return schema

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
        """Run ``model`` where edgeos decides: on the device or a venue off it.

        The agent.yaml's ``routing`` section gives the defaults (privacy class of the
        data, latency SLO, quality floor, cascade threshold, what to do offline); see
        :mod:`edgeos.routing`. The decision, its reasons and alternatives are journaled
        with the step; replay returns the journaled outputs instead of calling again. A
        call that must wait for an offline venue parks the run (``waiting_venue``); the
        step runs again when the venue is back, or gets ``routing.offline.default``.
        """
        from edgeos.agents._worker import decode_tensor, encode_tensor
        from edgeos.errors import ConfigError
        from edgeos.routing.decide import CallDeferred, Needs

        routing = self.manifest.routing
        self._routable(model, "called")
        try:
            needs = Needs(
                privacy or routing.privacy,
                routing.slo_ms if slo_ms is None else slo_ms,
                routing.min_quality if min_quality is None else min_quality,
                routing.cascade if cascade is None else cascade,
                routing.offline.fallback if fallback is None else fallback,
            )
        except ConfigError as exc:
            raise StepError(f"agent '{self.agent}' step '{self.step}' ctx.infer: {exc}") from None
        if self._routed is not None:
            if not self._routed or self._routed[0].get("model") != model:
                raise StepError(f"step '{self.step}' now calls {model!r}, which the journal lacks")
            journaled = self._routed.pop(0)
            return {k: decode_tensor(t) for k, t in journaled["outputs"].items()}
        router, before_call, call_key, waited = self._routed_call("ctx.infer")
        if waited is not None and waited.state == "defaulted":
            return self._defaulted(model, needs, waited.awaiting, waited.default)
        try:
            routed = router.route(self.agent, model, inputs, needs, before_call=before_call)
        except CallDeferred as deferred:
            deferred.call = call_key
            deferred.wait_s = routing.offline.wait
            deferred.default = routing.offline.default
            raise
        call = ModelCall(
            routed.model, routed.version, routed.latency_ms, routed.cost, _time.time(),
            venue=routed.record,
        )  # fmt: skip
        self.record.model_calls.append(call)
        outputs = {k: encode_tensor(v) for k, v in routed.outputs.items()}
        self.record.venue_decisions.append({**routed.record, "outputs": outputs})
        return routed.outputs

    def _routed_call(
        self, call: str
    ) -> tuple[Router, Callable[[str, float], None], str, DeferredCall | None]:
        """What the next routed call of the step (``ctx.infer`` or ``ctx.llm``) needs: the
        router, the before-call hook (the supervisor's throttle and budgets, its wait added
        to the step's), the call's key (the same on every attempt of the step) and, when
        an earlier attempt waited for a venue, its deferred call."""
        from edgeos.routing.deferral import call_id, deferred_call

        if self._router is None:
            raise StepError(f"this node has no router for {call}")

        def before_call(name: str, cost: float) -> None:
            if self._before_model_call is not None:
                self.record.throttled_s += self._before_model_call(name, cost)

        key = call_id(self.run_id, self.step_index, len(self.record.venue_decisions))
        waited = None if self._db is None else deferred_call(self._db, key)
        return self._router, before_call, key, waited

    def _defaulted(
        self, model: str, needs: Needs, awaiting: list[str], default: dict[str, Any] | None
    ) -> dict[str, Any]:
        """A deferred call's deadline passed: its declared default, journaled as its decision."""
        import numpy as np

        from edgeos.agents._worker import encode_tensor
        from edgeos.routing.stats import DEFAULTED

        if default is None:
            raise StepError(
                f"agent '{self.agent}' step '{self.step}': {model} waited for "
                f"{', '.join(awaiting)} until its deadline, and agent.yaml declares no "
                "routing.offline.default"
            )
        self.record.venue_decisions.append({
            "model": model, "privacy": needs.privacy, "slo_ms": needs.slo_ms,
            "min_quality": needs.min_quality, "cascade": needs.cascade, "venue": DEFAULTED,
            "venue_model": model, "version": "", "expected_ms": None, "latency_ms": 0.0,
            "cost": 0.0, "all_cloud_cost": 0.0, "alternatives": [],
            "reasons": [f"waited for {', '.join(awaiting)} until the deadline: the declared "
                        "default applies"],
            "outputs": {name: encode_tensor(np.asarray(v)) for name, v in default.items()},
        })  # fmt: skip
        return {name: np.asarray(value) for name, value in default.items()}

    @property
    def memory(self) -> AgentMemory:
        """The agent's long-term memory: ``remember``, ``recall`` and ``forget`` by meaning
        (see :mod:`edgeos.memory`). Writes commit with the step."""
        if self._memory is None:
            from edgeos.memory.handle import AgentMemory

            if self._db is None:
                raise StepError(f"step '{self.step}' has no node database for ctx.memory")
            memory = AgentMemory(
                self._db, self._host, self.agent, self.manifest.memory,
                infer=lambda name, inputs: self._infer(name, inputs, None),
                now=self._now, run_id=self.run_id, step=self.step, step_index=self.step_index,
                error=StepError,
            )  # fmt: skip
            self.record.writes.append(memory.apply)
            self._memory = memory
        return self._memory

    @property
    def context(self) -> RunScratch:
        """The run's short-term context: scratch values and conversational turns, kept
        from step to step and purged when the run finishes."""
        if self._context is None:
            from edgeos.memory.context import RunScratch

            scratch = RunScratch(self._db, self.run_id, now=self._now, error=StepError)
            self.record.writes.append(scratch.apply)
            self._context = scratch
        return self._context

    def effect(self, target: str, payload: Mapping[str, Any]) -> str:
        """Ask for an effect ``"connector.operation"``; returns its idempotency key.

        Nothing happens now: the effect is written to the outbox with the step's journal
        record and delivered after the step commits, exactly once in effect. When the
        binding implements a contract, the payload is checked against the operation's
        input schema first: a violation is a StepError (the step fails, not retried); the
        journal's copy of the payload has the fields the contract marks personal
        pseudonymised.
        """
        connector, _, operation = target.partition(".")
        if not connector or not operation:
            raise StepError(f"effect target {target!r} must be 'connector.operation'")
        if connector not in self.manifest.connectors:
            raise StepError(
                f"agent '{self.agent}' step '{self.step}' asked for an effect through "
                f"connector {connector!r}, which its agent.yaml does not list under connectors"
            )
        value = plain(payload)
        journaled = value
        contract = self._contracts.get(connector)
        if contract is not None:
            from edgeos.connectors.contracts import ContractError

            try:
                contract.check(operation, value)
            except ContractError as exc:
                raise StepError(f"effect {target!r}: {exc}") from None
            journaled = contract.redact(operation, value)
        key = f"{self.run_id}:{self.step_index}:{len(self.record.effects)}"
        self.record.effects.append(Effect(key, connector, operation, value, journaled))
        return key

    def feedback(self, decision: Any, outcome: Any = None) -> None:
        """Record a decision and, when known, its outcome, for the agent's training set.

        Written with the step; people's corrections to escalations are added by themselves.
        """
        self.record.feedback.append({"decision": plain(decision), "outcome": plain(outcome)})

    def escalate(
        self,
        question: str,
        options: Sequence[Any],
        *,
        default: Any,
        proposal: Any = None,
        timeout: float | None = None,
    ) -> Any:
        """Ask a person; the run parks until an answer comes or ``timeout`` applies ``default``.

        The step is run again from its start once answered, and this call then returns the
        answer, so code before it must not depend on anything but ``ctx`` and its input.
        """
        escalation_id = f"{self.run_id}:{self.step_index}:{len(self.record.escalations)}"
        self.record.escalations.append(escalation_id)
        if escalation_id in self._answers:
            return self._answers[escalation_id]
        if default not in options:
            raise StepError(f"escalation default {default!r} is not one of the options")
        raise EscalationPending(
            escalation_id,
            question,
            list(options),
            default,
            proposal,
            timeout if timeout is not None else self.manifest.escalation.timeout,
        )

    # -- used by ModelHandle ------------------------------------------------------------
    def _infer(self, name: str, inputs: Mapping[str, Any], version: str | None) -> dict[str, Any]:
        if self._host is None:
            raise StepError("this node has no model host")
        manifest = self._host.resolve(name, version)
        if self._before_model_call is not None:
            self.record.throttled_s += self._before_model_call(name, manifest.cost_per_call)
        result = self._host.infer(name, inputs, version=version)
        self.record.model_calls.append(
            ModelCall(
                name, result.version, result.latency_s * 1000, manifest.cost_per_call, _time.time()
            )
        )
        return result.outputs

    def _labels(self, name: str) -> list[str]:
        if self._host is None:
            return []
        return list(self._host.resolve(name).labels)


def plain(value: Any) -> Any:
    """JSON-ready copy of a payload (numpy scalars and arrays become Python values)."""
    # Exact types first: most leaves are these, and a Mapping check is slow (it runs for
    # every value of every step's output, in the writer's commit).
    kind = type(value)
    if kind is str or kind is int or kind is float or kind is bool or value is None:
        return value
    if kind is dict or isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if kind is list or isinstance(value, list | tuple):
        return [plain(v) for v in value]
    # Until something has imported numpy no value can be a numpy array, and plain() must
    # not import it: it runs on every step's output, models or not.
    np = sys.modules.get("numpy")
    if np is not None:
        if isinstance(value, np.ndarray):
            return value.tolist()
        if isinstance(value, np.generic):
            return value.item()
    return value


def _journaled_answer(
    text: str, schema: Mapping[str, Any] | None, tools: Mapping[str, Mapping[str, Any]]
) -> str:
    """The answer as the journal keeps it: fields its schema, or the called tool's
    parameters, mark ``x-personal`` replaced by their pseudonyms (the outbox keeps the
    values an effect delivers; the journal never holds them in clear)."""
    import json

    from edgeos.connectors.personal import redact

    try:
        value = json.loads(text)
    except ValueError:
        return text  # not JSON: read_reply refuses it, nothing personal to find

    def call(value: Any) -> Any:
        if not isinstance(value, dict) or value.get("name") not in tools:
            return value
        return {**value, "arguments": redact(dict(tools[value["name"]]), value.get("arguments"))}

    if schema is not None:
        kept = redact(dict(schema), value)
    elif tools:
        kept = [call(v) for v in value] if isinstance(value, list) else call(value)
    else:
        return text
    return text if kept == value else json.dumps(kept)

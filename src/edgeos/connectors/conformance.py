"""The conformance suite: what every connector owes the contract it is bound to.

Built-in connectors and plugins are held to the same checks, run against a live service.
A :class:`Subject` describes one binding under test: its contract and operation, a
payload the contract accepts and one it refuses, how to build a connector to the live
service and to the same kind of service when it is down (and, optionally, when it takes
the call and never answers), and how to count what the service applied. The checks:

``input_refused_before_io``
    A payload that breaks the input schema is refused with a permanent
    :class:`~edgeos.connectors.boundary.ContractViolation` naming contract, operation and
    field, and the connector is never called: nothing reaches the service.
``delivers``
    A valid effect is delivered once, its result is small JSON that the contract's output
    schema accepts.
``same_key_applies_once``
    Delivering one key twice applies it once, where the contract says the operation is
    idempotent or the connector says its target deduplicates by key (skipped otherwise).
``output_validated``
    Against a contract whose output schema the result cannot meet, the delivery fails
    (retryable, ``maybe_applied``, naming contract, operation and field): never accepted.
``unknown_operation``
    An operation the binding does not have is a permanent error.
``down_is_retryable``
    A service that is down is a retryable DeliveryError naming binding and operation,
    promptly, and not ``maybe_applied`` (nothing was sent).
``timeout_honoured``
    A service that never answers is given up on within the contract's timeout, with a
    retryable DeliveryError: the connector does not block the event loop.
``close_is_safe``
    ``close`` before use, after use and twice is harmless.

Every error a connector raises must be a :class:`~edgeos.connectors.base.DeliveryError`
(an ``EdgeOSError``); anything else fails the check it happened in.

The sense side has checks of its own, against a :class:`SourceSubject`: an event source
(:class:`~edgeos.connectors.events.Source`) bound to a contract's event and to a live
service that can be made to produce something (a message, a file, a row), a way to wait
until a started source listens, and the same source with its service down:

``source_emits``
    What the service produced is emitted, promptly, once, under the contract's event
    name, with data the contract's event schema accepts.
``source_retries_failed_emit``
    An ``emit`` that fails is tried again until it succeeds: the event is not lost, and
    events after it still come (at least once).
``source_down_starts_promptly``
    With its service down, ``start`` returns within a second without raising (the source
    keeps trying in the background) and ``stop`` ends it quietly.
``source_stop_is_safe``
    ``stop`` before ``start`` and twice after it is harmless, and a stopped source emits
    nothing more.

The suite needs no test framework: :func:`run_check` raises :class:`ConformanceFailure`
(an ``AssertionError``), :func:`run_all` collects :class:`Outcome` values; both take a
:class:`Subject` or a :class:`SourceSubject` and run the checks of its side.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from edgeos.connectors.base import Connector, DeliveryError, deduplicates
from edgeos.connectors.boundary import ContractViolation, deliver_checked
from edgeos.connectors.contracts import Contract, ContractError
from edgeos.connectors.events import Source

#: A result bigger than this does not belong in an outbox row.
MAX_RESULT_BYTES = 16384
#: The field the output check demands, which no real result has.
ABSENT_FIELD = "edgeos-conformance-absent"
#: How much later than the contract's timeout a stalled call may end.
TIMEOUT_SLACK = 1.0


class ConformanceFailure(AssertionError):
    """A connector broke a rule of the suite; the message names check and subject."""


@dataclass
class Subject:
    """One binding under test, the live service behind it, and how to look at it."""

    #: Names the subject in messages ("http", "sqlite", "plugin echo").
    label: str
    contract: Contract
    operation: str
    #: A payload the contract accepts, for the effect of a key (so that a service that
    #: does not see keys can still tell effects apart, when the payload carries it).
    valid: Callable[[str], dict[str, Any]]
    #: A payload the contract refuses, at ``invalid_field`` (a JSON pointer like ``/qty``).
    invalid: dict[str, Any]
    invalid_field: str
    #: A new connector to the live service.
    make: Callable[[], Connector]
    #: A new connector of the same binding whose service is down (nothing listens).
    make_down: Callable[[], Connector]
    #: How many times the service applied the effect of a key (for a receiver that
    #: deduplicates, the times it took effect; for one that cannot, the copies it got).
    applied: Callable[[str], Awaitable[int]]
    #: A new connector whose service takes calls and never answers; None when the
    #: service cannot be made to stall (the check is then skipped, with that reason).
    make_stalled: Callable[[], Connector] | None = None
    #: The contract timeout the stall check uses, in seconds.
    stall_timeout: float = 0.5


@dataclass
class SourceSubject:
    """One event source under test, the live service behind it, and how to make it speak."""

    #: Names the subject in messages ("mqtt source", "plugin echo source").
    label: str
    contract: Contract
    #: The event the source is bound to emit: ``<capability>.<event>`` of the contract.
    event: str
    #: A new source of the binding, watching the live service.
    make: Callable[[], Source]
    #: A new source of the same binding whose service is down (or not there).
    make_down: Callable[[], Source]
    #: Make the live service produce one thing the source turns into ``event``; the
    #: event's data carries the token (in any string field, at any depth).
    send: Callable[[str], Awaitable[None]]
    #: Wait until a started source sees what is sent (a subscription in place); None
    #: when it does from the start.
    ready: Callable[[Source], Awaitable[None]] | None = None
    #: How long an event may take from ``send`` to ``emit``, failed emits retried included.
    latency: float = 5.0


@dataclass(frozen=True)
class Outcome:
    """What one check found: passed, skipped (with why) or failed (with what)."""

    check: str
    subject: str
    skipped: str | None = None
    problem: str | None = None

    @property
    def passed(self) -> bool:
        """True unless the check failed (a skip is not a failure)."""
        return self.problem is None


Check = Callable[[Subject], Awaitable[str | None]]
"""A check: returns None when it passed, a reason when it does not apply; raises
ConformanceFailure when the connector broke a rule."""


# -- helpers ----------------------------------------------------------------------------
def _key(check: str) -> str:
    return f"conformance:{check}:{uuid.uuid4().hex[:12]}"


def _expect(condition: bool, problem: str) -> None:
    if not condition:
        raise ConformanceFailure(problem)


async def _deliver(
    subject: Subject,
    connector: Connector,
    payload: dict[str, Any],
    key: str,
    *,
    operation: str | None = None,
    contract: Contract | None = None,
    timeout: float | None = None,
) -> dict[str, Any] | None:
    """Deliver through the contract's boundary; anything but a DeliveryError fails."""
    op = operation or subject.operation
    limit = timeout if timeout is not None else _timeout(subject)
    try:
        return await deliver_checked(
            connector, op, payload, key, contract=contract or subject.contract, timeout=limit
        )
    except DeliveryError:
        raise
    except Exception as exc:
        raise ConformanceFailure(
            f"delivering {op} raised {type(exc).__name__} ({exc}), not a DeliveryError "
            f"(an EdgeOSError with retryable set)"
        ) from exc


async def _failure(
    subject: Subject, connector: Connector, payload: dict[str, Any], key: str, **kwargs: Any
) -> DeliveryError:
    """The DeliveryError a delivery must end in."""
    try:
        result = await _deliver(subject, connector, payload, key, **kwargs)
    except DeliveryError as exc:
        return exc
    raise ConformanceFailure(f"expected a DeliveryError, the delivery succeeded with {result!r}")


def _timeout(subject: Subject) -> float:
    op = subject.contract.operations.get(subject.operation)
    return op.timeout if op is not None else 10.0


def _names_where(error: DeliveryError, subject: Subject, connector: Connector) -> None:
    text = str(error)
    _expect(
        connector.name in text and error.operation in text,
        f"the error does not name binding '{connector.name}' and operation "
        f"'{error.operation}': {text}",
    )


def _demanding(contract: Contract, operation: str) -> Contract:
    """The contract with an output schema that no real result meets."""
    doc = contract.model_dump(mode="json")
    doc["operations"][operation]["output"] = {"type": "object", "required": [ABSENT_FIELD]}
    return Contract.model_validate(doc)


class _Spy:
    """A connector that counts the calls it passes on: did anything reach it?"""

    def __init__(self, inner: Connector) -> None:
        self.name = inner.name
        self.inner = inner
        self.calls = 0

    async def deliver(
        self, operation: str, payload: dict[str, Any], key: str
    ) -> dict[str, Any] | None:
        self.calls += 1
        return await self.inner.deliver(operation, payload, key)

    async def close(self) -> None:
        await self.inner.close()


# -- the checks ---------------------------------------------------------------------------
async def input_refused_before_io(subject: Subject) -> str | None:
    """A payload that breaks the input schema never reaches the connector."""
    spy = _Spy(subject.make())
    key = _key("input")
    try:
        error = await _failure(subject, spy, subject.invalid, key)
    finally:
        await spy.close()
    _expect(
        isinstance(error, ContractViolation),
        f"an invalid payload failed with {type(error).__name__} ({error}), not a contract "
        f"violation",
    )
    text = str(error)
    _expect(not error.retryable, f"an input that breaks the contract must be permanent: {text}")
    for part in (subject.contract.label, subject.operation, "input", subject.invalid_field):
        _expect(part in text, f"the refusal does not name {part!r}: {text}")
    _expect(spy.calls == 0, "the connector was called with a payload the contract refuses")
    _expect(await subject.applied(key) == 0, "the service applied a refused payload")
    return None


async def delivers(subject: Subject) -> str | None:
    """A valid effect is delivered once, with a small result the contract accepts."""
    connector = subject.make()
    key = _key("delivers")
    try:
        result = await _deliver(subject, connector, subject.valid(key), key)
    finally:
        await connector.close()
    _expect(
        result is None or isinstance(result, dict),
        f"the result must be a JSON object or None, got {type(result).__name__}",
    )
    size = len(orjson.dumps(result))
    _expect(size <= MAX_RESULT_BYTES, f"the result is {size} bytes (at most {MAX_RESULT_BYTES})")
    applied = await subject.applied(key)
    _expect(applied == 1, f"the service applied the effect {applied} times, not once")
    return None


async def same_key_applies_once(subject: Subject) -> str | None:
    """Two deliveries of one key apply it once, when idempotency is promised."""
    connector = subject.make()
    op = subject.contract.operations[subject.operation]
    try:
        if not (op.idempotent or deduplicates(connector)):
            return (
                f"{subject.contract.label} {subject.operation} is not idempotent and connector "
                f"'{connector.name}' does not deduplicate by key: a repeat may apply twice"
            )
        key = _key("twice")
        await _deliver(subject, connector, subject.valid(key), key)
        await _deliver(subject, connector, subject.valid(key), key)
    finally:
        await connector.close()
    applied = await subject.applied(key)
    _expect(applied == 1, f"one key delivered twice was applied {applied} times")
    return None


async def output_validated(subject: Subject) -> str | None:
    """A result that breaks the output schema fails the delivery, naming the field."""
    demanding = _demanding(subject.contract, subject.operation)
    connector = subject.make()
    key = _key("output")
    try:
        error = await _failure(subject, connector, subject.valid(key), key, contract=demanding)
    finally:
        await connector.close()
    text = str(error)
    _expect(
        isinstance(error, ContractViolation) and error.direction == "output",
        f"a result that breaks the output schema failed with {type(error).__name__} ({text})",
    )
    _expect(error.retryable, f"an output violation must be retryable per policy: {text}")
    _expect(error.maybe_applied, f"an output violation must say it may be applied: {text}")
    for part in (demanding.label, subject.operation, "output", ABSENT_FIELD):
        _expect(part in text, f"the output violation does not name {part!r}: {text}")
    applied = await subject.applied(key)
    _expect(applied == 1, f"the service applied the effect {applied} times, not once")
    return None


async def unknown_operation(subject: Subject) -> str | None:
    """An operation the binding does not have is refused for good."""
    connector = subject.make()
    missing = "edgeos_conformance_unknown"
    key = _key("unknown")
    try:
        error = await _failure(subject, connector, subject.valid(key), key, operation=missing)
    finally:
        await connector.close()
    _expect(not error.retryable, f"an unknown operation must be permanent: {error}")
    _expect(missing in str(error), f"the error does not name the operation: {error}")
    return None


async def down_is_retryable(subject: Subject) -> str | None:
    """A service that is down is a prompt, retryable failure that applied nothing."""
    connector = subject.make_down()
    key = _key("down")
    try:
        error = await _failure(subject, connector, subject.valid(key), key)
    finally:
        await connector.close()
    _expect(error.retryable, f"a service that is down must be retryable: {error}")
    _expect(
        not error.maybe_applied,
        f"a service that is down got nothing, but the error says it may be applied "
        f"(or the connector hung until the contract's timeout): {error}",
    )
    _names_where(error, subject, connector)
    return None


async def timeout_honoured(subject: Subject) -> str | None:
    """A service that never answers is given up on within the contract's timeout."""
    if subject.make_stalled is None:
        return f"no service that stalls is set up for {subject.label}"
    connector = subject.make_stalled()
    limit = subject.stall_timeout
    key = _key("stall")
    started = time.monotonic()
    try:
        error = await _failure(subject, connector, subject.valid(key), key, timeout=limit)
    finally:
        await connector.close()
    took = time.monotonic() - started
    _expect(error.retryable, f"a service that does not answer must be retryable: {error}")
    _expect(
        took <= limit + TIMEOUT_SLACK,
        f"the call took {took:.2f} s against a timeout of {limit:g} s (does the connector "
        f"block the event loop?)",
    )
    _names_where(error, subject, connector)
    return None


async def close_is_safe(subject: Subject) -> str | None:
    """Closing before use, after use and twice does no harm."""
    unused = subject.make()
    await unused.close()
    connector = subject.make()
    key = _key("close")
    try:
        await _deliver(subject, connector, subject.valid(key), key)
    finally:
        await connector.close()
        await connector.close()
    _expect(await subject.applied(key) == 1, "the effect delivered before close was not applied")
    return None


# -- the checks of event sources -------------------------------------------------------
class _Recorder:
    """An event sink that records what it is given; it fails the first ``fail`` calls that
    carry ``failing`` (a token)."""

    def __init__(self, failing: str | None = None, fail: int = 0) -> None:
        self.events: list[tuple[str, Any]] = []
        self.calls: list[tuple[str, Any]] = []
        self.failing, self.fail = failing, fail

    async def __call__(self, event: str, data: Any) -> list[str]:
        self.calls.append((event, data))
        if self.fail and self.failing is not None and _carries(data, self.failing):
            self.fail -= 1
            raise RuntimeError("the node is busy (a sink failing on purpose)")
        self.events.append((event, data))
        return []

    def carrying(self, token: str) -> list[tuple[str, Any]]:
        return [(e, d) for e, d in self.events if _carries(d, token)]

    async def wait_for(self, token: str, within: float) -> list[tuple[str, Any]]:
        deadline = time.monotonic() + within
        while not self.carrying(token):
            if time.monotonic() > deadline:
                raise ConformanceFailure(
                    f"no event carrying {token!r} within {within:g} s (emitted: {self.events!r})"
                )
            await asyncio.sleep(0.02)
        return self.carrying(token)


def _carries(data: Any, token: str) -> bool:
    if isinstance(data, str):
        return token in data
    if isinstance(data, Mapping):
        return any(_carries(v, token) for v in data.values())
    if isinstance(data, list | tuple):
        return any(_carries(v, token) for v in data)
    return False


async def _started(subject: SourceSubject, source: Source, sink: _Recorder) -> None:
    """Start ``source`` and wait until it listens; anything it raises fails the check."""
    try:
        await source.start(sink)
        if subject.ready is not None:
            await subject.ready(source)
    except Exception as exc:
        raise ConformanceFailure(
            f"starting the source raised {type(exc).__name__} ({exc}): a source starts "
            f"without raising and retries in the background"
        ) from exc


def _token(check: str) -> str:
    return f"conformance-{check}-{uuid.uuid4().hex[:12]}"


async def source_emits(subject: SourceSubject) -> str | None:
    """What the service produced is emitted once, under its name, as the contract says."""
    _expect(
        subject.event in subject.contract.event_names,
        f"{subject.contract.label} has no event {subject.event!r} (its events: "
        f"{', '.join(subject.contract.event_names) or 'none'})",
    )
    source, sink = subject.make(), _Recorder()
    token = _token("emits")
    try:
        await _started(subject, source, sink)
        await subject.send(token)
        got = await sink.wait_for(token, subject.latency)
        await asyncio.sleep(0.2)  # and a repeat, if there is one
        got = sink.carrying(token)
    finally:
        await source.stop()
    _expect(len(got) == 1, f"one thing produced was emitted {len(got)} times: {got!r}")
    ((event, data),) = got
    _expect(event == subject.event, f"emitted as {event!r}, not {subject.event!r}")
    try:
        subject.contract.check(subject.contract.event_names[event], data, direction="event")
    except ContractError as exc:
        raise ConformanceFailure(f"the event breaks {subject.contract.label}: {exc}") from exc
    try:
        orjson.dumps(data)
    except TypeError as exc:
        raise ConformanceFailure(f"the event's data is not JSON: {exc}") from exc
    return None


async def source_retries_failed_emit(subject: SourceSubject) -> str | None:
    """A failing ``emit`` is tried again: the event is not lost, and later ones follow."""
    first, then = _token("retried"), _token("after")
    source, sink = subject.make(), _Recorder(failing=first, fail=1)
    try:
        await _started(subject, source, sink)
        await subject.send(first)
        await sink.wait_for(first, subject.latency)
        await subject.send(then)
        await sink.wait_for(then, subject.latency)
    finally:
        await source.stop()
    tried = [d for _, d in sink.calls if _carries(d, first)]
    _expect(len(tried) >= 2, f"the failed event was tried {len(tried)} times, not again")
    return None


async def source_down_starts_promptly(subject: SourceSubject) -> str | None:
    """A service that is down does not hold the node's start up, nor raise."""
    source, sink = subject.make_down(), _Recorder()
    started = time.monotonic()
    try:
        await source.start(sink)
    except Exception as exc:
        raise ConformanceFailure(
            f"with its service down, start raised {type(exc).__name__} ({exc}): it must "
            f"return and retry in the background"
        ) from exc
    finally:
        took = time.monotonic() - started
        await asyncio.sleep(0.1)
        await source.stop()
    _expect(took <= 1.0, f"with its service down, start took {took:.2f} s (at most 1 s)")
    _expect(not sink.calls, f"a source whose service is down emitted {sink.calls!r}")
    return None


async def source_stop_is_safe(subject: SourceSubject) -> str | None:
    """Stopping before starting, and twice, is harmless; a stopped source is silent."""
    await subject.make().stop()
    source, sink = subject.make(), _Recorder()
    await _started(subject, source, sink)
    await source.stop()
    await source.stop()
    token = _token("stopped")
    await subject.send(token)
    await asyncio.sleep(0.5)
    _expect(not sink.carrying(token), "a stopped source still emitted")
    return None


SourceCheck = Callable[[SourceSubject], Awaitable[str | None]]

#: Every check of an event source, by name, in the order they are run.
SOURCE_CHECKS: dict[str, SourceCheck] = {
    check.__name__: check
    for check in (
        source_emits,
        source_retries_failed_emit,
        source_down_starts_promptly,
        source_stop_is_safe,
    )
}


#: Every check, by name, in the order they are run.
CHECKS: dict[str, Check] = {
    check.__name__: check
    for check in (
        input_refused_before_io,
        delivers,
        same_key_applies_once,
        output_validated,
        unknown_operation,
        down_is_retryable,
        timeout_honoured,
        close_is_safe,
    )
}


async def run_check(name: str, subject: Subject | SourceSubject) -> str | None:
    """Run one check (of :data:`CHECKS` for a connector, :data:`SOURCE_CHECKS` for a
    source); None when it passed, a reason when it does not apply. Raises
    ConformanceFailure (naming check and subject) when the subject broke a rule."""
    try:
        if isinstance(subject, SourceSubject):
            return await SOURCE_CHECKS[name](subject)
        return await CHECKS[name](subject)
    except ConformanceFailure as exc:
        raise ConformanceFailure(f"{subject.label}: {name}: {exc}") from exc


async def run_all(subject: Subject | SourceSubject) -> list[Outcome]:
    """Every check of its side against one subject."""
    outcomes = []
    for name in SOURCE_CHECKS if isinstance(subject, SourceSubject) else CHECKS:
        try:
            skipped = await run_check(name, subject)
        except ConformanceFailure as exc:
            outcomes.append(Outcome(name, subject.label, problem=str(exc)))
        else:
            outcomes.append(Outcome(name, subject.label, skipped=skipped))
    return outcomes

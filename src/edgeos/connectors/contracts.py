"""Capability contracts: ``<data_dir>/contracts/<capability>.yaml``.

A contract says what a capability's operations take and give, independently of the
connector that provides them::

    capability: supplier
    version: "1.2.0"
    operations:
      reorder:
        input:                       # JSON Schema (Draft 2020-12) of the effect's payload
          type: object
          required: [sku, qty]
          properties:
            sku: {type: string}
            qty: {type: integer, minimum: 1}
        output: {type: object}       # optional
        side_effect: true
        idempotent: true
        timeout: 10s
        rate_limit_per_minute: 60
        scopes: [orders:write]

A contract may also describe events, the sense side of a capability: a ``files`` or
``mqtt`` binding that implements it emits each under the name ``<capability>.<event>``
(its ``watch`` or ``subscribe`` key), which agents name in their ``event:`` triggers, and
every such event is checked against the schema of its data before it starts a run::

    capability: pos
    version: "1.0"
    events:
      sales:                         # emitted as pos.sales
        data: {type: object, required: [row]}

Any property of an input, output or event schema may be marked ``x-personal: true``: its
values are replaced by pseudonyms in the journal, in stored results and in error messages
(:mod:`edgeos.connectors.personal`).

A binding in ``connectors.yaml`` says which contract it implements
(``implements: {capability: supplier, version: "1.2.0"}``) and which credential scopes it
is granted (``scopes: [orders:write]``); a binding that lacks a scope its contract
requires is refused when the node loads it. An agent says which versions it accepts
(``requires: {supplier: ">=1.0,<2.0"}``). ``agent add`` refuses an agent whose
requirements no bound connector satisfies (or whose ``event:`` triggers name an event its
contract lacks), ``ctx.effect`` checks each payload against the input schema, and the
delivery worker checks it again before any I/O and checks the connector's result against
the output schema (:mod:`edgeos.connectors.boundary`), each naming the contract, the
operation and the failing field.

``side_effect`` and ``idempotent`` decide what happens when a delivery may have been
applied but its answer was lost: an operation with side effects that is not idempotent is
sent again only through a connector whose target deduplicates by key; otherwise the
effect is set aside for a person to review (:mod:`edgeos.connectors.delivery`).

Version ranges are comma-separated comparisons (``>=``, ``>``, ``<=``, ``<``, ``==``,
``!=``) of dotted integers, all of which must hold.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from edgeos.connectors.personal import check_marks, personal_values, redact
from edgeos.connectors.vault import check_scopes
from edgeos.errors import EdgeOSError, ManifestError
from edgeos.manifests.agent import VERSION_CLAUSE, check_version_range
from edgeos.manifests.durations import Duration
from edgeos.manifests.loader import load_manifest

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
_VERSION = re.compile(r"^\d+(\.\d+)*$")
_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
    ">": operator.gt,
    "<": operator.lt,
}


class ContractError(EdgeOSError):
    """A value violates a contract; the message names contract, operation (or event) and
    field, and quotes no personal value."""

    http_status: ClassVar[int] = 422

    def __init__(self, contract: str, operation: str, direction: str, problems: list[str]) -> None:
        super().__init__(f"{contract} {operation} {direction}: {'; '.join(problems)}")
        #: ``supplier@1.2.0``, the operation or event, ``input``, ``output`` or ``event``,
        #: and one ``/path: reason`` per failing field.
        self.contract = contract
        self.operation = operation
        self.direction = direction
        self.problems = problems


def parse_version(text: str) -> tuple[int, ...]:
    """``"1.2.0"`` as ``(1, 2)``: trailing zeros dropped, so ``1.2 == 1.2.0``."""
    if not _VERSION.match(text):
        raise ValueError(f"{text!r} is not a version (dotted integers like 1.2.0)")
    parts = [int(p) for p in text.split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def satisfies(version: str, spec: str) -> bool:
    """Whether ``version`` is in the range ``spec`` (every comparison holds)."""
    have = parse_version(version)
    for clause in check_version_range(spec).split(","):
        match = VERSION_CLAUSE.match(clause)
        assert match is not None  # check_version_range accepted it
        op, want = match.groups()
        if not _COMPARE[op](have, parse_version(want)):
            return False
    return True


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _jsonschema() -> Any:
    """The jsonschema module, imported on first use (an idle node never needs it)."""
    import jsonschema  # type: ignore[import-untyped]

    return jsonschema


def _check_schema(value: dict[str, Any]) -> dict[str, Any]:
    jsonschema = _jsonschema()
    try:
        jsonschema.Draft202012Validator.check_schema(value)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        raise ValueError(
            f"not a valid JSON Schema (Draft 2020-12){f' at /{where}' if where else ''}: "
            f"{exc.message}"
        ) from None
    check_marks(value)
    return value


class ContractOperation(_Strict):
    """One operation of a capability: its schemas and how it behaves."""

    #: JSON Schema (Draft 2020-12) of the payload an effect sends.
    input: dict[str, Any]
    #: JSON Schema of what the operation answers, when it answers something.
    output: dict[str, Any] | None = None
    #: Whether the operation changes the world (an order) or only reads it.
    side_effect: bool = True
    #: Whether the provider deduplicates by idempotency key.
    idempotent: bool = False
    timeout: Duration = Field(default=10.0, gt=0, le=600)
    rate_limit_per_minute: float | None = Field(default=None, gt=0)
    #: Credential scopes the provider needs to perform the operation.
    scopes: list[str] = Field(default_factory=list)

    @field_validator("input", "output")
    @classmethod
    def _schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if value is None else _check_schema(value)

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, value: list[str]) -> list[str]:
        return check_scopes(value)

    @property
    def retry_safe(self) -> bool:
        """Whether sending the operation twice does no harm, whatever the connector: it
        changes nothing, or its provider deduplicates."""
        return not self.side_effect or self.idempotent


class ContractEvent(_Strict):
    """One event of a capability: something that happened, which starts agents' runs."""

    #: JSON Schema (Draft 2020-12) of the event's data, which becomes a run's input.
    data: dict[str, Any]
    description: str = ""

    @field_validator("data")
    @classmethod
    def _schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _check_schema(value)


class Contract(_Strict):
    """A versioned capability contract: operations (effects), events (senses), or both."""

    capability: str
    version: str
    operations: dict[str, ContractOperation] = Field(default_factory=dict)
    events: dict[str, ContractEvent] = Field(default_factory=dict)
    # Compiled validators by (operation or event, direction): built on first use, reused.
    _validators: dict[tuple[str, str], Any] = PrivateAttr(default_factory=dict)
    # Whether each schema marks a field personal: every delivery asks, most say no.
    _marked: dict[tuple[str, str], bool] = PrivateAttr(default_factory=dict)

    @field_validator("events")
    @classmethod
    def _events(cls, value: dict[str, ContractEvent]) -> dict[str, ContractEvent]:
        for name in value:
            if not _NAME.match(name):
                raise ValueError(f"event name {name!r}: use 1-64 of A-Z a-z 0-9 _ - (no dots)")
        return value

    @model_validator(mode="after")
    def _something(self) -> Contract:
        if not self.operations and not self.events:
            raise ValueError("a contract needs operations (effects), events (senses), or both")
        return self

    @field_validator("capability")
    @classmethod
    def _capability(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("use 1-64 of A-Z a-z 0-9 _ - starting with a letter or _")
        return value

    @field_validator("version")
    @classmethod
    def _version(cls, value: str) -> str:
        parse_version(value)
        return value

    @property
    def label(self) -> str:
        """``supplier@1.2.0``, as errors name the contract."""
        return f"{self.capability}@{self.version}"

    @property
    def event_names(self) -> dict[str, str]:
        """``{"pos.sales": "sales"}``: each event's name as bindings emit it, and as agents'
        triggers name it."""
        return {f"{self.capability}.{name}": name for name in self.events}

    def schema_of(self, name: str, direction: str = "input") -> dict[str, Any] | None:
        """The schema of an operation's ``input`` or ``output``, or of an ``event``'s data;
        None when the contract describes none."""
        if direction == "event":
            event = self.events.get(name)
            return None if event is None else event.data
        op = self.operations.get(name)
        return None if op is None else (op.input if direction == "input" else op.output)

    def check(self, operation: str, value: Any, *, direction: str = "input") -> None:
        """Raise ContractError naming each failing field when ``value`` breaks the schema.

        ``direction`` is ``input`` or ``output`` of an operation, or ``event`` (then
        ``operation`` names an event). What the contract does not describe is not checked.
        A problem whose text would quote a personal value names the failing keyword instead.
        """
        schema = self.schema_of(operation, direction)
        if schema is None:
            return
        key = (operation, direction)
        validator = self._validators.get(key)
        if validator is None:
            validator = _jsonschema().Draft202012Validator(schema)
            self._validators[key] = validator
        errors = sorted(validator.iter_errors(value), key=lambda e: list(map(str, e.path)))
        if errors:
            hidden = [v for v in self.personal_values(operation, value, direction=direction) if v]
            problems = [
                f"/{'/'.join(str(p) for p in e.absolute_path)}: {_shown(e, hidden)}" for e in errors
            ]
            raise ContractError(self.label, operation, direction, problems)

    def redact(self, operation: str, value: Any, *, direction: str = "input") -> Any:
        """``value`` with its personal fields pseudonymised (see :meth:`check` for
        ``direction``): what the journal and stored results hold."""
        return redact(self._personal_schema(operation, direction), value)

    def personal_values(self, operation: str, value: Any, *, direction: str = "input") -> list[str]:
        """The text of each personal value in ``value``, to mask in messages."""
        return personal_values(self._personal_schema(operation, direction), value)

    def _personal_schema(self, name: str, direction: str) -> dict[str, Any] | None:
        """The schema, if it marks any field personal; None otherwise."""
        schema = self.schema_of(name, direction)
        if schema is None:
            return None
        key = (name, direction)
        marked = self._marked.get(key)
        if marked is None:
            marked = self._marked[key] = check_marks(schema)
        return schema if marked else None


def _shown(error: Any, hidden: list[str]) -> str:
    """A schema error's message, unless it quotes a personal value."""
    message = str(error.message)
    if any(value in message for value in hidden):
        return f"fails {error.validator!r} (the value is personal: not shown)"
    return message


def event_contract(contracts: Mapping[str, Contract], event: str) -> tuple[Contract, str] | None:
    """The contract that describes the event ``<capability>.<event>`` among the bound
    ``contracts``, with the event's name in it; None when none does."""
    for contract in contracts.values():
        name = contract.event_names.get(event)
        if name is not None:
            return contract, name
    return None


def load_contract(path: Path) -> Contract:
    """Read one contract file; ManifestError names the file, the field and the reason."""
    contract = load_manifest(path, Contract)
    if contract.capability != path.stem:
        raise ManifestError(
            str(path),
            [f"field 'capability': {contract.capability!r} must match the file name {path.stem!r}"],
        )
    return contract


def load_contracts(directory: Path) -> dict[str, Contract]:
    """Every ``*.yaml`` contract in ``directory`` by capability; none if it does not exist."""
    if not directory.is_dir():
        return {}
    return {path.stem: load_contract(path) for path in sorted(directory.glob("*.yaml"))}


def bind_contracts(
    bindings: Mapping[str, Any], contracts: Mapping[str, Contract], source: str
) -> dict[str, Contract]:
    """The contract each binding implements, by binding name.

    A binding's ``implements`` must name a contract on the node, at its version, the
    binding must offer every operation of the contract, and be granted every scope the
    contract's operations require. ``source`` names connectors.yaml.
    """
    bound: dict[str, Contract] = {}
    problems: list[str] = []
    for name, config in bindings.items():
        implements = getattr(config, "implements", None)
        if implements is None:
            continue
        field = f"field '{name}.implements"
        contract = contracts.get(implements.capability)
        if contract is None:
            problems.append(
                f"{field}.capability': no contract {implements.capability!r} on this node "
                f"(contracts/{implements.capability}.yaml)"
            )
            continue
        if parse_version(contract.version) != parse_version(implements.version):
            problems.append(
                f"{field}.version': {implements.version!r}, but the node's contract is "
                f"{contract.label}"
            )
            continue
        missing = sorted(set(contract.operations) - set(getattr(config, "operations", {})))
        if missing:
            problems.append(
                f"field '{name}.operations': {contract.label} needs {', '.join(missing)}"
            )
            continue
        # Sources name their events by their watch (files) or subscribe (mqtt) keys.
        emitted = set(getattr(config, "watch", {})) | set(getattr(config, "subscribe", {}))
        unsent = sorted(set(contract.event_names) - emitted)
        if unsent:
            problems.append(
                f"field '{name}': {contract.label} needs the events {', '.join(unsent)} "
                f"(as watch or subscribe names)"
            )
            continue
        granted = set(getattr(config, "granted_scopes", ()))
        lacking = [
            (scope, op_name)
            for op_name, op in sorted(contract.operations.items())
            for scope in op.scopes
            if scope not in granted
        ]
        if lacking:
            problems += [
                f"field '{name}.scopes': binding '{name}' is not granted scope {scope!r}, "
                f"which {contract.label} requires for {op_name}"
                for scope, op_name in lacking
            ]
            continue
        bound[name] = contract
    if problems:
        raise ManifestError(source, problems)
    return bound


def node_contracts(data_dir: Path, bindings: Mapping[str, Any]) -> dict[str, Contract]:
    """The contract of each binding in ``data_dir/connectors.yaml`` that implements one."""
    if not any(getattr(b, "implements", None) is not None for b in bindings.values()):
        return {}
    contracts = load_contracts(data_dir / "contracts")
    return bind_contracts(bindings, contracts, str(data_dir / "connectors.yaml"))


def check_requirements(
    requires: Mapping[str, str],
    connectors: Iterable[str],
    contracts: Mapping[str, Contract],
    source: str,
    *,
    events: Iterable[str] = (),
) -> None:
    """Refuse an agent whose ``requires`` its connectors do not satisfy.

    ``connectors`` are the bindings the agent lists, ``contracts`` the contract of each
    binding that implements one. Each required capability needs a listed binding with a
    version in range, and no listed binding may implement it at a version out of range.
    ``events`` are the agent's ``event:`` triggers: one named ``<capability>.<event>`` of a
    required capability must be an event of its contract.
    """
    listed = list(connectors)
    problems: list[str] = []
    for capability, spec in requires.items():
        offers = [(b, contracts[b]) for b in listed if b in contracts]
        offers = [(b, c) for b, c in offers if c.capability == capability]
        wrong = [f"{b} implements {c.label}" for b, c in offers if not satisfies(c.version, spec)]
        if wrong:
            problems.append(
                f"field 'requires.{capability}': needs {spec!r}, but {'; '.join(wrong)}"
            )
        elif not offers:
            problems.append(
                f"field 'requires.{capability}': no connector the agent lists implements "
                f"{capability} {spec} (add one under connectors, with implements in "
                f"connectors.yaml)"
            )
        else:
            contract = offers[0][1]
            for event in events:
                if event.partition(".")[0] == capability and event not in contract.event_names:
                    known = ", ".join(contract.event_names) or "none"
                    problems.append(
                        f"field 'triggers': event {event!r} is not an event of "
                        f"{contract.label} (its events: {known})"
                    )
    if problems:
        raise ManifestError(source, problems)

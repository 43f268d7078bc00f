"""A contract's boundary around a delivery: checked going in, bounded, checked coming out.

An effect passes from the outbox to a connector through :func:`deliver_checked`:

1. the payload is checked against the operation's input schema before the connector is
   called, so a violation does no I/O at all (:class:`ContractViolation`, permanent);
2. the call is bounded by the contract's timeout: one that overruns is cancelled and
   reported as retryable and ``maybe_applied`` (it may have reached the target);
3. the result, as the JSON that will be stored, is checked against the output schema: a
   violation is retryable (the receiver may answer properly next time) and
   ``maybe_applied`` (the effect took place, only its answer is wrong), never accepted.

The delivery worker and the conformance suite both go through here. Without a contract
only the timeout applies.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import orjson

from edgeos.connectors.base import Connector, DeliveryError

if TYPE_CHECKING:
    # contracts imports pydantic and jsonschema: only nodes with contracts load it.
    from edgeos.connectors.contracts import Contract, ContractError


class ContractViolation(DeliveryError):
    """An effect's payload or a connector's result breaks the binding's contract.

    The message names the connector, the contract, the operation, the direction and each
    failing field: ``connector 'supplier' operation 'reorder': supplier@1.2.0 reorder
    output: /id: 'id' is a required property``.
    """

    def __init__(self, connector: str, error: ContractError) -> None:
        output = error.direction == "output"
        super().__init__(
            connector, error.operation, str(error), retryable=output, maybe_applied=output
        )
        self.contract = error.contract
        self.direction = error.direction
        self.problems = error.problems


def check_input(connector: str, contract: Contract | None, operation: str, payload: Any) -> None:
    """Raise ContractViolation when ``payload`` breaks the operation's input schema."""
    _check(connector, contract, operation, payload, "input")


async def call_checked(
    connector: Connector,
    operation: str,
    payload: dict[str, Any],
    key: str,
    *,
    contract: Contract | None = None,
    timeout: float | None = None,
) -> dict[str, Any] | None:
    """Deliver within ``timeout`` seconds and check the result (steps 2 and 3 above).

    Returns the result as plain JSON (what the outbox stores). Raises DeliveryError.
    """
    try:
        result = await asyncio.wait_for(connector.deliver(operation, payload, key), timeout)
    except TimeoutError:
        if timeout is None:
            raise  # the connector's own, not the contract's: a bug it should report
        raise DeliveryError(
            connector.name, operation, f"no answer within the contract's {timeout:g} s",
            retryable=True, maybe_applied=True,
        ) from None  # fmt: skip
    plain = plain_result(result)
    _check(connector.name, contract, operation, plain, "output")
    return plain


async def deliver_checked(
    connector: Connector,
    operation: str,
    payload: dict[str, Any],
    key: str,
    *,
    contract: Contract | None = None,
    timeout: float | None = None,
) -> dict[str, Any] | None:
    """Check the input, deliver within ``timeout``, check the output (steps 1 to 3)."""
    check_input(connector.name, contract, operation, payload)
    return await call_checked(
        connector, operation, payload, key, contract=contract, timeout=timeout
    )


def plain_result(result: dict[str, Any] | None) -> dict[str, Any] | None:
    """A connector's result as the JSON the outbox stores: anything odd becomes text."""
    if result is None:
        return None
    plain: dict[str, Any] = orjson.loads(
        orjson.dumps(result, default=str, option=orjson.OPT_NON_STR_KEYS)
    )
    return plain


def _check(
    connector: str, contract: Contract | None, operation: str, value: Any, direction: str
) -> None:
    if contract is None:
        return
    # Loaded already: a contract exists only once its module was imported.
    from edgeos.connectors.contracts import ContractError

    try:
        contract.check(operation, value, direction=direction)
    except ContractError as exc:
        raise ContractViolation(connector, exc) from None

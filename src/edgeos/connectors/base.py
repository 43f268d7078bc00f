"""The connector seam: how an effect leaves the node, and how its failure is described.

A connector performs one kind of effect against the outside world (an HTTP API, a
database) and passes the effect's idempotency key on, so that the receiver can refuse to
apply the same effect twice. Delivery is at-least-once (the worker retries until it has
recorded an outcome); the key at the receiver turns that into exactly-once in effect.

Not every target honours a key. A connector whose target does (HTTP's
``Idempotency-Key``, SQL's ``edgeos_effects`` table) says so with the class attribute
``idempotency_keys = True``; for the others, a failure that may have applied the effect
(``DeliveryError.maybe_applied``) is not retried blindly when the contract says the
operation has side effects and is not idempotent (:mod:`edgeos.connectors.delivery`).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from edgeos.errors import EdgeOSError


class DeliveryError(EdgeOSError):
    """An effect could not be delivered; ``retryable`` says whether trying later may help.

    Unlike most edgeos errors, ``retryable`` is decided per failure (the same connector
    fails retryably when its target is down and permanently on a bad request), and
    ``retry_after`` carries the receiver's own hint, in seconds, when it gave one.
    """

    def __init__(
        self,
        connector: str,
        operation: str,
        problem: str,
        *,
        retryable: bool,
        retry_after: float | None = None,
        maybe_applied: bool = False,
    ) -> None:
        super().__init__(f"connector '{connector}' operation '{operation}': {problem}")
        self.connector = connector
        self.operation = operation
        self.problem = problem
        # EdgeOSError declares ``retryable`` per class; a delivery decides it per failure,
        # so the instance attribute shadows the class default on purpose.
        self.retryable = retryable
        self.retry_after = retry_after
        #: The request reached the target and its outcome is unknown (sent, then no answer:
        #: a timeout, a connection lost mid-call), or it was applied and then found wrong.
        #: False when the target surely did nothing (refused, unreachable, said no).
        self.maybe_applied = maybe_applied


class UnknownOperation(DeliveryError):
    """The connector has no operation of that name: retrying cannot help."""

    def __init__(self, connector: str, operation: str, known: list[str]) -> None:
        listed = ", ".join(sorted(known)) or "none"
        super().__init__(
            connector,
            operation,
            f"no such operation in connectors.yaml (known: {listed})",
            retryable=False,
        )


@runtime_checkable
class Connector(Protocol):
    """Something that performs effects of one named binding in ``connectors.yaml``."""

    #: The binding's name, the part before the dot in ``ctx.effect("supplier.reorder")``.
    name: str

    async def deliver(
        self, operation: str, payload: dict[str, Any], key: str
    ) -> dict[str, Any] | None:
        """Perform ``operation`` with ``payload``, passing ``key`` on to the receiver.

        Returns a small JSON-able result, stored with the delivered outbox row (and checked
        against the contract's output schema, when there is one). Raises
        :class:`DeliveryError` (with ``retryable`` set, and ``maybe_applied`` when the
        request may have reached the target) when the effect was not applied or its
        outcome is unknown; a delivery of a key the receiver has already applied is a
        success, not an error.
        """
        ...

    async def close(self) -> None:
        """Release connections and clients. Safe to call twice."""
        ...


class OutboundHandoff(Protocol):
    """Where a connector hands the messages of an operation declared ``batch``: the
    node's outbound queue for cloud services (:class:`edgeos.routing.outbound.Outbound`)."""

    def put(self, service: str, message: dict[str, Any], *, priority: str = "normal") -> bool:
        """Keep ``message`` on disk for ``service`` (blocking); False when the declared drop
        order dropped it itself (the queue is full of more important messages)."""
        ...


def deduplicates(connector: object) -> bool:
    """Whether a repeated key is harmless at the connector's target, so that an effect whose
    outcome is unknown may be sent again. A connector says so with the class attribute
    ``idempotency_keys = True``; without it, the answer is no."""
    return getattr(connector, "idempotency_keys", False) is True

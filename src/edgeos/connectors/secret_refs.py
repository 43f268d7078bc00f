"""``${secret:NAME}`` in connector configuration: filled from the vault when connecting.

A binding's fields may name secrets instead of holding them: HTTP header values, the
password (or user) of a PostgreSQL or MQTT URL, the SMTP password, and any string field of
a plugin's binding (through :func:`resolve`). The reference stays in ``connectors.yaml``
and in the binding; the value is looked up through the binding's scopes
(:class:`~edgeos.connectors.vault.BindingSecrets`) each time a connection is made, so a
rotation or a new grant applies at the next connection, and it is used only for that
call: never kept on the binding, never written to logs, errors or the journal (an error
that could quote it is masked with :meth:`Resolved.mask`).

A secret that is missing, expired or not granted fails the delivery as retryable: the
effect stays in the outbox until a grant arrives.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import quote

from edgeos.connectors.base import DeliveryError
from edgeos.errors import EdgeOSError
from edgeos.manifests.secrets import SECRET_REF

__all__ = ["SECRET_REF", "Resolved", "check_refs", "has_refs", "resolve"]
_ANY_REF = re.compile(r"\$\{secret:[^}]*\}?")


def check_refs(text: str) -> str:
    """``text`` if every ``${secret:...}`` in it is well formed; ValueError otherwise."""
    for match in _ANY_REF.finditer(text):
        if not SECRET_REF.fullmatch(match.group(0)):
            raise ValueError(
                f"{match.group(0)!r} is not a secret reference: use ${{secret:NAME}} with a "
                "NAME of 1-64 of A-Z a-z 0-9 . _ -"
            )
    return text


def has_refs(text: str | None) -> bool:
    """Whether ``text`` names a secret."""
    return bool(text) and SECRET_REF.search(str(text)) is not None


@dataclass(frozen=True)
class Resolved:
    """A field with its secrets filled in, and every form of them that may show in text."""

    text: str
    values: tuple[str, ...] = field(default=(), repr=False)

    def mask(self, message: str) -> str:
        """``message`` with every value used replaced by ``***`` (for errors and logs)."""
        from edgeos.connectors.vault import Redactor

        return Redactor(self.values)(message) if self.values else message


def resolve(
    text: str,
    secrets: Callable[[str], str] | None,
    *,
    binding: str,
    operation: str,
    what: str | None = None,
    in_url: bool = False,
) -> Resolved:
    """``text`` with every ``${secret:NAME}`` replaced by the secret's value.

    ``in_url`` percent-encodes each value (a password may hold ``@`` or ``/``). Raises
    DeliveryError naming ``what`` and the secret: permanent when the node has no vault,
    retryable when the secret is missing, expired or not granted (a grant may come).
    """
    if not has_refs(text):
        return Resolved(text)
    prefix = f"{what}: " if what else ""
    if secrets is None:
        raise DeliveryError(
            binding, operation, f"{prefix}names secrets but this node has no vault",
            retryable=False,
        )  # fmt: skip
    lookup = secrets
    values: list[str] = []

    def value(match: re.Match[str]) -> str:
        try:
            found = lookup(match.group(1))
        except EdgeOSError as exc:
            raise DeliveryError(binding, operation, f"{prefix}{exc}", retryable=True) from exc
        values.append(found)
        if in_url:
            found = quote(found, safe="")
            values.append(found)
        return found

    return Resolved(SECRET_REF.sub(value, text), tuple(values))

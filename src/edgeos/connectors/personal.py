"""Fields a contract marks personal, and keeping their values out of what the node records.

A contract marks a field personal with the JSON Schema annotation ``x-personal: true``
(validators ignore annotations, so the mark changes nothing about what is valid)::

    operations:
      send:
        input:
          type: object
          properties:
            to: {type: string, x-personal: true}     # a customer's address
            text: {type: string}

The mark is honoured on a schema and on the subschemas reached from it through
``properties``, ``patternProperties``, ``additionalProperties`` and ``items``, at any
depth; a marked object or array is personal as a whole. A mark anywhere else (under
``anyOf``, ``$defs``, ``prefixItems``...) would be silently ignored, so a contract that has
one is refused when it loads (:func:`check_marks`).

What the node does with personal values (operation inputs and outputs, event data):

- **journal**: an effect's payload in ``effect_enqueued`` and an event's data in
  ``run_started`` hold pseudonyms, not values;
- **outbox**: the payload keeps the values (the effect is delivered with them) and goes
  with its run at retention, overwritten on disk; the stored result of a delivery holds
  pseudonyms;
- **errors and logs of a delivery** (``last_error``, ``effect_dead``, log lines): the
  payload's personal values are masked, and a contract violation never quotes one.

A pseudonym is ``[personal:<16 hex digits>]``, the first 64 bits of the SHA-256 of the
value's canonical JSON: equal values have equal pseudonyms, so an audit and a replay can
compare decisions without the values. It hides a value from whoever reads the records, not
from someone who guesses it and hashes the guess.

What an agent's own code puts in its step outputs is not under any contract: the agent
keeps personal values out of them (it looks them up in the step that sends them).
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import orjson

#: The annotation that marks a field personal.
PERSONAL = "x-personal"
_PREFIX = "[personal:"
_PSEUDONYM = re.compile(r"^\[personal:[0-9a-f]{16}\]$")
# Keywords whose value maps names to subschemas, and keywords whose value is one subschema:
# the places a mark is honoured.
_BY_NAME = ("properties", "patternProperties")
_ONE = ("additionalProperties", "items")
_HONOURED = "properties, patternProperties, additionalProperties or items"


def pseudonym(value: Any) -> str:
    """``[personal:<16 hex>]``: the same for equal values, without the value."""
    canonical = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    return f"{_PREFIX}{hashlib.sha256(canonical).hexdigest()[:16]}]"


def is_pseudonym(value: Any) -> bool:
    """Whether ``value`` is a pseudonym made by :func:`pseudonym`."""
    return isinstance(value, str) and _PSEUDONYM.match(value) is not None


def check_marks(schema: dict[str, Any]) -> bool:
    """Raise ValueError naming the place of a mark that is not ``true``/``false`` or would
    not be honoured; returns whether the schema marks anything personal."""
    marked = False

    def visit(node: Any, path: str, honoured: bool) -> None:
        nonlocal marked
        if isinstance(node, list):
            for index, item in enumerate(node):
                visit(item, f"{path}/{index}", False)
            return
        if not isinstance(node, dict):
            return
        if PERSONAL in node:
            where = path or "/"
            if not isinstance(node[PERSONAL], bool):
                raise ValueError(f"{PERSONAL} at {where} must be true or false")
            if not honoured:
                raise ValueError(
                    f"{PERSONAL} at {where} would be ignored: mark the fields reached through "
                    f"{_HONOURED}"
                )
            marked = marked or node[PERSONAL]
        for key, child in node.items():
            if honoured and key in _BY_NAME and isinstance(child, dict):
                for name, sub in child.items():
                    visit(sub, f"{path}/{key}/{name}", True)
            else:
                visit(child, f"{path}/{key}", honoured and key in _ONE)

    visit(schema, "", True)
    return marked


def redact(schema: dict[str, Any] | None, value: Any) -> Any:
    """``value`` with each personal field replaced by its pseudonym (a copy; ``value`` itself
    when nothing is personal). Already pseudonymous values stay as they are."""
    if not schema or not check_marks(schema):
        return value
    return _walk(schema, value, lambda v: v if is_pseudonym(v) else pseudonym(v))


def personal_values(schema: dict[str, Any] | None, value: Any) -> list[str]:
    """The text of every personal value in ``value`` (strings and numbers, at any depth)."""
    found: list[str] = []

    def collect(personal: Any) -> Any:
        found.extend(_leaves(personal))
        return personal

    if schema:
        _walk(schema, value, collect)
    return found


def matches(journaled: Any, value: Any) -> bool:
    """Whether ``value`` is what ``journaled`` recorded, where a pseudonym on either side
    stands for any value with that pseudonym (replay may see a journaled pseudonym where
    the run saw the value: a model's answer is kept with its personal fields hidden)."""
    if is_pseudonym(journaled):
        return bool(journaled == value or journaled == pseudonym(value))
    if is_pseudonym(value):
        return bool(value == pseudonym(journaled))
    if isinstance(journaled, dict) and isinstance(value, dict):
        return journaled.keys() == value.keys() and all(
            matches(journaled[k], value[k]) for k in journaled
        )
    if isinstance(journaled, list) and isinstance(value, list):
        return len(journaled) == len(value) and all(map(matches, journaled, value))
    return bool(journaled == value)


def like(journaled: Any, value: Any) -> Any:
    """``value`` pseudonymised wherever ``journaled`` holds a pseudonym: a value to show
    next to a journaled one without revealing what the journal hides."""
    if is_pseudonym(journaled):
        return pseudonym(value)
    if isinstance(journaled, dict) and isinstance(value, dict):
        return {k: like(journaled[k], v) if k in journaled else v for k, v in value.items()}
    if isinstance(journaled, list) and isinstance(value, list):
        shown = [like(j, v) for j, v in zip(journaled, value, strict=False)]
        return shown + value[len(shown) :]
    return value


@contextmanager
def overwritten(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """Within the block, SQLite overwrites with zeros the bytes of rows it deletes, or moves
    when they change size (``secure_delete``), so that a personal value leaves no copy in
    the file's free space. Per connection; the previous setting is restored after."""
    previous = int(conn.execute("PRAGMA secure_delete").fetchone()[0])
    conn.execute("PRAGMA secure_delete = ON")
    try:
        yield conn
    finally:
        conn.execute(f"PRAGMA secure_delete = {previous}")


def _walk(schema: Any, value: Any, personal: Callable[[Any], Any]) -> Any:
    """``value`` with ``personal(v)`` in place of every value ``v`` the schema marks."""
    if not isinstance(schema, dict):
        return value
    if schema.get(PERSONAL) is True:
        return personal(value)
    if isinstance(value, dict):
        return {k: _walk_all(_subschemas(schema, k), v, personal) for k, v in value.items()}
    items = schema.get("items")
    if isinstance(value, list) and isinstance(items, dict):
        return [_walk(items, v, personal) for v in value]
    return value


def _walk_all(schemas: list[Any], value: Any, personal: Callable[[Any], Any]) -> Any:
    # Every subschema that applies to the field has its say: a field matched by a
    # property and a pattern is personal if either marks it.
    for sub in schemas:
        value = _walk(sub, value, personal)
    return value


def _subschemas(schema: dict[str, Any], name: str) -> list[Any]:
    """The subschemas that apply to the property ``name`` of an object."""
    found = []
    properties = schema.get("properties")
    if isinstance(properties, dict) and name in properties:
        found.append(properties[name])
    patterns = schema.get("patternProperties")
    if isinstance(patterns, dict):
        found += [sub for pattern, sub in patterns.items() if re.search(pattern, name)]
    extra = schema.get("additionalProperties")
    if not found and isinstance(extra, dict):
        found.append(extra)
    return found


def _leaves(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for item in value.values():
            yield from _leaves(item)
    elif isinstance(value, list):
        for item in value:
            yield from _leaves(item)
    elif isinstance(value, str):
        yield value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield str(value)

"""What a generative call is asked to produce, and what its answer is taken to mean.

A call may hold its answer to a JSON Schema (``schema=``) or to a choice of tools
(``tools=``: each a name and the JSON Schema of its arguments). Either becomes the one
schema the venue decodes under (:func:`answer_schema`); the answer is parsed and checked
again here (:func:`read_reply`), since a venue off the device may not constrain anything.
A tool call is only a proposal: the caller decides whether to act on it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edgeos.errors import EdgeOSError


class ReplyError(EdgeOSError):
    """A generative call was asked for something impossible, or its answer is not what it
    was asked for (not JSON, off the schema, a tool it was not offered)."""


@dataclass(frozen=True)
class ToolCall:
    """A tool call the model proposed: the tool's name and its arguments (unchecked)."""

    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class ChatReply:
    """A generative call's answer: the text, the parsed value (with a schema or tools) and
    any tool call the model proposed."""

    text: str
    parsed: Any = None
    tool_calls: tuple[ToolCall, ...] = ()


def check_json_schema(schema: Mapping[str, Any], where: str) -> None:
    """ReplyError naming ``where`` unless ``schema`` is a valid JSON Schema (the generative
    host's own check, so a venue and the host agree on what a schema is)."""
    from edgeos.runtime.structured import SchemaRefusedError
    from edgeos.runtime.structured import check_json_schema as check

    try:
        check(dict(schema) if isinstance(schema, Mapping) else schema, where)
    except SchemaRefusedError as exc:
        raise ReplyError(str(exc)) from None


def answer_schema(
    schema: Mapping[str, Any] | None,
    tools: Mapping[str, Mapping[str, Any]],
    *,
    parallel: bool = False,
) -> dict[str, Any] | None:
    """The schema a venue decodes under: ``schema`` itself, or one object per tool
    (``{"name": ..., "arguments": ...}``, any one of them; with ``parallel`` an array of 1
    to ``MAX_PARALLEL_CALLS`` of them); None for free text."""
    if schema is not None and tools:
        raise ReplyError("schema and tools: ask for one or the other")
    if schema is not None:
        check_json_schema(schema, "schema")
        return dict(schema)
    if not tools:
        return None
    choices = []
    for name, arguments in tools.items():
        check_json_schema(arguments, f"tools: {name}")
        choices.append({
            "type": "object",
            "properties": {"name": {"enum": [name]}, "arguments": dict(arguments)},
            "required": ["name", "arguments"], "additionalProperties": False,
        })  # fmt: skip
    call = choices[0] if len(choices) == 1 else {"anyOf": choices}
    if not parallel:
        return call
    from edgeos.runtime.structured import MAX_PARALLEL_CALLS

    return {"type": "array", "items": call, "minItems": 1, "maxItems": MAX_PARALLEL_CALLS}


def read_reply(
    text: str,
    schema: Mapping[str, Any] | None,
    tools: Mapping[str, Mapping[str, Any]],
    *,
    validate: bool = True,
    parallel: bool = False,
) -> ChatReply:
    """The answer as the call asked for it; ReplyError when it is not.

    With ``schema`` the answer must parse and (unless ``validate`` is False: a journaled
    answer, checked when it was made, whose personal fields are pseudonyms now) validate.
    With ``tools`` it must be a call (or, asked for parallel calls, an array of 1 to
    ``MAX_PARALLEL_CALLS`` calls; one call alone is taken too) that names one of them and
    carries an object of arguments; the arguments themselves are checked where the tool
    call is acted on (for a connector operation: at its contract's boundary).
    """
    if schema is None and not tools:
        return ChatReply(text)
    try:
        value = json.loads(text)
    except ValueError:
        raise ReplyError(f"the answer is not JSON: {text[:80]!r}") from None
    if schema is not None and not validate:
        return ChatReply(text, value)
    if schema is not None:
        from jsonschema import validators  # type: ignore[import-untyped]

        validator = validators.validator_for(schema)(schema)
        problems = [
            f"/{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(value)
        ]
        if problems:
            raise ReplyError(f"the answer does not hold to the schema: {'; '.join(problems)}")
        return ChatReply(text, value)
    from edgeos.runtime.structured import MAX_PARALLEL_CALLS

    many = parallel and isinstance(value, list)
    if many and not 1 <= len(value) <= MAX_PARALLEL_CALLS:
        raise ReplyError(f"the answer makes {len(value)} calls: 1 to {MAX_PARALLEL_CALLS} "
                         "are allowed")  # fmt: skip
    return ChatReply(text, value, tuple(_call(v, tools) for v in (value if many else [value])))


def _call(value: Any, tools: Mapping[str, Mapping[str, Any]]) -> ToolCall:
    name = value.get("name") if isinstance(value, dict) else None
    arguments = value.get("arguments") if isinstance(value, dict) else None
    if name not in tools:
        raise ReplyError(f"the answer calls {name!r}, not a tool it was offered "
                         f"({', '.join(tools)})")  # fmt: skip
    if not isinstance(arguments, dict):
        raise ReplyError(f"the call of tool {name!r} has no object of arguments")
    return ToolCall(str(name), arguments)

"""Structured output: JSON Schemas and tool calls as constraints for decoding.

A JSON Schema checked by :func:`json_schema_text` holds an answer to the schema. A set of
:class:`Tools` with a choice holds it to a tool call, the JSON object
``{"name": TOOL, "arguments": {...}}`` whose ``arguments`` validate against that tool's
``parameters``: a JSON Schema ``anyOf`` over the tools, one branch each. With the choice
``auto`` the answer is either such a call or text that does not start with ``{`` (a Lark
grammar around the same schema), so a reader knows from the first character which it is.
:func:`parse_call` turns a finished answer into a :class:`ToolCall`.

Errors are :class:`~edgeos.errors.InvalidRequestError` subclasses naming the parameter at
fault (``tools[1].function.parameters``, ``tool_choice``), so the OpenAI-compatible API
can answer in its error shape.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edgeos.errors import InvalidRequestError

CHOICES = ("none", "auto", "required")
"""Tool choices besides the name of one tool."""
MAX_PARALLEL_CALLS = 8
"""Calls one answer may make when calls run in parallel."""

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# The call's head as constrained decoding writes it (compact JSON), and as a client may
# send it back in an assistant message.
_HEAD = re.compile(r'^\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*')


class SchemaRefusedError(InvalidRequestError):
    """A schema, tool or tool choice that cannot constrain decoding; ``param`` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.code: str | None = None


def check_json_schema(schema: Any, param: str) -> dict[str, Any]:
    """``schema`` if it is a valid JSON Schema object; SchemaRefusedError naming ``param``."""
    if not isinstance(schema, dict):
        raise SchemaRefusedError(param, "must be a JSON Schema object")
    from jsonschema import SchemaError, validators  # type: ignore[import-untyped]

    try:
        validators.validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.path) or "the top"
        raise SchemaRefusedError(
            param, f"not a valid JSON Schema at {where}: {exc.message}"
        ) from exc
    return schema


def json_schema_text(schema: Mapping[str, Any]) -> str:
    """A checked schema as the JSON text guidance takes: compact JSON only, because a small
    model let loose on whitespace pads until ``max_tokens``."""
    return json.dumps({"x-guidance": {"whitespace_flexible": False}, **schema})


@dataclass(frozen=True)
class Tool:
    """A function the model may call: its name, what it does, and its arguments' schema."""

    name: str
    parameters: Mapping[str, Any] = field(
        default_factory=lambda: {"type": "object", "properties": {}}
    )
    description: str = ""


@dataclass(frozen=True)
class ToolCall:
    """A call the model made: the tool's name and its arguments as JSON text, which parse
    and validate against the tool's ``parameters``."""

    name: str
    arguments: str


@dataclass(frozen=True)
class Tools:
    """Tools offered to a model and ``choice``: ``auto`` (a call or text), ``required`` (a
    call of any of them), ``none`` (text only) or one tool's name (a call of that tool).
    With ``parallel`` an answer that calls is a JSON array of 1 to
    :data:`MAX_PARALLEL_CALLS` calls (:func:`parse_calls`) instead of one call. Checked on
    creation."""

    tools: tuple[Tool, ...]
    choice: str = "auto"
    parallel: bool = False

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for index, tool in enumerate(self.tools):
            where = f"tools[{index}].function"
            if not _NAME.match(tool.name):
                raise SchemaRefusedError(
                    f"{where}.name", f"{tool.name!r} must be 1-64 letters, digits, _ or -"
                )
            if tool.name in seen:
                raise SchemaRefusedError(f"{where}.name", f"{tool.name!r} is named twice")
            seen.add(tool.name)
            check_json_schema(tool.parameters, f"{where}.parameters")
        if not self.tools:
            raise SchemaRefusedError("tools", "must name at least one tool")
        if self.choice not in CHOICES and self.choice not in seen:
            raise SchemaRefusedError(
                "tool_choice",
                f"{self.choice!r} is not 'none', 'auto', 'required' or a tool given in tools",
            )

    @property
    def active(self) -> bool:
        """Whether the model may call a tool at all."""
        return self.choice != "none"

    def guidance(self) -> tuple[str, str] | None:
        """The constraint for ONNX Runtime GenAI's guidance, ``(kind, grammar)``, or None
        when the answer is free text."""
        if not self.active:
            return None
        chosen = [t for t in self.tools if self.choice in ("auto", "required", t.name)]
        branches = [
            {
                "type": "object",
                "properties": {"name": {"const": t.name}, "arguments": dict(t.parameters)},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for t in chosen
        ]
        calls: dict[str, Any] = {"anyOf": branches}
        if self.parallel:
            calls = {"type": "array", "items": calls, "minItems": 1,
                     "maxItems": MAX_PARALLEL_CALLS}  # fmt: skip
        schema = json_schema_text(calls)
        if self.choice != "auto":
            return "json_schema", schema
        # Text cannot start as a call does, so a reader knows from the first character.
        first = "{\\[" if self.parallel else "{"
        return (
            "lark_grammar",
            f"start: call | text\ncall: %json {schema}\ntext: /[^{first}](.|\\n)*/\n",
        )

    def describe(self) -> str:
        """The tools as a system message, short because small models have small contexts:
        each tool's name, argument names and description (decoding enforces the rest)."""
        lines = ["Tools:"]
        for tool in self.tools:
            properties = tool.parameters.get("properties")
            names = ", ".join(properties) if isinstance(properties, dict) else ""
            lines.append(f"{tool.name}({names}): {tool.description}".rstrip(": "))
        return "\n".join(lines)


def call_head(text: str) -> tuple[str, int] | None:
    """The tool's name in the start of a call's text and where its arguments begin; None
    until the head is complete."""
    match = _HEAD.match(text)
    if match is None:
        return None
    return str(json.loads(match.group(1))), match.end()


def parse_call(text: str) -> ToolCall | None:
    """The tool call a finished answer is, or None for text (or a call cut short)."""
    if not text.startswith("{"):
        return None
    head = call_head(text)
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    if head is None or not isinstance(doc, dict) or not isinstance(doc.get("arguments"), dict):
        return None
    name, start = head
    # The arguments exactly as generated: a streamed call's pieces add up to them.
    end = text.rstrip().rfind("}")
    return ToolCall(name, text[start:end].rstrip())


def parse_calls(text: str) -> list[ToolCall] | None:
    """The calls a finished answer of parallel calls is (a JSON array of calls), or None for
    text (or calls cut short). Each call's arguments are its text as generated."""
    if not text.startswith("["):
        return None
    spans = call_spans(text)
    calls = [parse_call(text[start:end]) for start, end in spans]
    # Complete only if the array closes right after its last call.
    if not spans or text[spans[-1][1] :].strip() != "]":
        return None
    return [call for call in calls if call is not None] if all(calls) else None


def call_spans(text: str) -> list[tuple[int, int]]:
    """Where each complete call of an array of calls (``[{...},{...}``) is in ``text``, so
    far: a call still being written is not in the list."""
    decoder = json.JSONDecoder()
    spans: list[tuple[int, int]] = []
    at = 1
    while True:
        while at < len(text) and text[at] in " ,\n\t\r":
            at += 1
        try:
            _, end = decoder.raw_decode(text, at)
        except ValueError:
            return spans
        spans.append((at, end))
        at = end


def call_text(name: str, arguments: str) -> str:
    """A call as the model writes it, for an assistant turn sent back in a conversation."""
    return f'{{"name":{json.dumps(name)},"arguments":{arguments}}}'

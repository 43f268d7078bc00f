"""How chat messages become one prompt for a generative model, and the turn markers.

A model trained by edgeos (:mod:`edgeos.genai.train`) learnt this format; a model made
elsewhere names its own markers in its ``genai_config.json``-side ``edgeos_chat.json``
(see :func:`ChatFormat.load`), falling back to these.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from edgeos.errors import InvalidModelError, InvalidRequestError
from edgeos.runtime.structured import Tools, call_text

PAD = "<|pad|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END = "<|end|>"

SPECIAL_TOKENS = (PAD, END, SYSTEM, USER, ASSISTANT)
"""Special tokens, in the order of their ids (0 is padding, 1 ends a turn)."""

CHAT_FILE = "edgeos_chat.json"
"""The file in a model directory that names its turn markers."""

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class ChatFormat:
    """The markers that open each role's turn and the one that ends a turn."""

    system: str = SYSTEM
    user: str = USER
    assistant: str = ASSISTANT
    end: str = END

    @classmethod
    def load(cls, directory: Path) -> ChatFormat:
        """The model directory's format, or the default when it names none."""
        path = directory / CHAT_FILE
        if not path.exists():
            return cls()
        try:
            fields = json.loads(path.read_text(encoding="utf-8"))
            return cls(**{k: str(v) for k, v in fields.items()})
        except (ValueError, TypeError) as exc:
            raise InvalidModelError(f"{path}: not a valid chat format: {exc}") from exc

    def prompt(self, messages: Sequence[Mapping[str, object]], tools: Tools | None = None) -> str:
        """The text a model continues to answer ``messages`` (OpenAI-style dicts), with the
        ``tools`` it may call described in a system turn first.

        An assistant message's ``tool_calls`` are written as the model writes calls (a JSON
        array of them when ``tools`` allow parallel calls, one object otherwise); a ``tool``
        message (a call's result) is a user turn that says so.
        """
        if not messages:
            raise InvalidRequestError("messages: at least one message is required")
        parts = []
        if tools is not None and tools.active:
            parts.append(f"{self.system}{tools.describe()}{self.end}")
        marker = {"system": self.system, "user": self.user, "assistant": self.assistant}
        for index, message in enumerate(messages):
            role = message.get("role")
            if role not in ROLES:
                raise InvalidRequestError(
                    f"messages[{index}].role: {role!r} is not one of {', '.join(ROLES)}"
                )
            content = _content(message, index, parallel=tools is not None and tools.parallel)
            if role == "tool":
                parts.append(f"{self.user}Tool result: {content}{self.end}")
            else:
                parts.append(f"{marker[str(role)]}{content}{self.end}")
        return "".join(parts) + self.assistant


def _content(message: Mapping[str, object], index: int, *, parallel: bool) -> str:
    """A message's text: its content, or the calls of an assistant message that made some."""
    content, calls = message.get("content"), message.get("tool_calls")
    if message.get("role") == "assistant" and calls:
        if not isinstance(calls, list):
            raise InvalidRequestError(f"messages[{index}].tool_calls: must be a list")
        texts = []
        for n, call in enumerate(calls):
            function = call.get("function") if isinstance(call, dict) else None
            name = function.get("name") if isinstance(function, dict) else None
            arguments = function.get("arguments") if isinstance(function, dict) else None
            if not isinstance(name, str) or not isinstance(arguments, str):
                raise InvalidRequestError(
                    f"messages[{index}].tool_calls[{n}].function: needs a name and arguments "
                    "as strings"
                )
            texts.append(call_text(name, arguments))
        written = f"[{','.join(texts)}]" if parallel else "".join(texts)
        return (content if isinstance(content, str) else "") + written
    if not isinstance(content, str):
        raise InvalidRequestError(f"messages[{index}].content: must be a string")
    return content


def format_exchange(ask: str, answer: str) -> str:
    """One training text: a user's request and the answer, in the default format."""
    fmt = ChatFormat()
    return fmt.prompt([{"role": "user", "content": ask}]) + answer + fmt.end

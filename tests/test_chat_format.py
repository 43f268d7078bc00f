"""Chat messages become the prompt a model learnt, calls written as the model writes them."""

from __future__ import annotations

from typing import Any

from edgeos.runtime.chat_format import ChatFormat
from edgeos.runtime.structured import Tool, Tools, parse_call, parse_calls

LOOKUP = Tool(
    "lookup",
    {"type": "object", "properties": {"sku": {"type": "string"}}, "required": ["sku"]},
    "find a product",
)
CALLS: list[dict[str, Any]] = [
    {"id": "call_1", "type": "function",
     "function": {"name": "lookup", "arguments": '{"sku":"sku-001"}'}},
    {"id": "call_2", "type": "function",
     "function": {"name": "lookup", "arguments": '{"sku":"sku-002"}'}},
]  # fmt: skip
MESSAGES: list[dict[str, Any]] = [
    {"role": "user", "content": "check two products"},
    {"role": "assistant", "content": None, "tool_calls": CALLS},
    {"role": "tool", "tool_call_id": "call_1", "content": "3 left"},
]


def _assistant_turn(prompt: str, chat: ChatFormat) -> str:
    return prompt.split(chat.assistant)[1].split(chat.end)[0]


def test_parallel_calls_sent_back_are_the_array_the_model_writes() -> None:
    chat = ChatFormat()
    prompt = chat.prompt(MESSAGES, Tools((LOOKUP,), parallel=True))
    calls = parse_calls(_assistant_turn(prompt, chat))
    assert calls is not None
    assert [(c.name, c.arguments) for c in calls] == [
        ("lookup", '{"sku":"sku-001"}'),
        ("lookup", '{"sku":"sku-002"}'),
    ]


def test_a_single_call_without_parallel_calls_is_one_object() -> None:
    chat = ChatFormat()
    one = [MESSAGES[0], {**MESSAGES[1], "tool_calls": CALLS[:1]}]
    prompt = chat.prompt(one, Tools((LOOKUP,)))
    call = parse_call(_assistant_turn(prompt, chat))
    assert call is not None
    assert call.arguments == '{"sku":"sku-001"}'

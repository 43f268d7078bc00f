"""Tool calls on the node's OpenAI-compatible API, through the ``openai`` client."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from jsonschema import validate  # type: ignore[import-untyped]

from edgeos.manifests.model import GenerationSpec, ModelSpec
from edgeos.node.process import ServerProcess, node_process
from edgeos.runtime import ModelRegistry
from edgeos.runtime.genai_store import register_generative
from edgeos.state import Database
from tests.genai_support import tiny_model

openai = pytest.importorskip("openai")
#: The client, untyped here: its request types are stricter than these tests' plain
#: dict messages, some of which are wrong on purpose.
Client = Any

# Short names and bounded strings: the tiny test model has a 128-token context and a
# tokenizer of a few hundred tokens, and the call must fit after the prompt.
STOCK = {
    "type": "object",
    "properties": {"sku": {"type": "string", "maxLength": 3}, "wh": {"enum": ["n", "s"]}},
    "required": ["sku", "wh"],
    "additionalProperties": False,
}
ORDER = {
    "type": "object",
    "properties": {
        "sku": {"type": "string", "maxLength": 3},
        "n": {"type": "integer", "minimum": 1, "maximum": 99},
    },
    "required": ["sku", "n"],
    "additionalProperties": False,
}
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "stock", "parameters": STOCK}},
    {"type": "function", "function": {"name": "order", "description": "reorder", "parameters": ORDER}},
]  # fmt: skip
SCHEMAS = {"stock": STOCK, "order": ORDER}
SHORT = {
    name: {"type": "object", "properties": {"k": {"enum": values}}, "required": ["k"],
           "additionalProperties": False}
    for name, values in (("a", ["n", "s"]), ("b", [1, 2]))
}  # fmt: skip
ASKS = [
    "OAT-1 left?",
    "Reorder 40 oat.",
    "Tell Bob oat is in.",
    "Stock of BEAN-7?",
    "Low on beans.",
]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    drafter = tiny_model(tmp_path_factory.getbasetemp())
    data_dir = tmp_path_factory.mktemp("tools") / "node"
    with Database(data_dir / "node.db") as db:
        registry = ModelRegistry(db, data_dir / "models")
        limits = GenerationSpec(max_running=1, max_queued=8)
        manifest = ModelSpec(kind="generative", generation=limits)
        register_generative(registry, drafter, name="drafter", manifest=manifest)
    with node_process(data_dir) as process:
        yield process


@pytest.fixture
def client(node: ServerProcess) -> Iterator[Client]:
    c = openai.OpenAI(base_url=f"{node.url}/v1", api_key=node.token, max_retries=0, timeout=30)
    yield c
    c.close()


def ask(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def test_every_required_tool_call_parses_and_validates(client: Client) -> None:
    names = set()
    for seed in range(40):
        done = client.chat.completions.create(
            model="drafter", messages=ask(ASKS[seed % len(ASKS)]), tools=TOOLS,
            tool_choice="required", temperature=1.0, seed=seed, parallel_tool_calls=False,
        )  # fmt: skip
        choice = done.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None
        (call,) = choice.message.tool_calls or []
        assert call.type == "function"
        assert call.id.startswith("call_")
        validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
        names.add(call.function.name)
    assert names == {"stock", "order"}  # sampling reaches both tools


def test_a_named_tool_choice_forces_that_tool(client: Client) -> None:
    for seed in range(10):
        done = client.chat.completions.create(
            model="drafter", messages=ask(ASKS[0]), tools=TOOLS, seed=seed,
            tool_choice={"type": "function", "function": {"name": "order"}},
            parallel_tool_calls=False,
        )  # fmt: skip
        (call,) = done.choices[0].message.tool_calls or []
        assert call.function.name == "order"
        validate(json.loads(call.function.arguments), ORDER)


def test_auto_gives_text_or_a_valid_call_and_none_gives_text(client: Client) -> None:
    kinds = set()
    for seed in range(20):
        done = client.chat.completions.create(
            model="drafter", messages=ask(ASKS[seed % len(ASKS)]), tools=TOOLS,
            temperature=2.0, seed=seed, parallel_tool_calls=False,
        )  # fmt: skip
        choice = done.choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls"
            (call,) = choice.message.tool_calls
            validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
            kinds.add("call")
        else:
            assert not (choice.message.content or "").startswith("{")
            kinds.add("text")
    # The tiny model was never taught to call tools: left to choose, it writes text.
    assert "text" in kinds
    plain = client.chat.completions.create(
        model="drafter", messages=ask(ASKS[1]), tools=TOOLS, tool_choice="none", max_tokens=20,
        temperature=0,
    )  # fmt: skip
    assert plain.choices[0].message.tool_calls is None
    assert plain.choices[0].finish_reason in ("stop", "length")


def test_a_streamed_call_adds_up_to_the_same_call(client: Client) -> None:
    settings: dict[str, Any] = {
        "model": "drafter", "tools": TOOLS, "tool_choice": "required",
        "temperature": 1.0, "parallel_tool_calls": False,
    }  # fmt: skip
    for seed in range(5):
        whole = client.chat.completions.create(messages=ask(ASKS[seed]), seed=seed, **settings)
        (expected,) = whole.choices[0].message.tool_calls or []
        chunks = list(
            client.chat.completions.create(
                messages=ask(ASKS[seed]), seed=seed, stream=True, **settings
            )
        )
        calls = [c for ch in chunks for c in ch.choices[0].delta.tool_calls or []]
        assert calls[0].id
        assert calls[0].function.name == expected.function.name
        assert all(c.id is None for c in calls[1:])
        arguments = "".join(c.function.arguments or "" for c in calls)
        assert arguments == expected.function.arguments
        assert len(calls) > 2  # the arguments came piece by piece
        assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_parallel_calls_each_validate_with_their_own_id_and_stream_the_same(
    client: Client,
) -> None:
    """OpenAI's default, ``parallel_tool_calls``: the answer is decoded as an array of calls.
    The tiny model, never taught when to stop calling, often runs out of context; the
    calls it completed are still returned. Tools with short calls, so several fit."""
    tools = [{"type": "function", "function": {"name": name, "parameters": schema}}
             for name, schema in SHORT.items()]  # fmt: skip
    settings: dict[str, Any] = {"model": "drafter", "tools": tools, "tool_choice": "required",
                                "temperature": 1.0}  # fmt: skip
    counts = []
    for seed in range(12):
        done = client.chat.completions.create(messages=ask(ASKS[seed % 5]), seed=seed, **settings)
        choice = done.choices[0]
        calls = choice.message.tool_calls or []
        assert choice.finish_reason in ("tool_calls", "length"), choice
        if choice.finish_reason == "tool_calls":
            assert calls, choice
            assert json.loads(choice.message.content or "null") is None
        for call in calls:
            validate(json.loads(call.function.arguments), SHORT[call.function.name])
        assert len({call.id for call in calls}) == len(calls)
        counts.append(len(calls))
        if seed < 4:  # streamed, the same calls piece by piece, each at its index
            chunks = list(client.chat.completions.create(messages=ask(ASKS[seed % 5]), seed=seed,
                                                         stream=True, **settings))  # fmt: skip
            pieces = [c for ch in chunks for c in ch.choices[0].delta.tool_calls or []]
            streamed: dict[int, list[Any]] = {}
            for piece in pieces:
                streamed.setdefault(piece.index, []).append(piece)
            for index, call in enumerate(calls):
                head, *rest = streamed[index]
                assert (head.id is not None, head.function.name) == (True, call.function.name)
                assert all(p.id is None for p in rest)
                assert "".join(p.function.arguments or "" for p in rest) == call.function.arguments
            assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    assert max(counts) >= 2, counts  # several calls in one answer


def test_a_conversation_with_a_call_and_its_result_goes_on(client: Client) -> None:
    call = {"id": "call_1", "type": "function",
            "function": {"name": "stock", "arguments": '{"sku":"OAT","wh":"n"}'}}  # fmt: skip
    messages: list[Any] = [
        *ask(ASKS[0]),
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12 units"},
    ]
    done = client.chat.completions.create(
        model="drafter", messages=messages, tools=TOOLS, tool_choice="none", max_tokens=20
    )
    assert done.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize(
    ("tools", "choice", "param"),
    [
        (
            [{"type": "function", "function": {"name": "get stock!"}}],
            None,
            "tools[0].function.name",
        ),
        ([{"type": "retrieval"}], None, "tools[0].type"),
        (
            [
                TOOLS[0],
                {"type": "function", "function": {"name": "x", "parameters": {"type": "nope"}}},
            ],
            None,
            "tools[1].function.parameters",
        ),
        ([TOOLS[0], TOOLS[0]], None, "tools[1].function.name"),
        (TOOLS, {"type": "function", "function": {"name": "delete_all"}}, "tool_choice"),
        (TOOLS, "sometimes", "tool_choice"),
        (None, "required", "tool_choice"),
    ],
)
def test_a_bad_tools_definition_is_refused_naming_the_parameter(
    client: Client, tools: Any, choice: Any, param: str
) -> None:
    extra: dict[str, Any] = {}
    if tools is not None:
        extra["tools"] = tools
    if choice is not None:
        extra["tool_choice"] = choice
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="drafter", messages=ask(ASKS[0]), **extra)
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    assert param in error["message"]


def test_tools_with_a_json_schema_answer_are_refused(client: Client) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="drafter", messages=ask(ASKS[0]), tools=TOOLS,
            response_format={"type": "json_object"},
        )  # fmt: skip
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["param"] == "response_format"


def test_parameters_guidance_cannot_compile_are_refused_before_any_answer(
    client: Client,
) -> None:
    # Valid JSON Schema, but its pattern has a look-ahead no constrained decoder supports.
    params = {"type": "object", "properties": {"a": {"type": "string", "pattern": "(?=x)a"}}}
    tools = [{"type": "function", "function": {"name": "t", "parameters": params}}]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(
                model="drafter", messages=ask(ASKS[0]), tools=tools, tool_choice="required",
                stream=stream,
            )  # fmt: skip
        assert isinstance(caught.value.body, dict)
        assert caught.value.body["param"] == "tools"
        assert "look-around" in caught.value.body["message"]
    # The refusal left the model free: the next request is answered.
    done = client.chat.completions.create(model="drafter", messages=ask(ASKS[0]), max_tokens=5)
    assert done.choices[0].finish_reason in ("stop", "length")

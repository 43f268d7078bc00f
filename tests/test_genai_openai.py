"""The node's OpenAI-compatible API in a real node process, driven by the ``openai`` client."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from edgeos.genai.corpus import examples
from edgeos.manifests.model import GenerationSpec, ModelSpec
from edgeos.node.process import ServerProcess, node_process
from edgeos.runtime import ModelRegistry
from edgeos.runtime.genai_store import register_generative
from edgeos.state import Database
from tests import onnx_models
from tests.genai_support import slow_model, tiny_model
from tests.memory_support import hashing_model

openai = pytest.importorskip("openai")
#: The client, untyped here: its request types are stricter than these tests' plain
#: dict messages, some of which are wrong on purpose.
Client = Any

ASK = [{"role": "user", "content": "Tell Bob the oat milk is back in stock."}]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    drafter = tiny_model(tmp_path_factory.getbasetemp())
    root = tmp_path_factory.mktemp("openai")
    data_dir = root / "node"
    with Database(data_dir / "node.db") as db:
        registry = ModelRegistry(db, data_dir / "models")
        limits = GenerationSpec(max_running=1, max_queued=4)
        register_generative(
            registry, drafter, name="drafter",
            manifest=ModelSpec(kind="generative", generation=limits),
        )  # fmt: skip
        slow = slow_model(tmp_path_factory.getbasetemp())
        register_generative(registry, slow, name="slow")
        solo = ModelSpec(kind="generative", generation=GenerationSpec(max_queued=0))
        register_generative(registry, slow, name="slow-solo", manifest=solo)
        registry.add(hashing_model(root), name="hash-embed")
        registry.add(onnx_models.mlp(root / "risk.onnx"), name="risk")
    with node_process(data_dir) as process:
        yield process


@pytest.fixture
def client(node: ServerProcess) -> Iterator[Client]:
    # No retries: a refusal must reach the test as it was sent.
    c = openai.OpenAI(base_url=f"{node.url}/v1", api_key=node.token, max_retries=0, timeout=30)
    yield c
    c.close()


def counter(node: ServerProcess, line_start: str) -> float:
    text = httpx.get(f"{node.url}/metrics", headers=node.headers).text
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(line_start)]
    return sum(values)


def long_seed(client: Client, max_tokens: int, model: str = "drafter") -> int:
    """A seed whose sampling at temperature 2 runs to ``max_tokens`` without ending."""
    for seed in range(200):
        done = client.chat.completions.create(
            model=model, messages=ASK, max_tokens=max_tokens, temperature=2.0, seed=seed
        )
        if done.choices[0].finish_reason == "length":
            return seed
    raise AssertionError("no seed generates that long")


def test_models_lists_every_registered_model(client: Client) -> None:
    ids = {m.id for m in client.models.list()}
    assert ids == {"drafter", "slow", "slow-solo", "hash-embed", "risk"}
    assert client.models.retrieve("drafter").owned_by == "edgeos"


def test_chat_completion_and_its_stream_give_the_same_seeded_answer(
    client: Client,
) -> None:
    seed = long_seed(client, 12)
    settings = {"max_tokens": 12, "temperature": 2.0, "top_p": 0.95, "seed": seed}
    done = client.chat.completions.create(model="drafter", messages=ASK, **settings)
    choice = done.choices[0]
    assert done.object == "chat.completion"
    assert done.model == "drafter"
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "length"
    assert done.usage is not None
    assert done.usage.completion_tokens == 12
    assert done.usage.total_tokens == done.usage.prompt_tokens + 12

    chunks = list(
        client.chat.completions.create(
            model="drafter",
            messages=ASK,
            stream=True,
            stream_options={"include_usage": True},
            **settings,
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12


def test_a_stop_string_cuts_the_answer(client: Client) -> None:
    seed = long_seed(client, 40)
    settings = {"max_tokens": 40, "temperature": 2.0, "seed": seed}
    full = client.chat.completions.create(model="drafter", messages=ASK, **settings)
    text = full.choices[0].message.content or ""
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = client.chat.completions.create(model="drafter", messages=ASK, stop=stop, **settings)
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_node_status_counts_the_loaded_generative_model(
    client: Client, node: ServerProcess
) -> None:
    client.chat.completions.create(model="drafter", messages=ASK, max_tokens=4)
    memory = httpx.get(f"{node.url}/api/status", headers=node.headers).json()["memory"]
    # Its worker process's memory (at least its weights and the KV caches it may fill),
    # which the node process's own figure does not include.
    assert memory["generative"] > 16 * 2**20
    assert memory["process"] > 0


DRAFT_SCHEMA = {
    "type": "object",
    "properties": {
        "customer": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["restock", "delay"]},
        "days": {"type": "integer", "minimum": 0, "maximum": 30},
    },
    "required": ["customer", "kind", "days"],
    "additionalProperties": False,
}


def test_json_schema_output_parses_and_validates_on_every_sampled_prompt(
    client: Client,
) -> None:
    import jsonschema  # type: ignore[import-untyped]

    for index, (ask, _) in enumerate(examples(50, seed=7)):
        done = client.chat.completions.create(
            model="drafter", messages=[{"role": "user", "content": ask}], seed=index,
            temperature=1.0, max_tokens=80,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "draft", "schema": DRAFT_SCHEMA, "strict": True},
            },
        )  # fmt: skip
        assert done.choices[0].finish_reason == "stop", done.choices[0].message.content
        jsonschema.validate(json.loads(done.choices[0].message.content or ""), DRAFT_SCHEMA)


def test_a_schema_that_is_not_json_schema_is_refused(client: Client) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model="drafter", messages=ASK,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "object", "properties": 3}},
            },
        )  # fmt: skip
    error = error_of(bad.value)
    assert error["param"] == "response_format.json_schema.schema"
    assert "not a valid JSON Schema" in str(error["message"])


def test_embeddings_come_from_the_registered_embedding_model(client: Client) -> None:
    texts = ["oat milk is back", "the truck was late", "oat milk is back"]
    # The client asks for base64 by default and decodes it; ask for floats too.
    packed = client.embeddings.create(model="hash-embed", input=texts)
    plain = client.embeddings.create(model="hash-embed", input=texts, encoding_format="float")
    a = np.array([d.embedding for d in packed.data])
    b = np.array([d.embedding for d in plain.data])
    assert a.shape == (3, 128)
    assert np.allclose(a, b, atol=1e-6)
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-4)
    assert np.allclose(a[0], a[2])
    assert not np.allclose(a[0], a[1])
    assert packed.usage.prompt_tokens > 0
    assert packed.model == "hash-embed"
    one = client.embeddings.create(model="hash-embed", input="oat milk is back")
    assert np.allclose(one.data[0].embedding, a[0], atol=1e-6)


def error_of(exc: Any) -> dict[str, object]:
    """The error object of an ``openai.APIStatusError``'s body, in OpenAI's shape."""
    body = exc.response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


def test_errors_come_in_openai_shape_naming_what_is_wrong(client: Client) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=ASK)
    assert error_of(missing.value)["code"] == "model_not_found"

    with pytest.raises(openai.BadRequestError) as hot:
        client.chat.completions.create(model="drafter", messages=ASK, temperature=3.0)
    assert error_of(hot.value)["param"] == "temperature"

    with pytest.raises(openai.BadRequestError) as long:
        client.chat.completions.create(
            model="drafter", messages=[{"role": "user", "content": "oat milk " * 200}], stream=True
        )
    error = error_of(long.value)
    assert error["code"] == "context_length_exceeded"
    assert "128 tokens" in str(error["message"])

    with pytest.raises(openai.BadRequestError) as predictive:
        client.chat.completions.create(model="risk", messages=ASK)
    assert error_of(predictive.value)["code"] == "model_not_generative"

    with pytest.raises(openai.BadRequestError) as role:
        client.chat.completions.create(
            model="drafter", messages=[{"role": "robot", "content": "x"}]
        )
    assert "messages[0].role" in str(error_of(role.value)["message"])

    with pytest.raises(openai.BadRequestError) as embed:
        client.embeddings.create(model="drafter", input="x")
    assert error_of(embed.value)["type"] == "invalid_request_error"


def test_a_body_that_is_not_json_is_refused_in_the_same_shape(node: ServerProcess) -> None:
    response = httpx.post(
        f"{node.url}/v1/chat/completions", content=b"{not json", headers=node.headers
    )
    assert response.status_code == 400
    assert "not JSON" in response.json()["error"]["message"]


def test_a_client_that_disconnects_mid_stream_cancels_its_generation(
    client: Client, node: ServerProcess
) -> None:
    seed = long_seed(client, 40, model="slow")  # no end for 40 tokens: ~150 ms
    cancelled = 'edgeos_generations_total{model="slow",outcome="cancelled"}'
    tokens = 'edgeos_generated_tokens_total{model="slow"}'
    before, tokens_before = counter(node, cancelled), counter(node, tokens)
    stream = client.chat.completions.create(
        model="slow", messages=ASK, stream=True, max_tokens=200, temperature=2.0, seed=seed
    )
    first = next(iter(stream))
    assert first.choices[0].delta.role == "assistant"
    stream.close()
    deadline = time.monotonic() + 10
    while counter(node, cancelled) == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert counter(node, cancelled) == before + 1
    assert counter(node, tokens) - tokens_before < 200
    # Its turn was given back: the model answers the next request.
    after = client.chat.completions.create(model="slow", messages=ASK, max_tokens=2)
    assert after.choices[0].finish_reason in ("stop", "length")


def test_a_request_past_the_queue_gets_429_with_retry_after(
    client: Client, node: ServerProcess
) -> None:
    seed = long_seed(client, 40, model="slow-solo")  # no end for 40 tokens: ~150 ms
    with client.chat.completions.create(
        model="slow-solo", messages=ASK, stream=True, max_tokens=200, temperature=2.0, seed=seed
    ) as busy:
        next(iter(busy))  # it is generating now, and nothing may wait behind it
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(
                model="slow-solo", messages=ASK, max_tokens=2, stream=True
            )
        with pytest.raises(openai.RateLimitError) as refused:
            client.chat.completions.create(model="slow-solo", messages=ASK, max_tokens=2)
    assert refused.value.response.headers["retry-after"] == "1"
    error = error_of(refused.value)
    assert error["code"] == "queue_full"
    assert "busy" in str(error["message"])


def test_a_generative_model_refuses_tensor_inference(node: ServerProcess) -> None:
    body = {"inputs": [{"name": "input_ids", "shape": [1, 1], "datatype": "INT64", "data": [1]}]}
    response = httpx.post(f"{node.url}/v2/models/drafter/infer", json=body, headers=node.headers)
    assert response.status_code == 400
    assert "/v1/chat/completions" in response.json()["error"]

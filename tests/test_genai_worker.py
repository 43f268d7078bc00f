"""Generative models generate in a worker process: the node's event loop never waits on
them, a killed worker fails only its requests and comes back, unloading stops it."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeos.errors import UnavailableError
from edgeos.manifests.model import GenerationSpec, ModelSpec
from edgeos.runtime import ModelRegistry
from edgeos.runtime.genai_store import register_generative
from edgeos.runtime.generative import Delta, Finish, GenerativeHost, Sampling
from edgeos.telemetry import MetricsRegistry
from edgeos.telemetry.process import process_rss_bytes
from tests.genai_support import slow_model, tiny_model

ASK = [{"role": "user", "content": "Tell Bob the oat milk is back in stock."}]


@pytest.fixture(scope="session")
def drafter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return slow_model(tmp_path_factory.getbasetemp())


@pytest.fixture
def metrics() -> MetricsRegistry:
    return MetricsRegistry()


@pytest.fixture
def host(registry: ModelRegistry, metrics: MetricsRegistry) -> Iterator[GenerativeHost]:
    h = GenerativeHost(registry, metrics)
    yield h
    h.close()


def gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (and been reaped)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process_rss_bytes(pid) is None:
            return True
        time.sleep(0.02)
    return False


def test_the_event_loop_keeps_ticking_while_models_read_long_prompts(
    slow: Path, registry: ModelRegistry, host: GenerativeHost
) -> None:
    # Three models, each reading 200 tokens of prompt: the untrained wide model takes about
    # 100 ms, during which ONNX Runtime GenAI holds the GIL (in the node's process, the
    # loop stalled as long: 90-130 ms).
    models = []
    for name in ("a", "b", "c"):
        register_generative(registry, slow, name=name)
        models.append(host.model(name))
    prompt = models[0].chat.prompt([{"role": "user", "content": "oat milk " * 28}])
    assert len(models[0].encode(prompt)) >= 200

    async def run() -> list[float]:
        gaps, done = [], False

        async def tick() -> None:
            last = time.perf_counter()
            while not done:
                await asyncio.sleep(0.001)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0.01)  # ticking before the first request
        for model in models:
            _, finish = await model.complete(prompt, Sampling(max_tokens=2, temperature=0))
            assert finish.completion_tokens == 2
        done = True
        await ticker
        return sorted(gaps)

    # Each first read would be one long gap; the third longest leaves out two stalls a
    # busy machine may cause whatever the node does.
    assert asyncio.run(run())[-3] < 0.05


def test_a_killed_worker_fails_its_request_and_the_next_one_is_served(
    drafter: Path, registry: ModelRegistry, host: GenerativeHost, metrics: MetricsRegistry
) -> None:
    register_generative(registry, drafter, name="drafter", manifest=spec(max_running=1))
    model = host.model("drafter")
    first = model.worker_pid
    # A string of at least 80 characters: the answer is still generating when the worker
    # dies, more pieces than the worker runs ahead of this reader.
    held = Sampling(schema='{"type": "string", "minLength": 80}', max_tokens=90)

    async def run() -> None:
        stream = model.stream(model.chat.prompt(ASK), held)
        assert isinstance(await anext(stream), Delta)
        os.kill(first, signal.SIGKILL)
        with pytest.raises(UnavailableError, match="worker process exited") as caught:
            async for _ in stream:
                pass
        assert caught.value.retryable
        # Its turn was given back, and a new worker serves the next request.
        deadline = time.monotonic() + 20
        while True:
            try:
                _, finish = await model.complete(model.chat.prompt(ASK), Sampling(max_tokens=3))
                break
            except UnavailableError:  # still restarting
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
        assert isinstance(finish, Finish)

    asyncio.run(run())
    assert model.worker_pid != first
    assert not model.busy
    generations = metrics.counter("edgeos_generations_total", "", ("model", "outcome"))
    assert generations.value("drafter", "error") == 1


def test_unloading_and_closing_stop_the_worker_and_its_memory_counts(
    drafter: Path, registry: ModelRegistry, host: GenerativeHost
) -> None:
    register_generative(registry, drafter, name="a")
    register_generative(registry, drafter, name="b")
    a, b = host.model("a"), host.model("b")
    pids = a.worker_pid, b.worker_pid
    rss = process_rss_bytes(pids[0])
    assert rss is not None
    assert a.memory_bytes > 0.9 * rss  # the worker's memory, not counted in the node's
    assert host.memory_used() >= a.memory_bytes
    assert host.unload("a", "1")
    assert gone(pids[0])
    # The next request loads it again, in a new worker.
    _, finish = asyncio.run(host.model("a").complete("hello", Sampling(max_tokens=2)))
    assert finish.prompt_tokens > 0
    again = host.model("a").worker_pid
    host.close()
    assert gone(again)
    assert gone(pids[1])


def spec(**generation: object) -> ModelSpec:
    return ModelSpec(kind="generative", generation=GenerationSpec.model_validate(generation))

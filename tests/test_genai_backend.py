"""Generative models behind the registry: registration, sampling, streaming, limits, turns."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeos.errors import InvalidModelError, ManifestError
from edgeos.manifests.model import GenerationSpec, ModelSpec
from edgeos.runtime import ModelRegistry
from edgeos.runtime.genai_store import register_generative
from edgeos.runtime.generative import (
    Delta,
    Finish,
    GenerationError,
    GenerativeHost,
    GenerativeModel,
    QueueFullError,
    Sampling,
    _StopScanner,
)
from edgeos.state import Database
from edgeos.telemetry import MetricsRegistry
from tests.genai_support import slow_model, tiny_model

ASK = [{"role": "user", "content": "Tell Bob the oat milk is back in stock."}]


@pytest.fixture(scope="session")
def drafter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory.getbasetemp())


def spec(**generation: object) -> ModelSpec:
    return ModelSpec(kind="generative", generation=GenerationSpec.model_validate(generation))


@pytest.fixture
def host(registry: ModelRegistry) -> Iterator[GenerativeHost]:
    h = GenerativeHost(registry, MetricsRegistry())
    yield h
    h.close()


def collect(model: GenerativeModel, sampling: Sampling) -> tuple[list[str], Finish]:
    async def run() -> tuple[list[str], Finish]:
        pieces: list[str] = []
        async for item in model.stream(model.chat.prompt(ASK), sampling):
            if isinstance(item, Delta):
                pieces.append(item.text)
            else:
                return pieces, item
        raise AssertionError("no Finish")

    return asyncio.run(run())


def long_seed(model: GenerativeModel, max_tokens: int) -> int:
    """A seed whose sampling at temperature 2 runs to ``max_tokens`` without ending."""
    for seed in range(200):
        _, finish = collect(model, Sampling(max_tokens=max_tokens, temperature=2.0, seed=seed))
        if finish.reason == "length":
            return seed
    raise AssertionError("no seed generates that long")


# -- registration -----------------------------------------------------------------------


def test_a_model_directory_registers_as_versions_sharing_one_copy(
    drafter: Path, registry: ModelRegistry
) -> None:
    first = register_generative(registry, drafter, name="drafter")
    second = register_generative(registry, drafter, name="drafter")
    assert (first.version, second.version) == ("1", "2")
    assert first.kind == "generative"
    assert first.task == "generation"
    assert first.generation is not None
    assert first.generation.context_length == 128
    assert {t.name for t in first.inputs} >= {"input_ids", "past_key_values.0.key"}
    stored = registry.path(first)
    assert stored == registry.path(second)
    assert (stored / "genai_config.json").is_file()
    registry.remove("drafter", "1")
    assert stored.is_dir()  # version 2 still refers to it
    registry.remove("drafter")
    assert not stored.exists()


def test_the_sweep_removes_model_directories_an_interrupted_add_left(
    drafter: Path, registry: ModelRegistry
) -> None:
    kept = registry.path(register_generative(registry, drafter, name="drafter"))
    orphan = registry.store / "genai" / ("ab" * 32)  # copied, then killed before its row
    staging = registry.store / "genai" / ".tmp-999999999-x"  # a copy whose writer died
    for leftover in (orphan, staging):
        shutil.copytree(drafter, leftover)
    assert registry.sweep(grace=3600) == []  # young: an add may be under way
    assert sorted(registry.sweep(grace=0)) == sorted([orphan, staging])
    assert not orphan.exists()
    assert not staging.exists()
    assert (kept / "genai_config.json").is_file()


def broken(drafter: Path, tmp_path: Path, change: str) -> Path:
    copy = tmp_path / "broken"
    shutil.copytree(drafter, copy)
    config_path = copy / "genai_config.json"
    config = json.loads(config_path.read_text())
    if change == "no config":
        config_path.unlink()
    elif change == "bad field":
        config["model"]["context_length"] = "long"
    elif change == "wrong tensor names":
        config["model"]["decoder"]["inputs"]["past_key_names"] = "past.%d.k"
    elif change == "no tokenizer":
        (copy / "tokenizer.json").unlink()
    elif change == "corrupt decoder":
        (copy / "model.onnx").write_bytes(b"not onnx")
    if change not in ("no config",):
        config_path.write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("no config", "has no genai_config.json"),
        ("bad field", "field 'model.context_length' must be a int"),
        ("wrong tensor names", "names tensors the decoder lacks: past.0.k"),
        ("no tokenizer", "has no tokenizer.json"),
        ("corrupt decoder", "is not an ONNX model"),
    ],
)
def test_an_invalid_model_directory_is_refused_and_leaves_nothing(
    drafter: Path, registry: ModelRegistry, tmp_path: Path, change: str, message: str
) -> None:
    with pytest.raises(InvalidModelError, match=message):
        register_generative(registry, broken(drafter, tmp_path, change), name="drafter")
    assert registry.catalog() == []
    assert not (registry.store / "genai").exists()


def test_a_single_onnx_file_cannot_register_as_generative(
    registry: ModelRegistry, mlp_file: Path
) -> None:
    with pytest.raises(ManifestError, match="field 'kind': a generative model is a directory"):
        registry.add(mlp_file, name="risk", manifest=spec())
    assert registry.catalog() == []


def test_limits_the_memory_budget_cannot_hold_are_refused(
    drafter: Path, registry: ModelRegistry
) -> None:
    with pytest.raises(ManifestError, match=r"generation.memory_budget_mb.*need"):
        register_generative(registry, drafter, manifest=spec(memory_budget_mb=0.01))
    with pytest.raises(ManifestError, match=r"generation.context_length.*over the model's 128"):
        register_generative(registry, drafter, manifest=spec(context_length=4096))
    assert registry.catalog() == []


# -- generation -------------------------------------------------------------------------


def test_streamed_pieces_make_the_whole_answer_and_a_seed_repeats_it(
    drafter: Path, registry: ModelRegistry, host: GenerativeHost
) -> None:
    register_generative(registry, drafter, name="drafter")
    model = host.model("drafter")
    seed = long_seed(model, 20)
    sampling = Sampling(max_tokens=20, temperature=2.0, seed=seed)
    pieces, finish = collect(model, sampling)
    text, again = asyncio.run(model.complete(model.chat.prompt(ASK), sampling))
    assert "".join(pieces) == text
    assert len(pieces) > 1
    assert finish == again
    assert finish.reason == "length"
    assert finish.completion_tokens == 20
    assert finish.prompt_tokens == len(model.encode(model.chat.prompt(ASK)))


def test_a_stop_string_ends_the_answer_before_it(drafter: Path, registry: ModelRegistry) -> None:
    metrics = MetricsRegistry()
    register_generative(registry, drafter, name="drafter")
    model = GenerativeHost(registry, metrics).model("drafter")
    seed = long_seed(model, 40)
    full, _ = asyncio.run(
        model.complete(model.chat.prompt(ASK), Sampling(max_tokens=40, temperature=2.0, seed=seed))
    )
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    generations = metrics.counter("edgeos_generations_total", "", ("model", "outcome"))
    stops = generations.value("drafter", "stop")
    cut, finish = asyncio.run(
        model.complete(
            model.chat.prompt(ASK),
            Sampling(max_tokens=40, temperature=2.0, seed=seed, stop=("\x00never", stop)),
        )
    )
    assert cut == full[: full.index(stop)]
    assert finish.reason == "stop"
    assert finish.completion_tokens < 40
    for _ in range(100):  # the generating thread records its end as it stops
        if generations.value("drafter", "stop") == stops + 1:
            break
        time.sleep(0.01)
    assert generations.value("drafter", "stop") == stops + 1
    assert generations.value("drafter", "cancelled") == 0


def test_the_stop_scanner_holds_back_what_may_begin_a_stop_string() -> None:
    scanner = _StopScanner(["END!"])
    assert scanner.feed("abc E") == ("abc ", False)
    assert scanner.feed("N") == ("", False)
    assert scanner.feed("x") == ("ENx", False)
    assert scanner.feed("yEN") == ("y", False)
    assert scanner.feed("D!zz") == ("", True)
    assert _StopScanner(["zz"]).feed("abz") == ("ab", False)


def test_prompts_over_the_context_are_refused_before_generating(
    drafter: Path, registry: ModelRegistry, host: GenerativeHost
) -> None:
    register_generative(registry, drafter, name="drafter", manifest=spec(context_length=64))
    model = host.model("drafter")
    prompt = model.chat.prompt([{"role": "user", "content": "oat milk " * 40}])
    with pytest.raises(GenerationError, match="takes at most 64 tokens") as caught:
        asyncio.run(model.complete(prompt, Sampling()))
    assert caught.value.code == "context_length_exceeded"
    short = model.chat.prompt(ASK)
    with pytest.raises(GenerationError, match="max_tokens asks for 60") as caught:
        asyncio.run(model.complete(short, Sampling(max_tokens=60)))
    assert caught.value.param == "max_tokens"


@pytest.mark.parametrize(
    ("settings", "param"),
    [
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": ("",)}, "stop"),
    ],
)
def test_bad_sampling_settings_name_the_parameter(settings: dict[str, object], param: str) -> None:
    with pytest.raises(GenerationError) as caught:
        Sampling(**settings)  # type: ignore[arg-type]
    assert caught.value.param == param


def test_a_predictive_model_is_not_served_as_generative(
    registry: ModelRegistry, host: GenerativeHost, mlp_file: Path
) -> None:
    registry.add(mlp_file, name="risk")
    with pytest.raises(GenerationError, match="not a generative model"):
        host.model("risk")


# -- turns, the queue and cancellation --------------------------------------------------


def test_requests_take_turns_in_order_and_one_past_the_queue_is_refused(
    drafter: Path, registry: ModelRegistry, host: GenerativeHost
) -> None:
    register_generative(registry, drafter, manifest=spec(max_running=1, max_queued=2))
    model = host.model("drafter")
    seed = long_seed(model, 90)
    sampling = Sampling(max_tokens=90, temperature=2.0, seed=seed)
    finished: list[int] = []

    async def one(index: int) -> None:
        await model.complete(model.chat.prompt(ASK), sampling)
        finished.append(index)

    async def run() -> list[BaseException | None]:
        # All four ask within one turn of the loop, while the first generates 90 tokens.
        tasks = [asyncio.create_task(one(i)) for i in range(4)]
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(run())
    assert results[:3] == [None, None, None]
    assert isinstance(results[3], QueueFullError)
    assert results[3].retryable
    assert finished == [0, 1, 2]


def test_a_reader_that_goes_away_stops_the_generation_and_frees_its_turn(
    drafter: Path, registry: ModelRegistry
) -> None:
    metrics = MetricsRegistry()
    host = GenerativeHost(registry, metrics)
    register_generative(registry, drafter, manifest=spec(max_running=1, max_queued=0))
    model = host.model("drafter")
    seed = long_seed(model, 90)
    generations = metrics.counter("edgeos_generations_total", "", ("model", "outcome"))
    tokens = metrics.counter("edgeos_generated_tokens_total", "", ("model",))
    before = tokens.value("drafter")

    async def run() -> None:
        stream = model.stream(
            model.chat.prompt(ASK), Sampling(max_tokens=90, temperature=2.0, seed=seed)
        )
        assert isinstance(await anext(stream), Delta)
        await stream.aclose()
        # The turn passes on once the generating thread has stopped.
        for _ in range(200):
            if generations.value("drafter", "cancelled") == 1:
                break
            await asyncio.sleep(0.01)
        await model.complete(model.chat.prompt(ASK), Sampling(max_tokens=2))

    asyncio.run(run())
    assert generations.value("drafter", "cancelled") == 1
    assert tokens.value("drafter") - before < 90 + 2


def test_edgeos_model_add_registers_a_directory_and_the_model_commands_handle_it(
    drafter: Path, tmp_path: Path
) -> None:
    import yaml
    from typer.testing import CliRunner

    from edgeos.cli.main import app

    runner = CliRunner()
    args = ["--data-dir", str(tmp_path / "node")]
    manifest = tmp_path / "drafter.yaml"
    manifest.write_text(yaml.safe_dump({"kind": "generative", "generation": {"max_queued": 3}}))
    added = runner.invoke(
        app, ["model", "add", str(drafter), "--name", "drafter", "--manifest", str(manifest), *args]
    )
    assert added.exit_code == 0, added.output
    assert "added generative drafter:1" in added.output
    assert "drafter" in runner.invoke(app, ["model", "list", *args]).output
    shown = yaml.safe_load(runner.invoke(app, ["model", "show", "drafter", *args]).output)
    assert shown["kind"] == "generative"
    assert shown["generation"]["max_queued"] == 3

    # The real command: a refusal is one line on stderr and exit status 1.
    bad = str(broken(drafter, tmp_path, "no tokenizer"))
    refused = subprocess.run(
        [sys.executable, "-m", "edgeos", "model", "add", bad, "--name", "bad", *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode == 1
    assert refused.stderr.startswith("error:")
    assert "has no tokenizer.json" in refused.stderr
    assert "bad" not in runner.invoke(app, ["model", "list", *args]).output

    assert "removed drafter:1" in runner.invoke(app, ["model", "remove", "drafter", *args]).output
    assert "no models registered" in runner.invoke(app, ["model", "list", *args]).output
    assert not any((tmp_path / "node" / "models" / "genai").glob("*/genai_config.json"))


def test_the_python_api_holds_a_forced_tool_call_to_its_schema(
    drafter: Path, registry: ModelRegistry, host: GenerativeHost
) -> None:
    from jsonschema import validate  # type: ignore[import-untyped]

    from edgeos.runtime.structured import Tool, Tools

    register_generative(registry, drafter, name="drafter")
    model = host.model("drafter")
    params = {
        "type": "object",
        "properties": {"sku": {"type": "string", "maxLength": 3}, "n": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["sku", "n"],
        "additionalProperties": False,
    }  # fmt: skip
    tools = Tools((Tool("order", params, "reorder"), Tool("noop")), choice="order")
    prompt = model.chat.prompt([{"role": "user", "content": "Reorder oat."}], tools)
    for seed in range(10):
        text, finish = asyncio.run(model.complete(prompt, Sampling(tools=tools, seed=seed)))
        assert finish.reason == "tool_calls"
        assert finish.tool_call is not None
        assert finish.tool_call.name == "order"
        validate(json.loads(finish.tool_call.arguments), params)
        assert text.startswith('{"name":"order","arguments":')
    with pytest.raises(GenerationError, match="exclude each other"):
        Sampling(tools=tools, schema='{"type": "object"}')


def test_the_guard_counts_generative_models_and_unloads_only_idle_ones(
    drafter: Path, registry: ModelRegistry, host: GenerativeHost, db: Database
) -> None:
    from edgeos.node.guard import MB, Budgets, ResourceGuard

    register_generative(registry, drafter, name="old")
    register_generative(registry, drafter, name="busy")
    # At least 80 characters: more pieces than a generation runs ahead of its reader, so
    # it is still generating while the test holds its stream open.
    held = Sampling(schema='{"type": "string", "minLength": 80}', max_tokens=90)

    async def run() -> None:
        old, busy = host.model("old"), host.model("busy")
        await old.complete(old.chat.prompt(ASK), Sampling(max_tokens=2))
        items = busy.stream(busy.chat.prompt(ASK), held)
        await anext(items)
        guard = ResourceGuard(
            db, db.path.parent, Budgets(memory_bytes=16 * MB), generative=host,
            metrics=MetricsRegistry(),
        )  # fmt: skip
        usage, _ = guard.measure()
        # Each model's worker process, read again: a generating one's memory moves.
        both = old.memory_bytes + busy.memory_bytes
        assert usage.memory["generative"] == pytest.approx(both, rel=0.05)
        # A budget the process is over: the idle model goes, the generating one stays.
        report = guard.check()
        assert [a for a in report.actions if a.startswith("unload")] == ["unload model old:1"]
        assert [m.name for m in host.loaded()] == ["busy"]
        await items.aclose()
        deadline = time.monotonic() + 10
        while busy.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert "unload model busy:1" in guard.check().actions
        assert host.loaded() == []
        assert guard.measure()[0].memory["generative"] == 0
        # Unloaded is not gone: the next request loads it again.
        again = host.model("old")
        forced = Sampling(schema=held.schema, max_tokens=3)  # cannot end before 3 tokens
        _, finish = await again.complete(again.chat.prompt(ASK), forced)
        assert finish.completion_tokens == 3
        assert [m.name for m in host.loaded()] == ["old"]

    asyncio.run(run())


def test_the_generation_bench_runs_every_side_on_the_same_model(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # The untrained model: greedy, it writes up to the limit instead of ending at once.
    model = slow_model(tmp_path_factory.getbasetemp())
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, str(root / "bench" / "generate.py"), "--model", str(model),
         "--requests", "4", "--max-tokens", "8"],
        capture_output=True, text=True, timeout=240, cwd=root, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(result.stdout.split("JSON ", 1)[1])
    compared = importlib.util.find_spec("transformers") is not None
    assert set(figures) == {"edgeos", "plain loop"} | ({"transformers"} if compared else set())
    for side in figures.values():
        assert side["peak_rss_mb"] > 0
        for workers in ("1", "4"):
            assert side[workers]["tokens_per_s"] > 0
            assert 0 < side[workers]["ttft_p50_ms"] <= side[workers]["latency_p50_ms"]
    # Greedy on the same weights: both sides write answers of the same lengths.
    assert figures["edgeos"]["1"]["tokens_mean"] == figures["plain loop"]["1"]["tokens_mean"]

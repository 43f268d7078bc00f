"""Generation: the demo language model on edgeos's generative host, a plain loop and
Hugging Face ``transformers``.

    python bench/generate.py [--model var/genai-models/shop-drafter] [--requests 40]
                             [--max-tokens 30]

The same model directory, the same prompts (requests of the demo's corpus in the chat
format), greedy decoding to at most ``--max-tokens`` tokens, three ways, each in a process
of its own so resident memory is its own (edgeos's counts its model's worker process too):

- **edgeos**: the model registered in a scratch registry and served by
  ``GenerativeHost`` (ONNX Runtime GenAI, the node's turns, streaming and stop handling),
  as the OpenAI-compatible API uses it;
- **plain loop**: the decoder run token by token with ONNX Runtime directly, the KV cache
  fed back by hand, the tokenizer read with ``tokenizers``: what a developer writes
  without a generation library;
- **transformers**: the same weights loaded into ``transformers.GPT2LMHeadModel`` (the
  trainer's block is GPT-2's; ``edgeos.genai.gpt2``) and run by
  ``model.generate`` (greedy, KV cache on, PyTorch with as many threads as ONNX Runtime
  uses), ``workers`` threads sharing one model. Skipped, and said so, when
  ``transformers`` or PyTorch is not installed (the ``genai-build`` extra).

Each at concurrency 1 (one request after another) and 4 (four at once): time to first
token p50/p99, tokens per second over the run, p50/p99 request latency, and the peak
resident memory of the process. The goal: at least twice the tokens per second of
``transformers``, and a 30-token draft in under 300 ms at p50.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "var" / "genai-models" / "shop-drafter"
CONCURRENCY = (1, 4)

# One request's timings: seconds to the first token, seconds in all, tokens made.
Timing = tuple[float, float, int]


@dataclass
class Run:
    """One side's requests at one concurrency: their timings, the seconds they took (after
    loading and warm-up), and the peak resident memory of a process the side generates in
    besides the measuring one (edgeos's worker)."""

    timings: list[Timing]
    seconds: float
    other_peak_bytes: int = 0


def _timed(work: Callable[[], list[Timing]]) -> Run:
    started = time.perf_counter()
    timings = work()
    return Run(timings, time.perf_counter() - started)


def _peak_rss_of(pid: int) -> int:
    """Peak resident memory of another process (Linux), 0 where unknown."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def prompts(count: int) -> list[str]:
    """The benchmark's prompts: requests of the demo corpus, in the chat format."""
    from edgeos.genai.corpus import examples
    from edgeos.runtime.chat_format import ChatFormat

    fmt = ChatFormat()
    return [fmt.prompt([{"role": "user", "content": ask}]) for ask, _ in examples(count, seed=7)]


def run_edgeos(model_dir: Path, texts: list[str], max_tokens: int, workers: int) -> Run:
    """The prompts through ``GenerativeHost``, ``workers`` at once."""
    from edgeos.manifests.model import GenerationSpec, ModelSpec
    from edgeos.runtime import ModelRegistry
    from edgeos.runtime.genai_store import register_generative
    from edgeos.runtime.generative import Delta, GenerativeHost, Sampling
    from edgeos.state import Database

    with tempfile.TemporaryDirectory() as scratch, Database(Path(scratch) / "node.db") as db:
        registry = ModelRegistry(db, Path(scratch) / "models")
        limits = GenerationSpec(max_running=workers, max_queued=len(texts))
        spec = ModelSpec(kind="generative", generation=limits)
        register_generative(registry, model_dir, name="bench", manifest=spec)
        host = GenerativeHost(registry)
        model = host.model("bench")
        sampling = Sampling(max_tokens=max_tokens, temperature=0)

        async def one(prompt: str) -> Timing:
            started = time.perf_counter()
            first, tokens = 0.0, 0
            async for item in model.stream(prompt, sampling):
                if not first:  # the first token, or the end when there is none
                    first = time.perf_counter() - started
                if not isinstance(item, Delta):
                    tokens = item.completion_tokens
            return first, time.perf_counter() - started, tokens

        async def client(todo: list[str], done: list[Timing]) -> None:
            while todo:  # one request after another, like the plain loop's threads
                done.append(await one(todo.pop()))

        async def everything() -> Run:
            await one(texts[0])  # warm-up: the first run allocates
            todo, done = list(reversed(texts)), list[Timing]()
            started = time.perf_counter()
            await asyncio.gather(*(client(todo, done) for _ in range(workers)))
            return Run(done, time.perf_counter() - started)

        run = asyncio.run(everything())
        # The model generates in a worker process: its memory is the model's.
        run.other_peak_bytes = _peak_rss_of(model.worker_pid)
        host.close()
        return run


def run_plain(model_dir: Path, texts: list[str], max_tokens: int, workers: int) -> Run:
    """The prompts through a hand-written ONNX Runtime loop with a KV cache, ``workers``
    threads sharing one session."""
    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer

    config = json.loads((model_dir / "genai_config.json").read_text())["model"]
    decoder = config["decoder"]
    layers, heads, head = (
        decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["head_size"],
    )  # fmt: skip
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        str(model_dir / decoder["filename"]), options, providers=["CPUExecutionProvider"]
    )
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    # Any special token ends the answer (the end of a turn, or another turn's start).
    stops = {config["eos_token_id"], *range(5)}
    context = config["context_length"]

    def one(prompt: str) -> Timing:
        started = time.perf_counter()
        ids = tokenizer.encode(prompt, add_special_tokens=False).ids
        past = {
            f"past_key_values.{i}.{kind}": np.zeros((1, heads, 0, head), np.float32)
            for i in range(layers) for kind in ("key", "value")
        }  # fmt: skip
        step, total, first, made = ids, len(ids), 0.0, []
        for _ in range(min(max_tokens, context - len(ids))):
            feed = {
                "input_ids": np.array([step], np.int64),
                "attention_mask": np.ones((1, total), np.int64),
                "position_ids": np.arange(total - len(step), total, dtype=np.int64)[None],
                **past,
            }
            logits, *present = session.run(None, feed)
            token = int(logits[0, -1].argmax())
            if not first:
                first = time.perf_counter() - started
            if token in stops:
                break
            made.append(token)
            past = dict(zip(past, present, strict=True))
            step, total = [token], total + 1
        tokenizer.decode(made)
        return first, time.perf_counter() - started, len(made)

    one(texts[0])
    with ThreadPoolExecutor(workers) as pool:
        return _timed(lambda: list(pool.map(one, texts)))


def run_transformers(model_dir: Path, texts: list[str], max_tokens: int, workers: int) -> Run:
    """The prompts through ``transformers``' ``generate`` on the same weights, ``workers``
    threads sharing one model."""
    import os

    import torch
    from tokenizers import Tokenizer
    from transformers.generation.streamers import BaseStreamer

    from edgeos.genai.gpt2 import gpt2_from_export

    config = json.loads((model_dir / "genai_config.json").read_text())["model"]
    options = config["decoder"].get("session_options", {})
    # ONNX Runtime's default: one intra-op thread per core.
    torch.set_num_threads(options.get("intra_op_num_threads") or os.cpu_count() or 1)
    model = gpt2_from_export(model_dir)
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    stops = [config["eos_token_id"], *range(5)]  # as the plain loop: any special token

    class FirstToken(BaseStreamer):
        """Notes when generate hands out its first new token (its first put is the prompt)."""

        def __init__(self) -> None:
            self.puts, self.at = 0, 0.0

        def put(self, value: Any) -> None:
            self.puts += 1
            if self.puts == 2:
                self.at = time.perf_counter()

        def end(self) -> None:
            if not self.at:
                self.at = time.perf_counter()

    def one(prompt: str) -> Timing:
        started = time.perf_counter()
        ids = tokenizer.encode(prompt, add_special_tokens=False).ids
        first = FirstToken()
        budget = min(max_tokens, config["context_length"] - len(ids))
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=budget, do_sample=False, use_cache=True, eos_token_id=stops,
                pad_token_id=config["pad_token_id"], streamer=first,
            )  # fmt: skip
        made = out[0, len(ids) :].tolist()
        if made and made[-1] in stops:
            made.pop()
        tokenizer.decode(made)
        return first.at - started, time.perf_counter() - started, len(made)

    one(texts[0])
    with ThreadPoolExecutor(workers) as pool:
        return _timed(lambda: list(pool.map(one, texts)))


RUNNERS: dict[str, Callable[[Path, list[str], int, int], Run]] = {
    "edgeos": run_edgeos,
    "plain loop": run_plain,
    "transformers": run_transformers,
}


def measure(side: str, model_dir: Path, requests: int, max_tokens: int) -> dict[str, Any]:
    """One side at every concurrency: its figures, and its peak memory (this process's, plus
    the largest of a worker process's where the side has one)."""
    from edgeos.telemetry.process import peak_rss_bytes

    texts = prompts(requests)
    result: dict[str, Any] = {}
    other_peak = 0
    for workers in CONCURRENCY:
        run = RUNNERS[side](model_dir, texts, max_tokens, workers)
        timings, other_peak = run.timings, max(other_peak, run.other_peak_bytes)
        firsts = sorted(t[0] * 1000 for t in timings)
        totals = sorted(t[1] * 1000 for t in timings)
        result[str(workers)] = {
            "ttft_p50_ms": _quantile(firsts, 0.5),
            "ttft_p99_ms": _quantile(firsts, 0.99),
            "latency_p50_ms": _quantile(totals, 0.5),
            "latency_p99_ms": _quantile(totals, 0.99),
            "tokens_per_s": sum(t[2] for t in timings) / run.seconds,
            "tokens_mean": statistics.fmean(t[2] for t in timings),
        }
    result["peak_rss_mb"] = (peak_rss_bytes() + other_peak) / 2**20
    return result


def _quantile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=30)
    parser.add_argument("--side", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not (args.model / "genai_config.json").is_file():
        sys.exit(f"no language model in {args.model}: run `make genai-model` first")
    if args.side:  # a child: one side, figures as JSON on stdout
        print(json.dumps(measure(args.side, args.model, args.requests, args.max_tokens)))
        return
    results = {}
    for side in RUNNERS:
        if side == "transformers" and not _has_transformers():
            print("transformers: skipped (pip install 'edgeos[genai-build]' to compare)")
            continue
        child = subprocess.run(
            [sys.executable, __file__, "--side", side, "--model", str(args.model),
             "--requests", str(args.requests), "--max-tokens", str(args.max_tokens)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        results[side] = json.loads(child.stdout.strip().splitlines()[-1])
    report(results, args)


def _has_transformers() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


def report(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        "", *(f"{side} c={c}" for side in results for c in CONCURRENCY),
        title=f"{args.model.name}: {args.requests} greedy requests, up to {args.max_tokens} "
        "tokens each",
    )  # fmt: skip
    rows = [
        ("TTFT p50 ms", "ttft_p50_ms", "{:.2f}"),
        ("TTFT p99 ms", "ttft_p99_ms", "{:.2f}"),
        ("latency p50 ms", "latency_p50_ms", "{:.2f}"),
        ("latency p99 ms", "latency_p99_ms", "{:.2f}"),
        ("tokens/s", "tokens_per_s", "{:,.0f}"),
        ("tokens per answer", "tokens_mean", "{:.1f}"),
    ]
    for label, key, fmt in rows:
        cells = [fmt.format(results[s][str(c)][key]) for s in results for c in CONCURRENCY]
        table.add_row(label, *cells)
    table.add_row(
        "peak RSS MB", *(f"{results[s]['peak_rss_mb']:.0f}" for s in results for _ in CONCURRENCY)
    )
    Console().print(table)
    ours = results["edgeos"]
    for other in ("plain loop", "transformers"):
        if other in results:
            ratios = ", ".join(
                f"{ours[str(c)]['tokens_per_s'] / results[other][str(c)]['tokens_per_s']:.2f}x "
                f"at c={c}"
                for c in CONCURRENCY
            )
            print(f"edgeos/{other} tokens per second: {ratios}")
    print(
        f"{args.max_tokens}-token draft p50 at c=1: {ours['1']['latency_p50_ms']:.1f} ms "
        "(goal: a 30-token draft under 300 ms; edgeos at least 2x transformers' tokens/s)"
    )
    print("JSON " + json.dumps(results))


if __name__ == "__main__":
    main()

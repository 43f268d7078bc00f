"""Train the demo language model with PyTorch and export it for ONNX Runtime GenAI.

A small decoder-only transformer (learned positions, pre-norm blocks, tied embeddings)
learns the chats of :mod:`edgeos.genai.corpus` with a byte-level BPE tokenizer trained on
the same text. The export is the directory ONNX Runtime GenAI loads: ``model.onnx``
(inputs ``input_ids``, ``attention_mask``, ``position_ids`` and ``past_key_values.N.key``/
``.value``; outputs ``logits`` and ``present.N.key``/``.value``), ``genai_config.json``,
``tokenizer.json`` with ``tokenizer_config.json``, and ``edgeos_chat.json``. Nothing is
downloaded: the weights are ours.

``python -m edgeos.genai.train --out DIR`` builds the demo model in a few minutes on two
cores; ``--tiny`` builds a smaller one in seconds, for tests. PyTorch is needed here only
(the ``genai-build`` extra); a node runs the export with ONNX Runtime alone.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgeos.genai.corpus import corpus, examples
from edgeos.runtime.chat_format import END, PAD, SPECIAL_TOKENS, ChatFormat

OPSET = 17


@dataclass(frozen=True)
class Size:
    """Architecture and training settings."""

    vocab: int
    dim: int
    layers: int
    heads: int
    context: int
    examples: int
    steps: int
    batch: int
    learning_rate: float


DEMO = Size(
    vocab=768, dim=128, layers=4, heads=4, context=128, examples=20_000, steps=300, batch=16,
    learning_rate=3e-3,
)  # fmt: skip
# For tests: it runs like the demo model and writes shop-like text, badly.
TINY = Size(
    vocab=320, dim=32, layers=1, heads=2, context=128, examples=1_000, steps=40, batch=8,
    learning_rate=1e-2,
)  # fmt: skip


def train_tokenizer(texts: list[str], vocab: int) -> Any:
    """A byte-level BPE tokenizer learnt from ``texts``; the special tokens come first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def build_model(size: Size, vocab: int) -> Any:
    """The decoder as a torch module whose ``forward`` takes and returns the KV cache."""
    import torch
    from torch import nn

    head = size.dim // size.heads

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm1 = nn.LayerNorm(size.dim)
            self.qkv = nn.Linear(size.dim, 3 * size.dim)
            self.proj = nn.Linear(size.dim, size.dim)
            self.norm2 = nn.LayerNorm(size.dim)
            self.mlp = nn.Sequential(
                nn.Linear(size.dim, 4 * size.dim), nn.GELU(), nn.Linear(4 * size.dim, size.dim)
            )

        def forward(self, x: Any, bias: Any, past_k: Any, past_v: Any) -> tuple[Any, Any, Any]:
            b, s, _ = x.shape
            q, k, v = self.qkv(self.norm1(x)).split(size.dim, dim=2)
            q, k, v = (t.view(b, s, size.heads, head).transpose(1, 2) for t in (q, k, v))
            k = torch.cat([past_k, k], dim=2)
            v = torch.cat([past_v, v], dim=2)
            scores = q @ k.transpose(2, 3) / math.sqrt(head) + bias
            out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, size.dim)
            x = x + self.proj(out)
            return x + self.mlp(self.norm2(x)), k, v

    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab, size.dim)
            self.position = nn.Embedding(size.context, size.dim)
            self.blocks = nn.ModuleList(Block() for _ in range(size.layers))
            self.norm = nn.LayerNorm(size.dim)
            # Small initial weights: the tied output layer starts near uniform logits.
            for parameter in self.parameters():
                if parameter.dim() == 2:
                    nn.init.normal_(parameter, std=0.02)

        def forward(
            self, input_ids: Any, attention_mask: Any, position_ids: Any, *past: Any
        ) -> tuple[Any, ...]:
            s = input_ids.shape[1]
            total = attention_mask.shape[1]
            # Query i sits at position total - s + i: it sees keys up to there, and no
            # key the attention mask pads out.
            query_at = torch.arange(s) + (total - s)
            causal = torch.arange(total)[None, :] <= query_at[:, None]
            allowed = causal[None, None] & (attention_mask[:, None, None, :] > 0)
            bias = torch.zeros(allowed.shape).masked_fill(~allowed, -1e9)
            x = self.embed(input_ids) + self.position(position_ids)
            presents = []
            for index, block in enumerate(self.blocks):
                x, k, v = block(x, bias, past[2 * index], past[2 * index + 1])
                presents += [k, v]
            logits = self.norm(x) @ self.embed.weight.T
            return (logits, *presents)

    return Decoder()


def _batches(ids: list[list[int]], size: Size, seed: int) -> Any:
    """Random windows of the concatenated token stream, forever."""
    import torch

    stream = torch.tensor([t for seq in ids for t in seq], dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    span = size.context
    while True:
        starts = torch.randint(0, len(stream) - span - 1, (size.batch,), generator=generator)
        window = torch.stack([stream[i : i + span + 1] for i in starts.tolist()])
        yield window[:, :-1], window[:, 1:]


def train(
    size: Size, ids: list[list[int]], vocab: int, *, seed: int, log: bool
) -> tuple[Any, float]:
    """Train the decoder on tokenized texts; returns it and its last loss."""
    import torch

    torch.manual_seed(seed)
    model = build_model(size, vocab)
    if size.steps == 0:  # untrained: a model of this shape and speed, for tests
        return model.eval(), math.inf
    optimizer = torch.optim.AdamW(model.parameters(), lr=size.learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=size.learning_rate, total_steps=size.steps, pct_start=0.1
    )
    batches = _batches(ids, size, seed)
    empty = [torch.zeros(size.batch, size.heads, 0, size.dim // size.heads)] * (2 * size.layers)
    positions = torch.arange(size.context)[None].expand(size.batch, -1)
    mask = torch.ones(size.batch, size.context, dtype=torch.long)
    loss_value = math.inf
    for step in range(size.steps):
        x, y = next(batches)
        logits = model(x, mask, positions, *empty)[0]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        loss_value = float(loss.detach())
        if log and step % 100 == 0:
            print(f"step {step:5d}  loss {loss_value:.3f}", flush=True)
    return model.eval(), loss_value


def export(model: Any, size: Size, vocab: int, path: Path) -> None:
    """Write the decoder as ONNX with the KV cache as inputs and outputs."""
    import torch

    head = size.dim // size.heads
    past = [torch.zeros(1, size.heads, 3, head) for _ in range(2 * size.layers)]
    past_names = [
        f"past_key_values.{i}.{kind}" for i in range(size.layers) for kind in ("key", "value")
    ]
    present_names = [f"present.{i}.{kind}" for i in range(size.layers) for kind in ("key", "value")]
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "position_ids": {0: "batch", 1: "sequence"},
        "logits": {0: "batch", 1: "sequence"},
    }
    axes.update({n: {0: "batch", 2: "past_sequence"} for n in past_names})
    axes.update({n: {0: "batch", 2: "total_sequence"} for n in present_names})
    ids = torch.ones(1, 2, dtype=torch.long)
    # The TorchScript exporter, said to be deprecated: the newer one needs onnxscript, one
    # more build dependency, for a graph this exporter writes as well.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (ids, torch.ones(1, 5, dtype=torch.long), torch.tensor([[3, 4]]), *past),
            str(path),
            input_names=["input_ids", "attention_mask", "position_ids", *past_names],
            output_names=["logits", *present_names],
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )


def genai_config(size: Size, vocab: int, end_id: int, pad_id: int) -> dict[str, Any]:
    """The ``genai_config.json`` ONNX Runtime GenAI reads for this decoder."""
    return {
        "model": {
            "bos_token_id": end_id,
            "context_length": size.context,
            "decoder": {
                "session_options": {"log_id": "edgeos", "provider_options": []},
                "filename": "model.onnx",
                "head_size": size.dim // size.heads,
                "hidden_size": size.dim,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": size.heads,
                "num_hidden_layers": size.layers,
                "num_key_value_heads": size.heads,
            },
            "eos_token_id": end_id,
            "pad_token_id": pad_id,
            "type": "llama",
            "vocab_size": vocab,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": size.context,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 0,
            "top_p": 1.0,
        },
    }


def build(out: Path, size: Size, *, seed: int = 0, log: bool = False) -> dict[str, Any]:
    """Train and export a model into ``out`` (replaced whole); returns its metrics."""
    started = time.monotonic()
    texts = corpus(size.examples, seed=seed)
    tokenizer = train_tokenizer(texts, size.vocab)
    vocab = tokenizer.get_vocab_size()
    encoded = [e.ids for e in tokenizer.encode_batch(texts)]
    model, loss = train(size, encoded, vocab, seed=seed, log=log)
    end_id, pad_id = tokenizer.token_to_id(END), tokenizer.token_to_id(PAD)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        export(model, size, vocab, staging / "model.onnx")
        tokenizer.save(str(staging / "tokenizer.json"))
        _write_json(
            staging / "tokenizer_config.json",
            {
                "tokenizer_class": "GPT2Tokenizer",
                "bos_token": END,
                "eos_token": END,
                "pad_token": PAD,
                "add_prefix_space": False,
                "model_max_length": size.context,
            },
        )
        _write_json(staging / "genai_config.json", genai_config(size, vocab, end_id, pad_id))
        parameters = sum(p.numel() for p in model.parameters())
        metrics = {
            "parameters": parameters,
            "final_loss": round(loss, 4),
            "vocab": vocab,
            "train_seconds": round(time.monotonic() - started, 1),
            "size": asdict(size),
        }
        _write_json(staging / "metrics.json", metrics)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return metrics


def quantize(model_dir: Path, out: Path, prompts: list[str]) -> dict[str, Any]:
    """Write an 8-bit copy of ``model_dir`` to ``out`` (MatMul weights, dynamic int8) and
    measure both with ONNX Runtime GenAI: milliseconds per token (median of greedy runs)
    and whether greedy answers agree. INT8 is not faster on every CPU: compare, then pick."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(model_dir, out, ignore=shutil.ignore_patterns("model.onnx", "metrics.json"))
    quantize_dynamic(
        model_dir / "model.onnx", out / "model.onnx", weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul"],
    )  # fmt: skip
    fp32, int8 = _greedy(model_dir, prompts), _greedy(out, prompts)
    report = {
        "fp32_ms_per_token": fp32[0],
        "int8_ms_per_token": int8[0],
        "greedy_agreement": sum(a == b for a, b in zip(fp32[1], int8[1], strict=True))
        / len(prompts),
        "fp32_bytes": (model_dir / "model.onnx").stat().st_size,
        "int8_bytes": (out / "model.onnx").stat().st_size,
    }
    _write_json(out / "metrics.json", report)
    return report


def _greedy(model_dir: Path, prompts: list[str], runs: int = 5) -> tuple[float, list[str]]:
    import statistics

    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    tokenizer = og.Tokenizer(model)
    timings, answers = [], []
    for prompt in prompts:
        ids = list(tokenizer.encode(prompt))
        for _ in range(runs):
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=len(ids) + 64, do_sample=False)
            generator = og.Generator(model, params)
            started = time.perf_counter()
            generator.append_tokens(ids)
            tokens: list[int] = []
            while not generator.is_done():
                generator.generate_next_token()
                tokens.append(int(generator.get_next_tokens()[0]))
            timings.append((time.perf_counter() - started) * 1000 / max(len(tokens), 1))
        answers.append(tokenizer.decode(tokens))
    return round(statistics.median(timings), 4), answers


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def format_prompt(ask: str) -> str:
    """The prompt of one user request in the model's chat format."""
    return ChatFormat().prompt([{"role": "user", "content": ask}])


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m edgeos.genai.train --out DIR [--tiny] [--force]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("var/genai-models/shop-drafter"))
    parser.add_argument("--tiny", action="store_true", help="a small model in seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild an existing model")
    parser.add_argument(
        "--int8", action="store_true", help="also write an 8-bit copy to OUT-int8 and compare"
    )
    args = parser.parse_args(argv)
    if (args.out / "genai_config.json").exists() and not args.force:
        print(f"{args.out} exists; --force rebuilds it")
    else:
        metrics = build(args.out, TINY if args.tiny else DEMO, seed=args.seed, log=True)
        print(json.dumps(metrics, indent=2))
    if args.int8:
        prompts = [format_prompt(ask) for ask, _ in examples(8, seed=args.seed + 1)]
        report = quantize(args.out, args.out.with_name(f"{args.out.name}-int8"), prompts)
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""Generative models on the node: prompts in, tokens streamed out, one model at a time.

:class:`GenerativeHost` serves the generative versions of the model registry (see
:mod:`edgeos.runtime.genai_store`) with ONNX Runtime GenAI, which runs in a worker process
per loaded model (:mod:`edgeos.runtime.genai_worker`): it holds the GIL while it computes a
token, and would otherwise stall the node's event loop. A worker that dies fails the
requests it was serving (UnavailableError) and is restarted. A request is a prompt and :class:`Sampling` settings; :meth:`GenerativeModel.stream`
yields the text token by token as :class:`Delta` items and ends with a :class:`Finish`.

Each model takes ``generation.max_running`` requests at once; later ones wait in arrival
order, at most ``generation.max_queued`` of them, and one more is refused at once
(:class:`~edgeos.errors.UnavailableError`, retryable). The worker generates a token for
each running request in turn; when the caller stops reading (a client that went away
cancels its task), its request ends before its next token and its turn passes on only once
it has, so the memory budget checked at registration holds. A prompt over the context, or a prompt plus
``max_tokens`` over it, is refused before anything runs.

Structured output and tool calls (:mod:`edgeos.runtime.structured`)::

    model = host.model("drafter")
    tools = Tools((Tool("get_stock", {"type": "object", "properties": {...}}, "Stock of a SKU"),),
                  choice="auto")  # or "required", "none", or a tool's name
    text, finish = await model.complete(model.chat.prompt(messages, tools), Sampling(tools=tools))
    if finish.reason == "tool_calls":
        finish.tool_call.name, finish.tool_call.arguments  # arguments: JSON text, validated

``Sampling(schema=json_schema_text(schema))`` holds a text answer to a JSON Schema instead.
A tool call's text streams as :class:`Delta` pieces like any answer; its :class:`Finish`
carries the parsed call.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from edgeos.errors import InvalidRequestError, UnavailableError
from edgeos.runtime.chat_format import ChatFormat
from edgeos.runtime.genai_store import memory_needed, read_config
from edgeos.runtime.genai_worker import CREDIT, Worker
from edgeos.runtime.structured import ToolCall, Tools, parse_call
from edgeos.telemetry import MetricsRegistry
from edgeos.telemetry.process import process_rss_bytes

if TYPE_CHECKING:
    from edgeos.manifests import ModelManifest
    from edgeos.runtime.registry import ModelRegistry


class GenerationError(InvalidRequestError):
    """A generation request the model cannot serve as asked; names the parameter at fault
    and, where one applies, a code (``context_length_exceeded``)."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class QueueFullError(UnavailableError):
    """Every turn of the model is taken and its queue is full: try again shortly."""


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens: OpenAI's parameters, checked on creation."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    schema: str | None = None
    """A JSON Schema (as JSON text) the answer is held to by constrained decoding."""
    tools: Tools | None = None
    """Tools the model may call; a call is held to its tool's ``parameters``."""

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise GenerationError("max_tokens must be at least 1", param="max_tokens")
        if not 0.0 <= self.temperature <= 2.0:
            raise GenerationError("temperature must be between 0 and 2", param="temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise GenerationError("top_p must be over 0 and at most 1", param="top_p")
        if len(self.stop) > 4 or any(not s for s in self.stop):
            raise GenerationError("stop takes up to 4 non-empty strings", param="stop")
        if self.schema is not None and self.tools is not None and self.tools.active:
            raise GenerationError(
                "a JSON Schema answer and tool calls exclude each other; use tool_choice "
                "'none' with response_format", param="response_format",
            )  # fmt: skip

    @property
    def constraint(self) -> tuple[str, str] | None:
        """What guidance holds the answer to, ``(kind, grammar)``, if anything."""
        if self.schema is not None:
            return "json_schema", self.schema
        return self.tools.guidance() if self.tools is not None else None


@dataclass(frozen=True)
class Delta:
    """The next piece of generated text (one token's worth, or less)."""

    text: str


@dataclass(frozen=True)
class Finish:
    """How generation ended, and the token counts; ``tool_call`` when the answer is one
    (``reason`` is then ``tool_calls``)."""

    reason: Literal["stop", "length", "tool_calls"]
    prompt_tokens: int
    completion_tokens: int
    tool_call: ToolCall | None = None


class _Gate:
    """Turns at a model: ``running`` at once, ``queued`` waiting in arrival order.

    A turn is given back from any thread (the worker's reader), to a waiter on any loop.
    """

    def __init__(self, running: int, queued: int) -> None:
        self.running = running
        self.queued = queued
        self._busy = 0
        self._waiters: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = deque()
        self._lock = threading.Lock()

    async def enter(self, what: str) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._busy < self.running and not self._waiters:
                self._busy += 1
                return
            if len(self._waiters) >= self.queued:
                raise QueueFullError(
                    f"{what} is busy: {self._busy} request(s) generating and "
                    f"{len(self._waiters)} waiting, the most it queues; retry shortly"
                )
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append((loop, waiter))
        try:
            await waiter
        except asyncio.CancelledError:
            with self._lock:
                if (loop, waiter) in self._waiters:
                    self._waiters.remove((loop, waiter))
                    raise
            if waiter.done() and not waiter.cancelled():
                self.leave()  # the turn came as the caller left: pass it on
            raise

    def leave(self) -> None:
        """Give a turn back: to the longest waiter, else free."""
        with self._lock:
            while self._waiters:
                loop, waiter = self._waiters.popleft()
                try:
                    loop.call_soon_threadsafe(self._hand, waiter)
                    return
                except RuntimeError:  # that waiter's loop is closed: the next one
                    continue
            self._busy -= 1

    @property
    def busy(self) -> bool:
        """Whether a request holds or waits for a turn."""
        with self._lock:
            return self._busy > 0 or bool(self._waiters)

    def _hand(self, waiter: asyncio.Future[None]) -> None:
        if waiter.done():  # its caller left while the turn was on its way
            self.leave()
        else:
            waiter.set_result(None)


class GenerativeModel:
    """One registered generative model version, loaded with ONNX Runtime GenAI in a worker
    process of its own (:mod:`edgeos.runtime.genai_worker`)."""

    def __init__(
        self,
        manifest: ModelManifest,
        directory: Path,
        record: Callable[[str, int], None] | None = None,
    ) -> None:
        """Load the model; ``record(outcome, tokens)`` hears how each generation ended
        (``stop``, ``length``, ``cancelled`` or ``error``) and how many tokens it made."""
        from edgeos.manifests.model import GenerationSpec

        self.manifest = manifest
        self.config = read_config(directory)
        limits = manifest.generation or GenerationSpec()
        self.context_length = limits.context_length or self.config.context_length
        self.chat = ChatFormat.load(directory)
        self._gate = _Gate(limits.max_running, limits.max_queued)
        self._record = record or (lambda outcome, tokens: None)
        weights = (directory / self.config.filename).stat().st_size
        # The memory it may take: its weights and the full KV cache of every request
        # allowed to run at once (what registration held to the budget).
        self._budgeted = memory_needed(
            weights, self.config, self.context_length, limits.max_running
        )
        self._worker = Worker(directory, f"model '{manifest.name}'")
        # A model dropped without close() stops its process too.
        self._finalizer = weakref.finalize(self, self._worker.close)
        #: When a request last came (monotonic seconds): the guard unloads the idlest first.
        self.last_used = time.monotonic()

    @property
    def memory_bytes(self) -> int:
        """The memory it takes: its worker process's resident memory, and never less than
        its weights plus the full KV cache of every request allowed to run at once (what
        registration held to the budget)."""
        return max(self._budgeted, process_rss_bytes(self._worker.pid) or 0)

    @property
    def worker_pid(self) -> int:
        """The process generating for this model (a new one after a crash)."""
        return self._worker.pid

    @property
    def busy(self) -> bool:
        """Whether a request is generating or waiting: such a model is not unloaded."""
        return self._gate.busy

    @property
    def name(self) -> str:
        """``name`` of the model as registered."""
        return self.manifest.name

    def encode(self, text: str) -> Sequence[int]:
        """Token ids of ``text`` by the model's own tokenizer, which is in the worker
        process: on an event loop, prefer :meth:`encode_async`."""
        return self._worker.encode(text).result()

    async def encode_async(self, text: str) -> Sequence[int]:
        """:meth:`encode` without blocking the event loop while the worker answers."""
        return await asyncio.wrap_future(self._worker.encode(text))

    def budget(self, prompt_tokens: int, sampling: Sampling) -> int:
        """Tokens the request may generate; GenerationError when the context cannot hold it."""
        room = self.context_length - prompt_tokens
        if room < 1:
            raise GenerationError(
                f"the prompt is {prompt_tokens} tokens; model '{self.name}' takes at most "
                f"{self.context_length} tokens of prompt and output together",
                param="messages", code="context_length_exceeded",
            )  # fmt: skip
        if sampling.max_tokens is None:
            return room
        if sampling.max_tokens > room:
            raise GenerationError(
                f"the prompt is {prompt_tokens} tokens and max_tokens asks for "
                f"{sampling.max_tokens} more: over model '{self.name}''s context of "
                f"{self.context_length} tokens",
                param="max_tokens", code="context_length_exceeded",
            )  # fmt: skip
        return sampling.max_tokens

    async def stream(self, prompt: str, sampling: Sampling) -> AsyncGenerator[Delta | Finish]:
        """Generate a continuation of ``prompt``: text pieces, then one :class:`Finish`.

        Raises GenerationError for a prompt the context cannot hold and QueueFullError when
        the model's queue is full, both before anything is generated; UnavailableError when
        the model's worker process fails (it is restarted for the next request).
        """
        self.last_used = time.monotonic()
        ids = await self.encode_async(prompt)
        budget = self.budget(len(ids), sampling)
        await self._gate.enter(f"model '{self.name}'")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        stopped = False  # the reader ended the answer at a stop string

        def deliver(message: tuple[Any, ...]) -> None:  # on the worker's reader thread
            kind = message[0]
            if kind in ("end", "error", "gone"):
                self._worker.finish(message[1])
                outcome = "stop" if stopped else message[2] if kind == "end" else "error"
                self._record(outcome, message[3] if kind != "gone" else 0)
                # The turn is given back before the caller hears of the end: a request
                # that has finished holds nothing.
                self._gate.leave()
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is listening
                loop.call_soon_threadsafe(events.put_nowait, message)

        try:
            options = self._options(sampling, len(ids) + budget)
            rid = self._worker.call(deliver, "start", ids, budget, options, sampling.constraint)
        except BaseException:
            self._gate.leave()
            raise
        stops = _StopScanner(sampling.stop)
        calling = sampling.tools is not None and sampling.tools.active
        answer: list[str] = []  # kept only when it may be a tool call
        count = 0
        try:
            while True:
                kind, _, value, *_ = await events.get()
                if kind == "error" and sampling.constraint is not None and count == 0:
                    raise GenerationError(
                        f"the JSON Schema cannot be used for constrained decoding: {value}",
                        param="tools" if calling else "response_format",
                    )
                if kind == "error":
                    raise UnavailableError(f"model '{self.name}' failed while generating: {value}")
                if kind == "gone":
                    raise UnavailableError(value)
                if kind == "end":
                    tail = stops.flush()
                    if tail:
                        yield Delta(tail)
                    call = parse_call("".join(answer)) if value != "length" else None
                    reason: Literal["stop", "length", "tool_calls"] = (
                        "tool_calls" if call else "length" if value == "length" else "stop"
                    )
                    yield Finish(reason, len(ids), count, call)
                    return
                count += 1
                if count % CREDIT == 0:
                    self._worker.tell("credit", rid, CREDIT)
                if calling:
                    if not any(answer) and value.startswith("{"):
                        stops = _StopScanner(())  # stop strings cut text, not a call
                    answer.append(value)
                emit, stopped_here = stops.feed(value)
                if emit:
                    yield Delta(emit)
                if stopped_here:
                    stopped = True
                    yield Finish("stop", len(ids), count)
                    return
        finally:
            self._worker.tell("cancel", rid)  # lost if it has ended

    def _options(self, sampling: Sampling, max_length: int) -> dict[str, Any]:
        """ONNX Runtime GenAI's search options for ``sampling``."""
        options: dict[str, Any] = {"max_length": max_length}
        if sampling.temperature == 0:
            options["do_sample"] = False
        else:
            options.update(
                do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                top_k=self.config.vocab_size,
            )  # fmt: skip
        if sampling.seed is not None:
            options["random_seed"] = sampling.seed & 0x7FFFFFFF
        return options

    async def complete(self, prompt: str, sampling: Sampling) -> tuple[str, Finish]:
        """The whole continuation at once, and how it ended."""
        parts: list[str] = []
        async for item in self.stream(prompt, sampling):
            if isinstance(item, Finish):
                return "".join(parts), item
            parts.append(item.text)
        raise AssertionError("stream ended without a Finish")  # pragma: no cover

    def close(self) -> None:
        """Stop the worker process; requests still generating end with UnavailableError."""
        self._finalizer()


class _StopScanner:
    """Cuts generated text at the first stop string, holding back what may begin one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.held = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """Text safe to emit now, and whether a stop string ended it."""
        text = self.held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return text[: min(hits)], True
        keep = max(
            (n for s in self.stops for n in range(1, len(s)) if text.endswith(s[:n])),
            default=0,
        )
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


class GenerativeHost:
    """The generative models of a registry, loaded on first use and kept by version."""

    def __init__(self, registry: ModelRegistry, metrics: MetricsRegistry | None = None) -> None:
        self.registry = registry
        self._loaded: dict[tuple[str, str], GenerativeModel] = {}
        self._lock = threading.Lock()
        metrics = metrics or MetricsRegistry()
        self._generations = metrics.counter(
            "edgeos_generations_total",
            "Generations by model and how they ended (stop, length, cancelled, error).",
            ("model", "outcome"),
        )
        self._tokens = metrics.counter(
            "edgeos_generated_tokens_total", "Tokens generated, by model.", ("model",)
        )

    def catalog(self) -> list[ModelManifest]:
        """The default version of every generative model."""
        return [m for m, default in self.registry.catalog() if default and m.kind == "generative"]

    def model(self, name: str, version: str | None = None) -> GenerativeModel:
        """The loaded model; ModelNotFoundError if unknown, InvalidRequestError if not
        generative."""
        manifest = self.registry.get(name, version)
        if manifest.kind != "generative":
            raise GenerationError(
                f"model '{name}' is not a generative model; it serves /v2 inference",
                param="model", code="model_not_generative",
            )  # fmt: skip
        key = (manifest.name, manifest.version)
        with self._lock:
            loaded = self._loaded.get(key)
            if loaded is None or loaded.manifest.sha256 != manifest.sha256:
                if loaded is not None:
                    loaded.close()
                loaded = GenerativeModel(
                    manifest, self.registry.path(manifest), self._recorder(manifest.name)
                )
                self._loaded[key] = loaded
        return loaded

    def loaded(self) -> list[GenerativeModel]:
        """Loaded models, least recently used first."""
        with self._lock:
            return sorted(self._loaded.values(), key=lambda m: m.last_used)

    def memory_used(self) -> int:
        """Bytes loaded models take: their worker processes' resident memory, at least
        their weights and full KV caches each."""
        with self._lock:
            return sum(m.memory_bytes for m in self._loaded.values())

    def unload(self, name: str, version: str) -> bool:
        """Drop a loaded model if it is idle; False when it is not loaded or a request is
        generating or waiting on it. The next request loads it again."""
        with self._lock:
            model = self._loaded.get((name, version))
            if model is None or model.busy:
                return False
            del self._loaded[(name, version)]
        model.close()
        return True

    def _recorder(self, name: str) -> Callable[[str, int], None]:
        def record(outcome: str, tokens: int) -> None:
            self._generations.inc(name, outcome)
            self._tokens.inc(name, amount=tokens)

        return record

    def close(self) -> None:
        """Drop every loaded model, stopping its worker process."""
        with self._lock:
            models = list(self._loaded.values())
            self._loaded.clear()
        for model in models:
            model.close()

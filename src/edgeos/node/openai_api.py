"""The OpenAI-compatible API of the node: models, chat completions, embeddings.

``GET /v1/models``, ``POST /v1/chat/completions`` (with ``stream`` as server-sent events
in OpenAI's chunk format, ``max_tokens``, ``temperature``, ``top_p``, ``stop``, ``seed``,
``response_format``, ``tools`` and ``tool_choice``) served by the generative models of the registry, and ``POST /v1/embeddings`` served by a
registered embedding model (:mod:`edgeos.memory.embeddings`). Any OpenAI client pointed at
``http://NODE/v1`` works. Errors use OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``; a full queue is a 429 with
``Retry-After``. A client that goes away mid-stream cancels its generation.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import math
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from edgeos.errors import EdgeOSError, InvalidRequestError, NotFoundError, PermissionDeniedError
from edgeos.limits import BudgetExceeded
from edgeos.node import spending
from edgeos.runtime.generative import (
    Delta,
    Finish,
    GenerationError,
    GenerativeHost,
    QueueFullError,
    Sampling,
)
from edgeos.runtime.host import ModelHost

if TYPE_CHECKING:
    from edgeos.node.tokens import Principal
    from edgeos.routing.router import Router
from edgeos.runtime.structured import (
    Tool,
    ToolCall,
    Tools,
    call_head,
    call_spans,
    check_json_schema,
    json_schema_text,
    parse_call,
    parse_calls,
)

JSON = "application/json"
_Item = TypeVar("_Item")
# Bodies larger than this are refused before parsing: prompts fit the context anyway.
MAX_BODY = 1024 * 1024


def openai_routes(
    generative: GenerativeHost, host: ModelHost, router: Router | None = None
) -> list[Route]:
    """The API's routes, served from the node's generative host and model host; with
    ``router``, chat requests for a model not registered here that a venue off the device
    serves (``venues.yaml``) are relayed to it, streams included."""
    api = _OpenAI(generative, host, router)
    return [
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/models/{model:path}", api.model, methods=["GET"]),
        Route("/v1/chat/completions", api.chat, methods=["POST"]),
        Route("/v1/embeddings", api.embeddings, methods=["POST"]),
    ]


def error_response(exc: EdgeOSError) -> Response:
    """An error in OpenAI's shape, with the status its type calls for."""
    kind, status, code = "api_error", exc.http_status, None
    param = getattr(exc, "param", None)
    retry_after = 1.0
    if isinstance(exc, QueueFullError):
        kind, status, code = "rate_limit_error", 429, "queue_full"
    elif isinstance(exc, BudgetExceeded):  # a token's budget for relayed calls
        kind, status, code = "insufficient_quota", 429, "insufficient_quota"
        retry_after = exc.retry_after or retry_after
    elif isinstance(exc, PermissionDeniedError):  # as the API's gate says it (access.py)
        kind, code = "permission_error", "insufficient_scope"
    elif isinstance(exc, NotFoundError):
        kind, status, code = "invalid_request_error", 404, "model_not_found"
        param = param or "model"
    elif isinstance(exc, GenerationError):
        kind, code = "invalid_request_error", exc.code
    elif exc.http_status < 500:
        kind = "invalid_request_error"
    body = {"error": {"message": str(exc), "type": kind, "param": param, "code": code}}
    headers = {"Retry-After": str(math.ceil(retry_after))} if status == 429 else None
    return Response(orjson.dumps(body), status_code=status, media_type=JSON, headers=headers)


def _json(doc: Any) -> Response:
    return Response(orjson.dumps(doc), media_type=JSON)


def _bad(param: str, message: str) -> GenerationError:
    return GenerationError(f"{param}: {message}", param=param)


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise InvalidRequestError(f"the request body is over {MAX_BODY} bytes")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequestError(f"the request body is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    return doc


def _typed(doc: Mapping[str, Any], name: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = doc.get(name)
    if value is None:
        return default
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _kinds(kind)):
        names = " or ".join(k.__name__ for k in _kinds(kind))
        raise _bad(name, f"must be {names} (got {type(value).__name__})")
    return value


def _kinds(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def sampling_of(doc: Mapping[str, Any]) -> Sampling:
    """The sampling settings of a chat request; GenerationError naming a bad parameter."""
    stop = doc.get("stop")
    stops = (stop,) if isinstance(stop, str) else stop or ()
    if not isinstance(stops, list | tuple) or not all(isinstance(s, str) for s in stops):
        raise _bad("stop", "must be a string or a list of strings")
    if _typed(doc, "n", int, 1) != 1:
        raise _bad("n", "only n=1 is supported")
    max_tokens = _typed(doc, "max_completion_tokens", int, None)
    return Sampling(
        schema=schema_of(doc),
        tools=tools_of(doc),
        max_tokens=_typed(doc, "max_tokens", int, max_tokens),
        temperature=float(_typed(doc, "temperature", (int, float), 1.0)),
        top_p=float(_typed(doc, "top_p", (int, float), 1.0)),
        seed=_typed(doc, "seed", int, None),
        stop=tuple(stops),
    )


def schema_of(doc: Mapping[str, Any]) -> str | None:
    """The JSON Schema of ``response_format`` as JSON text, checked; None for plain text."""
    fmt = _typed(doc, "response_format", dict, {"type": "text"})
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema: Any = {"type": "object"}
    elif kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
    else:
        raise _bad("response_format", "type must be 'text', 'json_object' or 'json_schema'")
    return json_schema_text(check_json_schema(schema, "response_format.json_schema.schema"))


def tools_of(doc: Mapping[str, Any]) -> Tools | None:
    """``tools`` and ``tool_choice`` of a chat request in OpenAI's shapes, checked; None
    when the request offers no tools."""
    specs = _typed(doc, "tools", list, [])
    choice = doc.get("tool_choice")
    # OpenAI's default: an answer may make several calls (a JSON array of them, decoded).
    parallel = bool(_typed(doc, "parallel_tool_calls", bool, True))
    if not specs:
        if choice not in (None, "none"):
            raise _bad("tool_choice", "needs tools to choose from")
        return None
    tools = []
    for index, spec in enumerate(specs):
        where = f"tools[{index}]"
        if not isinstance(spec, dict) or spec.get("type") != "function":
            raise _bad(f"{where}.type", "must be 'function'")
        function = spec.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _bad(f"{where}.function.name", "is required")
        description = _typed(function, "description", str, "")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        tools.append(Tool(function["name"], parameters, description))
    if choice is None or isinstance(choice, str):
        return Tools(tuple(tools), choice or "auto", parallel)
    named = choice.get("function") if isinstance(choice, dict) else None
    if not isinstance(named, dict) or not isinstance(named.get("name"), str):
        raise _bad("tool_choice", "must be 'none', 'auto', 'required' or a function by name")
    return Tools(tuple(tools), named["name"], parallel)


class _OpenAI:
    def __init__(
        self, generative: GenerativeHost, host: ModelHost, router: Router | None = None
    ) -> None:
        self.generative = generative
        self.host = host
        self.router = router
        self.holds = spending.Holds()

    async def models(self, request: Request) -> Response:
        caller = _caller(request)
        listed = [
            _model(m)
            for m, default in self.host.registry.catalog()
            if default and (caller is None or caller.allows("infer", m.name))
        ]
        return _json({"object": "list", "data": listed})

    async def model(self, request: Request) -> Response:
        try:
            name = request.path_params["model"]
            _may_infer(request, name)
            return _json(_model(self.host.registry.get(name)))
        except EdgeOSError as exc:
            return error_response(exc)

    async def chat(self, request: Request) -> Response:
        try:
            doc = await _body(request)
            name = _typed(doc, "model", str, None)
            if not name:
                raise _bad("model", "is required")
            _may_infer(request, name)
            messages = _typed(doc, "messages", list, None)
            if not messages or not all(isinstance(m, dict) for m in messages):
                raise _bad("messages", "must be a non-empty list of message objects")
            sampling = sampling_of(doc)
            stream = bool(_typed(doc, "stream", bool, False))
            options = _typed(doc, "stream_options", dict, {})
            if await asyncio.to_thread(self._relayed, name):
                return await self._relay(name, doc, sampling, stream, _caller(request))
            model = await asyncio.to_thread(self.generative.model, name)
            prompt = model.chat.prompt(messages, sampling.tools)
            # Checked here so that a prompt over the context is a plain error, not a stream.
            model.budget(len(await model.encode_async(prompt)), sampling)
        except EdgeOSError as exc:
            return error_response(exc)
        meta = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": model.name,
            "system_fingerprint": f"{model.name}@{model.manifest.version}",
        }
        if stream:
            # The first piece is awaited before the headers go out: a full queue or a
            # refused schema is then a plain error response, not an event in a 200 stream.
            items = model.stream(prompt, sampling)
            try:
                first = await anext(items)
            except EdgeOSError as exc:
                await items.aclose()
                return error_response(exc)
            usage = bool(options.get("include_usage"))
            return _EventStream(_chunks(_prepend(first, items), meta, usage, sampling.tools))
        try:
            text, finish = await model.complete(prompt, sampling)
        except EdgeOSError as exc:
            return error_response(exc)
        message: dict[str, Any] = {"role": "assistant", "content": text}
        reason = finish.reason
        calls = _answer_calls(text, finish, sampling.tools)
        if calls:
            reason = "length" if finish.reason == "length" else "tool_calls"
            listed = [
                {"id": _call_id(), "type": "function",
                 "function": {"name": call.name, "arguments": call.arguments}}
                for call in calls
            ]  # fmt: skip
            message = {"role": "assistant", "content": None, "tool_calls": listed}
        return _json(
            {
                **meta,
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "logprobs": None,
                        "finish_reason": reason,
                    }
                ],
                "usage": _usage(finish),
            }
        )

    def _relayed(self, name: str) -> bool:
        """Whether ``name`` is no model of this node but one a venue off it serves."""
        if self.router is None:
            return False
        from edgeos.routing.chat import OpenAIVenue

        if not any(isinstance(v, OpenAIVenue) and v.offer(name) for v in self.router.venues):
            return False
        try:
            self.host.registry.get(name)
        except NotFoundError:
            return True
        return False

    async def _relay(
        self,
        name: str,
        doc: dict[str, Any],
        sampling: Sampling,
        stream: bool,
        caller: Principal | None = None,
    ) -> Response:
        """The request, as it came, to the venue the routing rules choose; its answer (or its
        server-sent events) back as they are. Raises EdgeOSError before anything is sent
        back: BudgetExceeded when the calling token has spent its budget for the day."""
        from edgeos.routing.chat import (
            RELAYED,
            ChatRequest,
            relay_venue,
            relayed_record,
            token_price,
        )

        router = self.router
        assert router is not None  # checked by _relayed
        db = self.host.registry.db
        request = ChatRequest(tuple(doc["messages"]), sampling.max_tokens)
        venue, model = await asyncio.to_thread(relay_venue, router, name, request)
        body = {**doc, "model": model}
        # What this call may cost counts against the token's budget until it is charged.
        estimate = token_price(venue.info, *request.expected_tokens())
        release = self.holds.take(db, caller, estimate)

        def charge(usage: dict[str, Any] | None) -> None:
            # What the venue charges shows in the node's routing metrics, by the token that
            # asked, and counts against that token's budget.
            record = relayed_record(venue.info, usage)
            router.account(RELAYED if caller is None else caller.label, record)
            if caller is not None:
                spending.record_spend(db, caller, float(record["cost"]))

        if not stream:
            try:
                status, content = await asyncio.to_thread(venue.relay, body)
                if status == 200:
                    await asyncio.to_thread(charge, _usage_of(content))
            finally:
                release()
            return Response(content, status_code=status, media_type=JSON)
        # As for local streams: the first piece before the headers, so a refusal is a plain
        # error response.
        events = _metered(venue.relay_stream(body), charge, release)
        try:
            first = await anext(events)
        except StopAsyncIteration:
            first = b""
        except BaseException:
            await events.aclose()
            raise
        return _EventStream(_prepend(first, events))

    async def embeddings(self, request: Request) -> Response:
        from edgeos.memory.embeddings import describe, embed, host_infer

        try:
            doc = await _body(request)
            name = _typed(doc, "model", str, None)
            if not name:
                raise _bad("model", "is required")
            _may_infer(request, name)
            texts = doc.get("input")
            texts = [texts] if isinstance(texts, str) else texts
            if (
                not texts
                or not isinstance(texts, list)
                or not all(isinstance(t, str) for t in texts)
            ):
                raise _bad("input", "must be a string or a non-empty list of strings")
            encoding = _typed(doc, "encoding_format", str, "float")
            if encoding not in ("float", "base64"):
                raise _bad("encoding_format", "must be 'float' or 'base64'")
            model = await asyncio.to_thread(describe, self.host, name)
            vectors = await asyncio.to_thread(embed, model, texts, host_infer(self.host))
            tokens = int(model.tokenizer.encode(texts)[1].sum())
        except EdgeOSError as exc:
            return error_response(exc)
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()
                if encoding == "base64"
                else v.tolist(),
            }
            for i, v in enumerate(vectors)
        ]
        return _json(
            {
                "object": "list",
                "data": data,
                "model": model.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )


def _model(manifest: Any) -> dict[str, Any]:
    return {"id": manifest.name, "object": "model", "created": 0, "owned_by": "edgeos"}


def _answer_calls(text: str, finish: Finish, tools: Tools | None) -> list[ToolCall]:
    """The tool calls a finished answer makes: none for text or a single call cut short;
    of parallel calls cut short (``length``), the calls it completed."""
    if finish.tool_call is not None:
        return [finish.tool_call]
    if tools is None or not tools.parallel or not text.startswith("["):
        return []
    if finish.reason != "length":
        return parse_calls(text) or []
    calls = (parse_call(text[start:end]) for start, end in call_spans(text))
    return [call for call in calls if call is not None]


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _usage(finish: Finish) -> dict[str, int]:
    return {
        "prompt_tokens": finish.prompt_tokens,
        "completion_tokens": finish.completion_tokens,
        "total_tokens": finish.prompt_tokens + finish.completion_tokens,
    }


def _usage_of(content: bytes) -> dict[str, Any] | None:
    """The ``usage`` of an OpenAI answer or stream chunk, when it has one."""
    try:
        doc = orjson.loads(content)
    except orjson.JSONDecodeError:
        return None
    usage = doc.get("usage") if isinstance(doc, dict) else None
    return usage if isinstance(usage, dict) else None


def _caller(request: Request) -> Principal | None:
    """Who is asking (None where no gate stands in front of this app: its own tests)."""
    principal: Principal | None = getattr(request.state, "principal", None)
    return principal


def _may_infer(request: Request, model: str) -> None:
    """PermissionDeniedError unless the caller's token may use ``model`` (``infer`` or
    ``infer:MODEL``): under ``/v1`` the model is in the body, past the gate's reach."""
    caller = _caller(request)
    if caller is not None:
        caller.require("infer", model)


async def _metered(
    events: AsyncGenerator[bytes],
    account: Callable[[dict[str, Any] | None], None],
    done: Callable[[], None],
) -> AsyncGenerator[bytes]:
    """A venue's server-sent events passed on unchanged; once they end (or the client goes),
    ``account`` gets the ``usage`` the last chunk carried (None when none did), if anything
    was answered, and then ``done`` is called, whatever happened."""
    usage: dict[str, Any] | None = None
    pending, answered = b"", False
    try:
        async with contextlib.aclosing(events):
            async for piece in events:
                answered = True
                pending += piece
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line.startswith(b"data: {") and b'"usage"' in line:
                        usage = _usage_of(line[6:]) or usage
                yield piece
    finally:  # a stream the client cut short was still answered, and is still charged
        try:
            if answered:
                account(usage)
        finally:
            done()


async def _prepend(first: _Item, rest: AsyncGenerator[_Item]) -> AsyncGenerator[_Item]:
    async with contextlib.aclosing(rest):
        yield first
        async for item in rest:
            yield item


async def _chunks(
    items: AsyncGenerator[Delta | Finish],
    meta: dict[str, Any],
    usage: bool,
    tools: Tools | None = None,
) -> AsyncGenerator[bytes]:
    """OpenAI's ``chat.completion.chunk`` events for a generation, then ``[DONE]``."""

    def event(delta: dict[str, Any], reason: str | None, **extra: Any) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        doc = {**meta, "object": "chat.completion.chunk", "choices": [choice], **extra}
        return b"data: " + orjson.dumps(doc) + b"\n\n"

    deltas = _Deltas(tools)
    async with contextlib.aclosing(items):
        try:
            first = True
            async for item in items:
                out = deltas.piece(item.text) if isinstance(item, Delta) else deltas.end(item)
                for delta in out:
                    yield event({"role": "assistant", **delta} if first else delta, None)
                    first = False
                if isinstance(item, Finish):
                    if first:
                        yield event({"role": "assistant", "content": ""}, None)
                    calls = deltas.ids and item.reason == "stop"
                    yield event({}, "tool_calls" if calls else item.reason)
                    if usage:
                        doc = {**meta, "object": "chat.completion.chunk", "choices": []}
                        yield b"data: " + orjson.dumps({**doc, "usage": _usage(item)}) + b"\n\n"
        except EdgeOSError as exc:
            # Headers are sent: the error goes in the stream, as OpenAI does.
            body = orjson.loads(error_response(exc).body)
            yield b"data: " + orjson.dumps(body) + b"\n\n"
    yield b"data: [DONE]\n\n"


class _Deltas:
    """The pieces of an answer as chunk deltas: text as ``content``; when tools may be
    called and the answer starts as a call does (``{``, or ``[`` for parallel calls),
    each call as ``tool_calls`` at its index: its id and name once its head is complete,
    then its arguments as they come. A call's closing brace is held back until the call
    is complete, so the pieces add up to its arguments."""

    def __init__(self, tools: Tools | None) -> None:
        calling = tools is not None and tools.active
        self.parallel = calling and tools is not None and tools.parallel
        self.mode = None if calling else "text"
        self.text = ""
        self.ids: list[str] = []
        self.starts: list[int] = []  # where each call's arguments begin, within the call
        self.sent: list[int] = []  # how far into each call its arguments have been sent
        self.done = 0  # calls complete and sent whole

    def piece(self, text: str) -> list[dict[str, Any]]:
        if self.mode is None and text:
            self.mode = "call" if text.startswith("[" if self.parallel else "{") else "text"
        if self.mode != "call":
            return [{"content": text}] if self.mode == "text" else []
        self.text += text
        return self._progress(final=False)

    def end(self, finish: Finish) -> list[dict[str, Any]]:
        if self.mode != "call" or (finish.tool_call is None and not self.parallel):
            return []
        return self._progress(final=True)

    def _progress(self, final: bool) -> list[dict[str, Any]]:
        """Deltas for what ``text`` now holds: calls completed since, then the one being
        written."""
        if self.parallel:
            spans = call_spans(self.text)
            at = spans[-1][1] if spans else 1
            while at < len(self.text) and self.text[at] in ", ":
                at += 1
            writing = at if self.text[at : at + 1] == "{" else None
        else:  # one call, the whole answer: complete when the answer ends
            spans = [(0, len(self.text))] if final else []
            writing = None if final else 0
        out = []
        for index, (start, end) in enumerate(spans[self.done :], self.done):
            out += self._call(index, self.text[start:end], complete=True)
            self.done += 1
        if writing is not None:
            out += self._call(len(spans), self.text[writing:], complete=False)
        return out

    def _call(self, index: int, text: str, complete: bool) -> list[dict[str, Any]]:
        out = []
        if index == len(self.ids):
            head = call_head(text)
            if head is None:
                return []
            name, start = head
            self.ids.append(_call_id())
            self.starts.append(start)
            self.sent.append(start)
            call = {"index": index, "id": self.ids[index], "type": "function",
                    "function": {"name": name, "arguments": ""}}  # fmt: skip
            out.append({"content": None, "tool_calls": [call]})
        if complete:
            parsed = parse_call(text)
            end = self.starts[index] + len(parsed.arguments) if parsed else len(text)
        else:
            end = len(text.rstrip())
            if text[:end].endswith("}"):
                end = len(text[: end - 1].rstrip())
        if end > self.sent[index]:
            piece = text[self.sent[index] : end]
            out.append({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
            self.sent[index] = end
        return out


class _EventStream(StreamingResponse):
    """Server-sent events from an async iterator, stopped when the client disconnects.

    The iterator runs in a task that a watcher cancels on ``http.disconnect``, so a
    generation whose reader went away stops at its next token rather than running on.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncGenerator[bytes]) -> None:
        super().__init__(events, headers={"Cache-Control": "no-cache"})
        self.events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def produce() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async with contextlib.aclosing(self.events) as events:
                async for chunk in events:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        producer = asyncio.ensure_future(produce())
        watcher = asyncio.ensure_future(watch())
        try:
            await asyncio.wait({producer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (producer, watcher):
                task.cancel()
            await asyncio.gather(producer, watcher, return_exceptions=True)
        if producer.done() and not producer.cancelled() and producer.exception() is not None:
            raise producer.exception()  # type: ignore[misc]

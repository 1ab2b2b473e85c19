"""The HTTP API of ``moraft serve``, in the OpenAI shape: ``POST /v1/completions``, ``POST /v1/chat/completions``
(``stream: true`` as server-sent events), ``GET /v1/models``, plus ``GET /health`` and ``GET /metrics``.

The request's ``model`` names the adapter (its directory name) or the base model. Errors are OpenAI-style JSON,
``{"error": {"message", "type", "param", "code"}}``, with the HTTP status saying whose fault it is:

    400  a bad request: malformed JSON (NaN, nesting past Python's recursion limit), a string that is not Unicode
         text (a lone surrogate), a missing or out-of-range field, an unsupported option, too many or too long stop
         strings, a prompt over ``--max_prompt_chars`` characters or as long as the context, ``max_tokens`` past it
    401  ``--api_key`` is set and a ``/v1`` request lacks ``Authorization: Bearer <key>`` (``/health``, ``/metrics``
         stay open, as in vLLM)
    404  an unknown model or route
    413  a body over ``--max_request_mb``, refused by its Content-Length or as soon as that many bytes arrived
    499  (seen by no client; counted in /metrics) a non-streaming request whose client disconnected, and
         whose generation was cancelled
    500  the adapter's files cannot be loaded or do not fit the base, or its logits are not finite: only the requests
         for that adapter fail
    503  the adapters in use fill the memory bound, or the engine stopped

One client cannot slow or break another's request: bodies are bounded while they are read, tokenizing and chat
templating run on one worker thread (not the event loop, which keeps answering), sampling settings are validated
here and isolated per row in the engine, and a client that disconnects cancels its generation, streamed or not.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, AsyncIterator, Callable, Literal, Optional, TypeVar, Union

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from .adapters import AdapterBusy, AdapterLoadError, AdapterStore, AdapterTooLarge, UnknownAdapter
from .engine import Delta, Engine, Failed, Finished, Request
from .metrics import ServeMetrics
from .sampling import SamplingParams

T = TypeVar("T")

MAX_STOP_STRINGS = 16
"""The most stop strings a request may give. OpenAI takes 4, vLLM any number; each string costs the engine a search
per step, and its prefixes a set look-up (`sampling.TextTracker`)."""
MAX_STOP_LENGTH = 128
"""The longest stop string, in characters."""
SEED_RANGE = (-(2**63), 2**63 - 1)
"""``seed`` is a signed 64-bit integer, as vLLM's protocol bounds it (``torch.Generator.manual_seed`` takes no more)."""


class APIError(Exception):
    """An error answered as OpenAI-style JSON with ``status``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


# ---------------------------------------------------------------------------------------------------------------
# request bodies


class _StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by both endpoints. Unknown fields are ignored, as OpenAI-compatible servers usually do."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)  # (0, 0.01) is raised to 0.01, as vLLM does (SamplingParams)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = 1
    stream: bool = False
    stream_options: Optional[_StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    ignore_eos: bool = False  # a vLLM extension, for benchmarks
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: Optional[Union[bool, int]] = None

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, stop: Optional[Union[str, list[str]]]) -> Optional[Union[str, list[str]]]:
        stops = _stop_list(stop)
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"{len(stops)} stop strings given; at most {MAX_STOP_STRINGS} are accepted")
        longest = max(stops, key=len, default="")
        if len(longest) > MAX_STOP_LENGTH:
            raise ValueError(f"a stop string of {len(longest)} characters given; at most {MAX_STOP_LENGTH} are "
                             "accepted")
        return stop

    def stops(self) -> list[str]:
        return _stop_list(self.stop)

    def unsupported(self) -> Optional[tuple[str, str]]:
        """(field, message) for a requested feature the server does not implement."""
        if self.n != 1:
            return "n", f"n={self.n} is not supported; only n=1 (send separate requests)"
        if self.presence_penalty or self.frequency_penalty:
            return "presence_penalty", "presence_penalty and frequency_penalty are not supported; only 0"
        if self.logprobs:
            return "logprobs", "logprobs are not supported"
        return None


def _stop_list(stop: Optional[Union[str, list[str]]]) -> list[str]:
    """``stop`` (one string, a list, or none) as a list."""
    return [stop] if isinstance(stop, str) else list(stop or [])


class CompletionRequest(_Sampling):
    prompt: Union[str, list[int], list[str]]
    echo: bool = False
    suffix: Optional[str] = None

    def unsupported(self) -> Optional[tuple[str, str]]:
        if self.echo:
            return "echo", "echo=true is not supported"
        if self.suffix:
            return "suffix", "suffix is not supported"
        return super().unsupported()


class _TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: Union[str, list[_TextPart], None] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    tools: Optional[list[Any]] = None

    def unsupported(self) -> Optional[tuple[str, str]]:
        if self.tools:
            return "tools", "tools are not supported"
        return super().unsupported()


# ---------------------------------------------------------------------------------------------------------------
# the app


@dataclass
class ServerState:
    """What the endpoints need: the engine, the adapter store, the tokenizer, the base model's id and the limits.

    ``tokenizing`` is the one thread that runs the tokenizer and the chat template for requests: off the event loop,
    one call at a time (a Hugging Face fast tokenizer used from several threads at once can fail with "Already
    borrowed").
    """

    engine: Engine
    store: AdapterStore
    tokenizer: Any
    base_name: str
    context_length: int
    metrics: ServeMetrics
    max_request_bytes: int
    max_prompt_chars: int
    api_key: Optional[str] = None
    created: int = 0
    tokenizing: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="moraft-tokenizer"))

    async def tokenize(self, fn: Callable[..., T], *args) -> T:
        """``fn(*args)`` on the tokenizer thread."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenizing, partial(fn, *args))


class _EventQueue:
    """Carries engine events (from the engine thread) into an asyncio queue of the server's event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def __call__(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")  # metric labels


class _CountRequests:
    """ASGI middleware counting responses by endpoint and status (streamed ones included)."""

    def __init__(self, app, metrics: ServeMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_counting(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counting)
        finally:
            endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
            self.metrics.requests.inc(1, endpoint, str(status))


class _RequireAPIKey:
    """ASGI middleware: a request under ``/v1`` must carry ``Authorization: Bearer <key>``, as with vLLM's
    ``--api-key`` and the OpenAI API; ``/health`` and ``/metrics`` stay open, as vLLM leaves every path outside
    ``/v1``. The keys are compared as SHA-256 digests with ``hmac.compare_digest``, so neither the time taken nor
    the key's length tells a client how close it came."""

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self.digest = hashlib.sha256(api_key.encode()).digest()

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "").removeprefix(scope.get("root_path", ""))  # as vLLM: the app may be mounted
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and path.startswith("/v1"):
            problem = self._problem(Headers(scope=scope).get("authorization"))
            if problem:
                response = APIError(401, problem, code="invalid_api_key").response()
                response.headers["WWW-Authenticate"] = "Bearer"
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _problem(self, header: Optional[str]) -> Optional[str]:
        """Why the Authorization header does not authenticate; None when it does."""
        if not header:
            return "no API key given; send it as the header 'Authorization: Bearer <key>'"
        scheme, _, token = header.partition(" ")
        given = hashlib.sha256(token.strip().encode("utf-8", "replace")).digest()
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, self.digest):
            return "incorrect API key given; send the server's --api_key as 'Authorization: Bearer <key>'"
        return None


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI application serving ``state``."""
    app = FastAPI(title="moraft serve", description="OpenAI-compatible serving of many MoRA/LoRA adapters")
    state.created = state.created or int(time.time())
    app.state.moraft = state

    @app.exception_handler(APIError)
    async def _api_error(_: HTTPRequest, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: HTTPRequest, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return APIError(err.status_code, str(err.detail), kind).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: HTTPRequest, err: Exception) -> JSONResponse:
        return APIError(500, f"internal error: {type(err).__name__}: {err}", "server_error").response()

    @app.get("/health")
    async def health() -> JSONResponse:
        if not state.engine.alive:
            return JSONResponse({"status": "error", "message": "the decoding engine stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def card(name: str) -> dict:
        parent = None if name == state.base_name else state.base_name
        return {"id": name, "object": "model", "created": state.created, "owned_by": "moraft",
                "root": state.base_name, "parent": parent}

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        adapters = await run_in_threadpool(state.store.available)
        data = [card(state.base_name)] + [card(n) for n in adapters if n != state.base_name]
        return JSONResponse({"object": "list", "data": data})

    @app.get("/v1/models/{name}")
    async def model(name: str) -> JSONResponse:
        if name != state.base_name and not state.store.exists(name):
            raise await _unknown_model(state, name)
        return JSONResponse(card(name))

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        body = _parse(CompletionRequest, await _json_body(http, state.max_request_bytes))
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, f"prompt is a list of {len(prompt)} strings; send one prompt per request",
                               param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            _check_prompt_chars(state, len(prompt), "prompt")
            prompt_ids = await state.tokenize(_text_prompt_ids, state.tokenizer, prompt)
        else:
            _check_prompt_length(state, len(prompt), "prompt")
            vocab = len(state.tokenizer)
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})",
                               param="prompt")
            prompt_ids = list(prompt)
        return await _generate(state, http, body, prompt_ids, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest):
        body = _parse(ChatCompletionRequest, await _json_body(http, state.max_request_bytes))
        if not getattr(state.tokenizer, "chat_template", None):
            raise APIError(400, "the base model's tokenizer has no chat template; use /v1/completions",
                           param="messages")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        _check_prompt_chars(state, sum(len(m["role"]) + len(m["content"]) for m in messages), "messages")
        prompt_ids = await state.tokenize(_chat_prompt_ids, state.tokenizer, messages)
        return await _generate(state, http, body, prompt_ids, chat=True)

    if state.api_key:
        app.add_middleware(_RequireAPIKey, api_key=state.api_key)
    app.add_middleware(_CountRequests, metrics=state.metrics)  # added last, so outermost: it counts the 401s too
    return app


def _text_prompt_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]


def _chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The token ids of ``messages`` through the tokenizer's chat template, ready for the assistant's turn."""
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as err:  # the template rejects the conversation (e.g. roles out of order)
        raise APIError(400, f"the chat template rejected the messages: {err}", param="messages") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _check_prompt_chars(state: ServerState, chars: int, param: str) -> None:
    """Refuse a prompt too long to be worth tokenizing (the tokenizer's time grows with it, and other requests wait
    for the tokenizer thread meanwhile)."""
    if chars > state.max_prompt_chars:
        raise APIError(400, f"the prompt has {chars} characters; this server takes at most {state.max_prompt_chars} "
                       "(--max_prompt_chars). Shorten the prompt.", param=param, code="prompt_too_long")


def _check_prompt_length(state: ServerState, tokens: int, param: str) -> None:
    if tokens >= state.context_length:
        raise APIError(400, f"This model's maximum context length is {state.context_length} tokens, but the prompt "
                       f"has {tokens} tokens. Shorten the prompt.", param=param, code="context_length_exceeded")


async def _json_body(http: HTTPRequest, limit: int) -> dict:
    """The request's JSON object, read with at most ``limit`` bytes held; a 413 as soon as the body passes it."""
    raw = await _read_body(http, limit)
    try:  # NaN and Infinity are not JSON, though Python's parser takes them
        data = json.loads(raw, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = "it is nested too deeply" if isinstance(err, RecursionError) else err
        raise APIError(400, f"the request body is not valid JSON: {reason}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, not {type(data).__name__}", code="invalid_json")
    where = _lone_surrogate(data)
    if where is not None:
        raise APIError(400, f"{where} is not valid Unicode text: it holds a lone surrogate (a \\ud800-\\udfff escape "
                       "that is not half of a pair)", param=where)
    return data


async def _read_body(http: HTTPRequest, limit: int) -> bytes:
    """The body, refused with 413 by its Content-Length, or while it streams in (a chunked body has none), as soon as
    it passes ``limit`` bytes: an over-long body is never held in memory."""
    declared = http.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(f"{int(declared)} bytes", limit)
    chunks, size = [], 0
    async for chunk in http.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(f"more than {limit} bytes", limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: str, limit: int) -> APIError:
    return APIError(413, f"the request body is {size}; this server takes at most {limit} bytes "
                    f"({limit / 2**20:g} MiB, --max_request_mb)", code="request_too_large")


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _lone_surrogate(data: Any) -> Optional[str]:
    """The path (``messages.0.content``) of the first string in ``data`` that is not Unicode text: one holding a lone
    surrogate, which a JSON ``\\ud800`` escape makes and no tokenizer can encode. None when every string is text."""
    stack: list[tuple[tuple, Any]] = [((), data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return ".".join(str(p) for p in path) or "body"
        elif isinstance(value, dict):
            stack.extend(((*path, k), v) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend(((*path, i), v) for i, v in reversed(list(enumerate(value))))
    return None


def _parse(schema: type[BaseModel], data: dict):
    try:
        body = schema.model_validate(data)
    except ValidationError as err:
        errors = err.errors()
        param = ".".join(str(p) for p in errors[0]["loc"])
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors[:5])
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise APIError(400, f"invalid request: {problems}{more}", param=param or None) from None
    problem = body.unsupported()
    if problem:
        raise APIError(400, problem[1], param=problem[0])
    return body


async def _generate(state: ServerState, http: HTTPRequest, body: _Sampling, prompt_ids: list[int], chat: bool):
    # which model
    name = body.model
    if name != state.base_name and not state.store.exists(name):
        raise await _unknown_model(state, name)
    # how long
    context, n_prompt = state.context_length, len(prompt_ids)
    if n_prompt == 0:
        raise APIError(400, "the prompt is empty", param="prompt")
    _check_prompt_length(state, n_prompt, "messages" if chat else "prompt")
    max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
    if max_tokens is None:
        max_tokens = context - n_prompt if chat else min(16, context - n_prompt)
    elif n_prompt + max_tokens > context:
        raise APIError(400, f"This model's maximum context length is {context} tokens, but {n_prompt} prompt tokens "
                       f"+ max_tokens={max_tokens} = {n_prompt + max_tokens}. Lower max_tokens to at most "
                       f"{context - n_prompt}.", param="max_tokens", code="context_length_exceeded")
    params = SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, stop=body.stops(),
                            seed=body.seed, ignore_eos=body.ignore_eos)
    # the adapter, pinned until the request ends
    adapter = None
    if name != state.base_name:
        try:
            adapter = await run_in_threadpool(state.store.acquire, name)
        except UnknownAdapter:
            raise APIError(404, f"The model {_shown(name)} does not exist", type="not_found_error", param="model",
                           code="model_not_found") from None
        except (AdapterLoadError, AdapterTooLarge) as err:
            raise APIError(500, str(err), type="adapter_load_error", param="model", code="adapter_load_failed") from None
        except AdapterBusy as err:
            raise APIError(503, str(err), type="server_busy", code="adapter_memory_full") from None
    events = _EventQueue()
    request = Request(prompt_ids, params, adapter, events)
    try:
        state.engine.submit(request)
    except RuntimeError as err:
        if adapter is not None:
            state.store.release(adapter)
        raise APIError(503, str(err), type="server_busy") from None

    created = int(time.time())
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = _sse(events, request, rid, created, name, chat, include_usage)
        return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    outcome = await _until_done_or_disconnected(http, events, request)
    if outcome is None:  # nobody reads this answer; 499 is nginx's "client closed request", for the logs and metrics
        return Response(status_code=499)
    text, end = outcome
    if isinstance(end, Failed):
        raise APIError(500, end.message, type="server_error")
    usage = _usage(end)
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": end.reason}
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": name,
                             "choices": [choice], "usage": usage})
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": end.reason}
    return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": name,
                         "choices": [choice], "usage": usage})


async def _until_done_or_disconnected(http: HTTPRequest, events: _EventQueue,
                                      request: Request) -> Optional[tuple[str, Union[Finished, Failed]]]:
    """The request's whole text and last event; None, with the request cancelled, when its client disconnects first
    (a streamed response notices through starlette; a plain one must watch the connection itself)."""
    collecting = asyncio.ensure_future(_collect(events))
    watching = asyncio.ensure_future(_disconnected(http))
    answered = False
    try:
        finished, _ = await asyncio.wait({collecting, watching}, return_when=asyncio.FIRST_COMPLETED)
        answered = collecting in finished
    finally:
        watching.cancel()
        if not answered:  # the client went away (or this handler was cancelled)
            collecting.cancel()
            request.cancel()
    return collecting.result() if answered else None


async def _collect(events: _EventQueue) -> tuple[str, Union[Finished, Failed]]:
    text = []
    while True:
        event = await events.queue.get()
        if not isinstance(event, Delta):
            return "".join(text), event
        text.append(event.text)


async def _disconnected(http: HTTPRequest) -> None:
    """Return when the client closes the connection (the body was read already, so the next ASGI message is the
    disconnect)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


def _shown(name: str, most: int = 100) -> str:
    """``name`` quoted, cut to ``most`` characters: a model id echoed in an error."""
    return repr(name) if len(name) <= most else f"{name[:most]!r}... ({len(name)} characters)"


async def _unknown_model(state: ServerState, name: str) -> APIError:
    available = [state.base_name, *await run_in_threadpool(state.store.available)]
    return APIError(404, f"The model {_shown(name)} does not exist. Available models: {', '.join(available)}",
                    type="not_found_error", param="model", code="model_not_found")


def _usage(end: Finished) -> dict:
    return {"prompt_tokens": end.prompt_tokens, "completion_tokens": end.completion_tokens,
            "total_tokens": end.prompt_tokens + end.completion_tokens}


async def _sse(events: _EventQueue, request: Request, rid: str, created: int, model: str, chat: bool,
               include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: one chunk per piece of text, a last chunk with finish_reason and usage, then [DONE]."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list, **extra) -> str:
        body = {"id": rid, "object": kind, "created": created, "model": model, "choices": choices, **extra}
        return f"data: {json.dumps(body)}\n\n"

    def choice(text: Optional[str], reason: Optional[str] = None, role: bool = False) -> dict:
        if not chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}

    done = False
    try:
        if chat:
            yield chunk([choice(None, role=True)])
        while True:
            event = await events.queue.get()
            if isinstance(event, Delta):
                yield chunk([choice(event.text)])
                continue
            done = True
            if isinstance(event, Failed):
                error = {"message": event.message, "type": "server_error", "param": None, "code": None}
                yield f"data: {json.dumps({'error': error})}\n\n"
            else:
                # usage rides on the last chunk too, so every response carries it
                yield chunk([choice(None, event.reason)], usage=_usage(event))
                if include_usage:
                    yield chunk([], usage=_usage(event))
            yield "data: [DONE]\n\n"
            return
    finally:
        if not done:  # the client disconnected mid-stream
            request.cancel()

"""The HTTP API of ``moraft serve``, in the OpenAI shape: ``POST /v1/completions``, ``POST /v1/chat/completions``
(``stream: true`` as server-sent events), ``GET /v1/models``, plus ``GET /health`` and ``GET /metrics``.

The request's ``model`` names the adapter (its directory name) or the base model. Errors are OpenAI-style JSON,
``{"error": {"message", "type", "param", "code"}}``, with the HTTP status saying whose fault it is: 400 for a bad
request (malformed JSON, bad field, prompt longer than the context), 404 for an unknown model, 500 for an adapter
whose files cannot be loaded, 503 when the adapters in use fill the memory bound.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Literal, Optional, Union

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .adapters import AdapterBusy, AdapterLoadError, AdapterStore, AdapterTooLarge, UnknownAdapter
from .engine import Delta, Engine, Failed, Finished, Request
from .metrics import ServeMetrics
from .sampling import SamplingParams


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

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = 1
    stream: bool = False
    stream_options: Optional[_StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    ignore_eos: bool = False  # a vLLM extension, for benchmarks
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: Optional[Union[bool, int]] = None

    def unsupported(self) -> Optional[tuple[str, str]]:
        """(field, message) for a requested feature the server does not implement."""
        if self.n != 1:
            return "n", f"n={self.n} is not supported; only n=1 (send separate requests)"
        if self.presence_penalty or self.frequency_penalty:
            return "presence_penalty", "presence_penalty and frequency_penalty are not supported; only 0"
        if self.logprobs:
            return "logprobs", "logprobs are not supported"
        return None


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
    """What the endpoints need: the engine, the adapter store, the tokenizer and the base model's id."""

    engine: Engine
    store: AdapterStore
    tokenizer: Any
    base_name: str
    context_length: int
    metrics: ServeMetrics
    created: int = 0


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
        body = _parse(CompletionRequest, await _json_body(http))
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, f"prompt is a list of {len(prompt)} strings; send one prompt per request",
                               param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            prompt_ids = state.tokenizer(prompt)["input_ids"]
        else:
            vocab = len(state.tokenizer)
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})",
                               param="prompt")
            prompt_ids = list(prompt)
        return await _generate(state, http, body, prompt_ids, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest):
        body = _parse(ChatCompletionRequest, await _json_body(http))
        tokenizer = state.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(400, "the base model's tokenizer has no chat template; use /v1/completions",
                           param="messages")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # the template rejects the conversation (e.g. roles out of order)
            raise APIError(400, f"the chat template rejected the messages: {err}", param="messages") from None
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return await _generate(state, http, body, prompt_ids, chat=True)

    app.add_middleware(_CountRequests, metrics=state.metrics)
    return app


async def _json_body(http: HTTPRequest) -> Any:
    raw = await http.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"the request body is not valid JSON: {err}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, not {type(data).__name__}", code="invalid_json")
    return data


def _parse(schema: type[BaseModel], data: dict):
    try:
        body = schema.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(p) for p in first["loc"])
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in err.errors())
        raise APIError(400, f"invalid request: {problems}", param=param or None) from None
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
    if n_prompt >= context:
        raise APIError(400, f"This model's maximum context length is {context} tokens, but the prompt has "
                       f"{n_prompt} tokens. Shorten the prompt.", param="messages" if chat else "prompt",
                       code="context_length_exceeded")
    max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
    if max_tokens is None:
        max_tokens = context - n_prompt if chat else min(16, context - n_prompt)
    elif n_prompt + max_tokens > context:
        raise APIError(400, f"This model's maximum context length is {context} tokens, but {n_prompt} prompt tokens "
                       f"+ max_tokens={max_tokens} = {n_prompt + max_tokens}. Lower max_tokens to at most "
                       f"{context - n_prompt}.", param="max_tokens", code="context_length_exceeded")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    params = SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, stop=stop,
                            seed=body.seed, ignore_eos=body.ignore_eos)
    # the adapter, pinned until the request ends
    adapter = None
    if name != state.base_name:
        try:
            adapter = await run_in_threadpool(state.store.acquire, name)
        except UnknownAdapter:
            raise APIError(404, f"The model {name!r} does not exist", type="not_found_error", param="model",
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

    text, end = [], None
    try:
        while end is None:
            event = await events.queue.get()
            if isinstance(event, Delta):
                text.append(event.text)
            else:
                end = event
    finally:
        if end is None:  # the client went away
            request.cancel()
    if isinstance(end, Failed):
        raise APIError(500, end.message, type="server_error")
    usage = _usage(end)
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": "".join(text)}, "logprobs": None,
                  "finish_reason": end.reason}
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": name,
                             "choices": [choice], "usage": usage})
    choice = {"index": 0, "text": "".join(text), "logprobs": None, "finish_reason": end.reason}
    return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": name,
                         "choices": [choice], "usage": usage})


async def _unknown_model(state: ServerState, name: str) -> APIError:
    available = [state.base_name, *await run_in_threadpool(state.store.available)]
    return APIError(404, f"The model {name!r} does not exist. Available models: {', '.join(available)}",
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

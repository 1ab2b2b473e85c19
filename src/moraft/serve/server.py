"""``moraft serve``: load a base model, wrap its layers for per-row adapters, start the engine and the HTTP server."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from ..adapters import load_causal_lm, parse_dtype
from ..errors import MissingPathError, UserError
from .adapters import AdapterStore
from .engine import Engine
from .layers import wrap_model
from .metrics import Gauge, ServeMetrics

logger = logging.getLogger("moraft.serve")

API_KEY_ENV = "MORAFT_API_KEY"
"""The environment variable read for ``--api_key`` when the option is not given (as vLLM reads VLLM_API_KEY)."""
PROMPT_CHARS_PER_TOKEN = 32
"""The default ``--max_prompt_chars`` is this many characters per token of the context: more than any tokenizer's
average (about 4 for English text), so only prompts that could never fit are refused before tokenizing."""


@dataclass
class Server:
    """A ready server: ``app`` is the ASGI (FastAPI) application; ``close()`` stops the engine thread."""

    app: Any
    engine: Engine
    store: AdapterStore
    state: Any  # api.ServerState

    def close(self) -> None:
        self.engine.stop()
        self.state.tokenizing.shutdown(wait=False, cancel_futures=True)


def context_length_of(model: torch.nn.Module, tokenizer: Any) -> Optional[int]:
    """The model's context window: ``max_position_embeddings`` (or ``n_positions``) of its config."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and 0 < value < 10**7 else None


def build_server(model: torch.nn.Module, tokenizer: Any, adapters: str | Path, *, base_name: str = "base",
                 max_adapter_memory_mb: float = 1024.0, max_batch_size: int = 64, max_prefill_tokens: int = 8192,
                 batch_window_ms: float = 0.0, context_length: Optional[int] = None, max_request_mb: float = 4.0,
                 max_prompt_chars: Optional[int] = None, api_key: Optional[str] = None) -> Server:
    """Wrap ``model`` (in place) for per-row adapters and build the engine, the adapter store and the app.

    Args:
        model: the base causal LM, already on its device and dtype.
        tokenizer: its tokenizer.
        adapters: the folder of adapter directories.
        base_name: the ``model`` id that selects the base model itself.
        max_adapter_memory_mb: the bound on resident adapter weights (MiB); least recently used ones are evicted.
        max_batch_size: the most requests decoded together.
        max_prefill_tokens: the most padded prompt tokens prefilled in one step.
        batch_window_ms: how long an idle server waits after a request for others to start with it.
        context_length: the context window; default from the model's config.
        max_request_mb: the largest request body, in MiB; a longer one is answered 413 unread.
        max_prompt_chars: the longest text prompt (all chat messages together), in characters; default
            ``PROMPT_CHARS_PER_TOKEN`` × the context length.
        api_key: when set, every ``/v1`` request must send ``Authorization: Bearer <api_key>``.
    """
    try:  # the HTTP side is the optional "serve" extra; `moraft --help` must work without it
        from .api import ServerState, create_app
    except ImportError as err:
        raise UserError(f"moraft serve needs FastAPI and uvicorn: pip install 'moraft[serve]' ({err})") from None
    context = context_length or context_length_of(model, tokenizer)
    if context is None:
        raise UserError("cannot tell the base model's context length from its config; pass --context_length")
    model.eval()
    device = next(model.parameters()).device
    row_adapters, shapes = wrap_model(model)
    store = AdapterStore(adapters, shapes, device, int(max_adapter_memory_mb * 2**20), base_config=model.config)
    metrics = ServeMetrics()
    metrics.add(Gauge("moraft_adapters_loaded", "Adapters resident in memory.", lambda: len(store.resident())))
    metrics.add(Gauge("moraft_adapter_memory_bytes", "Bytes of resident adapter weights.", lambda: store.resident_bytes))
    metrics.add(Gauge("moraft_adapter_memory_limit_bytes", "The bound on resident adapter weights.",
                      lambda: store.max_bytes))
    metrics.add(Gauge("moraft_adapter_loads_total", "Adapters loaded from disk.", lambda: store.loads, "counter"))
    metrics.add(Gauge("moraft_adapter_evictions_total", "Adapters evicted (least recently used first).",
                      lambda: store.evictions, "counter"))
    metrics.add(Gauge("moraft_adapter_load_failures_total", "Adapter loads that failed.",
                      lambda: store.load_failures, "counter"))
    engine = Engine(model, tokenizer, row_adapters, store.release, metrics, context_length=context,
                    max_batch_size=max_batch_size, max_prefill_tokens=max_prefill_tokens,
                    batch_window=batch_window_ms / 1000).start()
    state = ServerState(engine, store, tokenizer, base_name, context, metrics,
                        max_request_bytes=int(max_request_mb * 2**20),
                        max_prompt_chars=max_prompt_chars or PROMPT_CHARS_PER_TOKEN * context, api_key=api_key)
    return Server(create_app(state), engine, store, state)


def load_base(
    base: str,
    device: str = "auto",
    dtype: str = "auto",
    revision: Optional[str] = None,
    local_files_only: bool = False,
) -> tuple[torch.nn.Module, Any]:
    """A causal LM and its tokenizer, by `moraft.adapters.resolve_model_dir` (a local directory, a built-in model,
    or a Hugging Face Hub id at ``revision``, downloaded into the Hub cache unless ``local_files_only``), on
    ``device`` ("auto": CUDA when there is one) in ``dtype``."""
    torch_dtype = parse_dtype(dtype, "--dtype", auto=True) or "auto"
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_causal_lm(
        base, dtype=torch_dtype, what="--base", revision=revision, local_files_only=local_files_only
    )
    return model.to(device), tokenizer


def serve(
    base: Optional[str] = None,
    adapters: Optional[str] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    served_name: Optional[str] = None,
    max_adapter_memory_mb: float = 1024.0,
    max_batch_size: int = 64,
    max_prefill_tokens: int = 8192,
    batch_window_ms: float = 0.0,
    context_length: Optional[int] = None,
    max_request_mb: float = 4.0,
    max_prompt_chars: Optional[int] = None,
    api_key: Optional[str] = None,
    device: str = "auto",
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
    log_level: Literal["debug", "info", "warning", "error"] = "info",
    revision: Optional[str] = None,
    local_files_only: bool = False,
) -> None:
    """Serve a base model and every adapter in a folder over an OpenAI-compatible HTTP API.

    POST /v1/completions and /v1/chat/completions (with "stream": true as server-sent events) take the adapter's
    directory name as "model" (or the base's id, --served_name); GET /v1/models lists the base and every adapter;
    GET /health and GET /metrics (Prometheus) report on the server. MoRA adapters (any compression) and PEFT LoRA
    adapters are loaded on first use, kept under --max_adapter_memory_mb (least recently used evicted first), and
    requests for different adapters are decoded together in one batch. Adapter directories added while the server
    runs are served without a restart.

    One client cannot hurt another's requests: a body over --max_request_mb is refused with 413 before it is read, a
    text prompt over --max_prompt_chars with 400 before it is tokenized, out-of-range sampling values and too many
    or too long stop strings with 400; tokenizing runs off the event loop, each request's sampling is isolated in
    the batch, and a client that disconnects cancels its generation. With --api_key (or the MORAFT_API_KEY
    environment variable) every /v1 request must send "Authorization: Bearer KEY" (401 otherwise); /health and
    /metrics stay open, as in vLLM.

    Args:
        base: (required) the base model: a local directory with the model and its tokenizer, or a Hugging Face
            Hub model id (downloaded into the Hub cache on first use, as from_pretrained does).
        adapters: (required) the folder of adapters: each sub-directory holding an adapter_config.json is one
            adapter, named by the directory. It may start empty: adapters added later are found on request.
        host: the address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).
        port: the TCP port.
        served_name: the "model" id of the base model itself (default: the last component of --base).
        max_adapter_memory_mb: the bound on the memory of loaded adapter weights, in MiB; adapters not in use are
            evicted least recently used first to stay under it.
        max_batch_size: the most requests decoded together in one batch.
        max_prefill_tokens: the most (padded) prompt tokens prefilled in one step; longer queues join over several
            steps. At least one request is always admitted.
        batch_window_ms: how long an idle server waits after a request arrives for others to start decoding with it
            (0: start at once; later requests still join the running batch between steps).
        context_length: the context window in tokens (default: the model config's max_position_embeddings).
        max_request_mb: the largest request body, in MiB (413 past it, refused by its Content-Length or as soon as
            that many bytes arrived).
        max_prompt_chars: the longest text prompt in characters, all chat messages together (400 past it, before
            tokenizing; default: 32 per token of the context, more than any prompt that fits the context has).
        api_key: the key clients must send as "Authorization: Bearer KEY" on every /v1 request (default: the
            MORAFT_API_KEY environment variable; neither: no key is checked). Compared in constant time.
        device: "auto" (cuda when available, else cpu), "cpu", "cuda" or "cuda:N".
        dtype: the base model's dtype ("auto": as saved). Adapter math is always float32.
        log_level: the server's log level.
        revision: a Hub --base: the branch, tag or commit hash to load (default: main).
        local_files_only: a Hub --base: load it from the Hub cache only, never downloading (as HF_HUB_OFFLINE=1).
    """
    try:
        import uvicorn
    except ImportError as err:
        raise UserError(f"moraft serve needs FastAPI and uvicorn: pip install 'moraft[serve]' ({err})") from None
    if not base or not adapters:
        raise UserError("both --base MODEL and --adapters DIR are required (see moraft serve --help)")
    adapters_dir = Path(adapters)
    if not adapters_dir.exists():
        raise MissingPathError(f"--adapters {adapters!r} does not exist; create it and put adapter directories in it")
    if not adapters_dir.is_dir():
        raise UserError(f"--adapters {adapters!r} is not a directory")
    for name, value, low in (("port", port, 0), ("max_batch_size", max_batch_size, 1),
                             ("max_prefill_tokens", max_prefill_tokens, 1)):
        if value < low:
            raise UserError(f"--{name}={value} is invalid; expected an integer >= {low}")
    if port > 65535:
        raise UserError(f"--port={port} is invalid; expected 0-65535")
    if max_adapter_memory_mb <= 0:
        raise UserError(f"--max_adapter_memory_mb={max_adapter_memory_mb} is invalid; expected a positive number")
    if batch_window_ms < 0:
        raise UserError(f"--batch_window_ms={batch_window_ms} is invalid; expected >= 0")
    if context_length is not None and context_length < 2:
        raise UserError(f"--context_length={context_length} is invalid; expected an integer >= 2")
    if max_request_mb <= 0:
        raise UserError(f"--max_request_mb={max_request_mb} is invalid; expected a positive number")
    if max_prompt_chars is not None and max_prompt_chars < 1:
        raise UserError(f"--max_prompt_chars={max_prompt_chars} is invalid; expected an integer >= 1")
    if api_key is None:
        api_key = os.environ.get(API_KEY_ENV) or None
    elif not api_key.strip():
        raise UserError("--api_key is empty; give the key clients must send, or leave the option out")
    if device != "auto" and not (device == "cpu" or device.startswith("cuda")):
        raise UserError(f"--device={device!r} is invalid; expected auto, cpu, cuda or cuda:N")

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    model, tokenizer = load_base(base, device, dtype, revision, local_files_only)
    base_name = served_name or Path(base.rstrip("/")).name or base
    server = build_server(model, tokenizer, adapters_dir, base_name=base_name,
                          max_adapter_memory_mb=max_adapter_memory_mb, max_batch_size=max_batch_size,
                          max_prefill_tokens=max_prefill_tokens, batch_window_ms=batch_window_ms,
                          context_length=context_length, max_request_mb=max_request_mb,
                          max_prompt_chars=max_prompt_chars, api_key=api_key)
    found = server.store.available()
    logger.info("serving %r and %d adapter(s) from %s on http://%s:%d/v1 (%s)", base_name, len(found), adapters_dir,
                host, port, "API key required" if api_key else "no API key checked")
    try:
        uvicorn.run(server.app, host=host, port=port, log_level=log_level)
    finally:
        server.close()

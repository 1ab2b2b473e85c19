"""Tiny models, random adapters and small helpers for moraft's tests and benchmarks (as ``transformers.testing_utils``
is for transformers'). Not needed to use moraft.

Everything is made in code and seeded, so it needs no download and is the same on every run:

- :func:`tiny_llama` and :func:`tiny_gpt2`: a random-init ``LlamaForCausalLM`` / ``GPT2LMHeadModel`` of any size,
  using the vocabulary and special tokens of :func:`char_tokenizer` (the built-in model's tokenizer, the one
  tokenizer of the tests); :func:`save_base` writes one to a directory with that tokenizer.
- :func:`randomize_adapter` and :func:`save_adapter`: adapters whose every weight is random and non-zero, so that a
  merge, a save/load or a served adapter cannot pass a check by doing nothing.
- :func:`input_ids` and :func:`logits`: a seeded batch of token ids and a model's float32 logits on it.
- :class:`LiveServer`: an ASGI app (``moraft serve``'s) behind a real uvicorn on a free loopback port, in a thread.

    from moraft import MoraConfig
    from moraft.testing import input_ids, logits, save_adapter, tiny_llama
    model = save_adapter(tiny_llama(), MoraConfig(r=8, target_modules="all-linear"), "out/adapter")
    logits(model, input_ids())
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import TypeVar

import torch
from peft import PeftConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM, PretrainedConfig, PreTrainedModel

from moraft.train.builtin import CHARACTERS, SPECIAL_TOKENS, TOKEN_IDS, char_tokenizer, tiny_llama_config

Model = TypeVar("Model", bound=nn.Module)

VOCAB_SIZE = len(SPECIAL_TOKENS) + len(CHARACTERS)
"""The size of :func:`char_tokenizer`'s vocabulary: the default vocabulary of every model made here."""


def tiny_llama(
    seed: int = 0,
    *,
    hidden_size: int = 64,
    intermediate_size: int | None = None,
    num_layers: int = 2,
    vocab_size: int = VOCAB_SIZE,
    dtype: torch.dtype | None = None,
    **config,
) -> LlamaForCausalLM:
    """A random-init ``LlamaForCausalLM`` in eval mode: the built-in model's architecture (4 heads, untied
    embeddings, :func:`char_tokenizer`'s vocabulary and special tokens) at this size. The same arguments give the
    built-in model's weights (``moraft.train.tiny_llama``).

    Args:
        seed: seeds torch's global RNG before the weights are drawn, so that what a test draws next (an adapter's
            initialisation) is seeded too.
        hidden_size: model width.
        intermediate_size: MLP width; ``None`` means 2 × hidden_size.
        num_layers: number of decoder layers.
        vocab_size: the embedding's rows: :func:`char_tokenizer`'s by default; a benchmark may ask for more (ids
            that tokenizer cannot write).
        dtype: build the weights directly in this dtype (no float32 copy of a large model); float32 if ``None``.
        config: any other ``LlamaConfig`` field, e.g. ``num_key_value_heads=2``.
    """
    llama = tiny_llama_config(vocab_size, hidden_size, num_layers, intermediate_size, **config)
    return _build(LlamaForCausalLM, llama, seed, dtype)


def tiny_gpt2(
    seed: int = 0,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    vocab_size: int = VOCAB_SIZE,
    dtype: torch.dtype | None = None,
    **config,
) -> GPT2LMHeadModel:
    """A random-init ``GPT2LMHeadModel`` (its projections are transformers ``Conv1D`` layers) in eval mode: 4 heads,
    128 positions, :func:`char_tokenizer`'s vocabulary and special tokens. Arguments as :func:`tiny_llama`'s;
    ``config`` sets any other ``GPT2Config`` field."""
    fields = dict(
        n_embd=hidden_size,
        n_layer=num_layers,
        n_head=4,
        n_positions=128,
        vocab_size=vocab_size,
        **TOKEN_IDS,
    )
    return _build(GPT2LMHeadModel, GPT2Config(**{**fields, **config}), seed, dtype)


def _build(
    cls: type[PreTrainedModel], config: PretrainedConfig, seed: int, dtype: torch.dtype | None
) -> PreTrainedModel:
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype or torch.float32)
    try:
        model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.pad_token_id = config.pad_token_id
    return model.eval()


def save_base(model: PreTrainedModel, directory: str | Path) -> Path:
    """``model`` saved to ``directory`` with :func:`char_tokenizer` beside it: a base model directory that
    ``AutoModelForCausalLM``/``AutoTokenizer``, ``moraft train --model.name_or_path`` and ``moraft serve --base``
    load offline. Returns ``directory``."""
    directory = Path(directory)
    model.save_pretrained(directory)
    char_tokenizer().save_pretrained(directory)
    return directory


def adapter_parameters(model: nn.Module, adapter_name: str | None = None) -> dict[str, nn.Parameter]:
    """Every adapter weight of ``model`` (of ``adapter_name`` only, if given), by parameter name: what PEFT's tuner
    layers list in ``adapter_layer_names`` (MoRA's ``mora_M``; LoRA's ``lora_A``, ``lora_B``; DoRA's
    ``lora_magnitude_vector``; ...). Found from the layers, not from ``requires_grad``, so that a test can check
    that these and only these train."""
    found = {}
    for module_name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        for part in module.adapter_layer_names:
            for name, holder in getattr(module, part).items():
                if adapter_name not in (None, name):
                    continue
                prefix = f"{module_name}.{part}.{name}"
                if isinstance(holder, nn.Parameter):
                    found[prefix] = holder
                else:
                    found.update({f"{prefix}.{n}": p for n, p in holder.named_parameters()})
    return found


@torch.no_grad()
def randomize_adapter(model: Model, seed: int = 0, std: float = 0.1, adapter_name: str | None = None) -> Model:
    """Fill every adapter weight of ``model`` (see :func:`adapter_parameters`) with seeded random non-zero values, in
    place; returns ``model``.

    Weights are drawn from N(0, std²), from a generator of their own (the global RNG is left alone), except a DoRA
    magnitude: a norm, kept positive by scaling it by a random factor in [0.5, 1.5).
    """
    generator = torch.Generator().manual_seed(seed)
    for name, param in adapter_parameters(model, adapter_name).items():
        if "magnitude" in name:
            value = param.float() * (0.5 + torch.rand(param.shape, generator=generator))
        else:
            value = torch.randn(param.shape, generator=generator) * std
        param.copy_(value.to(param.dtype))
    return model


def save_adapter(
    model: nn.Module, config: PeftConfig, directory: str | Path, seed: int = 0, std: float = 0.1
) -> PeftModel:
    """``get_peft_model(model, config)`` with random non-zero adapter weights (:func:`randomize_adapter`), saved to
    ``directory``; returns the PEFT model."""
    peft_model = randomize_adapter(get_peft_model(model, config), seed, std)
    peft_model.save_pretrained(directory)
    return peft_model


def input_ids(rows: int = 2, length: int = 11, seed: int = 1, vocab_size: int = VOCAB_SIZE) -> torch.Tensor:
    """A (rows, length) batch of random token ids, from a generator of its own."""
    return torch.randint(0, vocab_size, (rows, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The float32 logits of ``model`` on ``ids``, computed in eval mode (the model's mode is restored after)."""
    was_training = model.training
    model.eval()
    try:
        return model(input_ids=ids).logits.float()
    finally:
        model.train(was_training)


__all__ = [
    "LocalHub",
    "VOCAB_SIZE",
    "adapter_parameters",
    "char_tokenizer",
    "input_ids",
    "logits",
    "randomize_adapter",
    "save_adapter",
    "save_base",
    "tiny_gpt2",
    "tiny_llama",
]


def free_socket() -> socket.socket:
    """A TCP socket bound to a free port of 127.0.0.1."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class LiveServer:
    """``uvicorn`` serving an app on 127.0.0.1 in a background thread (a real TCP socket, a real ASGI stack); ``url``
    is its address. Needs the ``serve`` extra."""

    def __init__(self, app) -> None:
        import uvicorn

        self.sock = free_socket()
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


class LocalHub:
    """A Hugging Face Hub stand-in on 127.0.0.1, in a thread: serves local folders as model and dataset repos the way
    the Hub's API does, so that ``huggingface_hub``, ``transformers`` and ``datasets`` download from it with
    ``HF_ENDPOINT`` set to `url` (`env` gives the variables), offline and fast.

    It answers what those libraries ask for: a repo's info (``/api/{models,datasets}/REPO[/revision/REV]``), its
    file tree (``/api/.../tree/REV[/PATH]``) and paths-info (``POST /api/.../paths-info/REV``), and each file
    (``HEAD``/``GET /[datasets/]REPO/resolve/REV/PATH``, with ``X-Repo-Commit``, ``ETag``, ``Content-Length``, byte
    ranges, and for the large files the Hub keeps in LFS (weights, Parquet) ``X-Linked-Etag``/``X-Linked-Size``). Each
    revision has a fixed commit sha (`commit`), accepted as a revision too. Errors are the Hub's: the status, an
    ``X-Error-Code`` (``RepoNotFound``, ``GatedRepo``, ``RevisionNotFound``, ``EntryNotFound``), ``X-Error-Message``
    and a JSON ``{"error": ...}`` body; a missing or private repo asked without its token is 401 (404 with a token),
    a gated one 401 without a token and 403 with one. `requests` records every request as ``(method, path)``.

        with LocalHub() as hub:
            hub.add("org/tiny", save_base(tiny_llama(), tmp / "tiny"))
            subprocess.run([sys.executable, "-m", "moraft", "train", "--model", "org/tiny"], env=hub.env(tmp / "hf"))
    """

    LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf", ".parquet", ".arrow", ".onnx", ".msgpack", ".h5")

    def __init__(self) -> None:
        from http.server import ThreadingHTTPServer

        self.repos: dict[tuple[str, str], dict] = {}
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _hub_handler(self))
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def add(
        self,
        repo_id: str,
        folder: str | Path,
        *,
        repo_type: str = "model",
        revisions: dict[str, str | Path] | None = None,
        token: str | None = None,
        gated: bool = False,
    ) -> "LocalHub":
        """Serve ``folder`` as the ``main`` branch of ``repo_id`` (``repo_type`` "model" or "dataset"), and each of
        ``revisions`` (name → folder) as another branch or tag. With ``token`` the repo is private: only requests
        that send ``Authorization: Bearer TOKEN`` see it. A ``gated`` repo refuses every request (a licence not
        accepted)."""
        folders = {"main": Path(folder), **{name: Path(f) for name, f in (revisions or {}).items()}}
        self.repos[(repo_type, repo_id)] = {"revisions": folders, "token": token, "gated": gated}
        return self

    @staticmethod
    def commit(repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        """The commit sha the hub gives ``revision`` of a repo (fixed: the same on every run)."""
        import hashlib

        return hashlib.sha1(f"{repo_type}/{repo_id}@{revision}".encode()).hexdigest()

    def env(self, hf_home: str | Path, **more: str) -> dict[str, str]:
        """``os.environ`` with ``HF_ENDPOINT`` set to this hub and ``HF_HOME`` to ``hf_home`` (no token, online),
        plus ``more``: for a subprocess that downloads from it."""
        import os

        env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_CACHE",
                                                                  "HF_DATASETS_CACHE", "TRANSFORMERS_OFFLINE",
                                                                  "HF_DATASETS_OFFLINE")}
        return {**env, "HF_ENDPOINT": self.url, "HF_HOME": str(hf_home), "HF_HUB_DISABLE_TELEMETRY": "1", **more}

    def count(self, method: str | None = None, contains: str = "") -> int:
        """How many requests came (of ``method`` only, and whose path contains ``contains``, if given)."""
        with self._lock:
            return sum(1 for m, p in self.requests if method in (None, m) and contains in p)

    def __enter__(self) -> "LocalHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def _hub_handler(hub: LocalHub):
    import hashlib
    import json
    from http.server import BaseHTTPRequestHandler
    from urllib.parse import parse_qs, unquote, urlsplit

    def entry(folder: Path, file: Path) -> dict:
        data = file.read_bytes()
        path = file.relative_to(folder).as_posix()
        blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's blob id
        found = {"type": "file", "oid": blob, "size": len(data), "path": path}
        if file.suffix in LocalHub.LFS_SUFFIXES:
            found["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return found

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def send(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
            self.send_response(status)
            headers = {"Content-Type": "application/json", "Content-Length": str(len(body)), **(headers or {})}
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def json(self, value, headers: dict | None = None) -> None:
            self.send(200, json.dumps(value).encode(), headers)

        def error(self, status: int, code: str | None, message: str) -> None:
            headers = {"X-Error-Message": message, **({"X-Error-Code": code} if code else {})}
            self.send(status, json.dumps({"error": message}).encode(), headers)

        def do_HEAD(self) -> None:
            self.route()

        def do_GET(self) -> None:
            self.route()

        def do_POST(self) -> None:
            self.route()

        def find(self, repo_type: str, parts: list[str]):
            """The repo whose id starts ``parts``, and the parts after it; None after answering an error."""
            for (kind, repo_id), repo in hub.repos.items():
                n = repo_id.count("/") + 1
                if kind == repo_type and "/".join(parts[:n]) == repo_id:
                    sent = self.headers.get("Authorization", "")
                    if repo["gated"]:
                        self.error(403 if sent else 401, "GatedRepo",
                                   f"Access to {repo_type} {repo_id} is restricted. You must have access to it and be "
                                   "authenticated to access it. Please log in.")
                        return None
                    if repo["token"] is None or sent == f"Bearer {repo['token']}":
                        return repo_id, repo, parts[n:]
                    break  # private: answered as missing
            self.error(404 if self.headers.get("Authorization") else 401, "RepoNotFound", "Repository not found")
            return None

        def revision(self, repo_type: str, repo_id: str, repo: dict, rev: str):
            for name, folder in repo["revisions"].items():
                if rev in (name, LocalHub.commit(repo_id, name, repo_type)):
                    return LocalHub.commit(repo_id, name, repo_type), folder
            self.error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return None

        def route(self) -> None:
            url = urlsplit(self.path)
            with hub._lock:
                hub.requests.append((self.command, url.path))
            parts = [unquote(p) for p in url.path.strip("/").split("/")]
            if parts[0] == "api" and len(parts) > 2 and parts[1] in ("models", "datasets"):
                self.api(parts[1][:-1], parts[2:], parse_qs(url.query))
            elif "resolve" in parts:
                repo_type = "dataset" if parts[0] == "datasets" else "model"
                self.resolve(repo_type, parts[1:] if repo_type == "dataset" else parts)
            else:
                self.error(404, None, "Not Found")

        def api(self, repo_type: str, parts: list[str], query: dict) -> None:
            found = self.find(repo_type, parts)
            if found is None:
                return
            repo_id, repo, rest = found
            action, rev, path = (rest[0], rest[1] if len(rest) > 1 else "main", "/".join(rest[2:])) if rest else (
                "revision", "main", "")
            if action not in ("revision", "tree", "paths-info") or (action == "revision" and path):
                return self.error(404, None, "Not Found")
            resolved = self.revision(repo_type, repo_id, repo, rev)
            if resolved is None:
                return
            sha, folder = resolved
            files = sorted(p for p in folder.rglob("*") if p.is_file())
            if action == "revision":
                siblings = [{"rfilename": f.relative_to(folder).as_posix()} for f in files]
                return self.json({"id": repo_id, "sha": sha, "private": repo["token"] is not None,
                                  "gated": False, "disabled": False, "siblings": siblings, "tags": []})
            if action == "tree":
                recursive = query.get("recursive", ["false"])[0].lower() == "true"
                base = folder / path
                if not base.is_dir():
                    return self.error(404, "EntryNotFound", f"{path} does not exist on \"{rev}\"")
                children = base.rglob("*") if recursive else base.iterdir()
                listing = [entry(folder, p) if p.is_file() else
                           {"type": "directory", "oid": hashlib.sha1(str(p).encode()).hexdigest(),
                            "path": p.relative_to(folder).as_posix()} for p in sorted(children)]
                return self.json(listing)
            length = int(self.headers.get("Content-Length") or 0)
            form = parse_qs(self.rfile.read(length).decode()) if length else {}
            listing = []
            for asked in form.get("paths", []):
                p = folder / asked
                if p.is_file():
                    listing.append(entry(folder, p))
                elif p.is_dir():
                    listing.append({"type": "directory", "oid": hashlib.sha1(str(p).encode()).hexdigest(),
                                    "path": asked.strip("/")})
            self.json(listing)

        def resolve(self, repo_type: str, parts: list[str]) -> None:
            found = self.find(repo_type, parts)
            if found is None:
                return
            repo_id, repo, rest = found
            if len(rest) < 3 or rest[0] != "resolve":
                return self.error(404, None, "Not Found")
            resolved = self.revision(repo_type, repo_id, repo, rest[1])
            if resolved is None:
                return
            sha, folder = resolved
            file = folder / "/".join(rest[2:])
            if not file.is_file():
                return self.error(404, "EntryNotFound", "Entry not found")
            data = file.read_bytes()
            found_entry = entry(folder, file)
            etag = found_entry["lfs"]["oid"] if "lfs" in found_entry else found_entry["oid"]
            headers = {"Content-Type": "application/octet-stream", "X-Repo-Commit": sha, "ETag": f'"{etag}"',
                       "Accept-Ranges": "bytes"}
            if "lfs" in found_entry:
                headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))})
            ranged = self.headers.get("Range", "")
            if ranged.startswith("bytes=") and data:
                start_text, _, end_text = ranged[6:].partition("-")
                start = int(start_text or 0)
                end = min(int(end_text), len(data) - 1) if end_text else len(data) - 1
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                return self.send(206, data[start : end + 1], headers)
            self.send(200, data, headers)

    return Handler

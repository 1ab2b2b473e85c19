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

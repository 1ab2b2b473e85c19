"""Helpers for the ``moraft serve`` tests: a tiny offline base model with a character-level tokenizer, adapters with
random non-zero weights, offline reference generation with PEFT, and a real uvicorn server on a loopback port."""

from __future__ import annotations

import socket
import string
import threading
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import moraft

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character, plus <pad> <s> </s> <unk>; BOS prepended; a simple chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + list(string.printable))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", chat_template=CHAT_TEMPLATE)


def save_tiny_base(directory: Path, context: int = 128, seed: int = 0) -> Path:
    """A 2-layer LLaMA (hidden 64) with the char tokenizer, saved to ``directory``."""
    tokenizer = char_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=context,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.1)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def load_base(directory: Path):
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(directory)


def save_adapter(base_dir: Path, out: Path, kind: str, seed: int, **overrides) -> Path:
    """An adapter with random non-zero weights: kind is a MoRA compression ("sharing", "rotation", ...) or "lora"."""
    torch.manual_seed(seed)
    model, _ = load_base(base_dir)
    if kind == "lora":
        config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, **overrides)
    else:
        config = moraft.MoraConfig(r=4, compression=kind, target_modules="all-linear", init_weights=False,
                                   **overrides)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # big enough that every adapter changes the greedy continuation
        for name, p in peft_model.named_parameters():
            if "mora_M" in name or "lora_" in name:
                p.normal_(0, 0.5 if "mora_M" in name else 0.3)
    peft_model.save_pretrained(out)
    return out


def reference(base_dir: Path, adapter_dir: Path | None, prompt_ids: list[int], max_new_tokens: int,
              ignore_eos: bool = False) -> list[int]:
    """Offline greedy generation with PEFT (or the plain base): ``generate``, stopped after the first EOS; with
    ``ignore_eos``, a plain loop that recomputes the whole sequence each step (no KV cache at all)."""
    model, _ = load_base(base_dir)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        if ignore_eos:
            for _ in range(max_new_tokens):
                ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
            return ids[0, len(prompt_ids) :].tolist()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=0)
    return out[0, len(prompt_ids) :].tolist()


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class LiveServer:
    """``uvicorn`` serving an app on 127.0.0.1 in a background thread (a real TCP socket, a real ASGI stack)."""

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

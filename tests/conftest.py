"""Fixtures shared by the test files: tiny base models saved once per session (read-only: a test that changes a base
saves its own). The models come from `moraft.testing`; helpers that are not fixtures are in helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from moraft.testing import save_base, tiny_gpt2, tiny_llama


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    """``tiny_llama()`` saved with the character tokenizer."""
    return save_base(tiny_llama(), tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory) -> Path:
    """``tiny_gpt2()`` saved with the character tokenizer."""
    return save_base(tiny_gpt2(), tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="session")
def serve_base(tmp_path_factory) -> Path:
    """The base model of the serve tests: a tiny LLaMA with grouped-query attention (2 KV heads), a 128-token
    context, and weights drawn wider than transformers' default (std 0.1, not 0.02), so that next-token logits are
    far apart and greedy decoding is not decided by rounding."""
    model = tiny_llama(num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1)
    return save_base(model, tmp_path_factory.mktemp("serve") / "base")  # `moraft serve` names the base after its folder


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The built-in real model (``builtin:smollm2-135m-instruct``) as a transformers directory: converted from its
    GGUF file once, in moraft's cache (`moraft.models.cache_dir`), and reused by every later session. Read-only."""
    from moraft.models import smollm2_dir

    return smollm2_dir()

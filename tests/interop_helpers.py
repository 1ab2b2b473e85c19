"""Tiny real transformers models and helpers shared by the tests/test_interop_*.py files."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parents[1]
# CI clones the repository with shared/ beside it
FIXTURE = REPO.parent / "shared" / "fixtures" / "kongds-peft-mora"
VOCAB = 96


def tiny_llama(hidden: int = 64, intermediate: int = 128, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64)).eval()


def input_ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(seed))


def fixture_base() -> LlamaForCausalLM:
    """The fixture's base model, loaded as its README says."""
    assert FIXTURE.is_dir(), f"the peft-mora fixture is missing: expected {FIXTURE} (shared/ beside the repository)"
    model = LlamaForCausalLM(LlamaConfig.from_pretrained(FIXTURE / "base"))
    model.load_state_dict(load_file(FIXTURE / "base" / "model.safetensors"))
    return model.eval()


def fixture_expected() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "expected.safetensors")


@torch.no_grad()
def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def save_adapter(model: torch.nn.Module, config, path: Path):
    """``get_peft_model(model, config)`` saved to ``path``; returns the PEFT model."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(path)
    return peft_model


def leftovers(parent: Path) -> list[str]:
    """Staging directories left beside an output (there must be none)."""
    return sorted(p.name for p in parent.iterdir() if re.match(r"\..*\.(partial|replaced)$", p.name))

"""The built-in model: a tiny random-init LLaMA and a character-level tokenizer, both made in code (no download).

The tokenizer is a real ``PreTrainedTokenizerFast`` (one token per character of printable ASCII, plus a few special
tokens and a chat template), so everything that works with a hub tokenizer (``apply_chat_template``,
``save_pretrained``, ``AutoTokenizer.from_pretrained``) works with it. The model is a ``LlamaForCausalLM`` made from
a ``LlamaConfig`` with weights drawn from a seeded generator, so the same seed gives the same base model on any run.
"""

from __future__ import annotations

import string

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BUILTIN_MODEL = "builtin:tiny-llama"
"""The model name that selects the built-in model (the default of ``moraft train --model``)."""

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
CHARACTERS = string.printable[:95] + "\n\t"  # printable ASCII (space to ~), newline, tab
TOKEN_IDS = {  # the special token ids a model config of the character tokenizer names
    "bos_token_id": SPECIAL_TOKENS.index("<s>"),
    "eos_token_id": SPECIAL_TOKENS.index("</s>"),
    "pad_token_id": SPECIAL_TOKENS.index("<pad>"),
}

# Roles are special tokens, so a rendered chat never splits them into characters. The template is prefix-stable
# (rendering the first i messages gives a prefix of rendering all of them), and marks each assistant reply and its
# end-of-turn token with {% generation %}, which is how transformers and TRL find the tokens to train on.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>' }}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one token per printable ASCII character, BOS added in front of every text."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + tuple(CHARACTERS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character alone
    backend.decoder = decoders.Fuse()  # join characters back without spaces
    bos = vocab["<s>"]
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=list(SPECIAL_TOKENS[4:]),
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama_config(
    vocab_size: int, hidden_size: int = 128, num_layers: int = 4, intermediate_size: int | None = None, **overrides
) -> LlamaConfig:
    """A LLaMA config of the given width and depth (4 heads of width hidden/4, untied embeddings); ``overrides``
    replace any other ``LlamaConfig`` field (passed to its constructor, so derived fields such as head_dim follow)."""
    fields = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        **TOKEN_IDS,
    )
    return LlamaConfig(**{**fields, **overrides})


def tiny_llama(
    seed: int = 0, hidden_size: int = 128, num_layers: int = 4, intermediate_size: int | None = None
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """The built-in model and its tokenizer: a random-init ``LlamaForCausalLM``, the same for the same arguments.

    Args:
        seed: seeds the weight initialisation (the global torch RNG state is left as it was).
        hidden_size: model width (4 attention heads).
        num_layers: number of decoder layers.
        intermediate_size: MLP width; ``None`` means 2 × hidden_size.
    """
    tokenizer = char_tokenizer()
    config = tiny_llama_config(len(tokenizer), hidden_size, num_layers, intermediate_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer

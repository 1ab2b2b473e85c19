"""Choosing each row's next token (greedy, temperature, top-p, per-request seed) and turning tokens into text with
stop strings, incrementally, so that a streamed response never shows text that a stop string later removes."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class SamplingParams:
    """How one request is decoded.

    Args:
        max_tokens: the most tokens to generate.
        temperature: 0 for greedy decoding, else the softmax temperature.
        top_p: nucleus sampling: sample from the smallest set of tokens whose probabilities sum to at least top_p.
        stop: strings that end the completion; the text returned stops before the first one found.
        seed: makes sampling reproducible (each request has its own generator, whatever else is in the batch).
        ignore_eos: keep generating past the end-of-sequence token (for benchmarks).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: Optional[int] = None
    ignore_eos: bool = False

    def generator(self, device: torch.device) -> Optional[torch.Generator]:
        """A generator seeded from ``seed`` (or at random) for sampled requests; None for greedy ones."""
        if self.temperature == 0:
            return None
        gen = torch.Generator(device=device)
        gen.manual_seed(self.seed if self.seed is not None else secrets.randbits(63))
        return gen


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[Optional[torch.Generator]]) -> list[int]:
    """The next token of each row from its last-position logits (B, V)."""
    tokens = logits.argmax(-1).tolist()  # greedy rows, in one kernel
    for row, p in enumerate(params):
        if p.temperature == 0:
            continue
        probs = torch.softmax(logits[row].float() / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # keep a token while the mass before it is below top_p (the first token is always kept)
            keep = sorted_probs.cumsum(0) - sorted_probs < p.top_p
            sorted_probs = sorted_probs * keep
            choice = torch.multinomial(sorted_probs, 1, generator=generators[row])
            tokens[row] = int(order[choice])
        else:
            tokens[row] = int(torch.multinomial(probs, 1, generator=generators[row]))
    return tokens


class TextTracker:
    """The text of the generated tokens so far, with stop strings applied.

    Decoding uses a small window of earlier tokens (as vLLM's incremental detokenizer does) so each step costs
    O(window), and text that ends in an incomplete character (U+FFFD) waits for the next token.
    """

    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of ``text`` handed out by ``take``
        self._prefix = 0
        self._read = 0
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token: int) -> None:
        """Append a token; sets ``stopped`` when a stop string appears (and cuts the text before it)."""
        self.ids.append(token)
        self._extend(final=False)

    def flush(self) -> None:
        """At the end of generation: take in text held back for an incomplete character."""
        self._extend(final=True)

    def _extend(self, final: bool) -> None:
        if self.stopped:
            return
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        if len(new_text) <= len(prefix_text) or (new_text.endswith("\ufffd") and not final):
            return
        start = len(self.text)
        self.text += new_text[len(prefix_text) :]
        self._prefix, self._read = self._read, len(self.ids)
        if self.stop:
            longest = max(len(s) for s in self.stop)
            window = max(0, start - longest + 1)
            hits = [i for i in (self.text.find(s, window) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True

    def take(self, final: bool = False) -> str:
        """The text not handed out yet; while not final, holds back a tail that may begin a stop string."""
        end = len(self.text)
        if not final:
            for s in self.stop:
                for n in range(min(len(s) - 1, end), 0, -1):
                    if self.text.endswith(s[:n]):
                        end = min(end, len(self.text) - n)
                        break
            end = max(end, self.sent)
        delta = self.text[self.sent : end]
        self.sent = end
        return delta

"""Choosing each row's next token (greedy, temperature, top-p, per-request seed) and turning tokens into text with
stop strings, incrementally, so that a streamed response never shows text that a stop string later removes.

A row's sampling never touches another row's: a row whose logits are not finite, or whose draw fails, gets an error
in place of a token (`sample`), and the engine fails that request alone.
"""

from __future__ import annotations

import logging
import re
import secrets
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

logger = logging.getLogger("moraft.serve")

MIN_TEMPERATURE = 1e-2
"""Positive temperatures below this are raised to it (as vLLM's ``_MAX_TEMP``): logits divided by 1e-45 overflow to
inf, and softmax of inf is NaN."""


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

    def __post_init__(self) -> None:
        if 0 < self.temperature < MIN_TEMPERATURE:
            logger.warning("temperature %s is below %s, where sampling overflows to NaN; using %s",
                           self.temperature, MIN_TEMPERATURE, MIN_TEMPERATURE)
            self.temperature = MIN_TEMPERATURE

    def generator(self, device: torch.device) -> Optional[torch.Generator]:
        """A generator seeded from ``seed`` (or at random) for sampled requests; None for greedy ones."""
        if self.temperature == 0:
            return None
        gen = torch.Generator(device=device)
        gen.manual_seed(self.seed if self.seed is not None else secrets.randbits(63))
        return gen


class SamplingError(Exception):
    """One row's next token could not be chosen (its logits are not finite, or its draw failed)."""


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[Optional[torch.Generator]]) -> list[Union[int, SamplingError]]:
    """The next token of each row from its last-position logits (B, V); a row that cannot be sampled gets a
    `SamplingError` instead, and every other row its token."""
    finite = torch.isfinite(logits).all(-1).tolist()
    tokens: list[Union[int, SamplingError]] = logits.argmax(-1).tolist()  # greedy rows, in one kernel
    for row, p in enumerate(params):
        if not finite[row]:
            tokens[row] = SamplingError("the model's logits for this request are not finite (NaN or inf); its "
                                        "adapter's weights may have diverged")
        elif p.temperature != 0:
            try:
                tokens[row] = _draw(logits[row], p, generators[row])
            except Exception as err:  # e.g. torch.multinomial on a distribution it refuses
                tokens[row] = SamplingError(f"sampling failed: {type(err).__name__}: {err}")
    return tokens


def _draw(logits: torch.Tensor, p: SamplingParams, generator: Optional[torch.Generator]) -> int:
    """One token from softmax(logits / temperature), restricted to the top-p nucleus."""
    probs = torch.softmax(logits.float() / p.temperature, dim=-1)
    if p.top_p >= 1.0:
        return int(torch.multinomial(probs, 1, generator=generator))
    sorted_probs, order = probs.sort(descending=True)
    # keep a token while the mass before it is below top_p; the most likely token is always kept (a top_p below
    # float32's smallest number would otherwise keep none)
    keep = sorted_probs.cumsum(0) - sorted_probs < p.top_p
    keep[0] = True
    choice = torch.multinomial(sorted_probs * keep, 1, generator=generator)
    return int(order[choice])


class TextTracker:
    """The text of the generated tokens so far, with stop strings applied.

    Decoding uses a small window of earlier tokens (as vLLM's incremental detokenizer does) so each step costs
    O(window), and text that ends in an incomplete character (U+FFFD) waits for the next token. Each step finds stop
    strings with one ``str.find`` per stop over the new text (and the longest stop before it), and holds back the
    longest tail that begins a stop string with a look-up in the set of their prefixes at each place in the last
    (longest stop − 1) characters that holds a stop string's first character, whatever their number. That set holds Σ len(stop)²/2 characters, which the API bounds (`api.MAX_STOP_STRINGS`
    strings of at most `api.MAX_STOP_LENGTH` characters).
    """

    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self._longest = max((len(s) for s in self.stop), default=0)
        # every proper prefix of a stop string: the text's tail is held back while it is one of these; a tail can
        # only be one where it starts with the first character of a stop string
        self._prefixes = {s[:n] for s in self.stop for n in range(1, len(s))}
        self._starts = re.compile("[" + re.escape("".join({s[0] for s in self.stop})) + "]") if self.stop else None
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
            window = max(0, start - self._longest + 1)  # a stop string found now ends in the new text
            hits = [i for i in (self.text.find(s, window) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True

    def _held_back(self) -> int:
        """How many characters at the end of the text may begin a stop string (the longest such tail)."""
        if self._starts is None:
            return 0
        end = len(self.text)
        for start in self._starts.finditer(self.text, max(self.sent, end - self._longest + 1)):
            if self.text[start.start() :] in self._prefixes:  # the leftmost such tail is the longest
                return end - start.start()
        return 0

    def take(self, final: bool = False) -> str:
        """The text not handed out yet; while not final, holds back a tail that may begin a stop string."""
        end = len(self.text) if final else len(self.text) - self._held_back()
        delta = self.text[self.sent : end]
        self.sent = max(end, self.sent)
        return delta

"""Other libraries' notes that tell a moraft user nothing, kept off the console of the ``moraft`` command.

Each is a logging filter on the library's own logger, added before the library makes that logger (a logger keeps its
filters when the library configures it later), so that the note never reaches a handler; everything else the library
logs passes. ``import moraft`` itself does not import bitsandbytes (``moraft._peft_hook.import_peft``), but PEFT
imports it whenever it is installed as soon as it builds adapter layers (its quantization checks), and accelerate
imports DeepSpeed whenever it is installed as soon as a trainer unwraps a model; their notes would then follow every
``moraft train``, ``eval``, ``merge`` and ``serve``.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional


def _no_accelerator() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    return not (accelerator.is_available() if accelerator is not None else torch.cuda.is_available())


class DroppedNote(logging.Filter):
    """Drops the records whose message starts with ``start`` (when ``only_if()`` says so, if given)."""

    def __init__(self, start: str, only_if: Optional[Callable[[], bool]] = None) -> None:
        super().__init__()
        self.start = start
        self.only_if = only_if

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith(self.start):
            return True
        return self.only_if is not None and not self.only_if()


NOTES: dict[str, DroppedNote] = {
    # DeepSpeed, at import, where it finds no accelerator: where torch finds none either, it says nothing new
    "DeepSpeed": DroppedNote("Setting accelerator to CPU.", only_if=_no_accelerator),
    # bitsandbytes, at import on a CPU with AVX512-BF16: its optional CPU kernel for packed 4-bit weights comes from
    # the Hugging Face Hub through the `kernels` package. moraft never downloads code, and it keeps 4-bit weights
    # unpacked (moraft.quantization.keep_4bit_layout), where that kernel is never used.
    "bitsandbytes.backends.cpu.ops": DroppedNote("Failed to load CPU gemm_4bit_forward from kernels-community"),
}
"""The logger of each note that is dropped, and its filter."""


def quiet_console() -> None:
    """Add the filters of `NOTES` to their loggers (once)."""
    for name, note in NOTES.items():
        logger = logging.getLogger(name)
        if note not in logger.filters:
            logger.addFilter(note)


__all__ = ["NOTES", "DroppedNote", "quiet_console"]

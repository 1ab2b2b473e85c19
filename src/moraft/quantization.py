"""Quantized base models (QMoRA, QLoRA): the bitsandbytes settings behind ``moraft train --model.quantization`` and
``moraft merge --quantization``, and how much of a merged update quantized weights keep.

QLoRA (https://arxiv.org/abs/2305.14314) trains an adapter on a base whose frozen weights are stored in 4 bits: NF4
(16 levels at the quantiles of a normal distribution) or FP4, with one absmax scale per block of 64 weights (double
quantization stores those scales in 8 bits too), each matrix dequantized to the compute dtype for its product. The
adapter (MoRA's M, LoRA's A and B) stays in float32 and is saved as usual. 8-bit is LLM.int8
(https://arxiv.org/abs/2208.07339): one scale per row. The quantizing is transformers' own (a ``BitsAndBytesConfig``
given to ``from_pretrained``), at load time only: nothing else in training knows the base is quantized.

**Merging into quantized weights loses most of a small update.** Adjacent NF4 levels are 8% to 30% of their block's
largest weight apart, so an element moves to another level only when ΔW carries it past a midpoint, a step far
larger than a typical fine-tuning update. ``moraft merge`` therefore merges into the unquantized base weights, and
writes a quantized model only when asked, with `KeptUpdate` measuring what the quantized weights keep.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from .adapters import DTYPES
from .errors import UserError

QUANTIZATIONS = ("none", "4bit", "8bit")
"""The values of the quantization options: none, 4bit (bitsandbytes NF4/FP4) or 8bit (LLM.int8)."""
QUANT_TYPES = ("nf4", "fp4")
"""The 4-bit data types of bitsandbytes."""


def require_bitsandbytes(option: str, value: str) -> None:
    """Raise `UserError` saying what to install when bitsandbytes is not importable (``option=value`` asked for it)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError(
            f"{option}={value!r} needs bitsandbytes, which is not installed: pip install 'moraft[quantization]' "
            "(or pip install bitsandbytes)"
        ) from None


def bnb_config(
    quantization: str,
    quant_type: str = "nf4",
    double_quant: bool = False,
    compute_dtype: str = "float32",
    option: str = "model.quantization",
) -> Optional[Any]:
    """The transformers ``BitsAndBytesConfig`` of these options, or None for ``quantization="none"``.

    ``option`` names the flag in errors: an unknown value, or bitsandbytes not installed, is a `UserError`.
    """
    if quantization not in QUANTIZATIONS:
        raise UserError(f"{option}={quantization!r} is invalid; expected one of {', '.join(QUANTIZATIONS)}")
    if quantization == "none":
        return None
    require_bitsandbytes(option, quantization)
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=DTYPES[compute_dtype],
    )


def device_map() -> Optional[dict[str, int]]:
    """Where a quantized model is loaded: on a CUDA machine under torchrun, each process's own GPU (``LOCAL_RANK``);
    otherwise None, and transformers' bitsandbytes quantizer picks the current device (the CPU on a machine without
    one). A quantized model cannot be moved after loading, so this is decided here, not by the trainer."""
    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        return {"": int(os.environ["LOCAL_RANK"])}
    return None


def keep_4bit_layout(model: nn.Module) -> nn.Module:
    """Keep bitsandbytes from repacking ``model``'s 4-bit weights for its CPU inference kernel; ``model`` itself.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a ``Linear4bit`` weight at its first forward in eval mode
    (an evaluation during training), and ``state_dict`` (which every checkpoint and adapter save reads) unpacks it
    with the block scales of each row out of order: from then on every layer with more than one block per row
    computes with wrong weights, silently (and the repacking itself fails on rows shorter than one block of 64).
    Without the repack, evaluation runs on the ordinary dequantizing path.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def quantization_of(model: nn.Module) -> str:
    """How transformers quantized ``model`` at load time: "4bit", "8bit" (bitsandbytes), another method's name, or
    "none"."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return "none"
    config = quantizer.quantization_config
    if getattr(config, "load_in_4bit", False):
        return "4bit"
    if getattr(config, "load_in_8bit", False):
        return "8bit"
    return str(getattr(config, "quant_method", "quantized"))


# ----------------------------------------------------------------------------------------------------------------
# the weights a bitsandbytes layer holds


def _state(layer: nn.Module):
    weight = layer.weight
    state = getattr(weight, "quant_state", None)
    if getattr(state, "packing_format_for_cpu", False):
        raise ValueError("this 4-bit weight was repacked by bitsandbytes' CPU kernel (the layer has run in eval mode)")
    return weight, state


def is_quantized_linear(layer: nn.Module) -> bool:
    """Whether ``layer`` is a bitsandbytes ``Linear4bit`` or ``Linear8bitLt``."""
    import bitsandbytes as bnb

    return isinstance(layer, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def dequantized(layer: nn.Module) -> torch.Tensor:
    """The float32 weight a bitsandbytes ``Linear4bit`` or ``Linear8bitLt`` holds, read through bitsandbytes, of a
    layer that has not run in eval mode on the CPU (bitsandbytes' CPU kernel then repacks 4-bit weights)."""
    import bitsandbytes.functional as bnbf

    weight, state = _state(layer)
    if state is not None:
        return bnbf.dequantize_4bit(weight.data, state).float()
    scales = weight.SCB if weight.SCB is not None else layer.state.SCB  # the first forward moves them to the state
    return bnbf.int8_vectorwise_dequant(weight.data, scales).float()


def requantized(weight: torch.Tensor, like: nn.Module) -> torch.Tensor:
    """``weight`` quantized as the bitsandbytes layer ``like`` quantized its own (the same type, block size, double
    quantization; 8-bit through float16, as bitsandbytes' ``Int8Params`` does), dequantized to float32."""
    import bitsandbytes.functional as bnbf

    _, state = _state(like)
    if state is not None:
        data, quantized_state = bnbf.quantize_4bit(
            weight.to(state.dtype),
            blocksize=state.blocksize,
            compress_statistics=state.nested,
            quant_type=state.quant_type,
            quant_storage=like.weight.dtype,
        )
        return bnbf.dequantize_4bit(data, quantized_state).float()
    codes, scales, _ = bnbf.int8_vectorwise_quant(weight.to(torch.float16))
    return bnbf.int8_vectorwise_dequant(codes, scales).float()


@dataclass
class KeptUpdate:
    """How much of a merged update ΔW quantized weights keep, over the matrices measured (`add`).

    For a weight W and the update ΔW, a quantized merge stores Q(W + ΔW); what it changes against the base quantized
    the same way is ΔŴ = deq(Q(W + ΔW)) − deq(Q(W)). The measure is the relative error ‖ΔŴ − ΔW‖ / ‖ΔW‖ (Frobenius
    norms over all the matrices together): 0 keeps the update exactly; 1 is no better than dropping it (ΔŴ = 0
    gives 1); above 1 the rounding adds more change than the update itself. As deq(Q(W)) + ΔW is what an adapter
    trained on that quantized base computed with, it is also how far the quantized merge lands from the trained
    model, relative to the update. Rounding moves an element by a whole gap between levels, or not at all, and a new
    block maximum rescales its whole block: a small update comes out mostly as noise.
    """

    matrices: int = 0
    error_squared: float = 0.0
    update_squared: float = 0.0

    def add(
        self, base: torch.Tensor, merged: torch.Tensor, quantized_merged: torch.Tensor, quantized_base: torch.Tensor
    ) -> None:
        """Count one matrix: W, W + ΔW, deq(Q(W + ΔW)) and deq(Q(W))."""
        delta = merged.double() - base.double()
        kept = quantized_merged.double() - quantized_base.double()
        self.matrices += 1
        self.error_squared += float((kept - delta).square().sum())
        self.update_squared += float(delta.square().sum())

    @property
    def relative_error(self) -> float:
        """‖ΔŴ − ΔW‖ / ‖ΔW‖; nan when ΔW is zero."""
        return (self.error_squared / self.update_squared) ** 0.5 if self.update_squared > 0 else float("nan")

    def __str__(self) -> str:
        return (
            f"||dW' - dW|| / ||dW|| = {self.relative_error:.3f} over {self.matrices} quantized matrices, where "
            "dW' = deq(Q(W + dW)) - deq(Q(W)) is the update the quantized weights carry (0: all of dW kept; 1: no "
            "better than dropping it)"
        )


__all__ = [
    "QUANTIZATIONS",
    "QUANT_TYPES",
    "KeptUpdate",
    "bnb_config",
    "dequantized",
    "device_map",
    "is_quantized_linear",
    "keep_4bit_layout",
    "quantization_of",
    "require_bitsandbytes",
    "requantized",
]

"""Interoperability: the MoRA authors' peft-mora checkpoints in; plain LoRA adapters and merged models out."""

from .lora_export import LoraExport, export_lora
from .merge import merge_adapter
from .peft_mora import PEFT_MORA_TYPES, convert_peft_mora

__all__ = ["PEFT_MORA_TYPES", "LoraExport", "convert_peft_mora", "export_lora", "merge_adapter"]

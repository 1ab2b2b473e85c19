"""Interoperability: the MoRA authors' peft-mora checkpoints in; plain LoRA adapters and merged models out.

`load_adapter_on_meta` is the one check that an adapter's saved tensors fit its config and a base model, which
merge, export-lora and ``moraft serve`` share.
"""

from ._common import load_adapter_on_meta
from .lora_export import LoraExport, export_lora
from .merge import merge_adapter
from .peft_mora import PEFT_MORA_TYPES, convert_peft_mora

__all__ = ["PEFT_MORA_TYPES", "LoraExport", "convert_peft_mora", "export_lora", "load_adapter_on_meta",
           "merge_adapter"]

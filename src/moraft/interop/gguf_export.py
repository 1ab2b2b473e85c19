"""A MoRA adapter as a llama.cpp LoRA adapter: one GGUF file that ``llama-cli -m base.gguf --lora adapter.gguf``
(and llama-server, llama-export-lora) applies to the base model's GGUF file.

The file holds what llama.cpp's ``convert_lora_to_gguf.py`` writes from a PEFT LoRA adapter, so the two are
interchangeable: the keys general.architecture (the base's llama.cpp architecture), general.type = "adapter",
adapter.type = "lora", adapter.lora.alpha (= the rank: scaling 1, as MoRA has none) and general.name (gguf's
`Metadata` of the adapter directory), and for each adapted weight ``W`` named ``blk.N.attn_q.weight`` by gguf's
tensor-name map, two tensors ``blk.N.attn_q.weight.lora_a`` (rank x k in torch order; GGUF lists dimensions
innermost first: {k, rank}) and ``.lora_b`` (d x rank), with ΔW = lora_b · lora_a.

llama.cpp stores LLaMA's q_proj and k_proj weights with the rows of each head reordered (convert_hf_to_gguf's
``LlamaModel.permute``: the two rotary halves of a head interleaved, as the original LLaMA checkpoints had them),
so ΔW of those projections must be reordered the same way: only B carries rows, so B is permuted and A is not.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..models import is_gguf_file

# transformers model_type -> (llama.cpp architecture, whether llama.cpp permutes the q/k rows of its weights): the
# architectures whose export is checked against convert_lora_to_gguf.py (tests/test_gguf.py)
GGUF_ARCHITECTURES = {
    "llama": ("LLAMA", True),
    "mistral": ("LLAMA", True),  # llama.cpp converts MistralForCausalLM as a llama model
    "qwen2": ("QWEN2", False),
    "qwen3": ("QWEN3", False),
}


def rope_interleave(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """``rows`` (heads x head_dim, ...) with each head's rows reordered from transformers' rotary layout (first half,
    second half) to llama.cpp's (the two halves interleaved): the order in which llama.cpp stores q_proj (n_head =
    the attention heads) and k_proj (n_head = the key-value heads)."""
    head_dim = rows.shape[0] // n_head
    return rows.reshape(n_head, 2, head_dim // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def gguf_tensor_names(config, modules: list[str]) -> dict[str, str]:
    """The GGUF name (``blk.0.attn_q.weight``) of each adapted module's weight, by gguf's tensor-name map for the
    base's architecture; `UserError` for an architecture outside `GGUF_ARCHITECTURES` or a module llama.cpp has no
    tensor for (an output head tied to the embeddings)."""
    import gguf

    model_type = getattr(config, "model_type", None)
    if model_type not in GGUF_ARCHITECTURES:
        raise UserError(
            f"--format gguf: the base model is {model_type!r}; a GGUF LoRA adapter is written for "
            f"{', '.join(GGUF_ARCHITECTURES)} models (use --format peft for PEFT and vLLM)"
        )
    arch = gguf.MODEL_ARCH[GGUF_ARCHITECTURES[model_type][0]]
    name_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    names = {}
    for module in modules:
        if module.rsplit(".", 1)[-1] == "lm_head" and getattr(config, "tie_word_embeddings", False):
            raise UserError(
                f"--format gguf: the adapter changes {module}, which this base ties to its token embeddings; "
                "llama.cpp has no separate output weight to apply it to (merge the adapter instead: moraft merge)"
            )
        name = name_map.get_name(f"{module}.weight", try_suffixes=(".weight",))
        if name is None:
            raise UserError(f"--format gguf: llama.cpp has no tensor for {module} of a {model_type} model")
        names[module] = name
    return names


def check_gguf_target(out: Path | str, overwrite: bool) -> None:
    """Refuse an output path that is not a .gguf file name, or that exists and may not be replaced: with
    ``overwrite``, only a GGUF adapter file is (an earlier output), never a model, a directory or another file."""
    out = Path(out)
    if out.suffix != ".gguf":
        raise UserError(f"--format gguf writes one file: {out} should be a file name ending in .gguf")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise UserError(f"{out} exists; pass --overwrite to replace it")
        if not _is_gguf_adapter(out):
            raise UserError(f"{out} exists and is not a GGUF adapter file; refusing to replace it")


def _is_gguf_adapter(path: Path) -> bool:
    """Whether ``path`` is a GGUF file of general.type "adapter" (an earlier export, not a model)."""
    import gguf

    if not is_gguf_file(path):
        return False
    found = gguf.GGUFReader(path).get_field(gguf.Keys.General.TYPE)
    return found is not None and found.contents() == "adapter"


def _gguf_array(tensor: torch.Tensor, qtype) -> np.ndarray:
    """A float32 tensor as the bytes (or values) gguf writes for ``qtype`` (F32, F16, or BF16 rounded by gguf)."""
    import gguf

    values = tensor.detach().float().contiguous().numpy()
    if qtype == gguf.GGMLQuantizationType.F32:
        return values
    if qtype == gguf.GGMLQuantizationType.F16:
        return values.astype(np.float16)
    return gguf.quants.quantize(values, qtype)


def write_gguf_lora(exported, adapter_dir: Path, out: Path, dtype: torch.dtype, overwrite: bool) -> Path:
    """Write ``exported`` (`moraft.interop.lora_export.LoraFactors`) to the GGUF file ``out``, the tensors in
    ``dtype`` (float32, float16, bfloat16 as F32, F16, BF16); written beside and renamed into place, so ``out`` is
    whole or untouched."""
    import gguf

    check_gguf_target(out, overwrite)
    config = exported.loaded.model.base_model.model.config
    names = gguf_tensor_names(config, list(exported.factors))
    arch_name, permutes = GGUF_ARCHITECTURES[config.model_type]
    qtype = {
        torch.float32: gguf.GGMLQuantizationType.F32,
        torch.float16: gguf.GGMLQuantizationType.F16,
        torch.bfloat16: gguf.GGMLQuantizationType.BF16,
    }[dtype]
    n_head = config.num_attention_heads
    n_kv_head = getattr(config, "num_key_value_heads", None) or n_head

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(staging, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch_name]])
        for module, (a, b) in exported.factors.items():
            # a dtype round trip first, as a PEFT export in this dtype would hold them
            a, b = a.to(dtype).float(), b.to(dtype).float()
            if permutes and module.endswith(".q_proj"):
                b = rope_interleave(b, n_head)
            elif permutes and module.endswith(".k_proj"):
                b = rope_interleave(b, n_kv_head)
            writer.add_tensor(f"{names[module]}.lora_a", _gguf_array(a, qtype), raw_dtype=qtype)
            writer.add_tensor(f"{names[module]}.lora_b", _gguf_array(b, qtype), raw_dtype=qtype)
        # the keys, in the order convert_lora_to_gguf.py writes them
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        total_params = writer.get_total_parameter_count()[0]
        metadata = gguf.Metadata.load(None, adapter_dir, None, total_params)
        if metadata.name is None:
            metadata.name = adapter_dir.name
        metadata.set_gguf_meta_model(writer)
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(exported.rank))  # scaling alpha / rank = 1
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(staging, out)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)
    return out


__all__ = ["GGUF_ARCHITECTURES", "check_gguf_target", "gguf_tensor_names", "rope_interleave", "write_gguf_lora"]

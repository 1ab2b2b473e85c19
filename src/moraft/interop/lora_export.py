"""Export a moraft MoRA adapter as a plain PEFT LoRA adapter (for vanilla PEFT and multi-LoRA servers such as vLLM),
or as a llama.cpp LoRA adapter in GGUF (`moraft.interop.gguf_export`), from the same factors.

For sharing, truncation and single-block decouple, ΔW = D·M·C with C: r̂×k and D: d×r̂ fixed 0/1 matrices, so the
adapter is exactly a LoRA of rank r̂ with A = C and B = D·M (scaling 1). C and D are read off the operator itself by
pushing identities through its compression (transposed) and decompression. Rotation, and decouple with several
blocks, give a ΔW of rank up to min(d, k); they export only as a truncated SVD of ΔW at an explicit rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
from peft import LoraConfig
from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ..adapters import PEFT_PREFIX, PathLike, parse_dtype, read_json, resolve_model_dir
from ..errors import UserError
from ..models import is_gguf_file
from ..mora import MoraLayer, MoraOperator
from ..outputs import staged_output_dir
from ._common import ADAPTER_FILES, LoadedAdapter, load_adapter_on_meta


@dataclass
class LoraExport:
    """What ``export_lora`` wrote: the directory, the common LoRA rank, and each module's relative Frobenius
    error ||ΔW - B·A|| / ||ΔW|| (0 where the export is exact)."""

    path: Path
    rank: int
    errors: dict[str, float] = field(default_factory=dict)


def lora_factors(op: MoraOperator, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r̂, k) and B (d, r̂) with B·A = ``op.delta_weight(m)``, for operators where ``op.is_low_rank``."""
    if not op.is_low_rank:
        raise ValueError(f"{op} has {op.num_blocks} blocks: its ΔW is not a rank-r̂ product")
    eye = torch.eye(op.rank, dtype=m.dtype, device=m.device).unsqueeze(-2)  # (r̂, 1, r̂): one unit vector per row
    c = op.compress_t(eye)  # (r̂, k): row i is Cᵀe_i, i.e. row i of C
    d = op.decompress(eye).T  # (d, r̂): column i is D e_i
    return c, d @ m


def truncated_svd(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A (≤rank, k), B (d, ≤rank) minimising ||ΔW - B·A||_F, and that error relative to ||ΔW||_F."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    keep = min(rank, s.numel())
    root = s[:keep].sqrt()
    total = s.square().sum()
    error = (s[keep:].square().sum() / total).sqrt().item() if total > 0 else 0.0
    return (root.unsqueeze(1) * vh[:keep]).float(), (u[:, :keep] * root).float(), error


def _pad_rank(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero rows of A and columns of B up to ``rank``: the same product, one rank for every module."""
    extra = rank - a.shape[0]
    return torch.nn.functional.pad(a, (0, 0, 0, extra)), torch.nn.functional.pad(b, (0, extra))


@dataclass
class LoraFactors:
    """A MoRA adapter as LoRA factors, before they are written: each adapted module's A (rank, k) and B (d, rank) in
    float32 (scaling 1, zero-padded to the common rank), its relative error, and the adapter they came from."""

    loaded: LoadedAdapter
    rank: int
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    errors: dict[str, float]


def export_lora(
    adapter_dir: PathLike,
    out_dir: PathLike,
    rank: Optional[int] = None,
    base: Optional[PathLike] = None,
    dtype: Literal["float32", "bfloat16", "float16"] = "float32",
    format: Literal["peft", "gguf"] = "peft",
    overwrite: bool = False,
    revision: Optional[str] = None,
    local_files_only: bool = False,
) -> LoraExport:
    """Export a MoRA adapter as a plain LoRA adapter of rank r̂ (256 for r=8 on a 4096-wide model; vLLM takes <=512).

    The LoRA modules of a mixed adapter (``layer_methods``) export as they are (their scaling folded into B); DoRA
    modules are refused, their update depending on the base weight.

    The result is adapter_config.json + adapter_model.safetensors that vanilla PEFT (without moraft) and multi-LoRA
    servers such as vLLM load: one LoRA rank for every module (smaller modules zero-padded), lora_alpha equal to that
    rank (scaling 1), no bias and no modules_to_save. With ``--format gguf`` it is one GGUF file that llama.cpp
    applies to the base model's GGUF file (``llama-cli -m base.gguf --lora adapter.gguf``): the tensors and keys
    llama.cpp's convert_lora_to_gguf.py writes (`moraft.interop.gguf_export`).

    sharing, truncation and single-block decouple export exactly, at the largest r̂ among the adapted modules
    (r̂ = round(sqrt((d + k)·r)): r=8 gives 256 on a 4096x4096 projection and 348 on LLaMA-2-7B's 4096<->11008 MLP,
    so an all-linear r=8 adapter on LLaMA-2-7B exports at rank 348). vLLM accepts LoRA ranks up to 512 (serve with
    --max-lora-rank at or above the exported rank). rotation (and decouple with several blocks) has a full-rank ΔW
    that no low-rank LoRA represents: it exports only with an explicit --rank N, as the truncated SVD of each
    module's ΔW, and the relative Frobenius error of every module is printed.

    Args:
        adapter_dir: the moraft MoRA adapter directory.
        out_dir: where to write the LoRA adapter (written whole or not at all): a directory, or with --format gguf
            the .gguf file.
        rank: the LoRA rank N to export at. Without it the export is exact, at the largest r̂ of the adapted modules
            (r̂ = round(sqrt((d + k)·r)): 256 for r=8 on a 4096-wide model, 348 with LLaMA-2-7B's MLP; vLLM accepts
            ranks up to 512), and only for sharing, truncation and single-block decouple. rotation and multi-block
            decouple have a full-rank ΔW and need --rank: each module becomes the truncated SVD of its ΔW and its
            relative Frobenius error is printed. Modules with r̂ <= N stay exact (zero-padded).
        base: the base model: a directory, a Hugging Face Hub model id, or a GGUF file (only its config is read,
            for the layer shapes; from the Hub, its config and tokenizer files are downloaded, not its weights).
            Defaults to the adapter's base_model_name_or_path.
        dtype: dtype of the written LoRA weights: float32, bfloat16 or float16 (GGUF: F32, BF16, F16).
        format: peft (adapter_config.json + adapter_model.safetensors, for PEFT and vLLM) or gguf (one .gguf file
            for llama.cpp's --lora, on a base of an architecture llama.cpp converts: llama, mistral, qwen2, qwen3).
        overwrite: replace ``out_dir`` when it is an earlier output of this command (its .moraft-output.json names
            everything in it; with --format gguf, a GGUF adapter file); anything else there is refused.
        revision: a Hub base: the branch, tag or commit hash to read (default: main).
        local_files_only: a Hub base: read it from the Hub cache only, never downloading (as HF_HUB_OFFLINE=1).

    Returns:
        A ``LoraExport`` with the output path, the rank and each module's relative error.
    """
    out_dtype = parse_dtype(dtype)
    if format not in ("peft", "gguf"):
        raise UserError(f"format={format!r} is invalid; expected peft or gguf")
    if format == "gguf":
        from .gguf_export import check_gguf_target

        check_gguf_target(out_dir, overwrite)
    exported = lora_export_factors(adapter_dir, rank, base, revision=revision, local_files_only=local_files_only)
    if format == "gguf":
        from .gguf_export import write_gguf_lora

        write_gguf_lora(exported, Path(adapter_dir), Path(out_dir), out_dtype, overwrite)
        return LoraExport(path=Path(out_dir), rank=exported.rank, errors=exported.errors)
    loaded, common_rank = exported.loaded, exported.rank
    tensors = {}
    for module, (a, b) in exported.factors.items():
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.to(out_dtype).contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.to(out_dtype).contiguous()
    layers = loaded.layers
    config = LoraConfig(
        r=common_rank,
        lora_alpha=common_rank,  # scaling = alpha / r = 1: MoRA has no scaling
        target_modules=_target_modules(loaded.model.base_model.model, set(exported.factors)),
        fan_in_fan_out=all(layers[module].fan_in_fan_out for module in exported.factors),  # Conv1D (GPT-2)
        bias="none",
        lora_dropout=0.0,
        task_type=loaded.config.task_type,
        base_model_name_or_path=loaded.config.base_model_name_or_path,
        revision=loaded.config.revision,
        inference_mode=True,
    )
    with staged_output_dir(out_dir, overwrite, "moraft export-lora", ADAPTER_FILES) as staging:
        config.save_pretrained(str(staging))
        save_file(tensors, str(staging / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
    return LoraExport(path=Path(out_dir), rank=common_rank, errors=exported.errors)


def lora_export_factors(
    adapter_dir: PathLike,
    rank: Optional[int] = None,
    base: Optional[PathLike] = None,
    *,
    revision: Optional[str] = None,
    local_files_only: bool = False,
) -> LoraFactors:
    """The LoRA factors of every adapted module of a MoRA adapter, as `export_lora` writes them in either format:
    exact (`lora_factors`) where the operator allows it and its r̂ fits ``rank``, else the truncated SVD of ΔW at
    ``rank`` (each module's error printed when ``rank`` is given). Raises `UserError` for what no LoRA carries."""
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise UserError(f"rank={rank!r} is invalid; expected an integer >= 1 (or no --rank for an exact export)")
    base = _base_or_default(adapter_dir, base)
    if not is_gguf_file(base):  # a GGUF file's config is read by load_adapter_on_meta
        base = resolve_model_dir(base, revision=revision, local_files_only=local_files_only, weights=False)
    loaded = load_adapter_on_meta(adapter_dir, base, "export", accepted=("MORA",))
    if loaded.config.modules_to_save or loaded.replaced:
        raise UserError(
            f"{adapter_dir}: the adapter trains whole modules (modules_to_save={loaded.config.modules_to_save}), "
            "which a LoRA adapter for vLLM cannot carry; merge it into the base model instead (moraft merge)"
        )
    name = loaded.adapter_name
    layers = {
        module: layer
        for module, layer in loaded.layers.items()
        if isinstance(layer, MoraLayer) and name in layer.mora_method
    }
    dora = [module for module, layer in layers.items() if layer.mora_method[name] == "dora"]
    if dora:
        raise UserError(
            f"{adapter_dir}: {len(dora)} modules are DoRA (layer_methods, e.g. {dora[0]}): DoRA rescales each output "
            "row of W + ΔW by its magnitude, an update that depends on the base weight and that no LoRA adapter "
            "carries; merge the adapter into the base model instead (moraft merge)"
        )
    modules = {
        module: (layer.mora_operator[name], layer.mora_M[name].detach().float(), layer.fan_in_fan_out)
        for module, layer in layers.items()
        if layer.mora_method[name] == "mora"
    }
    # the LoRA modules of a mixed adapter (layer_methods): A (r, k) and B·scaling (d, r), the written scaling being 1
    lora_parts = {
        module: (
            layer.mora_lora_A[name].weight.detach().float(),
            layer.mora_lora_B[name].weight.detach().float() * layer.mora_scaling[name],
        )
        for module, layer in layers.items()
        if layer.mora_method[name] == "lora"
    }
    full_rank = {module: op for module, (op, _, _) in modules.items() if not op.is_low_rank}
    if rank is None and full_rank:
        module, op = next(iter(full_rank.items()))
        raise UserError(
            f"{len(full_rank)} of {len(modules)} modules have a full-rank ΔW that no LoRA represents exactly (e.g. "
            f"{module}: compression={op.compression!r}, {op.num_blocks} blocks of r̂={op.rank}, ΔW {op.out_features}"
            f"x{op.in_features} of rank up to {min(op.in_features, op.out_features)}). Pass --rank N to export the "
            "truncated SVD of each ΔW at rank N (the error of each module is printed), or merge the adapter into "
            "the base model instead (moraft merge)"
        )
    ranks = [op.rank for op, _, _ in modules.values()] + [a.shape[0] for a, _ in lora_parts.values()]
    common_rank = rank if rank is not None else max(ranks)

    factors, errors = {}, {}
    bar = tqdm([*modules, *lora_parts], desc="export-lora", unit="module", disable=None)
    for module in bar:
        if module in lora_parts:
            a, b = lora_parts[module]
            errors[module] = 0.0
            if a.shape[0] > common_rank:
                a, b, errors[module] = truncated_svd(b @ a, common_rank)
        else:
            op, m, _ = modules[module]
            if op.is_low_rank and op.rank <= common_rank:
                a, b = lora_factors(op, m)
                errors[module] = 0.0
            else:
                a, b, errors[module] = truncated_svd(op.delta_weight(m), common_rank)
        if rank is not None:
            bar.write(f"{module}: rank {common_rank}, relative Frobenius error {errors[module]:.3e}")
        factors[module] = _pad_rank(a, b, common_rank)
    return LoraFactors(loaded=loaded, rank=common_rank, factors=factors, errors=errors)


def _base_or_default(adapter_dir: PathLike, base: Optional[PathLike]) -> PathLike:
    """``base``, else the adapter's recorded base_model_name_or_path."""
    if base is not None:
        return base
    recorded = read_json(Path(adapter_dir) / CONFIG_NAME, "expected a saved moraft adapter").get(
        "base_model_name_or_path"
    )
    if not recorded:
        raise UserError(
            f"{adapter_dir}: the layer shapes come from the base model, and the adapter records none "
            "(base_model_name_or_path is empty): pass --base DIR"
        )
    return recorded


def _target_modules(model: nn.Module, adapted: set[str]) -> list[str]:
    """The short names (``q_proj``) when they select exactly the adapted modules, else the full names."""
    suffixes = {name.rsplit(".", 1)[-1] for name in adapted}
    selected = {name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in suffixes}
    return sorted(suffixes) if selected == adapted else sorted(adapted)

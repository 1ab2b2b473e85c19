"""Merge a MoRA, LoRA or other PEFT adapter into its base model and write a standard transformers checkpoint.

The merge never holds the model: it reads one tensor at a time from the base's safetensors files, merges the adapter
into the adapted weights (in float32, by the adapter's own layer code: moraft's for MoRA, PEFT's for LoRA and its
variants such as DoRA; then cast back), and streams each tensor straight into the output files. Output shard headers are written first (every tensor's shape and dtype
is known up front), so not even one output shard is buffered: peak memory is about one weight matrix plus ΔW.

The base is always the unquantized checkpoint, for an adapter trained on a quantized base too (QMoRA, QLoRA: such an
adapter's base_model_name_or_path is the unquantized base it was loaded from). Only when asked (``quantization``) is
the merged model then written quantized, by transformers and bitsandbytes, with a measure of how much of the update
the quantized weights keep (`moraft.quantization.KeptUpdate`): rounding to a 4-bit grid loses most of a small update.
"""

from __future__ import annotations

import copy
import json
import shutil
import struct
import tempfile
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable, Literal, Optional, Union

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from ..adapters import DTYPES, PathLike, lora_variants, parse_dtype, read_json, resolve_model_dir
from ..errors import UserError, first_line
from ..models import check_gguf, convert_gguf, is_gguf_file
from ..outputs import MANIFEST, staged_output_dir
from ..quantization import (
    QUANT_TYPES,
    KeptUpdate,
    bnb_config,
    dequantized,
    device_map,
    is_quantized_linear,
    requantized,
)
from ._common import LoadedAdapter, _model_class, load_adapter_on_meta

WEIGHTS_INDEX = "model.safetensors.index.json"
WEIGHTS_FILE = "model.safetensors"
# what a merge writes besides the base's side files (`_side_file`): all that --overwrite may replace
MERGED_FILES = ("config.json", "generation_config.json", WEIGHTS_FILE, "model-*-of-*.safetensors", WEIGHTS_INDEX)
# files never copied from the base directory: its weights (rewritten) in any format
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")

# safetensors dtype codes (https://github.com/huggingface/safetensors, format section)
_CODES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_CODE_OF = {dtype: code for code, dtype in _CODES.items()}


@dataclass
class TensorSpec:
    """One output tensor: its name, shape and dtype, and where its source lives."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    source_file: Path
    source_name: str

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * self.dtype.itemsize


def write_safetensors(
    path: Path, specs: list[TensorSpec], produce: Callable[[TensorSpec], torch.Tensor], metadata: dict[str, str]
) -> None:
    """Write a safetensors file tensor by tensor: header from ``specs``, then each ``produce(spec)`` in turn.

    The format is an 8-byte little-endian header length, a JSON header (padded with spaces to a multiple of 8)
    giving each tensor's dtype, shape and byte range, then the raw little-endian bytes with no gaps. Tensors go in
    order of decreasing item size, as safetensors itself writes them, so every tensor stays aligned.
    """
    ordered = sorted(specs, key=lambda s: (-s.dtype.itemsize, s.name))
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for spec in ordered:
        header[spec.name] = {
            "dtype": _CODE_OF[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for spec in ordered:
            tensor = produce(spec)
            if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:  # pragma: no cover - a bug guard
                raise RuntimeError(f"{spec.name}: produced {tuple(tensor.shape)} {tensor.dtype}, planned {spec}")
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)


def _inventory(base_dir: Path) -> dict[str, TensorSpec]:
    """Every tensor of the base checkpoint (name -> spec with the stored dtype), in checkpoint order."""
    if (base_dir / WEIGHTS_INDEX).is_file():
        weight_map = read_json(base_dir / WEIGHTS_INDEX, "the base checkpoint index").get("weight_map") or {}
        files = list(dict.fromkeys(weight_map.values()))
    elif (base_dir / WEIGHTS_FILE).is_file():
        files = [WEIGHTS_FILE]
    else:
        other = sorted(p.name for p in base_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        hint = f" (it has {', '.join(other)}: re-save the model with save_pretrained to get safetensors)"
        raise UserError(f"base model {base_dir} has no {WEIGHTS_FILE} or {WEIGHTS_INDEX}{hint if other else ''}")
    specs = {}
    for file in files:
        path = base_dir / file
        if not path.is_file():
            raise UserError(f"{base_dir / WEIGHTS_INDEX} names {file}, which is missing")
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                sliced = f.get_slice(key)
                code = sliced.get_dtype()
                if code not in _CODES:
                    raise UserError(f"{path}: tensor {key} has dtype {code}, which merge cannot rewrite")
                specs[key] = TensorSpec(key, tuple(sliced.get_shape()), _CODES[code], path, key)
    return specs


def _find(specs: dict[str, TensorSpec], name: str, model: nn.Module) -> Optional[str]:
    """The checkpoint name of parameter ``name``: itself, or without the base-model prefix (older checkpoints)."""
    if name in specs:
        return name
    prefix = getattr(model, "base_model_prefix", "") + "."
    if prefix != "." and name.startswith(prefix) and name[len(prefix) :] in specs:
        return name[len(prefix) :]
    return None


def _plan_changes(loaded: LoadedAdapter, specs: dict[str, TensorSpec], base_dir: Path) -> dict[str, Callable]:
    """Checkpoint tensor name -> function giving its merged float32 value from the stored one."""
    model = loaded.model.base_model.model
    changes: dict[str, Callable] = {}

    def missing(what: str, name: str) -> UserError:
        sample = ", ".join(list(specs)[:3])
        return UserError(
            f"{base_dir}: the adapter {what} {name}, but the base checkpoint has no tensor of that name (it holds "
            f"e.g. {sample}); if it is a tied weight, untie it first"
        )

    variants = _own_merge(loaded)
    for module, layer in loaded.layers.items():
        key = _find(specs, f"{module}.weight", model)
        if key is None:
            raise missing("adapts", f"{module}.weight")
        shape = tuple(layer.get_base_layer().weight.shape)  # the meta model's: the layout ΔW comes in
        if shape != specs[key].shape:
            raise UserError(
                f"{base_dir}: module {module}: config.json gives its weight the shape {shape}, but the checkpoint's "
                f"{key} is {specs[key].shape}"
            )

        # the merged weight is computed when its tensor is written, so only one exists at a time
        # a DoRA module of a mixed MoRA adapter: its ΔW depends on the weight, so the layer merges the real one
        dora = getattr(layer, "mora_method", {}).get(loaded.adapter_name) == "dora"
        changes[key] = partial(merged_weight, layer, loaded.adapter_name, variant=bool(variants) or dora)
    for name, tensor in loaded.replaced.items():
        key = _find(specs, name, model)
        if key is None:
            raise missing("replaces", name)
        if tuple(tensor.shape) != specs[key].shape:
            raise UserError(
                f"{loaded.weights_file}: {name} is {tuple(tensor.shape)} but the base checkpoint's {key} is "
                f"{specs[key].shape}"
            )
        changes[key] = lambda w, tensor=tensor: tensor
    return changes


def merged_weight(layer: BaseTunerLayer, adapter_name: str, weight: torch.Tensor, variant: bool) -> torch.Tensor:
    """``weight`` (as stored in the base checkpoint) with the adapter merged in by the layer's own ``merge``, in float32.

    This is the code ``merge_and_unload`` runs: moraft's for MoRA, PEFT's for LoRA and each of its variants (DoRA's
    magnitude rescaling, KaSA's truncation of the base weight and its diagonal, ...). Where that merge is
    W + ``get_delta_weight`` (MoRA, plain LoRA: PEFT's own branch for a LoRA without a variant), the sum is taken
    directly. A variant's merge (``variant``: the adapter's config has options `moraft.adapters.lora_variants`
    finds) runs on the layer itself: it lives on a meta base model, so the real weight is put in for the merge and
    taken out again, and the layer keeps no copy of it.
    """
    if not variant:
        return weight.float() + layer.get_delta_weight(adapter_name).float()
    base = layer.get_base_layer()
    placeholder = base.weight
    base.weight = nn.Parameter(weight.to(torch.float32, copy=True), requires_grad=False)
    try:
        layer.merge(adapter_names=[adapter_name])
        return base.weight.data
    finally:
        layer.merged_adapters = [name for name in layer.merged_adapters if name != adapter_name]
        base.weight = placeholder


def _check_mergeable(loaded: LoadedAdapter, specs: dict[str, TensorSpec]) -> None:
    """A LoRA variant that PEFT cannot merge (aLoRA, Arrow, ...) fails here, before anything is written.

    The smallest adapted weight is merged on a copy of its layer (a variant's merge may change the layer's state once,
    as KaSA's truncation of the base weight does), and PEFT's refusal becomes an error naming the variant's option.
    """
    variants = _own_merge(loaded)
    if not variants:
        return
    module, layer = min(loaded.layers.items(), key=lambda item: item[1].get_base_layer().weight.numel())
    key = _find(specs, f"{module}.weight", loaded.model.base_model.model)
    with safe_open(str(specs[key].source_file), "pt") as reader:
        weight = reader.get_tensor(specs[key].source_name)
    try:
        merged_weight(copy.deepcopy(layer), loaded.adapter_name, weight, variant=True)
    except (NotImplementedError, RuntimeError, TypeError, ValueError) as err:
        options = ", ".join(f"{name}={value!r}" for name, value in variants.items())
        reason = first_line(err).rstrip(".")
        what = "adapter" if "peft_type" in variants else "LoRA variant"
        raise UserError(
            f"{loaded.weights_file.parent}: PEFT cannot merge this {what} ({options}): {reason}. Nothing was "
            "written; load the adapter with PEFT (PeftModel.from_pretrained) and run it unmerged"
        ) from None


def _own_merge(loaded: LoadedAdapter) -> dict:
    """What makes the layers' own ``merge`` necessary, ``{option: value}``: a LoRA variant's options, or another
    method's peft_type (its ΔW is not a sum moraft computes); empty for MoRA and plain LoRA (W + get_delta_weight)."""
    peft_type = str(getattr(loaded.config.peft_type, "value", loaded.config.peft_type))
    if peft_type not in ("MORA", "LORA"):
        return {"peft_type": peft_type}
    return lora_variants(loaded.config)


def _shards(specs: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive tensors grouped so that each group stays under ``max_bytes`` (a bigger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _parse_size(size: Union[int, str]) -> int:
    from transformers.utils.hub import convert_file_size_to_int

    try:
        value = convert_file_size_to_int(size)
    except ValueError:
        value = None
    if not isinstance(value, int) or value < 1:
        raise UserError(f"max_shard_size={size!r} is invalid; expected bytes or a size such as '5GB' or '500MB'")
    return value


def merge_adapter(
    base: PathLike,
    adapter: PathLike,
    out_dir: PathLike,
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
    max_shard_size: Union[int, str] = "5GB",
    overwrite: bool = False,
    quantization: Literal["none", "4bit", "8bit"] = "none",
    quant_type: Literal["nf4", "fp4"] = "nf4",
    double_quant: bool = False,
    revision: Optional[str] = None,
    local_files_only: bool = False,
) -> Path:
    """Merge a MoRA or PEFT LoRA adapter (DoRA and other LoRA variants included), or another PEFT method's adapter
    whose layers PEFT can merge (HiRA, MiSS, GraLoRA, BOFT, VeRA, ...: the Methods page lists them), into its base
    model: a standard transformers checkpoint.

    The output (safetensors, sharded above ``max_shard_size``, with model.safetensors.index.json; config, generation
    config and tokenizer files copied from the base) loads with ``AutoModelForCausalLM.from_pretrained(OUT)`` and
    needs neither moraft nor PEFT. Each adapted weight is merged in float32 by the adapter's own layer code (the code
    PEFT's ``merge_and_unload`` runs), then cast to the output dtype. LoRA variants that PEFT cannot merge (aLoRA) and
    options that change more than the adapted weight matrices (lora_bias, trainable token embeddings) stop the merge
    with an error naming the option, before anything is written. The merge reads and writes one tensor at a time, so it never holds two copies of the model in memory.

    An adapter trained on a quantized base (moraft train --model.quantization) merges into the unquantized base
    weights, as any other. With ``quantization`` the merged model is then written quantized: it is loaded by
    transformers with a bitsandbytes config (which holds it in memory, quantized) and saved. Rounding to the 4-bit
    grid loses most of a small update, so the merge prints how much of it the quantized weights keep
    (`moraft.quantization.KeptUpdate`).

    Args:
        base: the base model directory (config.json + model.safetensors or a sharded index), or a Hugging Face Hub
            model id (downloaded into the Hub cache on first use, as from_pretrained does); its weights unquantized,
            also for an adapter trained on a quantized base. Or a GGUF file: dequantized first (to float32 with dtype
            auto) into a temporary directory, which needs the disk space of the dequantized model.
        adapter: the adapter directory: a moraft MoRA adapter, a PEFT LoRA adapter (DoRA, KaSA and the other
            LoRA variants that PEFT can merge), or another PEFT method's, merged by its layers' own ``merge``; one
            whose layers need tensors its file lacks, or that PEFT cannot merge, is refused before anything is
            written.
        out_dir: where to write the merged model (written whole or not at all).
        dtype: dtype of the floating-point tensors written: ``auto`` keeps each tensor's stored dtype (a bfloat16
            model stays bfloat16), or float32, bfloat16, float16. With quantization: of the tensors left unquantized,
            and the 4-bit compute dtype.
        max_shard_size: largest size of one weights file, in bytes or as '5GB', '500MB'.
        overwrite: replace ``out_dir`` when it is an earlier output of this command (its .moraft-output.json names
            everything in it); anything else there is refused.
        quantization: none, or write the merged model's linear layers quantized by bitsandbytes: 4bit (NF4/FP4) or
            8bit (LLM.int8). Most of a small update is lost in the rounding: the merge prints how much is kept.
        quant_type: 4bit: nf4 or fp4.
        double_quant: 4bit: quantize the per-block scales too.
        revision: a Hub base: the branch, tag or commit hash to load (default: main).
        local_files_only: a Hub base: read it from the Hub cache only, never downloading (as HF_HUB_OFFLINE=1).

    Returns:
        The output directory.
    """
    out_dtype = parse_dtype(dtype, auto=True)
    max_bytes = _parse_size(max_shard_size)
    quantize = _quantization_options(quantization, quant_type, double_quant)
    if is_gguf_file(base):
        # a GGUF base is dequantized once into a temporary transformers directory, which is then merged as any other
        check_gguf(base)
        with tempfile.TemporaryDirectory(prefix="moraft-merge-gguf-") as staged:
            convert_gguf(Path(base), Path(staged), str(Path(base).absolute()), out_dtype or torch.float32)
            return merge_adapter(
                staged, adapter, out_dir, dtype, max_shard_size, overwrite, quantization, quant_type, double_quant
            )
    base_dir = resolve_model_dir(base, revision=revision, local_files_only=local_files_only)
    config = read_json(base_dir / "config.json", "expected a transformers model directory")
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        raise UserError(f"{base_dir / 'config.json'}: the base is quantized ({method}); merge needs plain weights")
    specs = _inventory(base_dir)
    loaded = load_adapter_on_meta(adapter, base_dir, "merge", accepted=())
    changes = _plan_changes(loaded, specs, base_dir)
    _check_mergeable(loaded, specs)

    planned = [replace(s, dtype=out_dtype) if out_dtype and s.dtype.is_floating_point else s for s in specs.values()]
    shards = _shards(planned, max_bytes)
    names = (
        [WEIGHTS_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    total = sum(s.nbytes for s in planned)
    kept = None
    with tqdm(total=total, desc="merge", unit="B", unit_scale=True, disable=None) as bar, staged_output_dir(
        out_dir, overwrite, "moraft merge", [*MERGED_FILES, *(p.name for p in base_dir.iterdir() if _side_file(p))]
    ) as staging:
        # a quantized output is made from the merged model as an unquantized merge writes it
        target = staging if quantize is None else staging / ".unquantized"
        target.mkdir(exist_ok=True)

        def produce(spec: TensorSpec) -> torch.Tensor:
            # safetensors maps the file into memory, and every page read stays resident while the file is open:
            # opening it per tensor releases each tensor's pages once it is written
            with safe_open(str(spec.source_file), "pt") as reader:
                tensor = reader.get_tensor(spec.source_name)
            change = changes.get(spec.name)
            if change is not None:
                tensor = change(tensor)
                if not torch.isfinite(tensor).all():
                    raise UserError(f"merging {adapter} into {spec.name} gives NaN or infinite values")
            bar.update(spec.nbytes)
            return tensor.to(spec.dtype)

        for shard, name in zip(shards, names):
            write_safetensors(target / name, shard, produce, {"format": "pt"})
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": total},
                "weight_map": {spec.name: name for shard, name in zip(shards, names) for spec in shard},
            }
            (target / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        _copy_side_files(base_dir, target, config, dtype)
        if quantize is not None:
            written = {spec.name: target / name for shard, name in zip(shards, names) for spec in shard}
            adapted = {key: (specs[key].source_file, written[key]) for key in changes if key not in loaded.replaced}
            floating = [s.dtype for s in planned if s.name in adapted] + [s.dtype for s in planned]
            load_dtype = next(d for d in floating if d.is_floating_point)  # the adapted weights' dtype as written
            kept = _save_quantized(target, staging, quantize, load_dtype, loaded, adapted, max_shard_size)
            shutil.rmtree(target)
            _copy_missing_side_files(base_dir, staging)
    if kept is not None:
        print(_kept_message(Path(out_dir), quantization, quant_type, kept))
    return Path(out_dir)


# ----------------------------------------------------------------------------------------------------------------
# a quantized output


@dataclass
class _Quantize:
    quantization: str
    quant_type: str
    double_quant: bool


def _quantization_options(quantization: str, quant_type: str, double_quant: bool) -> Optional[_Quantize]:
    """The quantization asked for, checked (None for none): `UserError` naming a bad value, a 4bit option given
    without 4bit, or bitsandbytes missing."""
    bnb_config(quantization, option="quantization")  # an unknown value, bitsandbytes missing
    if quant_type not in QUANT_TYPES:
        raise UserError(f"quant_type={quant_type!r} is invalid; expected one of {', '.join(QUANT_TYPES)}")
    if quantization != "4bit":
        for name, value, default in (("quant_type", quant_type, "nf4"), ("double_quant", double_quant, False)):
            if value != default:
                raise UserError(f"{name} is a 4bit option; it does nothing with quantization={quantization!r}")
    return None if quantization == "none" else _Quantize(quantization, quant_type, double_quant)


def _save_quantized(
    merged_dir: Path,
    out: Path,
    quantize: _Quantize,
    load_dtype: torch.dtype,
    loaded: LoadedAdapter,
    adapted: dict[str, tuple[Path, Path]],
    max_shard_size: Union[int, str],
) -> KeptUpdate:
    """Load the merged model in ``merged_dir`` quantized (transformers' bitsandbytes quantizer; ``load_dtype``: the
    model's dtype and the 4-bit compute dtype), save it to ``out``, and measure, over the adapted weights it
    quantized, how much of the update it keeps. ``adapted`` maps each adapted weight's name to its base and merged
    safetensors files."""
    names = {dtype: name for name, dtype in DTYPES.items()}
    config = bnb_config(
        quantize.quantization, quantize.quant_type, quantize.double_quant, names.get(load_dtype, "float32"),
        option="quantization",
    )
    cls = _model_class(loaded.config.to_dict())
    model = cls.from_pretrained(merged_dir, quantization_config=config, dtype=load_dtype, device_map=device_map())
    model.save_pretrained(out, max_shard_size=max_shard_size)
    modules = dict(model.named_modules())
    prefix = getattr(model, "base_model_prefix", "")
    kept = KeptUpdate()
    for key, (base_file, merged_file) in adapted.items():
        name = key.removesuffix(".weight")
        layer = modules.get(name, modules.get(f"{prefix}.{name}"))
        if layer is None or not is_quantized_linear(layer):
            continue  # left unquantized (an output head): it keeps the whole update
        with safe_open(str(merged_file), "pt") as reader:
            merged = reader.get_tensor(key)
        with safe_open(str(base_file), "pt") as reader:
            weight = reader.get_tensor(key).to(merged.dtype)  # the base as the merge writes it, without the update
        quantized = dequantized(layer)
        kept.add(weight, merged, quantized.to(weight.device), requantized(weight.to(quantized.device), layer).cpu())
    return kept


def _side_file(path: Path) -> bool:
    """A top-level file of the base that the merged model keeps: not a weights file, nor the base's own record of
    the moraft command that wrote it (the merged model's is its own)."""
    return path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES) and path.name != MANIFEST


def _copy_missing_side_files(base_dir: Path, out: Path) -> None:
    """The base's non-weight top-level files (tokenizer, ...) that ``save_pretrained`` did not write."""
    for path in sorted(base_dir.iterdir()):
        if _side_file(path) and not (out / path.name).exists():
            shutil.copy2(path, out / path.name)


def _kept_message(out: Path, quantization: str, quant_type: str, kept: KeptUpdate) -> str:
    grid = f"4-bit {quant_type}" if quantization == "4bit" else "8-bit"
    return (
        f"moraft merge: wrote {out} with its linear layers quantized ({grid}, bitsandbytes). Rounding to the {grid} "
        f"grid loses part of an update, most of a small one. Of this one: {kept}. Without --quantization the merge "
        "keeps the whole update; on a quantized base, the adapter unmerged (as it was trained) keeps it too."
    )


def _copy_side_files(base_dir: Path, out: Path, config: dict, dtype: str) -> None:
    """config.json (with the new dtype), generation config, tokenizer and any other non-weight top-level files."""
    for path in sorted(base_dir.iterdir()):
        if _side_file(path) and path.name != "config.json":
            shutil.copy2(path, out / path.name)
    if dtype != "auto":
        config["dtype"] = dtype
        if "torch_dtype" in config:  # transformers < 5 reads this name
            config["torch_dtype"] = dtype
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


__all__ = ["merge_adapter", "write_safetensors"]

"""Saved adapters and the models they sit on: where moraft finds them, what their files are called, and whether a
use of an adapter is exact. Every command that reads these files asks this module, so they agree.

**Files.** An adapter directory holds PEFT's ``CONFIG_NAME`` (adapter_config.json) and ``SAFETENSORS_WEIGHTS_NAME``
(adapter_model.safetensors) or ``WEIGHTS_NAME`` (adapter_model.bin): the names are PEFT's own constants
(``peft.utils.constants``), never copies. `DTYPES` is the one table of dtype names the commands accept.

**Base models.** `moraft.models` is the one loader, everywhere (train, eval, merge, export-lora, serve, data);
`resolve_model_dir` and `load_causal_lm` are re-exported here.

**Exact uses.** Four places take adapters that moraft did not necessarily write: ``moraft merge`` (ΔW into a base checkpoint),
``moraft export-lora``, ``moraft eval`` and ``moraft serve`` (ΔW applied per request). Each asks this module, so they
agree on what a LoRA adapter is. The question is decided by PEFT's own metadata, not by a list kept here: every
``LoraConfig`` field that makes an adapter a *LoRA variant* (DoRA, aLoRA, KaSA, MiCA, ...) is tagged
``is_lora_variant`` (or, for ``init_lora_weights``, listed in its ``lora_variants``), and with any of them ΔW is not
``scaling · B · A``. So

- ``merge`` merges variants through PEFT's own layer code (what ``merge_and_unload`` runs), and stops with an error
  naming the option where PEFT refuses to merge (aLoRA, Arrow);
- ``serve`` and ``export`` apply ``scaling · B · A`` themselves, so they refuse every variant;
- ``eval`` runs the adapter through PEFT itself, which handles every variant.

A few options add something besides one update per adapted weight matrix; those are listed below (`EXTRAS`), with the
uses that cannot carry them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Literal, Union

import torch
from peft import PeftConfig
from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

from .errors import UserError

PathLike = Union[str, "os.PathLike[str]"]
PEFT_PREFIX = "base_model.model."  # what PEFT puts before each module name in a saved adapter
WEIGHT_FILES: tuple[str, ...] = (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME)  # an adapter's weights, preferred first
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

Use = Literal["merge", "serve", "export", "eval"]
USES: dict[str, str] = {
    "merge": "moraft merge",
    "serve": "moraft serve (which applies each adapter per request)",
    "export": "moraft export-lora",
    "eval": "moraft eval",
}
# Options (not PEFT variants) that make an adapter more than one update per adapted weight matrix, and the uses that
# cannot carry them. A streamed merge writes each weight matrix on its own, so it takes neither a bias trained beside
# lora_B (its ΔW lands in another tensor) nor adapters on tokens, raw parameters or replicated layers.
EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "lora_bias": ("a bias trained on lora_B", ("merge", "serve", "export")),
    "trainable_token_indices": ("trainable token embeddings", ("merge", "serve", "export")),
    "target_parameters": ("LoRA on raw parameters", ("merge", "serve", "export")),
    "layer_replication": ("layer replication", ("merge", "serve", "export")),
}
# What to do instead, per use
HINTS: dict[str, str] = {
    "merge": "load it with PEFT (PeftModel.from_pretrained) and save the result of merge_and_unload() where PEFT "
    "can, or serve it unmerged",
    "serve": "merge it into the base (moraft merge, or PEFT's merge_and_unload) and serve the merged model",
    "export": "merge it into the base instead (moraft merge)",
    "eval": "",
}


def lora_variants(config: PeftConfig) -> dict[str, Any]:
    """The options set in ``config`` that PEFT marks as LoRA variants (``{name: value}``; empty for plain LoRA).

    PEFT tags each variant's ``LoraConfig`` field with ``is_lora_variant``; variants chosen through
    ``init_lora_weights`` (MiCA) are the values listed in that field's ``lora_variants`` metadata. This is the check
    PEFT's own ``LoraLayer.resolve_lora_variant`` makes. Configs of other methods (MoRA) have no such fields.
    """
    found: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name, None)
        if f.name == "init_lora_weights":
            if isinstance(value, str) and value in f.metadata.get("lora_variants", ()):
                found[f.name] = value
        elif f.metadata.get("is_lora_variant") and value:
            found[f.name] = value
    return found


def unsupported_options(config: PeftConfig, use: Use) -> dict[str, str]:
    """``{"option=value": why}`` for each option of ``config`` that ``use`` cannot apply exactly."""
    if use not in USES:
        raise ValueError(f"use={use!r} is not one of {', '.join(USES)}")
    found: dict[str, str] = {}
    if use in ("serve", "export"):
        for name, value in lora_variants(config).items():
            found[f"{name}={value!r}"] = "a LoRA variant (PEFT marks it is_lora_variant): its ΔW is not scaling·B·A"
    for name, (what, uses) in EXTRAS.items():
        value = getattr(config, name, None)
        if use in uses and value:
            found[f"{name}={value!r}"] = what
    if use == "serve" and getattr(config, "bias", "none") != "none":
        found[f"bias={config.bias!r}"] = "trained biases of the base model"
    return found


def check_adapter(config: PeftConfig, use: Use, where: Union[str, Path]) -> None:
    """Raise `UserError` naming every option of ``config`` that ``use`` cannot apply exactly, and what to do."""
    found = unsupported_options(config, use)
    if found:
        listed = "; ".join(f"{option} ({why})" for option, why in found.items())
        raise UserError(f"{where}: {USES[use]} cannot apply this adapter exactly: {listed}. Instead, {HINTS[use]}")


def read_json(path: Path, what: str) -> dict:
    """The JSON object in ``path``; `UserError` naming the file when it is missing (``what`` says what was expected
    there), not JSON, or not an object."""
    if not path.is_file():
        raise UserError(f"{path} not found: {what}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a {type(data).__name__}, expected a JSON object")
    return data


def read_adapter_config(adapter_dir: Union[str, Path], use: Use, accepted: tuple[str, ...] = ()) -> PeftConfig:
    """The ``PeftConfig`` saved in ``adapter_dir``, checked for ``use`` (see `check_adapter`).

    Raises `UserError` naming the file when it is missing or not JSON, when it was written by the authors' peft-mora
    (it must be converted first), when its ``peft_type`` is not in ``accepted`` (any, when empty), or when PEFT cannot
    parse it.
    """
    adapter_dir = Path(adapter_dir)
    path = adapter_dir / CONFIG_NAME
    if not adapter_dir.is_dir():
        raise UserError(f"adapter {adapter_dir} is not a directory; expected a saved PEFT adapter")
    raw = read_json(path, "expected a saved PEFT adapter directory")
    if raw.get("use_mora"):
        raise UserError(
            f"{path} was written by the authors' peft-mora (use_mora=true); convert it first: "
            f"moraft convert-peft-mora {adapter_dir} OUT"
        )
    peft_type = str(raw.get("peft_type"))
    if accepted and peft_type not in accepted:
        instead = f". Instead, {HINTS[use]}" if HINTS[use] else ""
        raise UserError(
            f"{path}: peft_type={peft_type!r} is not supported here; accepted: {', '.join(accepted)} "
            f"({USES[use]}){instead}"
        )
    try:
        config = PeftConfig.from_pretrained(str(adapter_dir))
    except (ValueError, TypeError, KeyError) as err:
        raise UserError(f"{path}: {err}") from None
    check_adapter(config, use, path)
    return config


# ----------------------------------------------------------------------------------------------------------------
# files and dtypes


def adapter_weights_path(adapter_dir: Path) -> Path:
    """The adapter's weight file: adapter_model.safetensors, else adapter_model.bin."""
    for name in WEIGHT_FILES:
        if (adapter_dir / name).is_file():
            return adapter_dir / name
    raise UserError(f"{adapter_dir} has no {' (or '.join(WEIGHT_FILES)}): not a saved PEFT adapter")


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors or torch pickle file, on the CPU."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which one
        raise UserError(f"cannot read {path}: {err}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} does not hold a dict of tensors")
    return state


def parse_dtype(name: str, option: str = "dtype", auto: bool = False) -> torch.dtype | None:
    """The torch dtype called ``name`` in `DTYPES` (None for ``"auto"`` where ``auto`` is accepted); `UserError`
    naming ``option`` and the accepted names otherwise."""
    if auto and name == "auto":
        return None
    if name not in DTYPES:
        accepted = ", ".join((["auto"] if auto else []) + list(DTYPES))
        raise UserError(f"{option}={name!r} is not one of {accepted}")
    return DTYPES[name]


# ----------------------------------------------------------------------------------------------------------------
# base models: moraft.models (re-exported here, where the commands have always found them)

from .models import load_causal_lm, resolve_model_dir  # noqa: E402


__all__ = [
    "DTYPES",
    "PEFT_PREFIX",
    "WEIGHT_FILES",
    "adapter_weights_path",
    "check_adapter",
    "load_causal_lm",
    "load_tensors",
    "lora_variants",
    "parse_dtype",
    "read_adapter_config",
    "read_json",
    "resolve_model_dir",
    "unsupported_options",
]

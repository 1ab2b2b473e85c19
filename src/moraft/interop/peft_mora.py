"""Convert adapters saved by the MoRA authors' peft-mora (a fork of PEFT 0.9) into moraft adapters.

peft-mora saves a MoRA adapter as a PEFT LoRA adapter: ``"peft_type": "LORA"`` plus ``"use_mora": true`` and
``"mora_type"`` in adapter_config.json, and the square matrix M (r̂ × r̂) as ``<module>.lora_A.weight`` with
``<module>.lora_B.weight`` a copy of it. Its numbered types are moraft operators (see ``PEFT_MORA_TYPES``); the
converted adapter sets ``peft_mora_compat=True`` so that moraft reproduces peft-mora's outputs exactly, including
its output truncation for rotation when a layer has more inputs than outputs.

peft-mora derived r̂ from each layer's shape: r̂ = int(sqrt((in + out)·r) + 0.5), rounded down to even for type 6
(moraft's ``mora_rank``). The converted config records r̂ per module (``mora_rank_pattern``) together with
peft-mora's r, so that loading onto a base model with other layer shapes is an error rather than a silent change.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import torch
from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import save_file
from torch import nn

from ..adapters import PEFT_PREFIX, PathLike, adapter_weights_path, load_tensors, read_json
from ..errors import UserError
from ..mora import MoraConfig, mora_rank
from ..mora.model import SUPPORTED_LAYERS
from ..outputs import staged_output_dir
from ._common import ADAPTER_FILES, meta_base_model

# peft-mora's mora_type -> (compression, input_grouping, output_grouping). Types 2-4 are ReMoRA's groupings of
# sharing: "contiguous" input sums consecutive features (repeat_interleave), "contiguous" output repeats each in place.
PEFT_MORA_TYPES: dict[int, tuple[str, str, str]] = {
    1: ("sharing", "strided", "strided"),
    2: ("sharing", "contiguous", "contiguous"),
    3: ("sharing", "contiguous", "strided"),
    4: ("sharing", "strided", "contiguous"),
    6: ("rotation", "strided", "strided"),
}
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")


def _fork_rank_pattern_key(pattern: dict, module: str) -> Optional[str]:
    """The rank_pattern key peft-mora (PEFT 0.9) applied to ``module``: the first key matching ``.*\\.{key}$``."""
    return next((key for key in pattern if re.match(rf".*\.{key}$", module)), None)


def convert_peft_mora(
    src_dir: PathLike, out_dir: PathLike, base: Optional[PathLike] = None, overwrite: bool = False
) -> Path:
    """Convert an adapter saved by the MoRA authors' peft-mora into a moraft MoRA adapter.

    The result loads with ``PeftModel.from_pretrained(base_model, OUT)`` (after ``import moraft``) and gives the
    outputs peft-mora gave. peft-mora's mora_type becomes moraft's compression: 1 = sharing, 2/3/4 = sharing with
    ReMoRA's contiguous groupings (input/output: 2 contiguous/contiguous, 3 contiguous/strided, 4 strided/contiguous),
    6 = rotation.

    Args:
        src_dir: the peft-mora adapter directory (adapter_config.json with "use_mora": true, and
            adapter_model.safetensors or adapter_model.bin).
        out_dir: where to write the moraft adapter (written whole or not at all).
        base: optional base model directory (only its config.json is read) to check the adapter against now: every
            adapted module must exist and have the shape the adapter was trained on. Without it the same check runs
            when the converted adapter is loaded.
        overwrite: replace ``out_dir`` when it is an earlier output of this command (its .moraft-output.json names
            everything in it); anything else there is refused.

    Returns:
        The output directory.
    """
    src = Path(src_dir)
    if not src.is_dir():
        raise UserError(f"{src} is not a directory; expected a peft-mora adapter directory")
    config_path = src / CONFIG_NAME
    fork = read_json(config_path, "expected a peft-mora adapter directory (adapter_config.json + weights)")
    if fork.get("peft_type") != "LORA" or not fork.get("use_mora"):
        what = f"peft_type={fork.get('peft_type')!r}, use_mora={fork.get('use_mora')!r}"
        raise UserError(
            f"{config_path}: not a peft-mora adapter ({what}; peft-mora writes peft_type 'LORA' with use_mora true)"
        )
    mora_type = fork.get("mora_type", 1)
    if mora_type not in PEFT_MORA_TYPES:
        raise UserError(
            f"{config_path}: mora_type={mora_type!r} is not one peft-mora can run; accepted: "
            f"{', '.join(map(str, PEFT_MORA_TYPES))}"
        )
    for option, plain in (("bias", "none"), ("use_dora", False)):
        if fork.get(option, plain) != plain:
            raise UserError(f"{config_path}: {option}={fork[option]!r} is not supported for MoRA (expected {plain!r})")
    compression, input_grouping, output_grouping = PEFT_MORA_TYPES[mora_type]
    r = fork.get("r", 8)
    fork_rank_pattern = fork.get("rank_pattern") or {}

    weights_path = adapter_weights_path(src)
    state = load_tensors(weights_path)
    matrices, others = _mora_matrices(state, weights_path, mora_type)
    if not matrices:
        raise UserError(f"{weights_path} holds no <module>.lora_A.weight tensors: not a peft-mora adapter")

    # r per module as peft-mora chose it, then r̂ from the checkpoint itself
    module_r = {}
    for module in matrices:
        key = _fork_rank_pattern_key(fork_rank_pattern, module)
        module_r[module] = fork_rank_pattern[key] if key is not None else r
    if base is not None:
        _check_against_base(matrices, module_r, base, fork, weights_path, compression)

    config = MoraConfig(
        r=r,
        # per-module r as peft-mora used it, so loading can check r̂ against the layer shape as peft-mora derived it
        rank_pattern={re.escape(m): v for m, v in module_r.items() if v != r},
        mora_rank_pattern={re.escape(m): M.shape[0] for m, M in matrices.items()},
        compression=compression,
        input_grouping=input_grouping,
        output_grouping=output_grouping,
        target_modules=sorted(matrices),
        dropout=float(fork.get("lora_dropout") or 0.0),
        modules_to_save=fork.get("modules_to_save"),
        peft_mora_compat=True,
        base_model_name_or_path=fork.get("base_model_name_or_path"),
        revision=fork.get("revision"),
        task_type=fork.get("task_type"),
        auto_mapping=fork.get("auto_mapping"),
        inference_mode=True,
    )
    tensors = {f"{PEFT_PREFIX}{m}.mora_M": M.float().contiguous() for m, M in matrices.items()}
    tensors.update(others)  # modules_to_save, saved whole under the same names by both
    with staged_output_dir(out_dir, overwrite, "moraft convert-peft-mora", ADAPTER_FILES) as staging:
        config.save_pretrained(str(staging))
        save_file(tensors, str(staging / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
    return Path(out_dir)


def _mora_matrices(
    state: dict[str, torch.Tensor], path: Path, mora_type: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """M per module name (relative to the base model) from lora_A, checked square and equal to lora_B."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    others = {}
    for key, tensor in state.items():
        match = _KEY.match(key)
        if match is None:
            if "lora_" in key:
                raise UserError(f"{path}: {key} is not a peft-mora MoRA tensor (expected <module>.lora_A.weight)")
            others[key] = tensor
            continue
        module = match["module"]
        module = module[len(PEFT_PREFIX) :] if module.startswith(PEFT_PREFIX) else module
        pairs.setdefault(module, {})[match["which"]] = tensor
    matrices = {}
    for module, pair in sorted(pairs.items()):
        if "A" not in pair:
            raise UserError(f"{path}: module {module} has lora_B.weight but no lora_A.weight")
        a = pair["A"]
        if a.dim() != 2 or a.shape[0] != a.shape[1]:
            raise UserError(
                f"{path}: module {module}: lora_A.weight has shape {tuple(a.shape)}; peft-mora stores MoRA's square "
                "M (r̂ x r̂) there. A plain LoRA adapter needs no conversion."
            )
        b = pair.get("B")
        if b is not None and (b.shape != a.shape or not torch.equal(b, a)):
            raise UserError(
                f"{path}: module {module}: lora_B.weight (shape {tuple(b.shape)}) differs from lora_A.weight "
                f"(shape {tuple(a.shape)}); peft-mora saves the same M under both names"
            )
        if not torch.isfinite(a).all():
            raise UserError(f"{path}: module {module}: M holds NaN or infinite values")
        if mora_type == 6 and a.shape[0] % 2:
            raise UserError(
                f"{path}: module {module}: M is {a.shape[0]}x{a.shape[0]}; mora_type 6 (rotation) pairs features and "
                "needs an even r̂ (peft-mora cannot run this checkpoint either)"
            )
        matrices[module] = a
    return matrices, others


def _check_against_base(
    matrices: dict[str, torch.Tensor],
    module_r: dict[str, int],
    base: PathLike,
    fork: dict,
    path: Path,
    compression: str,
) -> None:
    """Each module must exist in ``base`` with the shape that gives the checkpoint's r̂ under peft-mora's rule."""
    model = meta_base_model(base, fork)
    label = base
    for module, m in matrices.items():
        try:
            layer = model.get_submodule(module)
        except AttributeError:
            raise UserError(
                f"{path}: module {module} (M {m.shape[0]}x{m.shape[1]}) does not exist in the base model {label}"
            ) from None
        if not isinstance(layer, SUPPORTED_LAYERS):
            raise UserError(f"{path}: module {module} is a {type(layer).__name__} in {label}, not a linear layer")
        if isinstance(layer, nn.Linear):
            k, d = layer.in_features, layer.out_features
        else:  # transformers Conv1D stores its weight as (in, out)
            k, d = layer.weight.shape
        expected = mora_rank(k, d, module_r[module], compression)
        if m.shape[0] != expected:
            raise UserError(
                f"{path}: module {module}: M is {m.shape[0]}x{m.shape[1]}, but peft-mora (mora_type="
                f"{fork.get('mora_type', 1)}, r={module_r[module]}) gives the {d}x{k} layer of {label} an M of "
                f"{expected}x{expected}: the adapter was trained on a base model with other layer shapes"
            )


__all__ = ["PEFT_MORA_TYPES", "convert_peft_mora"]

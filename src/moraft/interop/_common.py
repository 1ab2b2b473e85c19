"""Plumbing shared by the interop commands: base models on the meta device, and adapters loaded onto them (their
output directories are staged by `moraft.outputs.staged_output_dir`).

A "meta" base model has every module with its real shape but no weights, so an adapter can be injected into it by
PEFT (which runs moraft's own layer code: the same operators, the same r̂ per module as a real load) at no memory
cost. The adapter's own tensors are then put in place, on the CPU, so that ``get_delta_weight`` and the operators work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel
from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import PretrainedConfig

from .._peft_hook import quiet_peft_deprecation
from ..adapters import (
    PEFT_PREFIX,
    PathLike,
    Use,
    adapter_weights_path,
    load_tensors,
    read_adapter_config,
    resolve_model_dir,
)
from ..errors import UserError, first_line
from ..models import is_gguf_file, load_gguf_config

ADAPTER_FILES = (CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME)  # what export-lora and convert-peft-mora write (and replace)

# ----------------------------------------------------------------------------------------------------------------
# base models


def _model_class(adapter_config: dict | None):
    """The transformers class whose module names the adapter's keys use (PEFT records it as auto_mapping)."""
    import transformers

    adapter_config = adapter_config or {}
    class_name = (adapter_config.get("auto_mapping") or {}).get("base_model_class")
    if class_name and hasattr(transformers, class_name):
        return getattr(transformers, class_name)
    by_task = {
        "SEQ_CLS": "AutoModelForSequenceClassification",
        "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
        "TOKEN_CLS": "AutoModelForTokenClassification",
        "QUESTION_ANS": "AutoModelForQuestionAnswering",
        "FEATURE_EXTRACTION": "AutoModel",
    }
    return getattr(transformers, by_task.get(adapter_config.get("task_type") or "", "AutoModelForCausalLM"))


def meta_base_model(base: PathLike | PretrainedConfig, adapter_config: dict | None = None) -> nn.Module:
    """The base model with its real module shapes and no weights (on the meta device): from ``base``'s config.json
    (nothing else is read; of a GGUF file, its header), or from the config of a model already loaded (``moraft
    serve``'s)."""
    from transformers import AutoConfig

    if isinstance(base, PretrainedConfig):
        config, where = base, f"base model ({type(base).__name__})"
    elif is_gguf_file(base):
        config, where = load_gguf_config(base), f"base model {base}"
    else:
        base_dir = resolve_model_dir(base)
        if not (base_dir / "config.json").is_file():
            raise UserError(
                f"base model {base}: {base_dir / 'config.json'} not found; expected a transformers model directory"
            )
        where = f"base model {base}: {base_dir / 'config.json'}"
        try:
            config = AutoConfig.from_pretrained(base_dir)
        except (ValueError, KeyError, OSError) as err:
            raise UserError(f"{where}: cannot build the model: {err}") from None
    try:
        with torch.device("meta"):
            cls = _model_class(adapter_config)
            return cls.from_config(config) if hasattr(cls, "from_config") else cls(config)  # Auto* vs concrete
    except (ValueError, KeyError, OSError, AttributeError, TypeError) as err:  # e.g. an adapter of another family
        raise UserError(f"{where}: cannot build the model: {err}") from None


# ----------------------------------------------------------------------------------------------------------------
# an adapter on a meta base


@dataclass
class LoadedAdapter:
    """A PEFT adapter injected into a meta base model, with its own tensors real (on the CPU).

    ``layers`` maps each adapted module's name (as in the base model, e.g. ``model.layers.0.mlp.up_proj``) to its
    tuner layer; ``replaced`` holds tensors the adapter stores whole (``modules_to_save``, trained biases) under the
    base model's parameter names.
    """

    config: PeftConfig
    model: PeftModel
    weights_file: Path
    layers: dict[str, BaseTunerLayer] = field(default_factory=dict)
    replaced: dict[str, torch.Tensor] = field(default_factory=dict)
    adapter_name: str = "default"


def _strip_peft_prefix(key: str) -> str:
    return key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key


def load_adapter_on_meta(
    adapter_dir: PathLike, base: PathLike | PretrainedConfig, use: Use, accepted: tuple[str, ...] = ("MORA", "LORA")
) -> LoadedAdapter:
    """Inject the adapter saved in ``adapter_dir`` into a meta copy of ``base`` (a model directory, or a loaded
    model's config) and load its tensors.

    The adapter's config is checked for ``use`` (``moraft.adapters.read_adapter_config``). Raises ``UserError``
    naming the file, the module and the shapes when the adapter does not fit the base, or its saved tensors do not
    have the shapes its adapter_config.json gives on that base (an edited ``r``, say). ``moraft merge``,
    ``moraft export-lora`` and ``moraft serve`` all check an adapter here.
    """
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir, use, accepted)
    config.inference_mode = True
    weights_file = adapter_weights_path(adapter_dir)
    model = meta_base_model(base, config.to_dict())
    try:
        with quiet_peft_deprecation():
            peft_model = PeftModel(model, config)
    except (ValueError, TypeError) as err:
        raise UserError(f"adapter {adapter_dir} does not fit the base model: {err}") from None
    except NotImplementedError as err:  # a method whose layers cannot be built on the meta device (SHiRA's mask)
        reason = first_line(err)[:120]
        raise UserError(
            f"adapter {adapter_dir}: peft_type={config.peft_type.value} cannot be built on an empty (meta) copy of the "
            f"base ({reason}), which {use} needs"
        ) from None
    loaded = LoadedAdapter(config=config, model=peft_model, weights_file=weights_file)
    if str(getattr(config.peft_type, "value", config.peft_type)) in ("MORA", "LORA"):
        _load_adapter_tensors(loaded, load_tensors(weights_file))
    else:
        _load_with_peft(loaded, load_tensors(weights_file), adapter_dir)
    return loaded


def _load_with_peft(loaded: LoadedAdapter, state: dict[str, torch.Tensor], adapter_dir: Path) -> None:
    """Another PEFT method's tensors put in by PEFT's own loader (its key renames, shared projections, masks): the
    adapter's own tensors are made real (empty) first, the base stays on meta. A tensor of the adapter that the file
    does not hold (one the method makes from the base weights and never saves) fails, naming it."""
    from peft.utils import set_peft_model_state_dict

    name = loaded.adapter_name
    if loaded.config.modules_to_save:
        raise UserError(
            f"{adapter_dir}: modules_to_save={loaded.config.modules_to_save!r} with peft_type="
            f"{loaded.config.peft_type.value}: only mora and lora adapters may carry whole modules here"
        )
    own: dict[str, int] = {}  # each adapter tensor's name -> its storage (a shared projection has several names)
    for module_name, module in loaded.model.named_modules(remove_duplicate=False):
        if isinstance(module, (nn.ModuleDict, nn.ParameterDict, BufferDict)) and name in module.keys():
            if any(t.is_meta for t in [*module.parameters(), *module.buffers()]):
                module.to_empty(device="cpu")
            tensors = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
            own.update({f"{module_name}.{n}": t.data_ptr() for n, t in tensors})
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        result = set_peft_model_state_dict(loaded.model, state, name)
    except (RuntimeError, KeyError, ValueError) as err:
        raise UserError(f"{loaded.weights_file}: the adapter does not fit the base model: {err}") from None
    saved = set(loaded.model.state_dict())  # a non-persistent buffer (OFT's block indices) is made at wrapping time
    built = sorted(key for key in own if key not in saved)
    if built:
        raise UserError(
            f"{adapter_dir}: {built[0]} is computed when {loaded.config.peft_type.value} wraps a real model and never "
            "saved, so the adapter cannot be applied on an empty copy of the base; load it with PEFT "
            "(PeftModel.from_pretrained) and use merge_and_unload() there"
        )
    missing = set(result.missing_keys)
    filled = {ptr for key, ptr in own.items() if key not in missing}
    unfilled = sorted(key for key, ptr in own.items() if key in missing and ptr not in filled)
    if unfilled:
        raise UserError(
            f"{adapter_dir}: {unfilled[0]} is not in {loaded.weights_file.name} ({loaded.config.peft_type.value} "
            "makes it from the base weights and does not save it), so the adapter cannot be applied from its file alone"
        )
    for module_name, module in loaded.model.named_modules():
        if isinstance(module, BaseTunerLayer):
            loaded.layers[_strip_peft_prefix(module_name)] = module


def _load_adapter_tensors(loaded: LoadedAdapter, state: dict[str, torch.Tensor]) -> None:
    """Put the file's tensors into the injected layers (float32) and collect whole-tensor replacements."""
    name, model, path = loaded.adapter_name, loaded.model, loaded.weights_file
    params = {}  # file key (PEFT saves without the adapter name) -> (parameter name in the model, parameter)
    for module_name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            loaded.layers[_strip_peft_prefix(module_name)] = module
            for param_name in module.adapter_layer_names:
                holder = getattr(module, param_name, None)
                if not isinstance(holder, (nn.ModuleDict, nn.ParameterDict)) or name not in holder:
                    continue
                for sub, param in (
                    holder[name].named_parameters() if isinstance(holder, nn.ModuleDict) else [("", holder[name])]
                ):
                    key = ".".join(p for p in (module_name, param_name, sub) if p)
                    params[key] = (".".join(p for p in (module_name, param_name, name, sub) if p), param)
    # where the file holds each parameter, by PEFT's own key mapping (it renames some, e.g. DoRA's magnitude vector)
    tuner = type(model.base_model)
    file_key_of = tuner._remap_adapter_state_dict_for_load(model, loaded.config, name, {k: k for k in state})
    assign = {}
    used = set()
    for key, (full, param) in params.items():
        key = file_key_of.get(full, key)
        if key not in state:
            raise UserError(f"{path} lacks {key}: the adapter does not fit the base model (no weights for that module)")
        tensor = state[key]
        if tuple(tensor.shape) != tuple(param.shape):
            module_name = key.rsplit(".", 2 if key.endswith(".weight") else 1)[0]
            layer = loaded.layers.get(_strip_peft_prefix(module_name))
            where = f" (the base's layer is {layer.out_features}x{layer.in_features})" if layer is not None else ""
            raise UserError(
                f"{path}: {key} has shape {tuple(tensor.shape)}, but on this base model{where} the adapter config "
                f"gives {tuple(param.shape)}: the adapter was trained on a base model with other layer shapes"
            )
        assign[full] = tensor.float()
        used.add(key)
    model.load_state_dict(assign, strict=False, assign=True)
    prefix = model.base_model.prefix
    for key, tensor in state.items():
        if key in used:
            continue
        if prefix in key:
            raise UserError(f"{path}: {key} matches no module this adapter's config adapts in the base model")
        # modules_to_save and trained biases are saved whole, under the base parameter's name
        base_key = _strip_peft_prefix(key).replace(".base_layer.", ".").replace(".modules_to_save.", ".")
        loaded.replaced[base_key] = tensor

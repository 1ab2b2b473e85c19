"""`MoraModel`: the PEFT tuner that puts `MoraLinear` layers into a model. PEFT does the rest (target matching,
saving, loading, several named adapters, ``merge_and_unload``)."""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _maybe_include_all_linear_layers
from peft.utils import (
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    get_quantization_kwargs,
    resolve_quantization_backend,
)
from peft.utils.other import AuxiliaryTrainingWrapper, get_pattern_key
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import UserError
from .config import MoraConfig
from .layer import MoraLayer, MoraLinear

try:  # PEFT >= 0.18
    from peft.tuners.tuners_utils import NoMatchingPeftModuleError
except ImportError:  # pragma: no cover
    NoMatchingPeftModuleError = ValueError  # type: ignore[misc,assignment]

SUPPORTED_LAYERS = (nn.Linear, Conv1D)


def adaptable_module_names(model: nn.Module) -> list[str]:
    """The distinct last name components of every Linear/Conv1D in ``model`` (what ``target_modules`` can name)."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, SUPPORTED_LAYERS) and name:
            names.add(name.split(".")[-1])
        elif isinstance(module, BaseTunerLayer):
            names.add(name.split(".")[-1])
    return sorted(names)


def all_linear_names(model: nn.Module, task_type: str | None = None) -> set[str]:
    """The last name components (``q_proj``, ...) of the modules PEFT's ``"all-linear"`` selects in ``model``: every
    Linear/Conv1D but the output head.

    PEFT expands "all-linear" into full module names, and a full name matches exactly, so ``layers_to_transform``
    never applies to it; the last components match as suffixes, and layers_to_transform then selects among them.
    """
    probe = MoraConfig(target_modules="all-linear", task_type=task_type)
    return {name.rsplit(".", 1)[-1] for name in _maybe_include_all_linear_layers(probe, model).target_modules}


def _adapter_names_pre_forward_hook(module, args, kwargs, adapter_names):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


class MoraModel(BaseTuner):
    """Adds MoRA adapters to a model; created by ``peft.get_peft_model(model, MoraConfig(...))``."""

    prefix: str = "mora_"
    tuner_layer_cls = MoraLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        config = self.peft_config[adapter_name]
        if config.target_modules == "all-linear" and config.layers_to_transform is not None:
            config.target_modules = all_linear_names(model, config.task_type)
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except NoMatchingPeftModuleError as err:
            config = self.peft_config[adapter_name]
            raise UserError(
                f"MoraConfig: target_modules={sorted(config.target_modules) if isinstance(config.target_modules, set) else config.target_modules!r} "
                f"matched no module of {type(model).__name__}. Modules that can be adapted: "
                f"{', '.join(adaptable_module_names(model))}. ({err})"
            ) from None
        self._check_layer_methods(model, adapter_name)

    def _check_layer_methods(self, model: nn.Module, adapter_name: str) -> None:
        """Refuse a ``layer_methods`` key that matches none of the adapted modules: it is a typo, or a regex that
        does not reach the end of the name (keys match like ``rank_pattern``'s, against the whole module name)."""
        config = self.peft_config[adapter_name]
        if not config.layer_methods:
            return
        adapted = [
            name for name, module in model.named_modules()
            if isinstance(module, MoraLayer) and adapter_name in module.mora_method
        ]
        for key in config.layer_methods:
            if not any(get_pattern_key([key], name) == key for name in adapted):
                example = adapted[0] if adapted else "(none)"
                raise UserError(
                    f"MoraConfig: layer_methods key {key!r} matches none of the adapted modules (e.g. {example!r}); "
                    "keys are regexes matched like rank_pattern's, against the end of the module name: "
                    r"'layers\.[12]\..*' for every module of layers 1 and 2, 'q_proj' for every q_proj"
                )

    def _create_and_replace(
        self,
        mora_config: MoraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if current_key is None:
            raise ValueError("current_key must not be None")
        r_key = get_pattern_key(mora_config.rank_pattern.keys(), current_key)
        rank_key = get_pattern_key(mora_config.mora_rank_pattern.keys(), current_key)
        r = mora_config.rank_pattern.get(r_key, mora_config.r)
        rank = mora_config.mora_rank_pattern.get(rank_key, mora_config.mora_rank)
        if isinstance(target, MoraLayer):
            target.update_layer(adapter_name, mora_config, r=r, rank=rank, module_name=current_key)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        quantization = get_quantization_kwargs(self)  # what a torchao base needs to quantize a merged weight again
        backend = resolve_quantization_backend(base, **quantization)
        # bitsandbytes' layers subclass nn.Linear; other quantized linear layers are known by PEFT's backend
        if not isinstance(base, SUPPORTED_LAYERS) and not (backend is not None and backend.layer_type == "linear"):
            raise UserError(  # a ValueError, as PEFT's LoRA raises for an unsupported target
                f"MoRA cannot adapt {current_key!r}: it is a {type(base).__module__}.{type(base).__name__}; "
                "supported layer types are torch.nn.Linear and transformers Conv1D. Remove it from target_modules."
            )
        new_module = MoraLinear(
            target,
            adapter_name,
            mora_config,
            r=r,
            rank=rank,
            fan_in_fan_out=isinstance(base, Conv1D),
            module_name=current_key,
            **quantization,
        )
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added, inactive adapter is not trained
        self._replace_module(parent, target_name, new_module, target)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any):
        """Route ``adapter_names=[...]`` (one per row) from ``model(...)``/``generate(...)`` to every MoRA layer."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError(
                "Cannot pass `adapter_names` when the model is in training mode. (It is for inference: call "
                "model.eval() first.)"
            )
        if not isinstance(adapter_names, (list, tuple)) or not all(isinstance(n, str) for n in adapter_names):
            raise TypeError(f"adapter_names must be a list of adapter names, got {adapter_names!r}")
        known = set()
        for module in self.modules():
            if isinstance(module, MoraLayer):
                known |= set(module.mora_method)
        unknown = sorted({n for n in adapter_names if n != "__base__"} - known)
        if unknown:
            raise ValueError(
                f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}. (Known: "
                f"{', '.join(sorted(known))}, and '__base__' for no adapter.)"
            )
        num_beams = kwargs.get("num_beams")
        if isinstance(num_beams, int) and num_beams > 1:
            adapter_names = [name for name in adapter_names for _ in range(num_beams)]
        hook = partial(_adapter_names_pre_forward_hook, adapter_names=list(adapter_names))
        handles = [
            module.register_forward_pre_hook(hook, with_kwargs=True)
            for module in self.modules()
            if isinstance(module, (MoraLayer, AuxiliaryTrainingWrapper))
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def delta_weights(self, adapter_name: str = "default") -> dict[str, torch.Tensor]:
        """ΔW (out, in) in float32 for every module adapted by ``adapter_name``, keyed by module name."""
        return {
            name: (module.get_delta_weight(adapter_name).T if module.fan_in_fan_out else module.get_delta_weight(adapter_name))
            for name, module in self.model.named_modules()
            if isinstance(module, MoraLayer) and adapter_name in module.mora_method
        }

"""The model and the method: load the base (a local directory or the built-in tiny LLaMA, quantized by bitsandbytes
or not), wrap it for MoRA, LoRA, DoRA or full fine-tuning, and ReMoRA/ReLoRA's merge-and-restart of the adapter.

ReMoRA / ReLoRA (https://arxiv.org/abs/2405.12130 §4.2, https://arxiv.org/abs/2307.05695): every N steps the adapter's
update ΔW is added to the frozen base weights and the adapter starts again from its initial state, so the sum of
the successive low-rank (or, for MoRA, block-structured) updates can reach a higher rank than any one of them. For
MoRA sharing, each restart switches the grouping of the operators (strided ↔ contiguous), so the next update lives
in a different subspace.
"""

from __future__ import annotations

import tempfile
from typing import Any

import torch
from peft import PeftConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft.tuners.lora import LoraLayer
from torch import nn

from .._peft_hook import quiet_peft_deprecation
from ..adapters import load_causal_lm
from ..errors import UserError, first_line
from ..mora import MoraConfig, MoraLayer, MoraOperator
from ..mora.model import adaptable_module_names, all_linear_names
from ..quantization import bnb_config, device_map, keep_4bit_layout, quantization_of
from .builtin import BUILTIN_MODEL, tiny_llama
from .options import AdapterOptions, ModelOptions
from .peft_methods import build_config, config_class, derive_knob, mapped_options
from .peft_methods import method as method_row

ADAPTER = "default"  # the adapter name PEFT gives the one adapter get_peft_model creates


def load_base(
    model: str,
    *,
    hidden_size: int = 128,
    num_layers: int = 4,
    model_seed: int = 0,
    dtype: torch.dtype | None = None,
    revision: str | None = None,
    local_files_only: bool = False,
    **from_pretrained: Any,
) -> tuple[nn.Module, object]:
    """The base causal LM and its tokenizer: ``builtin:tiny-llama``, or a model found by
    `moraft.adapters.resolve_model_dir` (a local directory, a built-in model, or a Hugging Face Hub id at
    ``revision``, downloaded unless ``local_files_only``), loaded by ``from_pretrained`` with the
    ``from_pretrained`` arguments given (e.g. ``quantization_config``)."""
    if model == BUILTIN_MODEL:
        base, tokenizer = tiny_llama(model_seed, hidden_size, num_layers)
        if from_pretrained:  # through transformers' own loading (its quantizer, ...)
            from transformers import AutoModelForCausalLM

            with tempfile.TemporaryDirectory(prefix="moraft-builtin-") as tmp:
                base.save_pretrained(tmp)
                del base
                base = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype or torch.float32, **from_pretrained)
        base.name_or_path = base.config._name_or_path = BUILTIN_MODEL  # PEFT saves it as base_model_name_or_path
        return base, tokenizer
    base, tokenizer = load_causal_lm(
        model, dtype=dtype or torch.float32, what="model", alternatives=f", or {BUILTIN_MODEL!r}", revision=revision,
        local_files_only=local_files_only, **from_pretrained
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding positions are masked out of attention and loss
    return base, tokenizer


def load_model(options: ModelOptions) -> tuple[nn.Module, object]:
    """The base model of a run and its tokenizer, as ``options`` say: `load_base`, and with ``options.quantization``
    quantized by bitsandbytes through transformers (``from_pretrained`` with a ``BitsAndBytesConfig``; the built-in
    model is saved to a temporary directory and loaded from there), then PEFT's ``prepare_model_for_kbit_training``:
    every weight frozen, the unquantized ones (embeddings, norms, output head) in float32. Gradient checkpointing
    is the trainer's (optimization.gradient_checkpointing, non-reentrant, which needs no input gradients). 4-bit
    weights keep bitsandbytes' own layout on the CPU (`moraft.quantization.keep_4bit_layout`).

    The model's ``name_or_path`` (saved as the adapter's base_model_name_or_path) stays the unquantized base's.
    ``options.attn_implementation``, when given, replaces the model's attention kernel (transformers'
    ``set_attn_implementation``).
    """
    config = bnb_config(options.quantization, options.quant_type, options.double_quant, options.compute_dtype)
    builtin = dict(hidden_size=options.builtin_hidden_size, num_layers=options.builtin_num_layers,
                   model_seed=options.seed, revision=options.revision, local_files_only=options.local_files_only)
    if config is None:
        model, tokenizer = load_base(options.name_or_path, **builtin)
    else:
        model, tokenizer = load_base(options.name_or_path, **builtin, quantization_config=config,
                                     device_map=device_map())
        model = prepare_model_for_kbit_training(keep_4bit_layout(model), use_gradient_checkpointing=False)
    if options.attn_implementation is not None:
        try:
            model.set_attn_implementation(options.attn_implementation)
        except (ImportError, ValueError) as err:
            raise UserError(
                f"model.attn_implementation={options.attn_implementation!r} cannot be used: {str(err).splitlines()[0]}"
            ) from None
    return model, tokenizer


def peft_config(options: AdapterOptions, model: nn.Module | None = None) -> PeftConfig:
    """The PEFT config of ``options.method`` for ``model`` (see `moraft.train.peft_methods`).

    PEFT's LoraConfig refuses ``layers_to_transform`` with a string ``target_modules``, "all-linear" included; as that
    is a shorthand, not a regex, it is then expanded here (``all_linear_names``), and always for ia3. The method's
    size knob is derived from ``options.r`` (`moraft.train.peft_methods.derive_knob`) on a meta copy of ``model``.
    """
    row = method_row(options.method)
    target_modules = options.target_modules
    # ia3 too: PEFT 0.21 saves an "all-linear" IA³ adapter with full module names and its default
    # feedforward_modules suffixes, which its own config check then refuses when the adapter is loaded
    expand = options.layers_to_transform is not None or options.method == "ia3"
    if target_modules == "all-linear" and expand and model is not None:
        target_modules = sorted(all_linear_names(model, "CAUSAL_LM"))
    common = dict(
        target_modules=target_modules,
        exclude_modules=options.exclude_modules,
        layers_to_transform=options.layers_to_transform,
        layers_pattern=options.layers_pattern,
        modules_to_save=options.modules_to_save,
    )
    if options.method == "mora":
        return MoraConfig(
            **common,
            r=options.r,
            rank_pattern=dict(options.rank_pattern),
            task_type="CAUSAL_LM",
            dropout=options.dropout,
            compression=options.compression,
            mora_rank=options.mora_rank,
            mora_rank_pattern=dict(options.mora_rank_pattern),
            input_grouping=options.input_grouping,
            output_grouping=options.output_grouping,
            init_weights=options.init_weights,
            peft_mora_compat=options.peft_mora_compat,
            layer_methods=dict(options.layer_methods),
            lora_alpha=options.lora_alpha,
        )
    kwargs = mapped_options(row, options, common)
    if options.method in ("lora", "dora"):
        kwargs.setdefault("lora_alpha", options.effective_lora_alpha)
    if model is not None:
        derive_knob(row, model, options.r, common, kwargs)
    return build_config(config_class(row), {**kwargs, "task_type": "CAUSAL_LM"}, options.method)


def apply_method(model: nn.Module, options: AdapterOptions) -> nn.Module:
    """``model`` ready to train with ``options.method``: a ``PeftModel``, or the model itself for ``full``.

    A quantized base (`load_model`) takes an adapter only: full fine-tuning has no gradients for its weights, and
    ReMoRA/ReLoRA's merges (merge_every) would round each update onto the quantization grid, losing most of it.
    """
    quantization = quantization_of(model)
    if quantization != "none" and options.method == "full":
        # transformers' Trainer refuses this too, in these words
        raise UserError(
            f"adapter.method='full': you cannot perform fine-tuning on purely quantized models "
            f"(model.quantization={quantization!r}); train an adapter (mora, lora or dora) on it, or fine-tune the "
            "unquantized base fully"
        )
    if quantization != "none" and options.merge_every:
        raise UserError(
            f"adapter.merge_every={options.merge_every}: ReMoRA/ReLoRA merge the adapter into the base weights, which "
            f"are quantized here (model.quantization={quantization!r}), and rounding to their grid loses most of "
            "each merged update; use adapter.merge_every=0, or an unquantized base"
        )
    on_cpu = next(model.parameters()).device.type == "cpu"
    dora = options.method == "dora" or "dora" in options.layer_methods.values()
    if quantization == "8bit" and dora and on_cpu:
        # PEFT 0.21's DoRA reads the weight norm through dequantize_module_weight, which on the CPU puts back an
        # Int8Params without its scales (bitsandbytes moved them to the layer's state); the next forward fails
        raise UserError(
            f"adapter.method={options.method!r}{' with DoRA layer_methods' if options.method == 'mora' else ''} does "
            "not train on an 8-bit base on the CPU (PEFT's DoRA drops the 8-bit weight's scales after the first step "
            "there); use model.quantization='4bit', or method lora or mora"
        )
    if options.method == "full":
        model.requires_grad_(True)
        return model
    try:
        config = peft_config(options, model)  # its LoRA budget is measured on the same targets, so it fails alike
        with quiet_peft_deprecation():
            return get_peft_model(model, config)
    except ValueError as err:
        if "not found in the base model" in str(err) or "No modules were targeted" in str(err):
            raise UserError(
                f"adapter.target_modules={options.target_modules!r} matched no module of {type(model).__name__}. Modules "
                f"that can be adapted: {', '.join(adaptable_module_names(model))}"
            ) from None
        if options.method in ("mora", "lora", "dora"):
            raise
        # another method's check of a layer (a block size that does not divide it, ...): PEFT's message, one line
        raise UserError(f"adapter.method={options.method!r}: {first_line(err)}") from None


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


# -- ReMoRA / ReLoRA -----------------------------------------------------------------------------------------------

_OTHER_GROUPING = {"strided": "contiguous", "contiguous": "strided"}


@torch.no_grad()
def merge_and_restart(model: PeftModel, *, switch_grouping: bool = True, seed: int = 0) -> list[nn.Parameter]:
    """Add the adapter's ΔW to the base weights and put the adapter back to its initial state.

    MoRA: M = 0 and, for sharing with ``switch_grouping``, the operators switch between strided and contiguous
    grouping (the saved ``adapter_config.json`` follows). LoRA: A gets PEFT's Kaiming init from a generator seeded
    with ``seed`` (the same on every rank, and without touching the training RNG), B = 0. The model computes the
    same function before and after (up to rounding). Returns the re-initialized parameters, whose optimizer state
    the caller resets.
    """
    config = model.peft_config[ADAPTER]
    switch = isinstance(config, MoraConfig) and config.compression == "sharing" and switch_grouping
    if switch:  # the config first: each layer's new operator is built from it
        config.input_grouping = _OTHER_GROUPING[config.input_grouping]
        config.output_grouping = _OTHER_GROUPING[config.output_grouping]
    restarted: list[nn.Parameter] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in model.modules():
            restarted += _restart_layer(module, config if switch else None)
    return restarted


def _restart_layer(module: nn.Module, switched: MoraConfig | None) -> list[nn.Parameter]:
    """Merge one tuner layer's adapter into its base weight and re-initialize it (with the operator of the
    ``switched`` config, when given); its restarted parameters."""
    if isinstance(module, MoraLayer) and module.mora_method.get(ADAPTER, "mora") != "mora":
        return _restart_lora_part(module)
    if isinstance(module, MoraLayer) and ADAPTER in module.mora_M:
        module.merge(adapter_names=[ADAPTER])
        module.merged_adapters.remove(ADAPTER)  # ΔW now belongs to the base weight for good
        module.mora_M[ADAPTER].zero_()
        if switched is not None:
            op = module.mora_operator[ADAPTER]
            module.mora_operator[ADAPTER] = MoraOperator.from_config(
                switched, op.in_features, op.out_features, rank=op.rank
            )
        return [module.mora_M[ADAPTER]]
    if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
        module.merge(adapter_names=[ADAPTER])
        module.merged_adapters.remove(ADAPTER)
        module.reset_lora_parameters(ADAPTER, init_lora_weights=True)
        return [module.lora_A[ADAPTER].weight, module.lora_B[ADAPTER].weight]
    return []


def _restart_lora_part(module: MoraLayer) -> list[nn.Parameter]:
    """A LoRA/DoRA module of a mixed MoRA adapter: merged, then A = PEFT's Kaiming init, B = 0, and for DoRA the
    magnitude = the row norms of the merged weight, so that the restarted module computes the merged weight exactly
    as a fresh DoRA on it would."""
    module.merge(adapter_names=[ADAPTER])
    module.merged_adapters.remove(ADAPTER)
    module._dora_merged.pop(ADAPTER, None)  # ΔW now belongs to the base weight for good
    module.reset_lora_part(ADAPTER)
    a, b = module.mora_lora_A[ADAPTER].weight, module.mora_lora_B[ADAPTER].weight
    restarted = [a, b]
    if module.mora_method[ADAPTER] == "dora":
        dora = module.mora_magnitude[ADAPTER]
        weight = module.get_base_weight().detach().float()
        dora.weight.copy_(dora.get_weight_norm(weight, torch.zeros_like(b @ a), scaling=1).to(dora.weight.dtype))
        restarted.append(dora.weight)
    return restarted

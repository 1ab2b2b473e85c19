"""`MoraConfig`: the one dataclass saved beside a MoRA adapter's weights (``adapter_config.json``)."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig
from peft.utils.other import get_pattern_key

from .._peft_hook import MORA
from ..errors import UserError
from .operators import COMPRESSIONS, GROUPINGS

LAYER_METHODS = ("lora", "dora")


@dataclass
class MoraConfig(PeftConfig):
    """Configuration of a MoRA adapter (https://arxiv.org/abs/2405.12130).

    Each targeted layer W0 (d × k) gets one trainable square matrix M (r̂ × r̂), with r̂ chosen so that M has the
    parameters of a LoRA of rank ``r`` on that layer: r̂ = round(sqrt((d + k)·r)). MoRA has no ``alpha``: its scale
    is 1. Every field is validated; a bad value raises `moraft.errors.UserError` (a ``ValueError``) naming it and
    what is accepted.

    Each field is documented once, in its ``metadata["help"]`` as PEFT's own configs do; the docs' configuration
    reference is generated from those.
    """

    r: int = field(
        default=8,
        metadata={
            "help": "The LoRA rank whose parameter budget MoRA matches, per layer (r=8 on a 4096×4096 layer gives "
            "r̂=256, 65,536 parameters). An integer >= 1."
        },
    )
    mora_rank: Optional[int] = field(
        default=None,
        metadata={"help": "An explicit r̂ for every targeted layer instead of deriving it from r (even for rotation)."},
    )
    compression: str = field(
        default="sharing",
        metadata={
            "help": "The fixed operators around M: sharing (sum input chunks, tile outputs; rank(ΔW) <= r̂; "
            "recommended for large r), rotation (RoPE-rotated input blocks; ΔW can be full rank; recommended for "
            "small r such as 8), decouple (block-diagonal copies of M), truncation (M in the top-left corner; the "
            "paper's weakest baseline)."
        },
    )
    input_grouping: str = field(
        default="strided",
        metadata={
            "help": "sharing only. strided: input feature i is summed into group i mod r̂ (the paper's default); "
            "contiguous: consecutive features share a group (ReMoRA alternates the two)."
        },
    )
    output_grouping: str = field(
        default="strided",
        metadata={
            "help": "sharing only. strided: the r̂ outputs are tiled to fill d; contiguous: each output is repeated "
            "in place."
        },
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Module names to adapt: a list (exact names or name suffixes), a regex matched against the full "
            "module name, or 'all-linear' (every Linear/Conv1D except the output head). None uses the "
            "architecture's default (as PEFT's LoRA does)."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names (a list) or a regex never to adapt."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt these layer indices (an int or a list of ints)."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "The name of the module list holding the layers (e.g. 'layers'), with layers_to_transform."},
    )
    rank_pattern: dict = field(
        default_factory=dict, metadata={"help": "Per-module overrides of r: {regex or suffix: r}."}
    )
    mora_rank_pattern: dict = field(
        default_factory=dict, metadata={"help": "Per-module overrides of r̂: {regex or suffix: r̂}."}
    )
    dropout: float = field(
        default=0.0, metadata={"help": "Dropout probability applied to the adapter's input, in [0, 1)."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Modules besides the adapted ones to train fully and save (e.g. ['lm_head'])."},
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True starts M at zero (the model is unchanged at step 0, as in the paper). False starts it "
            "random; only useful for tests."
        },
    )
    layer_methods: dict = field(
        default_factory=dict,
        metadata={
            "help": "Per-module method: {regex or suffix: 'lora' | 'dora'}, keys matched like rank_pattern's (a module "
            "matching no key uses MoRA). The LoRA/DoRA modules have rank r (rank_pattern applies) and PEFT's LoRA "
            "math, init and DoRA magnitude; they are saved in the same adapter directory, with the 'mora_' prefix."
        },
    )
    lora_alpha: Optional[float] = field(
        default=None,
        metadata={
            "help": "LoRA/DoRA modules of layer_methods only: the scaling is lora_alpha / r (lora_alpha / sqrt(r) "
            "with use_rslora). None means 2·r, moraft train's convention (a scaling of 2)."
        },
    )
    use_rslora: bool = field(
        default=False,
        metadata={"help": "LoRA/DoRA modules of layer_methods only: scale by lora_alpha / sqrt(r) (rsLoRA)."},
    )
    peft_mora_compat: bool = field(
        default=False,
        metadata={
            "help": "Reproduce peft-mora's output truncation (rotation with k > d drops the block outputs past d). "
            "Set by convert_peft_mora; leave it off for new adapters."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = MORA
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = set(self.exclude_modules)
        self._validate()

    def _validate(self) -> None:
        def positive_int(name: str, value, what: str = "an integer >= 1") -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"MoraConfig: {name}={value!r} is invalid; expected {what}")

        positive_int("r", self.r)
        if self.mora_rank is not None:
            positive_int("mora_rank", self.mora_rank, "None or an integer >= 1 (r̂)")
            if self.compression == "rotation" and self.mora_rank % 2:
                raise UserError(
                    f"MoraConfig: mora_rank={self.mora_rank} is odd; compression='rotation' pairs features and "
                    "needs an even r̂"
                )
        if self.compression not in COMPRESSIONS:
            raise UserError(
                f"MoraConfig: compression={self.compression!r} is not one of {', '.join(COMPRESSIONS)} "
                "(peft-mora's numbered types: 1 = sharing, 6 = rotation; use moraft.convert_peft_mora for their "
                "checkpoints)"
            )
        for name in ("input_grouping", "output_grouping"):
            value = getattr(self, name)
            if value not in GROUPINGS:
                raise UserError(f"MoraConfig: {name}={value!r} is not one of {', '.join(GROUPINGS)}")
            if value != "strided" and self.compression != "sharing":
                raise UserError(
                    f"MoraConfig: {name}={value!r} only applies to compression='sharing', not {self.compression!r}"
                )
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise UserError(f"MoraConfig: dropout={self.dropout!r} is invalid; expected a number in [0, 1)")
        for name in ("rank_pattern", "mora_rank_pattern"):
            pattern = getattr(self, name)
            if not isinstance(pattern, dict):
                raise UserError(f"MoraConfig: {name}={pattern!r} is invalid; expected a dict {{pattern: int}}")
            for key, value in pattern.items():
                positive_int(f"{name}[{key!r}]", value)
        if self.target_modules is not None and not isinstance(self.target_modules, (str, set)):
            raise UserError(
                f"MoraConfig: target_modules={self.target_modules!r} is invalid; expected a list of module names, "
                "a regex string, 'all-linear' or None"
            )
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            try:
                re.compile(self.target_modules)
            except re.error as err:
                raise UserError(f"MoraConfig: target_modules={self.target_modules!r} is not a valid regex: {err}")
        if self.layers_to_transform is not None:
            layers = self.layers_to_transform
            layers = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
            if not isinstance(layers, list) or not all(isinstance(i, int) and i >= 0 for i in layers):
                raise UserError(
                    f"MoraConfig: layers_to_transform={self.layers_to_transform!r} is invalid; expected a "
                    "non-negative int or a list of them"
                )
            if isinstance(self.target_modules, str) and self.target_modules != "all-linear":  # a shorthand, not a regex
                raise UserError(
                    f"MoraConfig: layers_to_transform cannot be combined with a regex target_modules "
                    f"({self.target_modules!r}); name the modules in a list, or use 'all-linear'"
                )
        if self.modules_to_save is not None and not (
            isinstance(self.modules_to_save, list) and all(isinstance(m, str) for m in self.modules_to_save)
        ):
            raise UserError(f"MoraConfig: modules_to_save={self.modules_to_save!r} is invalid; expected a list of names")
        if not isinstance(self.init_weights, bool):
            raise UserError(f"MoraConfig: init_weights={self.init_weights!r} is invalid; expected True or False")
        self._validate_layer_methods()

    def _validate_layer_methods(self) -> None:
        if not isinstance(self.layer_methods, dict):
            raise UserError(
                f"MoraConfig: layer_methods={self.layer_methods!r} is invalid; expected a dict "
                "{regex: 'lora' | 'dora'}"
            )
        for key, method in self.layer_methods.items():
            if method not in LAYER_METHODS:
                raise UserError(
                    f"MoraConfig: layer_methods[{key!r}]={method!r} is not one of {', '.join(LAYER_METHODS)} "
                    "(modules matching no key use MoRA)"
                )
            try:
                re.compile(key)
            except (re.error, TypeError) as err:
                raise UserError(f"MoraConfig: layer_methods key {key!r} is not a valid regex: {err}") from None
        alpha = self.lora_alpha
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0):
            raise UserError(f"MoraConfig: lora_alpha={alpha!r} is invalid; expected None (2·r) or a number > 0")
        if not isinstance(self.use_rslora, bool):
            raise UserError(f"MoraConfig: use_rslora={self.use_rslora!r} is invalid; expected True or False")
        if not self.layer_methods and (alpha is not None or self.use_rslora):
            # as PEFT warns about options that its config will not use
            warnings.warn(
                "MoraConfig: lora_alpha and use_rslora only apply to the LoRA/DoRA modules of layer_methods, which is "
                "empty: they are ignored"
            )
        if self.layer_methods and self.peft_mora_compat:
            raise UserError(
                "MoraConfig: layer_methods cannot be combined with peft_mora_compat (peft-mora had no LoRA)"
            )

    def method_of(self, module_name: str) -> str:
        """The method of module ``module_name``: ``"mora"``, or the value of its ``layer_methods`` key."""
        key = get_pattern_key(self.layer_methods.keys(), module_name)
        return self.layer_methods.get(key, "mora")

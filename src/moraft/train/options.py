"""`TrainOptions`: every option of ``moraft train``, in five groups; each field's docstring is its ``--help``.

The groups are the model (`ModelOptions`), the data (`DataOptions`), the adapter (`AdapterOptions`), the
optimization (`OptimizationOptions`) and the outputs (`OutputOptions`). The same classes are:

- the command line: ``moraft train --adapter.method lora --adapter.r 8 --optimization.max_steps 100``, where a group
  name alone sets its main option (``--model DIR``, ``--data FILE``, ``--adapter METHOD``, ``--output DIR``);
- the YAML file of ``--config run.yaml``: one mapping per group (``adapter: {method: lora, r: 8}``);
- the Python API: ``train(TrainOptions(adapter=AdapterOptions(method="lora"), output=OutputOptions(dir="runs/a")))``;
- the resolved config saved beside the adapter (``train_config.yaml``, read back by `TrainOptions.from_dict`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional, Union

from ..adapters import DTYPES
from ..errors import UserError
from ..mora.operators import COMPRESSIONS, GROUPINGS
from ..quantization import QUANT_TYPES, QUANTIZATIONS
from .builtin import BUILTIN_MODEL
from .data import FORMATS, UUID_MEMORY

METHODS = ("mora", "lora", "dora", "full")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")


@dataclass
class _Group:
    """What every option group shares: checks whose errors name the flag (``adapter.r=0 is invalid; ...``)."""

    GROUP: ClassVar[str]
    SHORTCUT: ClassVar[Optional[str]] = None  # the option ``--GROUP VALUE`` sets (``--data x.jsonl``), if any

    def _fail(self, name: str, expected: str) -> None:
        raise UserError(f"{self.GROUP}.{name}={getattr(self, name)!r} is invalid; expected {expected}")

    def _check(self, ok: bool, name: str, expected: str) -> None:
        if not ok:
            self._fail(name, expected)

    def _choice(self, name: str, choices: tuple[str, ...]) -> None:
        self._check(getattr(self, name) in choices, name, f"one of {', '.join(choices)}")

    def _integer(self, name: str, minimum: int) -> None:
        value = getattr(self, name)
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
        self._check(ok, name, f"an integer >= {minimum}")

    def validate(self) -> None:
        """Raise `moraft.errors.UserError` naming the first invalid option of the group and what it accepts."""


@dataclass
class ModelOptions(_Group):
    """The base model."""

    GROUP: ClassVar[str] = "model"
    SHORTCUT: ClassVar[Optional[str]] = "name_or_path"

    name_or_path: str = BUILTIN_MODEL
    """A transformers causal LM: a local directory or a model already in the local Hugging Face cache (never
    downloaded); or "builtin:tiny-llama", a random-init LLaMA made in code with a character-level tokenizer."""
    builtin_hidden_size: int = 128
    """builtin:tiny-llama: its width (a multiple of 4, its number of attention heads)."""
    builtin_num_layers: int = 4
    """builtin:tiny-llama: its decoder layers."""
    seed: int = 0
    """builtin:tiny-llama: the seed of its random weights (the same seed gives the same base model)."""
    quantization: Literal["none", "4bit", "8bit"] = "none"
    """Load the base quantized by bitsandbytes and train the adapter on it (QMoRA, QLoRA): 4bit (NF4 or FP4, as
    QLoRA) or 8bit (LLM.int8), or none. The adapter is saved as usual and merges into the unquantized base
    (moraft merge). Needs bitsandbytes; not with adapter.method full or adapter.merge_every."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4bit: the 4-bit data type, nf4 (NormalFloat, QLoRA's) or fp4."""
    double_quant: bool = False
    """4bit: quantize the per-block scales too (QLoRA's double quantization: about 0.37 bits less per weight)."""
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """4bit: the dtype the 4-bit weights are dequantized to for each matrix product."""

    FOUR_BIT_ONLY: ClassVar[tuple[str, ...]] = ("quant_type", "double_quant", "compute_dtype")

    def validate(self) -> None:
        for name in ("builtin_hidden_size", "builtin_num_layers"):
            self._integer(name, 1)
        self._check(self.builtin_hidden_size % 4 == 0, "builtin_hidden_size", "a multiple of 4 (4 attention heads)")
        self._choice("quantization", QUANTIZATIONS)
        self._choice("quant_type", QUANT_TYPES)
        self._check(isinstance(self.double_quant, bool), "double_quant", "true or false")
        self._choice("compute_dtype", tuple(DTYPES))
        if self.quantization != "4bit":
            default = ModelOptions()
            for name in self.FOUR_BIT_ONLY:
                if getattr(self, name) != getattr(default, name):
                    raise UserError(
                        f"model.{name} is a 4bit option; it does nothing with quantization={self.quantization!r}"
                    )


@dataclass
class DataOptions(_Group):
    """The training (and evaluation) data."""

    GROUP: ClassVar[str] = "data"
    SHORTCUT: ClassVar[Optional[str]] = "dataset"

    dataset: str = UUID_MEMORY
    """"uuid-memory" (num_pairs random UUID pairs "key:value" made from the seed; loss over the whole sequence, as in
    the paper's memory task), or a path: a JSONL file of chat ({"messages": [...]}, loss on the assistant turns) or
    prompt/completion ({"prompt", "completion"}, loss on the completion) records, or a text file / directory of
    *.txt files (continual pretraining, packed into seq_length blocks)."""
    format: Literal["auto", "chat", "prompt-completion", "text"] = "auto"
    """How to read the dataset: auto (chat or prompt-completion from the JSONL keys; text for other files), chat,
    prompt-completion or text."""
    seq_length: int = 512
    """The longest example in tokens (longer ones are cut, with a warning); the block length for text."""
    num_pairs: int = 128
    """uuid-memory: how many pairs."""
    seed: int = 0
    """uuid-memory: the seed of the pairs."""
    eval_dataset: Optional[str] = None
    """A held-out file in the same format as the dataset: its loss and perplexity are logged every
    output.eval_steps."""

    def validate(self) -> None:
        self._choice("format", FORMATS)
        for name in ("seq_length", "num_pairs"):
            self._integer(name, 1)


@dataclass
class AdapterOptions(_Group):
    """The method and its adapter."""

    GROUP: ClassVar[str] = "adapter"
    SHORTCUT: ClassVar[Optional[str]] = "method"

    method: Literal["mora", "lora", "dora", "full"] = "mora"
    """mora, lora (PEFT's LoRA), dora (PEFT's LoRA with use_dora) or full (every weight trained)."""
    r: int = 8
    """The rank. LoRA/DoRA: the rank. MoRA: the LoRA rank whose parameter budget M matches
    (r̂ = round(sqrt((d+k)·r)) per layer), so mora and lora at the same r train the same number of parameters."""
    target_modules: Union[list[str], str] = "all-linear"
    """Modules to adapt: a list of names (or name suffixes), a regex on the full module name, or "all-linear"
    (every linear layer but the output head)."""
    exclude_modules: Optional[Union[list[str], str]] = None
    """Module names (a list) or a regex never to adapt."""
    layers_to_transform: Optional[list[int]] = None
    """Only adapt these layer indices."""
    layers_pattern: Optional[str] = None
    """The name of the layer list (e.g. "layers"), with layers_to_transform."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module r overrides, {regex or suffix: r}."""
    dropout: float = 0.0
    """Dropout on the adapter's input."""
    modules_to_save: Optional[list[str]] = None
    """Other modules to train fully and save with the adapter (e.g. [embed_tokens, lm_head])."""
    lora_alpha: Optional[float] = None
    """lora/dora: the scaling numerator (scale = lora_alpha / r); None means 2·r."""
    compression: Literal["sharing", "rotation", "decouple", "truncation"] = "sharing"
    """mora: the fixed operators around M: sharing, rotation, decouple or truncation (see `moraft.MoraConfig`; the
    paper recommends rotation for small r, sharing for large r)."""
    mora_rank: Optional[int] = None
    """mora: an explicit r̂ for every layer instead of deriving it from r."""
    mora_rank_pattern: dict[str, int] = field(default_factory=dict)
    """mora: per-module r̂ overrides, {regex or suffix: r̂}."""
    input_grouping: Literal["strided", "contiguous"] = "strided"
    """mora sharing: strided (feature i goes to group i mod r̂) or contiguous."""
    output_grouping: Literal["strided", "contiguous"] = "strided"
    """mora sharing: strided (outputs tiled) or contiguous (each output repeated in place)."""
    init_weights: bool = True
    """mora: True starts M at zero (the model is unchanged at step 0). lora/dora: PEFT's usual init."""
    peft_mora_compat: bool = False
    """mora: reproduce peft-mora's rotation output truncation (for adapters converted from it)."""
    merge_every: int = 0
    """ReMoRA / ReLoRA: every N optimizer steps merge the adapter into the base weights, re-initialize it (M = 0;
    LoRA's usual init), reset its optimizer state, restart the learning rate with a warmup of merge_warmup_steps
    and, for mora sharing, switch between strided and contiguous grouping. 0: never. Each merged adapter is kept in
    output.dir/merges/step-N/; the final adapter alone is not the whole update: load the result with `moraft eval`
    or `moraft.train.load_trained`."""
    merge_warmup_steps: Optional[int] = None
    """Steps of linear warmup after each merge; None means max(1, merge_every // 10)."""
    switch_grouping: bool = True
    """mora sharing with merge_every: alternate the grouping at each merge (the paper's ReMoRA)."""

    MORA_ONLY: ClassVar[tuple[str, ...]] = (
        "compression", "mora_rank", "mora_rank_pattern", "input_grouping", "output_grouping"
    )

    def validate(self) -> None:
        self._choice("method", METHODS)
        self._choice("compression", COMPRESSIONS)
        self._choice("input_grouping", GROUPINGS)
        self._choice("output_grouping", GROUPINGS)
        self._integer("r", 1)
        self._integer("merge_every", 0)
        self._check(0 <= self.dropout < 1, "dropout", "a number in [0, 1)")
        self._check(self.lora_alpha is None or self.lora_alpha > 0, "lora_alpha", "None or a number > 0")
        self._check(self.mora_rank is None or self.mora_rank >= 1, "mora_rank", "None or an integer >= 1")
        self._check(
            self.merge_warmup_steps is None or self.merge_warmup_steps >= 1, "merge_warmup_steps", "None or >= 1"
        )
        for name in ("rank_pattern", "mora_rank_pattern"):
            ok = all(isinstance(v, int) and v >= 1 for v in getattr(self, name).values())
            self._check(ok, name, "{pattern: int >= 1}")
        if self.method != "mora":
            default = AdapterOptions()
            for name in self.MORA_ONLY:
                if getattr(self, name) != getattr(default, name):
                    raise UserError(f"adapter.{name} is a mora option; it does nothing with method={self.method!r}")
        if self.merge_every:
            expected = "0 with method dora or full (ReMoRA/ReLoRA merge mora or lora adapters)"
            self._check(self.method in ("mora", "lora"), "merge_every", expected)

    @property
    def effective_lora_alpha(self) -> float:
        """lora_alpha, or its default 2·r."""
        return self.lora_alpha if self.lora_alpha is not None else 2 * self.r

    @property
    def effective_merge_warmup(self) -> int:
        """merge_warmup_steps, or its default max(1, merge_every // 10)."""
        return self.merge_warmup_steps if self.merge_warmup_steps is not None else max(1, self.merge_every // 10)


@dataclass
class OptimizationOptions(_Group):
    """The optimizer, its schedule and the batch (what Trainer's TrainingArguments receive)."""

    GROUP: ClassVar[str] = "optimization"

    learning_rate: float = 3e-4
    """The peak learning rate (> 0)."""
    lr_scheduler: Literal[
        "linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial"
    ] = "linear"
    """The schedule after the warmup."""
    warmup_steps: int = 0
    """Steps of linear warmup at the start."""
    weight_decay: float = 0.0
    """AdamW's weight decay."""
    epochs: float = 3.0
    """Passes over the data (ignored when max_steps > 0)."""
    max_steps: int = -1
    """Optimizer steps to run; -1 means use epochs."""
    batch_size: int = 32
    """Examples per device per forward pass."""
    gradient_accumulation_steps: int = 1
    """Forward passes per optimizer step."""
    max_grad_norm: float = 1.0
    """The gradient clipping norm (0: none)."""
    bf16: bool = False
    """bf16 mixed precision."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    seed: int = 0
    """The seed of the data order, dropout and the adapter's initialization."""

    def validate(self) -> None:
        self._choice("lr_scheduler", SCHEDULERS)
        for name in ("batch_size", "gradient_accumulation_steps"):
            self._integer(name, 1)
        self._integer("warmup_steps", 0)
        self._check(self.max_steps == -1 or self.max_steps >= 1, "max_steps", "-1 (use epochs) or an integer >= 1")
        self._check(self.max_steps > 0 or self.epochs > 0, "epochs", "> 0 when max_steps is -1")
        self._check(self.learning_rate > 0, "learning_rate", "a number > 0")
        self._check(self.weight_decay >= 0, "weight_decay", "a number >= 0")
        self._check(self.max_grad_norm >= 0, "max_grad_norm", "a number >= 0 (0: no clipping)")


@dataclass
class OutputOptions(_Group):
    """Where the run is written, checkpoints and logging."""

    GROUP: ClassVar[str] = "output"
    SHORTCUT: ClassVar[Optional[str]] = "dir"

    dir: str = "runs/train"
    """Where everything is written (created; must be empty unless resume or overwrite)."""
    overwrite: bool = False
    """Delete what dir holds before training."""
    resume: bool = False
    """Continue from the last checkpoint-N in dir (pass the same options, e.g. with
    --config DIR/train_config.yaml)."""
    save_steps: int = 500
    """Write a checkpoint every N steps (0: only the final adapter)."""
    save_total_limit: Optional[int] = 2
    """Keep at most this many checkpoints (None: all)."""
    logging_steps: int = 10
    """Log the loss, learning rate and tokens/s every N steps."""
    eval_steps: int = 0
    """Evaluate every N steps (uuid-memory: character accuracy and exact match by greedy generation;
    data.eval_dataset: loss and perplexity); 0: only at the end."""

    def validate(self) -> None:
        self._integer("logging_steps", 1)
        for name in ("save_steps", "eval_steps"):
            self._integer(name, 0)
        self._check(self.save_total_limit is None or self.save_total_limit >= 1, "save_total_limit", "None or >= 1")
        if self.overwrite and self.resume:
            raise UserError("output.overwrite and output.resume contradict each other; pass one")


@dataclass
class TrainOptions:
    """Fine-tune a model with MoRA, LoRA, DoRA or full fine-tuning (Hugging Face Trainer underneath).

    Options come from flags (--adapter.r 8), a YAML file (--config FILE, one mapping per group), or both; flags win.
    With no options it trains MoRA r=8 on the built-in uuid-memory task with the built-in tiny LLaMA, offline. Runs
    under `torchrun`/`accelerate launch` like any Trainer script. Writes to output.dir: the adapter (never a copy
    of the base; the whole model for method=full), the tokenizer, train_config.yaml (these options, resolved),
    metrics.jsonl, loss.png and checkpoint-N/ directories for --output.resume.
    """

    # each group's help is its class's docstring
    model: ModelOptions = field(default_factory=ModelOptions)
    data: DataOptions = field(default_factory=DataOptions)
    adapter: AdapterOptions = field(default_factory=AdapterOptions)
    optimization: OptimizationOptions = field(default_factory=OptimizationOptions)
    output: OutputOptions = field(default_factory=OutputOptions)

    def groups(self) -> dict[str, _Group]:
        """The five option groups by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def validate(self) -> None:
        """Raise `moraft.errors.UserError` naming the first invalid option and what it accepts."""
        for name, group in self.groups().items():
            cls = next(f.type for f in dataclasses.fields(self) if f.name == name)
            if not isinstance(group, _Group):
                raise UserError(f"{name}={group!r} is invalid; expected a {cls} (or a mapping of its options)")
            group.validate()
        if self.adapter.merge_every and self.optimization.max_steps <= 0:
            raise UserError(
                f"optimization.max_steps={self.optimization.max_steps!r} is invalid; expected a step count (> 0) "
                "when adapter.merge_every is set"
            )

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The options as plain YAML-ready values, one mapping per group (what train_config.yaml holds)."""
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Every option by its dotted name (``"adapter.r": 8``), as the flags spell them."""
        return {f"{group}.{key}": value for group, values in self.to_dict().items() for key, value in values.items()}

    def replace(self, **groups: dict[str, Any]) -> "TrainOptions":
        """A copy with some options changed, given by group: ``options.replace(adapter={"method": "lora"})``.

        An unknown group or option raises `moraft.errors.UserError` as `from_dict` does.
        """
        values = self.to_dict()
        for name, changes in groups.items():
            values[name] = {**values.get(name, {}), **changes} if isinstance(changes, dict) else changes
        return self.from_dict(values)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "options") -> "TrainOptions":
        """Options from one mapping per group (a train_config.yaml); a missing group or key keeps its default.

        An unknown group or key raises `moraft.errors.UserError` naming it and what ``source`` may hold.
        """
        groups = {f.name: f.default_factory for f in dataclasses.fields(cls)}  # type: ignore[misc]
        if not isinstance(values, dict) or set(values) - set(groups):
            unknown = sorted(set(values) - set(groups)) if isinstance(values, dict) else values
            raise UserError(f"{source}: unknown option group(s) {unknown}; expected mappings {', '.join(groups)}")
        built = {}
        for name, make in groups.items():
            given = values.get(name) or {}
            keys = {f.name for f in dataclasses.fields(make)}
            if not isinstance(given, dict) or set(given) - keys:
                unknown = sorted(set(given) - keys) if isinstance(given, dict) else given
                raise UserError(f"{source}: unknown {name} option(s) {unknown}; expected {', '.join(sorted(keys))}")
            built[name] = make(**given)
        return cls(**built)

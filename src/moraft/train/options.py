"""`TrainOptions`: every option of ``moraft train``, one dataclass. Its docstring is the command's ``--help``.

The same dataclass is the Python API (``moraft.train.train(TrainOptions(method="lora", max_steps=100))``), the
YAML file (``--config run.yaml``: the field names as keys) and the resolved config saved beside the adapter.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional, Union

from ..errors import UserError
from ..mora.operators import COMPRESSIONS, GROUPINGS
from .builtin import BUILTIN_MODEL
from .data import FORMATS

METHODS = ("mora", "lora", "dora", "full")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")


@dataclass
class TrainOptions:
    """Fine-tune a model with MoRA, LoRA, DoRA or full fine-tuning (Hugging Face Trainer underneath).

    Options come from flags, a YAML file (--config FILE, keys = the option names), or both; flags win. With no
    options it trains MoRA r=8 on the built-in uuid-memory task with the built-in tiny LLaMA, offline. Runs under
    `torchrun`/`accelerate launch` like any Trainer script. Writes to output_dir: the adapter (never a copy of the
    base; the whole model for method=full), the tokenizer, train_config.yaml (these options, resolved),
    metrics.jsonl, loss.png and checkpoint-N/ directories for --resume.

    Args:
        model: a local transformers model directory, or "builtin:tiny-llama" (a random-init LLaMA made in code with
            a character-level tokenizer; sized by builtin_hidden_size/builtin_num_layers, seeded by model_seed).
        builtin_hidden_size: width of the built-in model.
        builtin_num_layers: decoder layers of the built-in model.
        model_seed: seed of the built-in model's random weights (the same seed gives the same base model).
        data: "uuid-memory" (num_pairs random UUID pairs "key:value" made from data_seed; loss over the whole
            sequence, as in the paper's memory task), or a path: a JSONL file of chat ({"messages": [...]}, loss on
            the assistant turns) or prompt/completion ({"prompt", "completion"}, loss on the completion) records,
            or a text file / directory of *.txt files (continual pretraining, packed into seq_length blocks).
        data_format: auto (chat or prompt-completion from the JSONL keys; text for other files), chat,
            prompt-completion or text.
        seq_length: the longest example in tokens (longer ones are cut, with a warning); the block length for text.
        num_pairs: uuid-memory: how many pairs.
        data_seed: uuid-memory: seed of the pairs.
        eval_data: a held-out file in the same format as data: its loss and perplexity are logged every eval_steps.
        method: mora, lora (PEFT's LoRA), dora (PEFT's LoRA with use_dora) or full (every weight trained).
        r: rank. LoRA/DoRA: the rank. MoRA: the LoRA rank whose parameter budget M matches (r̂ = round(sqrt((d+k)·r))
            per layer), so mora and lora at the same r train the same number of parameters.
        target_modules: modules to adapt: a list of names (or name suffixes), a regex on the full module name, or
            "all-linear" (every linear layer but the output head).
        exclude_modules: module names (list) or a regex never to adapt.
        layers_to_transform: only adapt these layer indices.
        layers_pattern: the name of the layer list (e.g. "layers"), with layers_to_transform.
        rank_pattern: per-module r overrides, {regex or suffix: r}.
        dropout: dropout on the adapter's input.
        modules_to_save: other modules to train fully and save with the adapter (e.g. [embed_tokens, lm_head]).
        lora_alpha: lora/dora: the scaling numerator (scale = lora_alpha / r); None means 2·r.
        compression: mora: the fixed operators around M: sharing, rotation, decouple or truncation (see the
            MoraConfig docs; the paper recommends rotation for small r, sharing for large r).
        mora_rank: mora: an explicit r̂ for every layer instead of deriving it from r.
        mora_rank_pattern: mora: per-module r̂ overrides, {regex or suffix: r̂}.
        input_grouping: mora sharing: strided (feature i goes to group i mod r̂) or contiguous.
        output_grouping: mora sharing: strided (outputs tiled) or contiguous (each output repeated in place).
        init_weights: mora: True starts M at zero (the model is unchanged at step 0). lora/dora: PEFT's usual init.
        peft_mora_compat: mora: reproduce peft-mora's rotation output truncation (for adapters converted from it).
        merge_every: ReMoRA / ReLoRA: every N optimizer steps merge the adapter into the base weights, re-initialize
            it (M = 0; LoRA's usual init), reset its optimizer state, restart the learning rate with a warmup of
            merge_warmup_steps and, for mora sharing, switch between strided and contiguous grouping. 0: never.
            Each merged adapter is kept in output_dir/merges/step-N/; the final adapter alone is not the whole
            update: load the result with `moraft eval` or moraft.train.load_trained(output_dir).
        merge_warmup_steps: steps of linear warmup after each merge; None means max(1, merge_every // 10).
        switch_grouping: mora sharing with merge_every: alternate the grouping at each merge (the paper's ReMoRA).
        learning_rate: peak learning rate (> 0).
        lr_scheduler: schedule after the warmup: linear, cosine, constant, constant_with_warmup,
            cosine_with_restarts or polynomial.
        warmup_steps: linear warmup steps at the start.
        weight_decay: AdamW weight decay.
        epochs: passes over the data (ignored when max_steps > 0).
        max_steps: optimizer steps to run; -1 means use epochs.
        batch_size: examples per device per forward pass.
        gradient_accumulation_steps: forward passes per optimizer step.
        max_grad_norm: gradient clipping norm (0: none).
        bf16: bf16 mixed precision.
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        seed: seed of data order, dropout and adapter initialization.
        output_dir: where everything is written (created; must be empty unless resume or overwrite).
        overwrite: delete what output_dir holds before training.
        resume: continue from the last checkpoint-N in output_dir (pass the same options, e.g. with
            --config output_dir/train_config.yaml).
        save_steps: write a checkpoint every N steps (0: only the final adapter).
        save_total_limit: keep at most this many checkpoints (None: all).
        logging_steps: log loss, learning rate and tokens/s every N steps.
        eval_steps: evaluate every N steps (uuid-memory: character accuracy and exact match by greedy generation;
            eval_data: loss and perplexity); 0: only at the end.
    """

    # model
    model: str = BUILTIN_MODEL
    builtin_hidden_size: int = 128
    builtin_num_layers: int = 4
    model_seed: int = 0
    # data
    data: str = "uuid-memory"
    data_format: Literal["auto", "chat", "prompt-completion", "text"] = "auto"
    seq_length: int = 512
    num_pairs: int = 128
    data_seed: int = 0
    eval_data: Optional[str] = None
    # method
    method: Literal["mora", "lora", "dora", "full"] = "mora"
    r: int = 8
    target_modules: Union[list[str], str] = "all-linear"
    exclude_modules: Optional[Union[list[str], str]] = None
    layers_to_transform: Optional[list[int]] = None
    layers_pattern: Optional[str] = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    dropout: float = 0.0
    modules_to_save: Optional[list[str]] = None
    lora_alpha: Optional[float] = None
    compression: Literal["sharing", "rotation", "decouple", "truncation"] = "sharing"
    mora_rank: Optional[int] = None
    mora_rank_pattern: dict[str, int] = field(default_factory=dict)
    input_grouping: Literal["strided", "contiguous"] = "strided"
    output_grouping: Literal["strided", "contiguous"] = "strided"
    init_weights: bool = True
    peft_mora_compat: bool = False
    merge_every: int = 0
    merge_warmup_steps: Optional[int] = None
    switch_grouping: bool = True
    # optimization
    learning_rate: float = 3e-4
    lr_scheduler: Literal[
        "linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial"
    ] = "linear"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    epochs: float = 3.0
    max_steps: int = -1
    batch_size: int = 32
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    bf16: bool = False
    gradient_checkpointing: bool = False
    seed: int = 0
    # outputs
    output_dir: str = "runs/train"
    overwrite: bool = False
    resume: bool = False
    save_steps: int = 500
    save_total_limit: Optional[int] = 2
    logging_steps: int = 10
    eval_steps: int = 0

    def validate(self) -> None:
        """Raise `UserError` naming the first invalid option and what it accepts."""

        def check(ok: bool, name: str, expected: str) -> None:
            if not ok:
                raise UserError(f"{name}={getattr(self, name)!r} is invalid; expected {expected}")

        def integer(name: str, minimum: int) -> None:
            value = getattr(self, name)
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
            check(ok, name, f"an integer >= {minimum}")

        check(self.method in METHODS, "method", f"one of {', '.join(METHODS)}")
        check(self.data_format in FORMATS, "data_format", f"one of {', '.join(FORMATS)}")
        check(self.compression in COMPRESSIONS, "compression", f"one of {', '.join(COMPRESSIONS)}")
        check(self.input_grouping in GROUPINGS, "input_grouping", f"one of {', '.join(GROUPINGS)}")
        check(self.output_grouping in GROUPINGS, "output_grouping", f"one of {', '.join(GROUPINGS)}")
        check(self.lr_scheduler in SCHEDULERS, "lr_scheduler", f"one of {', '.join(SCHEDULERS)}")
        for name in ("r", "builtin_hidden_size", "builtin_num_layers", "seq_length", "num_pairs", "batch_size",
                     "gradient_accumulation_steps", "logging_steps"):
            integer(name, 1)
        for name in ("warmup_steps", "merge_every", "save_steps", "eval_steps"):
            integer(name, 0)
        check(self.builtin_hidden_size % 4 == 0, "builtin_hidden_size", "a multiple of 4 (4 attention heads)")
        check(self.max_steps == -1 or self.max_steps >= 1, "max_steps", "-1 (use epochs) or an integer >= 1")
        check(self.max_steps > 0 or self.epochs > 0, "epochs", "> 0 when max_steps is -1")
        check(self.learning_rate > 0, "learning_rate", "a number > 0")
        check(self.weight_decay >= 0, "weight_decay", "a number >= 0")
        check(self.max_grad_norm >= 0, "max_grad_norm", "a number >= 0 (0: no clipping)")
        check(0 <= self.dropout < 1, "dropout", "a number in [0, 1)")
        check(self.lora_alpha is None or self.lora_alpha > 0, "lora_alpha", "None or a number > 0")
        check(self.mora_rank is None or self.mora_rank >= 1, "mora_rank", "None or an integer >= 1")
        check(self.save_total_limit is None or self.save_total_limit >= 1, "save_total_limit", "None or >= 1")
        check(
            self.merge_warmup_steps is None or self.merge_warmup_steps >= 1, "merge_warmup_steps", "None or >= 1"
        )
        for name in ("rank_pattern", "mora_rank_pattern"):
            ok = all(isinstance(v, int) and v >= 1 for v in getattr(self, name).values())
            check(ok, name, "{pattern: int >= 1}")
        if self.method != "mora":
            for name in ("compression", "mora_rank", "mora_rank_pattern", "input_grouping", "output_grouping"):
                if getattr(self, name) != _default(name):
                    raise UserError(f"{name} is a mora option; it does nothing with method={self.method!r}")
        if self.merge_every:
            expected = "0 with method dora or full (ReMoRA/ReLoRA merge mora or lora adapters)"
            check(self.method in ("mora", "lora"), "merge_every", expected)
            check(self.max_steps > 0, "max_steps", "a step count (> 0) when merge_every is set")
        if self.overwrite and self.resume:
            raise UserError("overwrite and resume contradict each other; pass one")

    @property
    def effective_lora_alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else 2 * self.r

    @property
    def effective_merge_warmup(self) -> int:
        return self.merge_warmup_steps if self.merge_warmup_steps is not None else max(1, self.merge_every // 10)

    def to_dict(self) -> dict:
        """The options as plain YAML-ready values (what train_config.yaml holds)."""
        return dataclasses.asdict(self)


def _default(name: str):
    f = TrainOptions.__dataclass_fields__[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def command(options_cls: type, run: Callable, name: str) -> Callable:
    """A function with one keyword parameter per dataclass field and the dataclass's docstring, calling
    ``run(options_cls(**kwargs))``: what the CLI (jsonargparse) turns into flags and ``--help``."""
    hints = typing.get_type_hints(options_cls)
    parameters = [
        inspect.Parameter(
            f.name,
            inspect.Parameter.KEYWORD_ONLY,
            default=f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default,
            annotation=hints[f.name],
        )
        for f in dataclasses.fields(options_cls)
    ]

    def cli_command(**kwargs):
        return run(options_cls(**kwargs))

    cli_command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    cli_command.__doc__ = options_cls.__doc__
    cli_command.__name__ = cli_command.__qualname__ = name
    return cli_command

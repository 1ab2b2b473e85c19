"""The training loop: `train(options)` checks everything, then fine-tunes with TRL's ``SFTTrainer`` (or
``DPOTrainer``) and writes the run's outputs. ``moraft train`` is this function; benchmarks call it directly.

The data comes from `moraft.train.data` as a 🤗 dataset in one of TRL's formats; TRL tokenizes it, masks the loss
(assistant turns of chat data, completions of prompt-completion data) and packs it. moraft adds the method (MoRA,
ReMoRA's merges), the run directory's files and the checks.

Every check that can fail on bad input (options, model path, data, target modules, an output directory that holds
anything but an earlier run's files) runs before anything is written, so a bad command leaves the output directory as
it was. Final files are written to a temporary directory and moved into place. The run records what it writes in the
directory's manifest (`moraft.outputs`), so that ``output.overwrite`` deletes those files and nothing else.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
import yaml
from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_callback import ProgressCallback

from ..errors import UserError
from ..outputs import check_replaceable, clear, record
from .callbacks import (
    METRICS_FILE,
    CheckpointMark,
    Evaluator,
    MergeEvery,
    NonFiniteStop,
    Recorder,
    checkpoints,
    restarting_schedule,
)
from .data import UUID_MEMORY, describe_mix, detect_format, has_tokens_to_train, load_data, uuid_pairs
from .evaluate import CONFIG_FILE, MERGES_DIR, merge_dirs, read_train_config, uuid_accuracy
from .methods import ADAPTER, apply_method, count_parameters, load_model, merge_and_restart
from .peft_methods import describe_size, size_report
from .options import AdapterOptions, DataOptions, TrainOptions
from .plot import plot_run

SUMMARY_FILE = "train_summary.json"
COMMAND = "moraft train"  # the owner of a run directory, in its manifest
FINAL_TMP = ".final.tmp"  # the final files before they are moved into place
# what a run writes in output.dir before its final files (whose names the tokenizer and method decide; recorded then):
# TRL's model card (README.md) comes with the first checkpoint, TensorBoard's event files go under runs/
RUN_ENTRIES = (CONFIG_FILE, METRICS_FILE, "checkpoint-*", MERGES_DIR, "README.md", "runs", FINAL_TMP)
# options a resumed run may change: what is saved and logged, and how long it trains
RESUMABLE_CHANGES = {"output.resume", "output.overwrite", "output.dir", "output.save_steps", "output.save_total_limit",
                     "output.logging_steps", "output.eval_steps", "optimization.max_steps", "optimization.epochs",
                     "output.report_to", "output.run_name"}


@dataclass
class TrainResult:
    """What a training run produced.

    Attributes:
        output_dir: where the adapter (or the full model) and the other outputs are.
        history: every logged entry in order (``loss``, ``learning_rate``, ``tokens_per_second``, evaluation
            results such as ``char_accuracy``), each with its ``step``.
        final: the last evaluation and the mean training loss.
        trainable_parameters: parameters the method trained.
        total_parameters: all parameters of the trained model (base + adapter).
        size: how the trainable count compares with LoRA's budget at the same r (``lora_budget``, ``budget_ratio``,
            ``knob``: see `moraft.train.peft_methods.size_report`).
        runtime_s: wall time of the training loop.
        world_size: how many processes trained.
        sharding: how the parameters were sharded across them ("FSDP", "DeepSpeed ZeRO-3"), or None.
        ranks_in_sync: whether every rank ended with identical trainable parameters; None when the parameters are
            sharded (FSDP, DeepSpeed ZeRO-3), where each rank holds its own part and there is nothing to compare.
        model: the trained model, in memory (a ``PeftModel`` unless method=full).
        tokenizer: its tokenizer.
    """

    output_dir: Path
    history: list[dict] = field(default_factory=list)
    final: dict = field(default_factory=dict)
    trainable_parameters: int = 0
    total_parameters: int = 0
    size: dict = field(default_factory=dict)
    runtime_s: float = 0.0
    world_size: int = 1
    sharding: Optional[str] = None
    ranks_in_sync: Optional[bool] = True
    model: Optional[torch.nn.Module] = field(default=None, repr=False)
    tokenizer: object = field(default=None, repr=False)

    def curve(self, key: str) -> list[tuple[int, float]]:
        """(step, value) for every entry that has ``key``, e.g. ``result.curve("char_accuracy")``."""
        return [(entry["step"], entry[key]) for entry in self.history if key in entry]


class _MoraftTrainerMixin:
    """What moraft adds to TRL's trainers: ReMoRA/ReLoRA's learning rate, which restarts with a short warmup after
    every merge (see `restarting_schedule`), and the perplexity beside each evaluation loss."""

    def __init__(self, *args, merge_every: int = 0, merge_warmup: int = 1, **kwargs) -> None:
        self.merge_every = merge_every
        self.merge_warmup = merge_warmup
        super().__init__(*args, **kwargs)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            scheduler = super().create_scheduler(num_training_steps, optimizer)
            if self.merge_every:
                self.lr_scheduler = restarting_schedule(scheduler, self.merge_every, self.merge_warmup)
        return self.lr_scheduler

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "eval_loss" in logs:
            logs["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50.0))
        super().log(logs, *args, **kwargs)


class MoraftSFTTrainer(_MoraftTrainerMixin, SFTTrainer):
    """TRL's SFTTrainer with ReMoRA's restarting schedule."""


class MoraftDPOTrainer(_MoraftTrainerMixin, DPOTrainer):
    """TRL's DPOTrainer (merge_every is refused with DPO: see `TrainOptions.validate`)."""


def _prepare_output_dir(options: TrainOptions) -> Optional[str]:
    """Check output.dir against overwrite/resume; the checkpoint to resume from (None for a fresh run)."""
    out = Path(options.output.dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output.dir {str(out)!r} is a file, not a directory")
    occupied = out.is_dir() and any(out.iterdir())
    if options.output.resume:
        checkpoint = _resume_checkpoint(out)
        saved = read_train_config(out)
        before = saved.flat() if saved is not None else {}
        differ = [
            f"{key} ({before[key]!r} before, {value!r} now)"
            for key, value in options.flat().items()
            if key in before and key not in RESUMABLE_CHANGES and before[key] != value
        ]
        if differ:
            raise UserError(
                f"resume: these options differ from the run in {str(out)!r}: {', '.join(differ)}; resume with "
                f"--config {out / CONFIG_FILE} --output.resume true"
            )
        return checkpoint
    if occupied and not options.output.overwrite:
        raise UserError(
            f"output.dir {str(out)!r} is not empty; pass --output.resume to continue its run, --output.overwrite to "
            "replace it, or another --output.dir"
        )
    if options.output.overwrite:
        check_replaceable(out, COMMAND, "output.dir")
    return None


def _resume_checkpoint(out: Path) -> str:
    """The newest complete checkpoint of the run in ``out`` (`CheckpointMark`); newer ones that a killed run left
    half-written are skipped, with a line that says so."""
    found = checkpoints(out)
    complete = [path for path, whole in found if whole]
    if not found:
        raise UserError(f"resume: {str(out)!r} has no checkpoint-N directory to resume from")
    if not complete:
        raise UserError(f"resume: {str(out)!r} has no complete checkpoint-N directory to resume from "
                        f"({', '.join(path.name for path, _ in found)}: the run stopped while writing them)")
    newest = complete[-1]
    skipped = [path.name for path, _ in found[found.index((newest, True)) + 1 :]]  # all incomplete
    if skipped:
        print(f"moraft train: resume: skipping {', '.join(skipped)} (written only in part: the run stopped while "
              f"saving it); resuming from {newest.name}", flush=True)
    return str(newest)


def _has_accelerator() -> bool:
    if hasattr(torch, "accelerator"):
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


def _sharding(trainer: Trainer) -> Optional[str]:
    """How the trainer shards the parameters across processes ("FSDP", "DeepSpeed ZeRO-3"), or None when every rank
    holds all of them (one process, DDP, ZeRO-1/2)."""
    if trainer.is_fsdp_enabled:
        return "FSDP"
    if trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3:
        return "DeepSpeed ZeRO-3"
    return None


def _digest(model: torch.nn.Module) -> str:
    """A hash of the trainable parameters: equal on every rank when data-parallel training stayed in sync (only
    meaningful when every rank holds whole parameters, see `_sharding`)."""
    sha = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if param.requires_grad:
            sha.update(name.encode())
            sha.update(param.detach().float().cpu().numpy().tobytes())
    return sha.hexdigest()


def _gather(value: str) -> list[str]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        values: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(values, value)
        return values
    return [value]


def _device_arguments(options: TrainOptions) -> dict:
    """``use_cpu``, ``ddp_backend`` and ``deepspeed`` for this machine. accelerate treats torchrun on CPU as
    distributed (gloo) only with ``use_cpu``, but enables DeepSpeed only without it, given an explicit backend; on CPU
    the DeepSpeed config reaches accelerate through the environment instead (see `_deepspeed_environment`)."""
    if _has_accelerator():
        return {"deepspeed": options.distributed.deepspeed}
    if options.distributed.fsdp:
        raise UserError(
            f"distributed.fsdp={options.distributed.fsdp!r}: accelerate runs FSDP only on GPUs (and other "
            "accelerators), and this machine has none; shard on CPU with distributed.deepspeed (ZeRO-3)"
        )
    if options.distributed.deepspeed or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        if "LOCAL_RANK" not in os.environ:  # accelerate would ask torch for a process group that nobody created
            raise UserError("distributed.deepspeed on a machine without GPUs runs under a launcher, with a process "
                            "group: torchrun --nproc-per-node N -m moraft train ...")
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        return {"use_cpu": False, "ddp_backend": "gloo", "deepspeed": None}
    return {"use_cpu": True, "deepspeed": None}


@contextmanager
def _deepspeed_environment(options: TrainOptions) -> Iterator[None]:
    """On a machine without accelerator, while the Trainer is built: ``distributed.deepspeed`` as
    ``accelerate launch --use_deepspeed --deepspeed_config_file FILE`` passes it, in environment variables.

    Given as ``TrainingArguments(deepspeed=FILE)`` on CPU, the config makes transformers (5.23) set up accelerate's
    state without a backend; DeepSpeed then creates the process group, but accelerate (1.15) counts one process: every
    rank would train on all the data, and DeepSpeed's batch-size check fails. Through the environment, with
    ``ddp_backend="gloo"`` (`_device_arguments`), accelerate counts the processes, and the Trainer fills the config's
    "auto" values from its arguments as it does for ``accelerate launch``."""
    if _has_accelerator() or not options.distributed.deepspeed:
        yield
        return
    given = {"ACCELERATE_USE_DEEPSPEED": "true",
             "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(Path(options.distributed.deepspeed).resolve())}
    before = {name: os.environ.get(name) for name in given}
    os.environ.update(given)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _packing(options: TrainOptions, fmt: str) -> Optional[str]:
    """TRL's packing strategy for the data, or None: data.packing, where auto packs text (wrapped) but not the
    uuid-memory task, whose examples must stay whole."""
    packing = options.data.packing
    if packing == "auto":
        return "wrapped" if fmt == "text" and UUID_MEMORY not in options.data.sources else None
    return None if packing == "none" else packing


def _check_trackers(options: TrainOptions) -> None:
    """Each tracker of output.report_to must be installed (transformers would fail deep inside Trainer)."""
    from transformers.integrations import get_available_reporting_integrations

    available = get_available_reporting_integrations()
    for name in options.output.trackers:
        if name != "all" and name not in available:
            extra = " (or moraft[trackers])" if name == "tensorboard" else ""
            raise UserError(f"output.report_to={name!r}: its package is not installed; pip install {name}{extra}")


def _check_kernels(options: TrainOptions) -> None:
    import importlib.util

    if options.optimization.use_liger_kernel and importlib.util.find_spec("liger_kernel") is None:
        raise UserError("optimization.use_liger_kernel=True needs the liger-kernel package (pip install liger-kernel) "
                        "and a GPU")


def _training_arguments(options: TrainOptions, fmt: str) -> TrainingArguments:
    """TRL's config (SFTConfig or DPOConfig) of a run (creating it also sets up the process group under torchrun)."""
    opt, output, data, dist = options.optimization, options.output, options.data, options.distributed
    evaluating = data.eval_dataset is not None and output.eval_steps > 0
    common = dict(
        output_dir=output.dir,
        per_device_train_batch_size=opt.batch_size,
        per_device_eval_batch_size=opt.batch_size,
        gradient_accumulation_steps=opt.gradient_accumulation_steps,
        learning_rate=opt.learning_rate,
        lr_scheduler_type=opt.lr_scheduler,
        warmup_steps=opt.warmup_steps,
        weight_decay=opt.weight_decay,
        num_train_epochs=opt.epochs,
        max_steps=opt.max_steps,
        max_grad_norm=opt.max_grad_norm,
        bf16=opt.bf16,
        fp16=False,
        gradient_checkpointing=opt.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if opt.gradient_checkpointing else None,
        neftune_noise_alpha=opt.neftune_noise_alpha,
        use_liger_kernel=opt.use_liger_kernel,
        torch_compile=opt.torch_compile,
        seed=opt.seed,
        data_seed=opt.seed,
        save_strategy="steps" if output.save_steps else "no",
        save_steps=output.save_steps or 500,
        save_total_limit=None,  # CheckpointMark deletes old checkpoints, once the new one is complete
        logging_steps=output.logging_steps,
        eval_strategy="steps" if evaluating else "no",
        eval_steps=output.eval_steps if evaluating else None,
        report_to=output.trackers or "none",
        run_name=output.run_name or output.dir,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        fsdp=dist.fsdp,
        fsdp_config=dist.fsdp_config,
        max_length=data.seq_length,
        dataset_num_proc=data.num_proc,
        **_device_arguments(options),
    )
    with warnings.catch_warnings():  # TRL's configs still set the old name of activation_checkpointing
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing.* is deprecated", category=FutureWarning)
        if opt.objective == "dpo":
            return DPOConfig(**common, beta=opt.dpo_beta)
        packing = _packing(options, fmt)
        return SFTConfig(
            **common,
            packing=packing is not None,
            packing_strategy=packing or "bfd",
            assistant_only_loss=fmt == "chat",
            chat_template_path=data.chat_template,
        )


def train(options: TrainOptions, callbacks: Sequence[TrainerCallback] = ()) -> TrainResult:
    """Fine-tune ``options.model`` on ``options.data`` with ``options.adapter.method``; see `TrainOptions`.

    ``callbacks`` are extra ``transformers.TrainerCallback`` objects (e.g. to stop early). Returns a `TrainResult`
    with the logged history and final metrics. In a multi-process run (torchrun, accelerate launch) every process
    calls this; only the main one writes files.
    """
    options.validate()
    data, adapter, output = options.data, options.adapter, options.output
    _check_trackers(options)
    _check_kernels(options)
    checkpoint = _prepare_output_dir(options)
    model, tokenizer = load_model(options.model)
    train_data, fmt = load_data(data, tokenizer)
    eval_data = load_data(data, tokenizer, eval=True)[0] if data.eval_dataset else None
    _check_objective(options, fmt)
    set_seed(options.optimization.seed)  # the adapter's initialization
    model = apply_method(model, adapter)
    trainable, total = count_parameters(model)
    size = size_report(model, adapter.method, adapter.r)
    print(f"moraft train: {describe_size(adapter.method, size)}", flush=True)
    pairs = uuid_pairs(data.num_pairs, data.seed) if data.sources == [UUID_MEMORY] else None

    def evaluate(model) -> dict:
        return uuid_accuracy(model, tokenizer, pairs) if pairs is not None else {}

    out = Path(output.dir)
    existed = out.exists()
    with _deepspeed_environment(options):
        args = _training_arguments(options, fmt)
        is_main = args.process_index == 0
        recorder = Recorder(out, _label(adapter), is_main)
        advice = f"lower optimization.learning_rate (now {options.optimization.learning_rate:g})"
        own = [recorder, CheckpointMark(output.save_total_limit, is_main), NonFiniteStop(advice, out)]
        if pairs is not None:
            own.append(Evaluator(evaluate, output.eval_steps, recorder))
        if adapter.merge_every:
            seed = options.optimization.seed
            own.append(MergeEvery(adapter.merge_every, out, adapter.switch_grouping, seed, is_main))
        trainer = make_trainer(options, model, tokenizer, train_data, eval_data, args, own + list(callbacks))
    trainer.remove_callback(ProgressCallback)  # the Recorder draws the bar
    sharding = _sharding(trainer)
    try:
        _check_sharded_merges(options, trainer, sharding)
        _check_tokens_to_train(options, trainer, tokenizer, fmt)
    except UserError:
        if is_main and not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # Trainer creates output.dir; a refused run leaves none behind
        raise

    # -- everything is checked: from here on the run writes to output.dir -------------------------------------
    if output.overwrite and is_main:
        clear(out, COMMAND, "output.dir")  # only what an earlier run wrote (checked in _prepare_output_dir)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        record(out, COMMAND, RUN_ENTRIES)
        (out / CONFIG_FILE).write_text(yaml.safe_dump(options.to_dict(), sort_keys=False))
    if checkpoint is not None:
        _replay_merges(model, options, int(Path(checkpoint).name.split("-")[1]), is_main)
    started = time.perf_counter()
    try:
        with _quiet_builtin_saves():
            trained = trainer.train(resume_from_checkpoint=checkpoint)
    except BaseException:
        recorder.close()
        raise
    runtime = time.perf_counter() - started
    state = trainer.state
    final = {"train_loss": trained.training_loss}
    if eval_data is not None:  # on every rank: under FSDP or ZeRO-3 each forward pass gathers from all of them
        done = [e for e in state.log_history if e["step"] == state.global_step and "eval_loss" in e]
        last = done[-1] if done else trainer.evaluate()
        final.update({k: v for k, v in last.items() if k.startswith("eval_") and not k.endswith(("_runtime",
                      "_samples_per_second", "_steps_per_second"))})
    if pairs is not None:
        done = [e for e in state.log_history if e["step"] == state.global_step and "char_accuracy" in e]
        last = done[-1] if done else recorder.record(state, evaluate(model))  # no second evaluation of the last step
        final.update({k: v for k, v in last.items() if k != "step"})
    recorder.close()
    digests = [] if sharding else _gather(_digest(model))
    result = TrainResult(
        output_dir=out,
        history=list(state.log_history),
        final=final,
        trainable_parameters=trainable,
        total_parameters=total,
        size=size,
        runtime_s=runtime,
        world_size=args.world_size,
        sharding=sharding,
        ranks_in_sync=None if sharding else len(set(digests)) == 1,
        model=model,
        tokenizer=tokenizer,
    )
    with _quiet_builtin_saves():
        _save_outputs(trainer, tokenizer, options, result, digests, is_main)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # no rank returns before the outputs exist
    if result.ranks_in_sync is False:
        raise RuntimeError(f"the {len(digests)} ranks ended with different parameters: {digests}")
    return result


def _check_sharded_merges(options: TrainOptions, trainer: Trainer, sharding: Optional[str]) -> None:
    """ReMoRA/ReLoRA's merges need every rank to hold whole parameters, trained in place."""
    adapter = options.adapter
    if not adapter.merge_every or not (sharding or trainer.is_deepspeed_enabled):
        return
    if sharding:
        why = f"merge the adapter into the base weights, which {sharding} shards across processes"
    else:  # ZeRO-1/2 keep the trained weights in their optimizer's fp32 partitions, copied into the model
        stage = trainer.accelerator.state.deepspeed_plugin.zero_stage
        why = (f"restart the adapter after each merge, but DeepSpeed ZeRO-{stage} steps its own fp32 copy of the "
               "adapter and copies it back, undoing the restart")
    raise UserError(f"adapter.merge_every={adapter.merge_every}: ReMoRA/ReLoRA {why}; train with "
                    "adapter.merge_every=0, or under DDP")


# what the loss is taken on, per format: the words of the refusal of data without a token to train on
LOSS_ON = {"text": "text", "prompt-completion": "completion", "chat": "assistant turn",
           "preference": "chosen and rejected answer"}


def _check_tokens_to_train(options: TrainOptions, trainer: Trainer, tokenizer, fmt: str) -> None:
    """The data as TRL prepared it (tokenized, loss-masked, packed) has a token to train on
    (`moraft.train.data.has_tokens_to_train`)."""
    prepared = trainer.train_dataset
    names = prepared.column_names or []  # None: a stream, not read ahead
    if options.optimization.objective == "dpo":
        columns = [c for c in ("chosen_ids", "rejected_ids") if c in names]
    else:  # TRL's labels: the input ids, -100 where the loss mask is 0
        columns = ["labels"] if "labels" in names else ["input_ids"] if "input_ids" in names else []
    if columns and not has_tokens_to_train(prepared, columns, tokenizer):
        raise UserError(
            f"data.dataset {describe_mix(options.data)!r} has no token to train on after tokenization and the loss "
            f"mask, only special tokens and whitespace (every {LOSS_ON.get(fmt, 'text')} is empty or blank); give "
            "data with text in it"
        )


def _replay_merges(model, options: TrainOptions, step: int, is_main: bool) -> None:
    """Before resuming at ``step``, merge the adapters that the run merged up to then (the base weights of the
    checkpoint), and drop those the interrupted run merged after it (they will be merged again)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    for directory in merge_dirs(options.output.dir):
        merged_at = int(directory.name.split("-")[1])
        if merged_at > step:
            if is_main:
                shutil.rmtree(directory)
            continue
        set_peft_model_state_dict(model, load_file(directory / SAFETENSORS_WEIGHTS_NAME), ADAPTER)
        seed = options.optimization.seed + merged_at
        merge_and_restart(model, switch_grouping=options.adapter.switch_grouping, seed=seed)


def make_trainer(
    options: TrainOptions,
    model: torch.nn.Module,
    tokenizer,
    train_data,
    eval_data=None,
    args: Optional[TrainingArguments] = None,
    callbacks: Sequence[TrainerCallback] = (),
) -> Trainer:
    """TRL's trainer for ``options.optimization.objective`` on data from `moraft.train.data.load_data`: it tokenizes,
    masks and packs the data as it is built (``trainer.train_dataset`` is what trains). ``model`` is ready to train
    (`apply_method`)."""
    dpo = options.optimization.objective == "dpo"
    fmt = "preference" if dpo else _format_of(train_data)
    trainer_class = MoraftDPOTrainer if dpo else MoraftSFTTrainer
    extra = {}
    if dpo and options.adapter.method == "full":
        # DPO's reference is the model before training: an adapter disabled gives it for free; a fully trained model
        # needs a frozen copy (TRL would reload it from its name, which the built-in model does not have)
        extra["ref_model"] = copy.deepcopy(model).eval().requires_grad_(False)
    dtypes = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
    with _trl_errors():
        trainer = trainer_class(
            model=model,
            args=args or _training_arguments(options, fmt),
            train_dataset=train_data,
            eval_dataset=eval_data,
            processing_class=tokenizer,
            callbacks=list(callbacks),
            merge_every=options.adapter.merge_every,
            merge_warmup=options.adapter.effective_merge_warmup,
            **extra,
        )
    # TRL casts the adapter of a quantized base to bf16 (QLoRA's advice for GPUs); moraft keeps PEFT's dtype (float32),
    # which is what the adapter saves in and what small updates need, as TRL itself concedes for DoRA's magnitudes
    for name, param in model.named_parameters():
        if name in dtypes and param.dtype != dtypes[name]:
            param.data = param.data.to(dtypes[name])
    return trainer


def _format_of(data) -> str:
    """The format of data that `load_data` made (standard columns only)."""
    columns = data.column_names or list(next(iter(data)).keys())
    return detect_format(set(columns), columns, "the training data", DataOptions())


def _check_objective(options: TrainOptions, fmt: str) -> None:
    """The data's format suits the objective: preference data for DPO, and only for DPO."""
    dpo, described = options.optimization.objective == "dpo", describe_mix(options.data)
    if dpo and fmt != "preference":
        raise UserError(f"optimization.objective='dpo' needs preference data (prompt, chosen, rejected); data.dataset "
                        f"{described!r} is {fmt} data")
    if not dpo and fmt == "preference":
        raise UserError(f"data.dataset {described!r} is preference data (prompt, chosen, rejected); train it with "
                        "--optimization.objective dpo")


@contextmanager
def _quiet_builtin_saves() -> Iterator[None]:
    """PEFT warns at each save that it cannot find the built-in model's config.json (its name is not a directory nor
    a Hub repository, so there is nothing to compare the vocabulary with, and the vocabulary is unchanged)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Could not find a config file in builtin:", category=UserWarning)
        yield


@contextmanager
def _trl_errors() -> Iterator[None]:
    """TRL's refusals of the data or the template while it prepares them, as one line."""
    try:
        yield
    except (ValueError, RuntimeError) as err:
        message = str(err)
        if "chat template" in message or "generation" in message or "assistant" in message:
            raise UserError(
                f"data: {message.splitlines()[0]} (give a template with {{% generation %}} markers with "
                "--data.chat_template FILE)"
            ) from None
        raise


def _label(adapter: AdapterOptions) -> str:
    """The run's name in progress bars and plots: ``mora r=8``, or ``full``."""
    return f"{adapter.method} r={adapter.r}" if adapter.method != "full" else "full"


def _save_model(trainer: Trainer, directory: Path, is_main: bool) -> None:
    """The trained adapter (or full model) into ``directory``. Every rank calls this: under FSDP and DeepSpeed ZeRO-3
    ``Trainer.save_model`` gathers the parameter shards from all ranks, then the main process writes them (a plain
    ``save_pretrained`` there would write shards, or fail). The main process then checks that what it wrote is
    whole, so a gather that came back empty fails the run instead of leaving an empty adapter."""
    if trainer.is_fsdp_enabled:  # Trainer.save_model writes nothing from a SHARDED_STATE_DICT plugin
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(directory))
    if not is_main:
        return
    (directory / TRAINING_ARGS_NAME).unlink(missing_ok=True)  # Trainer's pickle: checkpoints keep theirs
    adapter = directory / SAFETENSORS_WEIGHTS_NAME
    if not adapter.is_file():
        if (directory / CONFIG_NAME).is_file():
            raise RuntimeError(f"Trainer.save_model wrote no {adapter.name} to {directory}")
        return  # method=full: the model's own files
    from safetensors import safe_open

    with safe_open(str(adapter), "pt") as handle:
        shapes = {key: handle.get_slice(key).get_shape() for key in handle.keys()}
    expected = sum(1 for p in trainer.model.parameters() if p.requires_grad)
    empty = [key for key, shape in shapes.items() if 0 in shape or not shape]
    if len(shapes) < expected or empty:  # some methods save frozen tensors too (VeRA's projections, SHiRA's mask)
        raise RuntimeError(
            f"Trainer.save_model wrote {len(shapes)} tensors ({len(empty)} empty) to {adapter}, for {expected} "
            "trainable parameters"
        )


def _save_outputs(
    trainer: Trainer, tokenizer, options: TrainOptions, result: TrainResult, digests: list, is_main: bool
) -> None:
    """The final adapter (or full model), tokenizer, config, summary and plot, moved into output.dir at once. Every
    rank calls this (see `_save_model`); only the main process writes."""
    out = result.output_dir
    tmp = out / FINAL_TMP
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _save_model(trainer, tmp, is_main)
    if not is_main:
        return
    tokenizer.save_pretrained(tmp)
    (tmp / CONFIG_FILE).write_text(yaml.safe_dump(options.to_dict(), sort_keys=False))
    summary = {
        "method": options.adapter.method,
        "final": result.final,
        "steps": trainer.state.global_step,
        "trainable_parameters": result.trainable_parameters,
        "total_parameters": result.total_parameters,
        "lora_budget": result.size.get("lora_budget"),
        "budget_ratio": result.size.get("budget_ratio"),
        "size_knob": result.size.get("knob"),
        "runtime_s": round(result.runtime_s, 2),
        "world_size": result.world_size,
        "sharding": result.sharding,
        "ranks_in_sync": result.ranks_in_sync,
        "rank_digests": digests,
        "merges": [d.name for d in merge_dirs(out)],
    }
    (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    plot_run(result.history, tmp / "loss.png", title=f"{_label(options.adapter)} on {describe_mix(options.data)}")
    record(out, COMMAND, sorted(item.name for item in tmp.iterdir()))  # before they appear in output.dir
    for item in tmp.iterdir():
        os.replace(item, out / item.name)
    tmp.rmdir()
    print(f"moraft train: saved {'the model' if options.adapter.method == 'full' else 'the adapter'} and loss.png to {out}")

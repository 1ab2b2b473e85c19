"""Evaluation: the uuid-memory task (character accuracy and exact match of greedily generated values), perplexity
on text, and multiple-choice tasks ranked by likelihood (`moraft.train.tasks`), for a training run's adapter, a
merged or fully fine-tuned model, or a base model.

``moraft eval PATH`` is `eval_command`; `uuid_accuracy` and `perplexity` are what training calls every
``eval_steps``; `load_trained` rebuilds what a run produced (including ReMoRA/ReLoRA's merged updates).
"""

from __future__ import annotations

import dataclasses

import json
import math
from pathlib import Path
from typing import Optional, Sequence

import torch
import yaml
from peft.utils.constants import CONFIG_NAME
from torch import nn

from .._peft_hook import quiet_peft_deprecation
from ..adapters import read_adapter_config
from ..errors import MissingPathError, UserError
from ..models import builtin_dir
from ..outputs import write_json
from .builtin import BUILTIN_MODEL
from .data import uuid_pairs, uuid_prompt
from .options import DataOptions, ModelOptions, TrainOptions
from .tasks import check_shots, read_tasks, score_tasks

CONFIG_FILE = "train_config.yaml"
MERGES_DIR = "merges"
TASKS_FILE = "eval_tasks.json"


@torch.no_grad()
def uuid_accuracy(
    model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 128
) -> dict[str, float]:
    """Greedy-generate each value from ``key:`` and compare it with the true value.

    Returns ``char_accuracy`` (the fraction of the value's characters generated correctly at their position,
    averaged over pairs, as in the paper's memory task) and ``exact_match`` (the fraction of values generated
    exactly).
    """
    was_training = model.training
    model.eval()
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the last position of every row
    max_new = max(len(tokenizer(value, add_special_tokens=False).input_ids) for _, value in pairs) + 1
    chars = exact = 0.0
    try:
        for start in range(0, len(pairs), batch_size):
            batch = pairs[start : start + batch_size]
            encoded = tokenizer([uuid_prompt(key) for key, _ in batch], return_tensors="pt", padding=True)
            encoded = encoded.to(next(model.parameters()).device)
            out = model.generate(
                **encoded,
                max_new_tokens=max_new,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            texts = tokenizer.batch_decode(out[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
            for text, (_, value) in zip(texts, batch):
                chars += sum(a == b for a, b in zip(text, value)) / len(value)
                exact += text[: len(value)] == value
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return {"char_accuracy": chars / len(pairs), "exact_match": exact / len(pairs)}


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer, path: str | Path, seq_length: int = 512, batch_size: int = 8) -> dict:
    """Mean token negative log-likelihood (``loss``) and ``perplexity`` = exp(loss) on a text source (a file, a
    directory of text files, or any source `moraft.train.data.read_source` reads with a text column), each document
    as ``<bos>text<eos>``, concatenated and cut into blocks of ``seq_length`` tokens (TRL's wrapped packing)."""
    from trl import pack_dataset

    from .data import load_data

    data, _ = load_data(DataOptions(dataset=str(path), format="text"), tokenizer)
    eos = tokenizer.eos_token_id
    tokenized = data.map(lambda row: {"input_ids": tokenizer(row["text"]).input_ids + [eos]}, remove_columns=["text"])
    return mean_loss(model, pack_dataset(tokenized, seq_length, strategy="wrapped"), tokenizer.pad_token_id, batch_size)


@torch.no_grad()
def mean_loss(model: nn.Module, examples, pad_token_id: int, batch_size: int = 8) -> dict:
    """Token-weighted mean loss and perplexity of ``model`` over tokenized examples (``input_ids``, and ``labels``
    with -100 where no loss is taken; without labels every token counts), padded by TRL's collator."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    was_training = model.training
    model.eval()
    collate = DataCollatorForLanguageModeling(pad_token_id=pad_token_id)
    device = next(model.parameters()).device
    examples = [{k: v for k, v in e.items() if k in ("input_ids", "labels")} for e in examples]
    total = count = 0.0
    try:
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size]).items()}
            n = (batch["labels"][:, 1:] != -100).sum().item()  # the model shifts labels by one
            total += model(**batch).loss.float().item() * n
            count += n
    finally:
        model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(count)}


def read_train_config(path: str | Path) -> Optional[TrainOptions]:
    """The options a run was trained with (its ``train_config.yaml``), or None when ``path`` has none."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        return None
    return TrainOptions.from_dict(yaml.safe_load(file.read_text()), source=str(file))


def merge_dirs(run_dir: str | Path) -> list[Path]:
    """The adapters ReMoRA/ReLoRA merged into the base during a run, in order (``merges/step-N``)."""
    root = Path(run_dir) / MERGES_DIR
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("step-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))


def load_trained(
    path: str,
    base: Optional[str] = None,
    up_to_step: Optional[int] = None,
    *,
    revision: Optional[str] = None,
    local_files_only: bool = False,
):
    """What ``path`` holds, ready to run: (model, tokenizer, description).

    ``path`` may be a training run's output directory or any PEFT adapter directory (its base comes from ``base``,
    else the run's train_config.yaml, quantized if the run's was, else the adapter's base_model_name_or_path), a
    full model directory (merged, fully fine-tuned, or a base), or a built-in model (``builtin:tiny-llama``,
    ``builtin:smollm2-135m-instruct``). For a run trained with
    merge_every, the merged adapters in ``merges/`` are first merged into the base in order (the final adapter alone
    is only the last segment). ``revision`` and ``local_files_only`` apply to a base that is a Hugging Face Hub id
    (`moraft.models.resolve_model_dir`); the run's own model.revision is used when ``revision`` is None.
    """
    from .methods import load_base, load_model

    config = read_train_config(path) if path != BUILTIN_MODEL else None
    model_options = config.model if config is not None else ModelOptions()
    builtin = {
        "hidden_size": model_options.builtin_hidden_size,
        "num_layers": model_options.builtin_num_layers,
        "model_seed": model_options.seed,
    }
    if path == BUILTIN_MODEL:
        model, tokenizer = load_base(BUILTIN_MODEL, **builtin)
        return model, tokenizer, f"base model {BUILTIN_MODEL}"
    if builtin_dir(path) is not None:  # a built-in model made from files (builtin:smollm2-135m-instruct)
        model, tokenizer = load_base(path)
        return model, tokenizer, f"base model {path}"
    directory = Path(path)
    if not directory.is_dir():
        raise MissingPathError(f"{path!r} is not a directory (expected a run, an adapter or a model directory)")
    if not (directory / CONFIG_NAME).is_file():
        if not (directory / "config.json").is_file():
            raise UserError(f"{path!r} holds neither {CONFIG_NAME} (an adapter) nor config.json (a model)")
        model, tokenizer = load_base(str(directory))
        return model, tokenizer, f"model {path}"
    adapter_config = read_adapter_config(directory, "eval")  # PEFT runs it: every method and LoRA variant
    base_name = base or (config and config.model.name_or_path) or adapter_config.base_model_name_or_path
    if not base_name:
        raise UserError(f"{path!r}: cannot tell its base model; pass --base")
    if base is None and config is not None:  # the run's own base, quantized as it was trained on, if it was
        hub = {"local_files_only": config.model.local_files_only or local_files_only}
        if revision is not None:
            hub["revision"] = revision
        model, tokenizer = load_model(dataclasses.replace(config.model, **hub))
    else:
        model, tokenizer = load_base(base_name, **builtin, revision=revision, local_files_only=local_files_only)
    if (directory / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(directory)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    merges = [d for d in merge_dirs(directory) if up_to_step is None or int(d.name.split("-")[1]) <= up_to_step]
    for merged in merges:
        read_adapter_config(merged, "merge")
        model = _load_adapter(model, merged).merge_and_unload()
    model = _load_adapter(model, directory)
    described = f"adapter {path} on {base_name}" + (f" after {len(merges)} merged adapters" if merges else "")
    return model, tokenizer, described


def _load_adapter(model, directory: Path):
    """PeftModel.from_pretrained, with unreadable or mismatched adapter files reported as one line naming them."""
    from peft import PeftModel
    from safetensors import SafetensorError

    try:
        with quiet_peft_deprecation():
            return PeftModel.from_pretrained(model, directory)
    except (SafetensorError, RuntimeError, OSError) as err:
        raise UserError(f"cannot load the adapter in {str(directory)!r}: {str(err).splitlines()[0]}") from err


def eval_command(
    path: str,
    base: Optional[str] = None,
    revision: Optional[str] = None,
    local_files_only: bool = False,
    text: Optional[str] = None,
    num_pairs: Optional[int] = None,
    data_seed: Optional[int] = None,
    seq_length: int = 512,
    batch_size: int = 64,
    output: Optional[str] = None,
    tasks: Optional[str] = None,
    shots: int = 0,
    seed: int = 0,
) -> dict:
    """Evaluate a trained adapter, a merged or fully fine-tuned model, or a base model.

    Without --text or --tasks: the uuid-memory task: each value is generated greedily from "key:" and compared with
    the true value (char_accuracy: fraction of characters right at their position; exact_match: fraction of values
    exactly right). With --text SOURCE: loss and perplexity on that text (a text file, a directory of text files, or a
    JSONL/Parquet/... file or dataset with a "text" column), cut into blocks of seq_length tokens. With --tasks
    FILE.jsonl: multiple-choice tasks, each option ranked by its log-likelihood after the prompt (accuracy; and
    accuracy_norm, per character of the option), with --shots examples drawn from the file's other tasks; one task a
    line: {"prompt": ..., "options": [...], "answer": INDEX} (docs: "Evaluating on multiple-choice tasks"). The
    metrics and each task's prediction also go to eval_tasks.json in PATH when PATH is a training run, else beside
    --output when given. Prints the metrics as one JSON object.

    Args:
        path: a `moraft train` output directory, a PEFT adapter directory (MoRA, LoRA or DoRA), a model directory
            (merged, fully fine-tuned, or a base), or a built-in model ("builtin:tiny-llama",
            "builtin:smollm2-135m-instruct").
        base: the base model under an adapter (default: the run's train_config.yaml, else the adapter's
            base_model_name_or_path): a model directory, or a Hugging Face Hub model id (downloaded into the Hub
            cache on first use, as from_pretrained does).
        revision: a Hub base: the branch, tag or commit hash to load (default: the run's model.revision, else main).
        local_files_only: a Hub base: load it from the Hub cache only, never downloading (as HF_HUB_OFFLINE=1).
        text: evaluate perplexity on this text file or directory instead of the uuid-memory task.
        num_pairs: uuid-memory: how many pairs (default: the run's data.num_pairs, else 128).
        data_seed: uuid-memory: seed of the pairs (default: the run's data.seed, else 0).
        seq_length: text: block length in tokens.
        batch_size: sequences per forward pass.
        output: also write the metrics to this JSON file.
        tasks: evaluate on the multiple-choice tasks of this JSONL file instead of the uuid-memory task.
        shots: tasks: examples (prompt and right option) before each prompt, drawn from the file's other tasks.
        seed: tasks: seed of the few-shot draw.
    """
    if text is not None and tasks is not None:
        raise UserError("pass --text or --tasks, not both")
    task_list = read_tasks(tasks) if tasks is not None else None  # bad task files fail before a model loads
    if task_list is not None:
        check_shots(shots, len(task_list))
    model, tokenizer, described = load_trained(path, base, revision=revision, local_files_only=local_files_only)
    run_config = read_train_config(path) if Path(path).is_dir() else None
    run = run_config or TrainOptions()
    if task_list is not None:
        scored = score_tasks(model, tokenizer, task_list, shots, seed, batch_size)
        metrics = {"task": "multiple-choice", "tasks": tasks, **{k: v for k, v in scored.items() if k != "rows"}}
        details_dir = Path(path) if run_config is not None else Path(output).parent if output else None
        if details_dir is not None:
            write_json(details_dir / TASKS_FILE, {"evaluated": described, **metrics, "rows": scored["rows"]})
    elif text is not None:
        metrics = {"task": "perplexity", "text": text, **perplexity(model, tokenizer, text, seq_length, batch_size)}
    else:
        pairs = uuid_pairs(
            num_pairs if num_pairs is not None else run.data.num_pairs,
            data_seed if data_seed is not None else run.data.seed,
        )
        metrics = {"task": "uuid-memory", "num_pairs": len(pairs), **uuid_accuracy(model, tokenizer, pairs, batch_size)}
    metrics = {"evaluated": described, **metrics}
    print(json.dumps(metrics))
    if output:
        write_json(Path(output), metrics)
    return metrics

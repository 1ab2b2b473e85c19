"""Multiple-choice tasks scored by likelihood ranking: ``moraft eval PATH --tasks FILE.jsonl``.

How AdaptLLM (arXiv 2309.09530) evaluates its domain models and how lm-evaluation-harness scores a
``multiple_choice`` task (https://github.com/EleutherAI/lm-evaluation-harness, ``lm_eval/api/task.py``): for each
option, the log-likelihood of ``" " + option`` after the prompt; the prediction is the option with the highest sum
(``accuracy``, lm-eval's ``acc``) or the highest sum per character of the option (``accuracy_norm``, lm-eval's
``acc_norm``, which stops long options losing only for being long).

The task file is JSONL, one task per line::

    {"id": "q1", "prompt": "Debian package gnuplot: its short description is",
     "options": ["command-line driven interactive plotting program", "..."], "answer": 0}

- ``prompt``: the text before the option; or ``context`` and ``question``, joined by a newline.
- ``options``: at least two strings; ``answer``: the index of the right one. ``id`` is optional (default: the
  line number); ``instruction`` is optional text put once before everything else, then a blank line.
- Prompt and option are joined by one space: the option is scored as ``" " + option``.
- With ``shots`` K, each task's prompt is preceded by K other tasks of the file (drawn per task with a seed, never the
  task itself), each written as its prompt, a space and its right option, separated by blank lines.

The option's tokens are those of ``prompt + " " + option`` after the tokens of ``prompt`` (lm-eval's
``_encode_pair``), so a tokenizer that merges across the boundary scores what it would have encoded; a sequence longer
than the model's context loses tokens from the left of the prompt, as in lm-eval.
"""

from __future__ import annotations

import inspect
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import MissingPathError, UserError

FORMAT = 'one JSON object a line: {"prompt": str (or "context" and "question"), "options": [str, ...], "answer": int}'


@dataclass(frozen=True)
class Task:
    """One multiple-choice task (a line of the task file)."""

    id: str
    prompt: str
    options: tuple[str, ...]
    answer: int
    instruction: Optional[str] = None


def read_tasks(path: str | Path) -> list[Task]:
    """The tasks of a JSONL task file (format in this module's docstring).

    Raises:
        MissingPathError: the file does not exist.
        UserError: the file has no task, or a line is not a valid task (the message names the line).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"task file {str(path)!r} does not exist (expected a JSONL file: {FORMAT})")
    tasks = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if line.strip():
                tasks.append(_parse_task(line, number, path))
    if not tasks:
        raise UserError(f"task file {str(path)!r} has no tasks (expected {FORMAT})")
    return tasks


def _parse_task(line: str, number: int, path: Path) -> Task:
    where = f"{path.name} line {number}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: not JSON ({err.msg}); expected {FORMAT}") from None
    if not isinstance(row, dict):
        raise UserError(f"{where}: a {type(row).__name__}, expected {FORMAT}")
    if isinstance(row.get("prompt"), str):
        prompt = row["prompt"]
    elif isinstance(row.get("context"), str) and isinstance(row.get("question"), str):
        prompt = f"{row['context']}\n{row['question']}"
    else:
        raise UserError(f'{where}: no "prompt" string (nor "context" and "question" strings)')
    options = row.get("options")
    if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) and o for o in options):
        raise UserError(f'{where}: "options" must be a list of at least 2 non-empty strings, got {options!r}')
    answer = row.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(options):
        raise UserError(
            f'{where}: "answer" must be the index of the right option, an integer from 0 to {len(options) - 1}, '
            f"got {answer!r}"
        )
    instruction = row.get("instruction")
    if instruction is not None and not isinstance(instruction, str):
        raise UserError(f'{where}: "instruction" must be a string, got {instruction!r}')
    return Task(str(row.get("id", number)), prompt, tuple(options), answer, instruction)


def check_shots(shots: int, count: int) -> None:
    """Raise `UserError` unless ``shots`` examples can be drawn for each of ``count`` tasks from the others."""
    if shots < 0:
        raise UserError(f"--shots {shots}: expected 0 or more")
    if shots >= count:
        raise UserError(f"--shots {shots} needs at least {shots + 1} tasks (each task's examples are other tasks); "
                        f"the task file has {count}")


def few_shot_context(tasks: Sequence[Task], index: int, shots: int = 0, seed: int = 0) -> str:
    """The text that task ``index``'s options are scored after: its instruction (if any) and a blank line, ``shots``
    other tasks drawn with ``seed`` (each its prompt, a space and its right option), then its prompt; all separated by
    blank lines. Each task's draw has its own generator, seeded by ``seed`` and ``index``: the same file and seed give
    every task the same examples on every run, however the scoring is batched."""
    task = tasks[index]
    others = random.Random(f"{seed}:{index}").sample(range(len(tasks) - 1), shots)
    blocks = [task.instruction] if task.instruction else []
    for other in (tasks[j + (j >= index)] for j in others):  # j >= index skips the task itself
        blocks.append(f"{other.prompt} {other.options[other.answer]}")
    blocks.append(task.prompt)
    return "\n\n".join(blocks)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids): the continuation's ids are those of ``context + continuation`` after the
    context's, so they are what the tokenizer writes for the continuation in that place (lm-eval's
    ``_encode_pair``). Spaces at the end of the context move to the continuation first, as lm-eval does."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation).input_ids
    context_ids = tokenizer(context).input_ids
    return context_ids, whole[len(context_ids) :]


def context_length(model: nn.Module, tokenizer) -> int:
    """The most tokens the model reads at once: its config's position limit, else the tokenizer's."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    return int(tokenizer.model_max_length)


@torch.no_grad()
def loglikelihoods(
    model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 16, progress: bool = True
) -> list[float]:
    """The sum of the log-probabilities of each continuation's tokens given its context (see `encode_pair`), in
    float32, batched longest first and right-padded. A context too long for the model is cut from the left. Only the
    positions that predict continuation tokens get logits, where the model takes ``logits_to_keep`` (transformers'
    causal LMs do), so a large vocabulary does not cost batch × length × vocabulary floats."""
    limit = context_length(model, tokenizer)
    encoded = [encode_pair(tokenizer, context, continuation) for context, continuation in pairs]
    # an empty context (a tokenizer that adds no BOS) still needs one position to predict the first option token
    start_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    encoded = [(ctx or [start_id], cont) for ctx, cont in encoded]
    for (context, continuation), (_, cont) in zip(pairs, encoded):
        if not cont or len(cont) > limit:
            raise UserError(f"option {continuation!r} is {len(cont)} tokens; the model reads 1 to {limit}")
    # the model predicts token t+1 at position t, so the input is every token but the last
    inputs = [(ctx + cont)[-(limit + 1) :][:-1] for ctx, cont in encoded]
    order = sorted(range(len(pairs)), key=lambda i: -len(inputs[i]))
    scores = [0.0] * len(pairs)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    trims = accepts_logits_to_keep(model)
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="Scoring options", disable=not progress):
            batch = order[start : start + batch_size]
            width = len(inputs[batch[0]])
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(batch):
                ids[row, : len(inputs[i])] = torch.tensor(inputs[i])
                mask[row, : len(inputs[i])] = 1
            first = min(len(inputs[i]) - len(encoded[i][1]) for i in batch) if trims else 0
            kept = {"logits_to_keep": torch.arange(first, width, device=device)} if trims else {}
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), **kept).logits  # (B, width-first, V)
            for row, i in enumerate(batch):
                cont = encoded[i][1]
                end = len(inputs[i]) - first
                logprobs = torch.log_softmax(logits[row, end - len(cont) : end].float(), dim=-1)  # (len(cont), V)
                target = torch.tensor(cont, device=logprobs.device).unsqueeze(1)
                scores[i] = logprobs.gather(1, target).sum().item()
    finally:
        model.train(was_training)
    return scores


def accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether the model (or the model under a PEFT wrapper) computes logits for chosen positions only."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def score_tasks(
    model: nn.Module, tokenizer: Any, tasks: Sequence[Task], shots: int = 0, seed: int = 0, batch_size: int = 16
) -> dict:
    """Rank every task's options by log-likelihood (this module's docstring has the format and the prompt).

    Args:
        model: a causal LM (a transformers model or a PEFT model over one).
        tokenizer: its tokenizer.
        tasks: from `read_tasks`.
        shots: examples before each prompt, drawn from the other tasks.
        seed: seed of the few-shot draw.
        batch_size: sequences (prompt + one option) per forward pass.

    Returns:
        ``num_tasks``, ``shots``, ``seed``, ``accuracy`` (highest sum of log-likelihood), ``accuracy_norm`` (highest
        log-likelihood per character of the option), ``chance`` (the mean of 1 / number of options) and ``rows``:
        per task its ``id``, ``answer``, ``prediction``, ``prediction_norm`` and the options' ``loglikelihoods``.

    Raises:
        UserError: ``shots`` is negative or not below the number of tasks.
    """
    check_shots(shots, len(tasks))
    contexts = [few_shot_context(tasks, i, shots, seed) for i in range(len(tasks))]
    pairs = [(context, f" {option}") for context, task in zip(contexts, tasks) for option in task.options]
    scores = iter(loglikelihoods(model, tokenizer, pairs, batch_size))
    rows = []
    for task in tasks:
        lls = [next(scores) for _ in task.options]
        per_char = [ll / len(option) for ll, option in zip(lls, task.options)]
        rows.append(
            {
                "id": task.id,
                "answer": task.answer,
                "prediction": max(range(len(lls)), key=lls.__getitem__),  # first of equals, as numpy's argmax
                "prediction_norm": max(range(len(lls)), key=per_char.__getitem__),
                "loglikelihoods": lls,
            }
        )
    n = len(rows)
    return {
        "num_tasks": n,
        "shots": shots,
        "seed": seed,
        "accuracy": sum(r["prediction"] == r["answer"] for r in rows) / n,
        "accuracy_norm": sum(r["prediction_norm"] == r["answer"] for r in rows) / n,
        "chance": sum(1 / len(task.options) for task in tasks) / n,
        "rows": rows,
    }

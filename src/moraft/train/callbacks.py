"""Trainer callbacks: the progress bar, metrics.jsonl, evaluation during training, ReMoRA/ReLoRA's merge every N steps
(with the learning-rate schedule that restarts after each merge), the mark of each checkpoint written whole, and the
stop of a run whose parameters or loss are no longer finite."""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..errors import UserError
from ..outputs import write_json
from .evaluate import MERGES_DIR
from .methods import merge_and_restart

METRICS_FILE = "metrics.jsonl"
CHECKPOINT_MARK = "moraft_complete.json"  # in checkpoint-N/ once Trainer has written all of it


class Recorder(TrainerCallback):
    """Writes every logged entry to ``metrics.jsonl`` and shows a progress bar with loss, learning rate, tokens/s
    (and the latest evaluation). Only the main process writes or draws; other ranks keep the entries in memory."""

    def __init__(self, output_dir: Path, description: str, is_main: bool) -> None:
        self.path = Path(output_dir) / METRICS_FILE
        self.description = description
        self.is_main = is_main
        self.bar: Optional[tqdm] = None
        self.postfix: dict[str, str] = {}
        self._last_tokens: Optional[tuple[float, int]] = None

    def on_train_begin(self, args, state, control, **kwargs):
        # a resumed run restarts metrics.jsonl from the checkpoint's history, so entries logged after that
        # checkpoint by the interrupted run are not kept twice
        if self.is_main:
            self.path.write_text("".join(json.dumps(entry) + "\n" for entry in state.log_history))
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.description, unit="step")
        self._last_tokens = (time.perf_counter(), state.num_input_tokens_seen)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        entry = state.log_history[-1] if state.log_history else {}
        if "loss" in entry and state.num_input_tokens_seen and self._last_tokens is not None:
            now = time.perf_counter()
            seconds, tokens = now - self._last_tokens[0], state.num_input_tokens_seen - self._last_tokens[1]
            entry["tokens_per_second"] = round(tokens / seconds, 1) if seconds > 0 else None
            self._last_tokens = (now, state.num_input_tokens_seen)
        self.write(entry)

    def record(self, state, values: dict) -> dict:
        """Add an entry (e.g. evaluation results) to the run's history at the current step, and write it."""
        entry = {**values, "step": state.global_step}
        state.log_history.append(entry)
        self.write(entry)
        return entry

    def write(self, entry: dict) -> None:
        if "loss" in entry:
            self.postfix["loss"] = f"{entry['loss']:.4g}"
        if "learning_rate" in entry:
            self.postfix["lr"] = f"{entry['learning_rate']:.3g}"
        if entry.get("tokens_per_second"):
            self.postfix["tok/s"] = f"{entry['tokens_per_second']:.0f}"
        for key, short in (("char_accuracy", "acc"), ("eval_perplexity", "ppl")):
            if key in entry:
                self.postfix[short] = f"{entry[key]:.3g}"
        if not self.is_main:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(entry) + "\n")
        if self.bar is not None:
            self.bar.set_postfix(self.postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Evaluator(TrainerCallback):
    """Runs ``evaluate(model) -> dict`` every ``every`` steps and records the result (the main process writes it).

    Every rank evaluates: under FSDP or DeepSpeed ZeRO-3 each forward pass gathers parameter shards from all ranks,
    so a forward pass on the main process alone would wait forever for the others.
    """

    def __init__(self, evaluate: Callable, every: int, recorder: Recorder) -> None:
        self.evaluate = evaluate
        self.every = every
        self.recorder = recorder

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every and state.global_step % self.every == 0:
            self.recorder.record(state, self.evaluate(model))


class MergeEvery(TrainerCallback):
    """ReMoRA / ReLoRA: every ``every`` steps (not at the last), merge the adapter into the base, restart it and
    reset its optimizer state. The main process first saves the adapter being merged to ``merges/step-N`` (so the
    run can be reloaded and resumed); every rank then merges the same way, so the ranks stay identical."""

    def __init__(self, every: int, output_dir: Path, switch_grouping: bool, seed: int, is_main: bool) -> None:
        self.every = every
        self.output_dir = Path(output_dir)
        self.switch_grouping = switch_grouping
        self.seed = seed
        self.is_main = is_main

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = state.global_step
        if step % self.every or step >= state.max_steps:
            return
        if self.is_main:
            save_merged_adapter(model, self.output_dir, step)
        restarted = merge_and_restart(model, switch_grouping=self.switch_grouping, seed=self.seed + step)
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
        for param in restarted:
            inner.state.pop(param, None)  # AdamW starts this parameter's moments afresh at its next step


def save_merged_adapter(model, output_dir: Path, step: int) -> Path:
    """Write the adapter about to be merged to ``output_dir/merges/step-N`` (whole or not at all)."""
    final = Path(output_dir) / MERGES_DIR / f"step-{step}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def restarting_schedule(scheduler: LambdaLR, every: int, warmup: int) -> LambdaLR:
    """``scheduler``'s schedule times a linear re-warmup of ``warmup`` steps after every ``every`` steps (ReLoRA's
    jagged schedule): right after a merge the fresh adapter starts with a small learning rate."""
    base = list(scheduler.lr_lambdas)

    def restarted(index: int) -> Callable[[int], float]:
        def factor(step: int) -> float:
            since = step % every if step >= every else warmup
            return base[index](step) * min(1.0, (since + 1) / warmup)

        return factor

    return LambdaLR(scheduler.optimizer, [restarted(i) for i in range(len(base))])


# -- checkpoints -----------------------------------------------------------------------------------------------------


def checkpoints(output_dir: Path) -> list[tuple[Path, bool]]:
    """The ``checkpoint-N`` directories of a run, by step, each with whether it is complete (`CheckpointMark`)."""
    pattern = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")
    found = []
    if Path(output_dir).is_dir():
        for path in Path(output_dir).iterdir():
            match = pattern.fullmatch(path.name)
            if match and path.is_dir():
                found.append((int(match[1]), path))
    return [(path, (path / CHECKPOINT_MARK).is_file()) for _, path in sorted(found)]


def last_complete_checkpoint(output_dir: Path) -> Optional[Path]:
    """The newest checkpoint of a run that was written whole, or None."""
    complete = [path for path, whole in checkpoints(output_dir) if whole]
    return complete[-1] if complete else None


class CheckpointMark(TrainerCallback):
    """Marks each checkpoint complete once Trainer has written all of it, then keeps the newest ``limit`` complete
    ones.

    Trainer writes ``checkpoint-N/`` file by file (the model, then the optimizer, scheduler and RNG state, then
    ``trainer_state.json``) and calls ``on_save`` only after the last one; a run killed in between leaves a directory
    that ``get_last_checkpoint`` would still pick and ``resume_from_checkpoint`` fail on. The mark (a file written
    under a temporary name and renamed) is what makes a checkpoint one to resume from (`last_complete_checkpoint`).
    Trainer's own ``save_total_limit`` is left unset: it deletes old checkpoints before ``on_save``, so a kill right
    after could leave none complete; here they are deleted after the new one is marked, and only complete ones count.
    """

    def __init__(self, limit: Optional[int], is_main: bool) -> None:
        self.limit = limit
        self.is_main = is_main

    def on_save(self, args, state, control, **kwargs):
        if not self.is_main:
            return
        directory = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        write_json(directory / CHECKPOINT_MARK, {"step": state.global_step})
        if self.limit:
            complete = [path for path, whole in checkpoints(Path(args.output_dir)) if whole]
            for path in complete[: -self.limit]:
                shutil.rmtree(path, ignore_errors=True)


# -- divergence ------------------------------------------------------------------------------------------------------


class NonFiniteStop(TrainerCallback):
    """Stops the run, with a one-line `moraft.errors.UserError`, as soon as the trained parameters or the logged loss
    are no longer finite, before Trainer saves anything from that step.

    Trainer does its part first: it leaves a NaN or infinite step loss out of the logged average
    (``logging_nan_inf_filter``), and with fp16 its gradient scaler skips an update whose gradients overflowed. What
    that cannot save shows in the parameters themselves after the update (or in a logged loss that is still not
    finite): training on would only save NaN. ``on_step_end`` runs before Trainer's save of the step, so every
    checkpoint written is one whose parameters were finite. Every rank checks its own parameters (its shard under
    FSDP or ZeRO-3) and the ranks agree, so all stop together.
    """

    def __init__(self, advice: str, output_dir: Path) -> None:
        self.advice = advice
        self.output_dir = Path(output_dir)
        self.loss: Optional[float] = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if isinstance(loss, (int, float)):
            if not math.isfinite(loss):
                self._stop(state.global_step, f"the loss is {loss}")
            self.loss = loss

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None and not _finite(model):
            self._stop(state.global_step, "the trained parameters hold NaN or infinite values")

    def _stop(self, step: int, what: str) -> None:
        before = f" (the last logged loss was {self.loss:.4g})" if self.loss is not None else ""
        good = last_complete_checkpoint(self.output_dir)
        kept = (f"the last checkpoint, {good}, is from before and still good" if good is not None
                else "no checkpoint was saved before it")
        raise UserError(f"training diverged at step {step}: {what}{before}; nothing was saved from it ({kept}); "
                        f"{self.advice}")


def _zero3_partition(param: torch.nn.Parameter) -> torch.Tensor:
    """This rank's elements of a ZeRO-3 parameter: its partition (``ds_tensor``) without the padding DeepSpeed adds
    past the parameter's end to make the partitions equal, which is never written and may hold any bits, NaN
    included."""
    partition = param.ds_tensor.detach().view(-1)
    group = getattr(param, "ds_process_group", None)
    rank = torch.distributed.get_rank(group) if torch.distributed.is_initialized() else 0
    real = max(0, min(partition.numel(), param.ds_numel - rank * partition.numel()))
    return partition[:real]


def _finite(model: torch.nn.Module) -> bool:
    """Whether every trainable parameter is finite, on every rank (each checks its own shard: a ZeRO-3 partition,
    an FSDP2 local tensor)."""
    device = next(model.parameters()).device
    ok = torch.ones((), device=device)
    for param in model.parameters():
        if param.requires_grad:
            local = _zero3_partition(param) if hasattr(param, "ds_tensor") else param.detach()
            local = local.to_local() if hasattr(local, "to_local") else local
            ok = ok * torch.isfinite(local).all().to(device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    return bool(ok.item())

"""``moraft train`` when a run cannot go right: a run whose loss or parameters stop being finite stops in one line
and saves no NaN adapter, and a resume skips the checkpoint a killed run left half-written."""

from __future__ import annotations

import json
import shutil

import torch
from helpers import run_cli, tiny_flags
from safetensors.torch import load_file

from moraft.train.callbacks import CHECKPOINT_MARK


def test_a_diverging_run_stops_in_one_line_and_saves_no_nan_adapter(tmp_path, capsys):
    out = tmp_path / "run"
    flags = [*tiny_flags(out), "--optimization.learning_rate", "1e6", "--optimization.max_steps", "8",
             "--output.save_steps", "1"]
    status, _, err = run_cli(["train", *flags], capsys)
    assert status == 2 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("moraft train: error: training diverged at step "), err
    assert line.endswith("; lower optimization.learning_rate (now 1e+06)"), err
    assert not (out / "adapter_model.safetensors").exists()
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert checkpoints and f"the last checkpoint, {checkpoints[-1]}, is from before and still good" in line
    for checkpoint in checkpoints:  # every checkpoint saved is one whose parameters were finite
        assert all(torch.isfinite(t).all() for t in load_file(checkpoint / "adapter_model.safetensors").values())


def test_resume_skips_the_checkpoint_a_killed_run_left_half_written(tmp_path, capsys):
    out, data = tmp_path / "run", tmp_path / "text.jsonl"
    data.write_text("".join(f'{{"text": "line {i}: the quick brown fox jumps over the lazy dog"}}\n' for i in range(8)))
    flags = [*tiny_flags(out), "--data", str(data), "--output.save_steps", "1"]
    status, _, err = run_cli(["train", *flags, "--optimization.max_steps", "3"], capsys)
    assert status == 0, err
    # output.save_total_limit (2) counts the complete checkpoints, each marked once Trainer wrote all of it
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert all((out / name / CHECKPOINT_MARK).is_file() for name in ("checkpoint-2", "checkpoint-3"))
    # killed the moment checkpoint-4/ appeared: it holds part of what Trainer writes
    (out / "checkpoint-4").mkdir()
    shutil.copy(out / "checkpoint-3" / "adapter_config.json", out / "checkpoint-4")

    status, stdout, err = run_cli(["train", *flags, "--optimization.max_steps", "5", "--output.resume"], capsys)
    assert status == 0, err
    assert ("moraft train: resume: skipping checkpoint-4 (written only in part: the run stopped while saving it); "
            "resuming from checkpoint-3") in stdout
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 5
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]
    assert (out / "checkpoint-4" / CHECKPOINT_MARK).is_file()  # written again, whole

    lone = tmp_path / "lone"  # only a half-written checkpoint: nothing to resume from
    shutil.copytree(out, lone, ignore=shutil.ignore_patterns("checkpoint-5"))
    (lone / "checkpoint-4" / CHECKPOINT_MARK).unlink()
    status, _, err = run_cli(["train", *tiny_flags(lone), "--data", str(data), "--output.save_steps", "1",
                              "--optimization.max_steps", "5", "--output.resume"], capsys)
    assert status == 2 and err.strip().endswith(
        f"resume: {str(lone)!r} has no complete checkpoint-N directory to resume from (checkpoint-4: the run stopped "
        "while writing them)"), err

"""``moraft train`` when a run cannot go right: data it cannot train on is refused in one line before training, a
run whose loss or parameters stop being finite stops in one line and saves no NaN adapter, and a resume skips the
checkpoint a killed run left half-written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import assert_refused, run_cli, tiny_flags
from safetensors.torch import load_file

from moraft.train.callbacks import CHECKPOINT_MARK

# file contents -> what the one line says (after the file's path)
BAD_DATA = {
    "null text": ('{"text": "a"}\n{"text": null}\n', "bad.jsonl', row 2: text is null; expected a string"),
    "null completion": ('{"prompt": "a", "completion": null}\n',
                        "bad.jsonl', row 1: completion is null; expected a string or a list of messages"),
    "a number as text": ('{"text": 5}\n', "bad.jsonl': column text holds int64 values; expected a string per row"),
    "0 bytes": ("", "data file '{path}' is empty (0 bytes); expected json data, one row or more"),
    "only blank lines": ("\n \n", "data file '{path}' is empty (3 bytes, all whitespace)"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_rows_and_files_without_text_are_one_line(tmp_path, capsys, case):
    content, expected = BAD_DATA[case]
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    out = tmp_path / "out"
    assert_refused(["train", *tiny_flags(out), "--data", str(path)], capsys, expected.format(path=path), out)


def test_a_csv_header_without_rows_is_one_line(tmp_path, capsys):
    path, out = tmp_path / "header.csv", tmp_path / "out"
    path.write_text("text\n")
    assert_refused(["train", *tiny_flags(out), "--data", str(path)], capsys, "header.csv' holds no rows", out)


BLANK = {
    "text": [{"text": ""}, {"text": "  \n "}] * 4,
    "prompt-completion": [{"prompt": "Which?", "completion": ""}, {"prompt": "Why?", "completion": " "}] * 4,
}


@pytest.mark.parametrize("fmt", list(BLANK))
def test_data_without_a_token_to_train_on_is_refused_before_training(tmp_path, capsys, fmt):
    """Empty texts still tokenize (BOS, EOS): the check is on the tokens TRL would train on."""
    path, out = tmp_path / "blank.jsonl", tmp_path / "out"
    path.write_text("".join(json.dumps(row) + "\n" for row in BLANK[fmt]))
    status, _, err = run_cli(["train", *tiny_flags(out), "--data", str(path)], capsys)
    loss_on = {"text": "text", "prompt-completion": "completion"}[fmt]
    assert status == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (
        f"moraft train: error: data.dataset {str(path)!r} has no token to train on after tokenization and the loss "
        f"mask, only special tokens and whitespace (every {loss_on} is empty or blank); give data with text in it"
    )
    assert not out.exists()


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
    status, _, err = run_cli(["train", *flags, "--optimization.max_steps", "2"], capsys)
    assert status == 0, err
    assert all((out / name / CHECKPOINT_MARK).is_file() for name in ("checkpoint-1", "checkpoint-2"))
    # killed the moment checkpoint-3/ appeared: it holds part of what Trainer writes
    (out / "checkpoint-3").mkdir()
    shutil.copy(out / "checkpoint-2" / "adapter_config.json", out / "checkpoint-3")

    status, stdout, err = run_cli(["train", *flags, "--optimization.max_steps", "3", "--output.resume"], capsys)
    assert status == 0, err
    assert ("moraft train: resume: skipping checkpoint-3 (written only in part: the run stopped while saving it); "
            "resuming from checkpoint-2") in stdout
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 3
    # checkpoint-3 written again, whole; output.save_total_limit (2) counts complete checkpoints
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert (out / "checkpoint-3" / CHECKPOINT_MARK).is_file()

    lone = tmp_path / "lone"  # only a half-written checkpoint: nothing to resume from
    shutil.copytree(out, lone, ignore=shutil.ignore_patterns("checkpoint-2"))
    (lone / "checkpoint-3" / CHECKPOINT_MARK).unlink()
    status, _, err = run_cli(["train", *tiny_flags(lone), "--data", str(data), "--output.save_steps", "1",
                              "--optimization.max_steps", "3", "--output.resume"], capsys)
    assert status == 2 and err.strip().endswith(
        f"resume: {str(lone)!r} has no complete checkpoint-N directory to resume from (checkpoint-3: the run stopped "
        "while writing them)"), err


def test_the_padding_of_a_zero3_partition_is_not_read_as_a_diverged_run():
    """A ZeRO-3 rank holds its partition of each parameter in ``ds_tensor``, padded past the parameter's end with
    uninitialised memory (``torch.empty``), which may hold NaN bits: only the parameter's own elements count."""
    from moraft.train.callbacks import _finite

    model = torch.nn.Linear(3, 1, bias=False)  # 3 elements; a partition of 4 on rank 0 of 1
    model.weight.ds_numel = 3
    model.weight.ds_tensor = torch.tensor([1.0, 2.0, 3.0, float("nan")])
    assert _finite(model)
    model.weight.ds_tensor[1] = float("inf")
    assert not _finite(model)

"""Two processes on CPU with torchrun (gloo): under DDP, DeepSpeed ZeRO-2 and ZeRO-3 (``--deepspeed`` with the
shipped configs) training ends with the adapter a single process trains from the same data and global batch; what
cannot work is refused before anything is written; a MoRA model sharded with torch FSDP2 saves the adapter a single
process writes (FSDP itself needs GPUs, see the last test).

Why the runs can agree: the uuid-memory examples all have the same length (75 tokens), so no rank pads; the Trainer
divides each rank's token loss by the token count of all ranks and DDP or DeepSpeed average the gradients, so the
gradient of a step is the single process's; the sampler hands the two ranks the two halves of the single process's
batch. What remains is the order of float sums (an all-reduce of two halves instead of one batch): the weights
differ by a few 1e-6, where a wrong batch, a missing all-reduce or a bad gather moves them by the learning rate
(1e-2, which is also the scale of the trained weights)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_flags
from safetensors.torch import load_file

from moraft.cli import main
from moraft.testing import input_ids, logits
from moraft.train import load_trained

ROOT = Path(__file__).resolve().parents[1]
DRIVERS = Path(__file__).resolve().parent / "distributed"
CONFIGS = ROOT / "examples" / "distributed"
ZERO3_ENV = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}  # accelerate launch's
# 4 steps of a global batch of 4 on 16 pairs: each step takes its 4 examples in the sampler's order
RUN = ["--data.num_pairs=16", "--optimization.max_steps=4"]
SINGLE_BATCH, PER_RANK_BATCH = 4, 2
TOKENS = 75  # BOS + "key:value" (two UUIDs of 36 characters around a colon) + EOS
ATOL, RTOL = 1e-5, 1e-4


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1", **extra}


def _torchrun(*args: str, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "adapter_model.safetensors")


def _history(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]


def _assert_same_adapter(got: Path, expected: Path) -> None:
    want, have = _tensors(expected), _tensors(got)
    assert sorted(have) == sorted(want)
    for key, tensor in want.items():
        assert tensor.abs().sum() > 0, key  # trained: MoRA's M starts at zero
        assert torch.allclose(have[key], tensor, atol=ATOL, rtol=RTOL), (key, (have[key] - tensor).abs().max())


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference runs, one process with the global batch, by merge_every (0 or 2)."""
    runs = {}

    def run(merge_every: int) -> Path:
        if merge_every not in runs:
            out = tmp_path_factory.mktemp("single") / "run"
            main(["train", *tiny_flags(out), *RUN, f"--optimization.batch_size={SINGLE_BATCH}",
                  f"--adapter.merge_every={merge_every}"])
            runs[merge_every] = out
        return runs[merge_every]

    return run


CASES = {  # name: (flags, merge_every, what train_summary.json says of the sharding)
    "ddp": ([], 2, None),  # with ReMoRA's merges, which DDP keeps in step on both ranks
    "zero2": (["--deepspeed", str(CONFIGS / "zero2.json")], 0, None),
    "zero3": (["--deepspeed", str(CONFIGS / "zero3.json")], 0, "DeepSpeed ZeRO-3"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_train_the_adapter_one_process_trains(tmp_path, single, case):
    flags, merge_every, sharding = CASES[case]
    out = tmp_path / case
    done = _torchrun("-m", "moraft", "train", *tiny_flags(out), *RUN, f"--optimization.batch_size={PER_RANK_BATCH}",
                     f"--adapter.merge_every={merge_every}", *flags, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    reference = single(merge_every)

    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4 and summary["sharding"] == sharding
    if sharding:  # each rank holds its part of every parameter: nothing to compare
        assert summary["ranks_in_sync"] is None and summary["rank_digests"] == []
    else:
        assert summary["ranks_in_sync"] and len(set(summary["rank_digests"])) == 1
    assert summary["merges"] == (["step-2"] if merge_every else [])

    history, expected = _history(out), _history(reference)
    seen = [e["num_input_tokens_seen"] for e in history if "loss" in e]
    assert seen == [2 * PER_RANK_BATCH * TOKENS * k for k in (1, 2, 3, 4)]  # each step saw the global batch
    losses, expected_losses = ([e["loss"] for e in h if "loss" in e] for h in (history, expected))
    assert len(losses) == len(expected_losses) == 4
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(losses, expected_losses)), (losses, expected_losses)
    # the final evaluation (greedy generation) ran on both ranks, as ZeRO-3's forward passes gather from all of them
    assert [e["step"] for e in history if "char_accuracy" in e] == [4] and "char_accuracy" in summary["final"]

    _assert_same_adapter(out, reference)
    for merged in summary["merges"]:
        _assert_same_adapter(out / "merges" / merged, reference / "merges" / merged)
    assert not (out / "training_args.bin").exists() and not (out / ".final.tmp").exists()
    ids = input_ids(rows=2, length=12)
    (model, _, _), (ref, _, _) = load_trained(str(out)), load_trained(str(reference))  # merges included
    assert torch.allclose(logits(model, ids), logits(ref, ids), atol=1e-4)


@pytest.mark.parametrize("route", ["--deepspeed zero2.json", "accelerate launch --use_deepspeed --zero_stage 3"])
def test_deepspeed_refuses_merge_every_before_writing(tmp_path, route):
    """ReMoRA's merges under ZeRO-3 change base weights that ranks hold parts of; under ZeRO-1/2 DeepSpeed's
    optimizer steps its own fp32 copy of the adapter and writes it back over the restarted one (a run that was let
    through ended 0.03 away from the single process's adapter, whose weights are 0.008 at most). The ZeRO-3 case
    comes in through the environment accelerate launch sets, the route of a run without --deepspeed."""
    out = tmp_path / "remora"
    flags, env = ["--adapter.method=mora", "--adapter.merge_every=2"], _env()
    if route.startswith("--deepspeed"):
        flags.append(f"--deepspeed={CONFIGS / 'zero2.json'}")
    else:
        env.update(ZERO3_ENV)
    done = _torchrun("-m", "moraft", "train", *tiny_flags(out), *flags, env=env)
    assert done.returncode != 0 and "exitcode  : 2" in done.stderr, done.stderr[-3000:]  # torchrun: the ranks' status
    expected = ("which DeepSpeed ZeRO-3 shards across processes" if "zero_stage 3" in route else
                "but DeepSpeed ZeRO-2 steps its own fp32 copy of the adapter and copies it back")
    assert "moraft train: error: adapter.merge_every=2: ReMoRA/ReLoRA" in done.stderr and expected in done.stderr
    assert "runner.py" not in done.stderr and not out.exists()  # one line, no traceback; nothing written


def test_fsdp2_gathered_adapter_equals_the_single_process_one(tmp_path):
    """accelerate (1.15) enables FSDP only on GPUs: on CPU its state stays MULTI_CPU, so Trainer cannot run FSDP here
    (moraft refuses distributed.fsdp on CPU). The driver shards a moraft MoRA model with ``fully_shard`` itself and
    makes the gather ``Trainer.save_model`` makes under FSDP2 (accelerate's ``get_state_dict``), which the runner
    relies on."""
    done = _torchrun(str(DRIVERS / "fsdp2_save.py"), str(tmp_path), env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["sharded_trainable"] > 0  # the adapter's own parameters are shards (DTensors)
    assert result["max_logit_difference"] < 1e-5  # MoRA computes the same under fully_shard
    assert result["plain_save"] != "wrote"  # the old save (save_pretrained of the sharded model) cannot work
    expected, got = _tensors(tmp_path / "single"), _tensors(tmp_path / "gathered")
    assert sorted(got) == sorted(expected)
    for key, tensor in expected.items():
        assert tensor.abs().sum() > 0 and torch.equal(got[key], tensor), key

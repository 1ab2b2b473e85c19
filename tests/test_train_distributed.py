"""Two processes on CPU with torchrun (gloo): under DDP the ranks stay in sync and the saved adapter loads; under
DeepSpeed ZeRO-3 and torch FSDP2, where each rank holds a part of every parameter, the adapter saved is the one a
single process writes from the same state."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from helpers import tiny_flags, tiny_options
from safetensors.torch import load_file

from moraft.testing import logits
from moraft.train import load_trained

SRC = str(Path(__file__).resolve().parents[1] / "src")
DRIVERS = Path(__file__).resolve().parent / "distributed"
ZERO3 = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3", "DS_ACCELERATOR": "cpu"}


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1", **extra}


def _torchrun(*args: str, env: dict, timeout: int = 200) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def test_torchrun_two_processes_stay_in_sync(tmp_path):
    out = tmp_path / "ddp"
    flags = ["--optimization.max_steps=4", "--adapter.method=mora", "--adapter.merge_every=2"]
    done = _torchrun("-m", "moraft", "train", *tiny_flags(out), *flags, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]

    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_in_sync"] and summary["sharding"] is None
    assert len(summary["rank_digests"]) == 2 and len(set(summary["rank_digests"])) == 1
    # 4 steps of 2 processes × batch 4 = 32 examples: each rank saw its own half of every global batch
    assert summary["steps"] == 4 and summary["merges"] == ["step-2"]
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["num_input_tokens_seen"] for e in history if "loss" in e] == [8 * 75 * k for k in (1, 2, 3, 4)]

    adapter = load_file(out / "adapter_model.safetensors")
    assert adapter and all(t.abs().sum() > 0 for t in adapter.values())
    model, tokenizer, _ = load_trained(str(out))
    ids = torch.tensor([tokenizer("abc:def").input_ids])
    assert torch.isfinite(logits(model, ids)).all()


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "adapter_model.safetensors")


def test_deepspeed_zero3_saves_the_adapter_a_single_process_writes(tmp_path):
    # evaluation every step and at the end runs on both ranks: ZeRO-3's forward gathers from all of them
    single, zero3 = tmp_path / "single", tmp_path / "zero3"

    def options(out: Path) -> str:
        run = tiny_options(out, adapter={"method": "mora", "r": 8}, output={"eval_steps": 1})
        return json.dumps(run.to_dict())

    driver = str(DRIVERS / "train_with_state.py")
    done = subprocess.run([sys.executable, driver, options(single)], env=_env(), capture_output=True, text=True,
                          timeout=200)
    assert done.returncode == 0, done.stderr[-3000:]
    done = _torchrun(driver, options(zero3), env=_env(**ZERO3))
    assert done.returncode == 0, done.stderr[-3000:]

    summary = json.loads((zero3 / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["sharding"] == "DeepSpeed ZeRO-3"
    assert summary["ranks_in_sync"] is None and summary["rank_digests"] == []
    evaluated = [json.loads(line)["step"] for line in (zero3 / "metrics.jsonl").read_text().splitlines()
                 if "char_accuracy" in line]
    assert evaluated == [1, 2, 3]
    expected, got = _tensors(single), _tensors(zero3)
    assert sorted(got) == sorted(expected)
    for key, tensor in expected.items():
        assert tensor.abs().sum() > 0 and torch.equal(got[key], tensor), key
    assert not (zero3 / "training_args.bin").exists() and not (zero3 / ".final.tmp").exists()
    model, _, _ = load_trained(str(zero3))
    assert torch.isfinite(logits(model, torch.tensor([[1, 2, 3]]))).all()


def test_deepspeed_zero3_refuses_merge_every_before_writing(tmp_path):
    out = tmp_path / "remora"
    flags = ["--adapter.method=mora", "--adapter.merge_every=2"]
    done = _torchrun("-m", "moraft", "train", *tiny_flags(out), *flags, env=_env(**ZERO3))
    assert done.returncode != 0 and "exitcode  : 2" in done.stderr, done.stderr[-3000:]  # torchrun: the ranks' status
    assert "adapter.merge_every=2: ReMoRA/ReLoRA merge the adapter into the base weights, which DeepSpeed ZeRO-3 shards" \
        in done.stderr
    assert "runner.py" not in done.stderr and not out.exists()  # one line, no traceback; nothing written


def test_fsdp2_gathered_adapter_equals_the_single_process_one(tmp_path):
    """accelerate (1.15) enables FSDP only on GPUs: on CPU its state stays MULTI_CPU, so Trainer cannot run FSDP here.
    The driver shards a moraft MoRA model with ``fully_shard`` itself and makes the gather ``Trainer.save_model``
    makes under FSDP2 (accelerate's ``get_state_dict``), which the runner relies on."""
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

"""Two processes on CPU with torchrun (gloo): the ranks stay in sync and the saved adapter loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from moraft.train import load_trained

from _train_helpers import TINY, logits

SRC = str(Path(__file__).resolve().parents[1] / "src")


def test_torchrun_two_processes_stay_in_sync(tmp_path):
    out = tmp_path / "ddp"
    flags = [arg for key, value in {**TINY, "max_steps": 4, "method": "mora", "merge_every": 2}.items()
             for arg in (f"--{key}", str(value))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "moraft", "train", *flags, "--output_dir", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_in_sync"]
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

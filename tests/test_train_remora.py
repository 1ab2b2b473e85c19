"""ReMoRA / ReLoRA (merge every N steps) and resuming: merging keeps the model's function and restarts the adapter,
the optimizer state and the learning rate; a run reloads whole (base + merged adapters + final adapter); a resumed
run ends exactly where an uninterrupted one does."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from helpers import tiny_options
from peft import PeftModel
from safetensors.torch import load_file
from transformers import TrainerCallback

from moraft.errors import UserError
from moraft.testing import logits, randomize_adapter
from moraft.train import AdapterOptions, apply_method, load_trained, merge_and_restart, tiny_llama, train
from moraft.train.callbacks import MergeEvery, restarting_schedule

IDS = torch.tensor([[1, 20, 30, 40, 50, 60, 70, 80]])


@pytest.mark.parametrize("method, compression", [("mora", "sharing"), ("mora", "rotation"), ("lora", "sharing")])
def test_merge_and_restart_keeps_function_and_restarts_adapter(tmp_path, method, compression):
    model, _ = tiny_llama(0, 32, 2)
    model = apply_method(model, AdapterOptions(method=method, compression=compression, init_weights=False))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    before, weight = logits(model, IDS), layer.base_layer.weight.clone()

    restarted = merge_and_restart(model, seed=1)
    torch.testing.assert_close(logits(model, IDS), before, rtol=0, atol=2e-5)  # ΔW moved into the base
    assert not torch.equal(layer.base_layer.weight, weight) and not layer.merged
    if method == "mora":
        assert layer.mora_M["default"].abs().sum() == 0
        assert len(restarted) == sum(1 for name, _ in model.named_parameters() if "mora_M" in name)
        grouping = "contiguous" if compression == "sharing" else "strided"  # only sharing switches
        assert layer.mora_operator["default"].input_grouping == grouping
        assert layer.mora_operator["default"].output_grouping == grouping
        assert model.peft_config["default"].input_grouping == grouping  # what save_pretrained writes
    else:
        assert layer.lora_B["default"].weight.abs().sum() == 0 and layer.lora_A["default"].weight.abs().sum() > 0

    if compression == "sharing" and method == "mora":
        # a trained M under the switched grouping, merged again: the function is still kept and grouping switches back
        randomize_adapter(model, std=0.05)
        before = logits(model, IDS)
        merge_and_restart(model, seed=2)
        torch.testing.assert_close(logits(model, IDS), before, rtol=0, atol=2e-5)
        assert model.peft_config["default"].input_grouping == "strided"


def test_merge_callback_resets_optimizer_state_and_saves_the_merged_adapter(tmp_path):
    model, _ = tiny_llama(0, 32, 1)
    model = apply_method(model, AdapterOptions(method="mora", init_weights=False))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    model(input_ids=IDS, labels=IDS).loss.backward()
    optimizer.step()
    assert all(p in optimizer.state for p in params)
    state = SimpleNamespace(global_step=4, max_steps=10)
    MergeEvery(2, tmp_path, True, 0, is_main=True).on_step_end(None, state, None, model=model, optimizer=optimizer)
    assert not any(p in optimizer.state for p in params)  # AdamW moments start afresh
    saved = json.loads((tmp_path / "merges" / "step-4" / "adapter_config.json").read_text())
    assert saved["input_grouping"] == "strided"  # the grouping the merged adapter was trained with
    merged = load_file(tmp_path / "merges" / "step-4" / "adapter_model.safetensors")
    assert merged and all(t.abs().sum() > 0 for t in merged.values())


def test_restarting_schedule_rewarms_after_each_merge():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    constant = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scheduler = restarting_schedule(constant, every=10, warmup=4)
    lrs = []
    for _ in range(25):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # lrs[i] is the learning rate of update i+1: the update right after the merge at step 10 (and 20) uses lr/4,
    # the next ones 2/4 and 3/4, then the full lr again
    assert lrs[:10] == [1.0] * 10 and lrs[10:15] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lrs[20:24] == [0.25, 0.5, 0.75, 1.0]


class StopAt(TrainerCallback):
    """Interrupts training after ``step`` (as a crash would, right after the checkpoint of that step)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


RESUME_CASES = {
    "lora": {"method": "lora"},
    "remora-sharing": {"method": "mora", "compression": "sharing", "merge_every": 2},
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_equals_uninterrupted_and_run_reloads_whole(tmp_path, case):
    optimization = {"max_steps": 6, "learning_rate": 5e-3, "lr_scheduler": "linear"}
    common = dict(adapter=RESUME_CASES[case], optimization=optimization)
    whole = train(tiny_options(tmp_path / "whole", output={"save_steps": 3}, **common))
    train(tiny_options(tmp_path / "split", output={"save_steps": 3}, **common), callbacks=[StopAt(3)])
    assert (tmp_path / "split" / "checkpoint-3").is_dir()
    resume = {"save_steps": 3, "resume": True}
    with pytest.raises(UserError, match=r"optimization.learning_rate \(0.005 before, 0.001 now\)"):
        changed = {**common, "optimization": {**optimization, "learning_rate": 1e-3}}
        train(tiny_options(tmp_path / "split", output=resume, **changed))
    resumed = train(tiny_options(tmp_path / "split", output=resume, **common))

    a = load_file(whole.output_dir / "adapter_model.safetensors")
    b = load_file(resumed.output_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda r: {e["step"]: e["loss"] for e in r.history if "loss" in e}  # noqa: E731
    assert losses(resumed) == pytest.approx(losses(whole), abs=1e-6)
    metrics = [json.loads(line) for line in (resumed.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in metrics if "loss" in e] == [1, 2, 3, 4, 5, 6]  # no step logged twice

    reloaded, _, _ = load_trained(str(resumed.output_dir))
    torch.testing.assert_close(logits(reloaded, IDS), logits(whole.model, IDS), rtol=0, atol=1e-5)
    if case == "remora-sharing":
        merges = sorted(p.name for p in (resumed.output_dir / "merges").iterdir())
        assert merges == ["step-2", "step-4"]  # not at the last step
        config = json.loads((resumed.output_dir / "adapter_config.json").read_text())
        assert config["input_grouping"] == "strided"  # switched twice
        # the final adapter alone is only the last segment of the update
        base, _ = tiny_llama(0, 32, 2)
        alone = PeftModel.from_pretrained(base, resumed.output_dir)
        assert not torch.allclose(logits(alone, IDS), logits(whole.model, IDS), atol=1e-4)

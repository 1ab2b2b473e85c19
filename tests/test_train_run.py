"""Short training runs: every method (a row each) and every data format, checking what a run must guarantee:
only the method's parameters change, the outputs are written, and what was saved reloads to the same model."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from helpers import tiny_options
from safetensors.torch import load_file

from moraft.cli import main
from moraft.testing import logits
from moraft.train import load_trained, tiny_llama, train

METHODS = {
    "mora-sharing": dict(adapter={"method": "mora", "compression": "sharing"}),
    "mora-rotation": dict(adapter={"method": "mora", "compression": "rotation"}),
    "lora": dict(adapter={"method": "lora"}),
    "dora": dict(adapter={"method": "dora"}),
    "full": dict(adapter={"method": "full"}, optimization={"learning_rate": 1e-3}),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_method_trains_saves_and_reloads(tmp_path, name):
    options = tiny_options(tmp_path / name, output={"eval_steps": 2}, **METHODS[name])
    base, _ = tiny_llama(0, options.model.builtin_hidden_size, options.model.builtin_num_layers)
    result = train(options)
    out = result.output_dir

    for file in ("train_config.yaml", "metrics.jsonl", "loss.png", "train_summary.json", "tokenizer.json"):
        assert (out / file).is_file() and (out / file).stat().st_size > 0, file
    assert yaml.safe_load((out / "train_config.yaml").read_text())["adapter"]["method"] == options.adapter.method
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in history if "loss" in e] == [1, 2, 3]
    assert all("learning_rate" in e and "tokens_per_second" in e for e in history if "loss" in e)
    assert [e["step"] for e in history if "char_accuracy" in e] == [2, 3]  # every eval_steps, and at the end
    assert result.curve("char_accuracy") == [(e["step"], e["char_accuracy"]) for e in history if "char_accuracy" in e]

    trained = load_file(out / ("model.safetensors" if name == "full" else "adapter_model.safetensors"))
    if name == "full":
        assert not (out / "adapter_config.json").exists()
        q_proj = trained["model.layers.0.self_attn.q_proj.weight"]
        assert not torch.equal(q_proj, base.model.layers[0].self_attn.q_proj.weight)
    else:
        # the adapter only, never a copy of the base; and it moved away from its (zero) initialisation
        assert not any(key.endswith("q_proj.weight") and "lora" not in key for key in trained)
        assert all(t.abs().sum() > 0 for key, t in trained.items() if "mora_M" in key or "lora_B" in key)
        assert result.trainable_parameters == sum(t.numel() for t in trained.values())

    # what was saved reloads into the model that was trained
    reloaded, tokenizer, _ = load_trained(str(out))
    ids = torch.tensor([tokenizer("0123-abcd:ffff").input_ids])
    torch.testing.assert_close(logits(reloaded, ids), logits(result.model, ids), rtol=0, atol=1e-5)
    assert not torch.allclose(logits(reloaded, ids), logits(base, ids), atol=1e-4)  # and it differs from the base


CHAT = [
    {"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
    for w in ("red", "green", "blue", "cyan")
]
PROMPTS = [{"prompt": f"{a}+{a}=", "completion": str(2 * a)} for a in range(6)]


@pytest.mark.parametrize("data_format", ["chat", "prompt-completion", "text"])
def test_data_formats_through_the_cli_with_yaml_and_flags(tmp_path, capsys, data_format):
    if data_format == "text":
        data = tmp_path / "corpus.txt"
        data.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    else:
        data = tmp_path / "data.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in (CHAT if data_format == "chat" else PROMPTS)))
    out = tmp_path / "out"
    config = tmp_path / "run.yaml"
    options = tiny_options(out, data={"dataset": str(data), "seq_length": 64}, optimization={"max_steps": 5},
                           adapter={"method": "lora"})
    config.write_text(yaml.safe_dump(options.to_dict()))
    # flags win over the file
    main(["train", "--config", str(config), "--optimization.max_steps", "2", "--adapter.method", "mora"])
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 2 and summary["method"] == "mora"
    assert torch.isfinite(torch.tensor(summary["final"]["train_loss"]))
    resolved = yaml.safe_load((out / "train_config.yaml").read_text())
    assert resolved["data"]["dataset"] == str(data) and resolved["data"]["seq_length"] == 64
    assert resolved["optimization"]["max_steps"] == 2 and resolved["adapter"]["method"] == "mora"


def test_eval_data_logs_perplexity(tmp_path):
    text = tmp_path / "held_out.txt"
    text.write_text("abc " * 100)
    data = {"dataset": str(text), "eval_dataset": str(text), "seq_length": 32}
    result = train(tiny_options(tmp_path / "run", data=data, output={"eval_steps": 2}))
    ppl = result.curve("eval_perplexity")
    assert [step for step, _ in ppl] == [2, 3] and all(1 < p < 200 for _, p in ppl)


def test_training_options_bf16_checkpointing_accumulation_schedule(tmp_path):
    options = tiny_options(
        tmp_path / "run",
        adapter={"method": "mora", "compression": "rotation"},
        optimization={"bf16": True, "gradient_checkpointing": True, "gradient_accumulation_steps": 2,
                      "warmup_steps": 1, "lr_scheduler": "cosine", "max_steps": -1, "epochs": 3},
        output={"eval_steps": 0},
    )
    result = train(options)
    # 8 pairs, 4 per forward pass, 2 passes per step: one step per epoch
    losses = result.curve("loss")
    assert [step for step, _ in losses] == [1, 2, 3] and all(torch.isfinite(torch.tensor(v)) for _, v in losses)
    # the learning rate of each update: linear warmup from 0 over 1 step, then a cosine over the remaining 2
    lrs = [lr for _, lr in result.curve("learning_rate")]
    peak = options.optimization.learning_rate
    assert lrs == pytest.approx([0.0, peak, peak / 2])


def test_local_gpt2_directory(tmp_path, gpt2_dir):
    """A model directory on disk (here a GPT-2, whose projections are Conv1D) with its own tokenizer."""
    data = tmp_path / "pc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    for method in ("mora", "lora"):
        result = train(tiny_options(
            tmp_path / method, model={"name_or_path": str(gpt2_dir)}, data={"dataset": str(data)},
            adapter={"method": method, "target_modules": ["c_attn", "c_proj", "c_fc"]}, optimization={"max_steps": 2},
        ))
        reloaded, tok, described = load_trained(str(result.output_dir))
        assert str(gpt2_dir) in described
        ids = torch.tensor([tok("1+1=").input_ids])
        torch.testing.assert_close(logits(reloaded, ids), logits(result.model, ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("compression", ["sharing", "rotation"])
def test_mora_backward_under_bf16_autocast(compression):
    """What --bf16 does to a MoRA layer: the forward runs in bf16 and the backward must not mix dtypes."""
    from moraft.mora.operators import MoraOperator

    op = MoraOperator(64, 48, 16, compression=compression)
    x = torch.randn(3, 64, requires_grad=True)
    m = torch.randn(16, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = op.apply(x, m)
    assert y.dtype == torch.bfloat16
    (y.float() * torch.linspace(-1, 1, 48)).sum().backward()
    m32 = m.detach().requires_grad_()
    reference_m = torch.autograd.grad((op.apply(x.detach(), m32) * torch.linspace(-1, 1, 48)).sum(), m32)[0]
    assert m.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    torch.testing.assert_close(m.grad, reference_m, rtol=0.05, atol=0.05 * reference_m.abs().max().item())

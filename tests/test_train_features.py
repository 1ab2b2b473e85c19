"""TrainingArguments' own features as `moraft train` options: each one is on during the run and trains the same
adapter as a plain run where it should (gradient checkpointing, torch.compile), and `moraft eval --text` reads any
text source."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset
from helpers import tiny_options
from safetensors.torch import load_file
from transformers import TrainerCallback

from moraft.cli import main
from moraft.train import train


def _adapter(out):
    return load_file(out / "adapter_model.safetensors")


def _close(a: dict, b: dict, atol: float) -> bool:
    return sorted(a) == sorted(b) and all((a[k] - b[k]).abs().max().item() <= atol for k in a)


class Probe(TrainerCallback):
    """What the model looks like while it trains."""

    def __init__(self) -> None:
        self.checkpointing: list[bool] = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.checkpointing.append(bool(getattr(model, "is_gradient_checkpointing", False)))


def test_gradient_checkpointing_trains_the_same_adapter(tmp_path):
    plain, probed = Probe(), Probe()
    train(tiny_options(tmp_path / "plain"), callbacks=[plain])
    train(tiny_options(tmp_path / "ckpt", optimization={"gradient_checkpointing": True}), callbacks=[probed])
    assert plain.checkpointing == [False] * 3 and probed.checkpointing == [True] * 3
    assert _close(_adapter(tmp_path / "plain"), _adapter(tmp_path / "ckpt"), atol=1e-6)


def test_torch_compile_trains_the_same_adapter(tmp_path):
    """torch.compile (inductor on the CPU): about a minute on 2 cores, the one slow test of this file."""
    from torch._dynamo.utils import counters

    steps = {"max_steps": 1}
    train(tiny_options(tmp_path / "plain", optimization=steps))
    counters.clear()
    result = train(tiny_options(tmp_path / "compiled", optimization={**steps, "torch_compile": True}))
    assert result.final["train_loss"] > 0 and counters["stats"]["unique_graphs"] > 0  # dynamo compiled the model
    assert _close(_adapter(tmp_path / "plain"), _adapter(tmp_path / "compiled"), atol=1e-5)


def test_bf16_mixed_precision_trains(tmp_path):
    result = train(tiny_options(tmp_path / "bf16", optimization={"bf16": True}))
    assert result.final["train_loss"] > 0 and all(t.abs().sum() > 0 for t in _adapter(tmp_path / "bf16").values())


def test_liger_without_its_package_is_one_line(tmp_path, capsys):
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("liger-kernel is installed")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--output.dir", str(tmp_path / "out"), "--optimization.use_liger_kernel"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.count("\n") == 0
    assert "optimization.use_liger_kernel=True needs the liger-kernel package" in err
    assert not (tmp_path / "out").exists()


def test_eval_perplexity_on_a_parquet_text_column(tmp_path, capsys):
    text = "the quick brown fox jumps over the lazy dog. " * 8
    Dataset.from_list([{"text": text}] * 3).to_parquet(str(tmp_path / "held_out.parquet"))
    (tmp_path / "held_out.txt").write_text(text + "\n")
    main(["eval", "builtin:tiny-llama", "--text", str(tmp_path / "held_out.parquet"), "--seq_length", "64"])
    parquet = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    main(["eval", "builtin:tiny-llama", "--text", str(tmp_path / "held_out.txt"), "--seq_length", "64"])
    single = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # three documents of the same text: three times the tokens; a random model is near-uniform over its vocabulary
    assert parquet["task"] == "perplexity" and parquet["tokens"] > 2.9 * single["tokens"]
    assert 50 < parquet["perplexity"] < 200 and abs(parquet["loss"] - single["loss"]) < 0.05


def test_attention_implementation(tmp_path, capsys):
    seen = []

    class Attention(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            seen.append(model.config._attn_implementation)

    train(tiny_options(tmp_path / "eager", model={"attn_implementation": "eager"}, optimization={"max_steps": 1}),
          callbacks=[Attention()])
    assert seen == ["eager"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--output.dir", str(tmp_path / "out"), "--model.attn_implementation", "flash_attention_2"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err and not (tmp_path / "out").exists()
    assert "model.attn_implementation='flash_attention_2' cannot be used: FlashAttention2" in err

"""Quantized bases (QMoRA, QLoRA) on the CPU: ``moraft train --model.quantization 4bit|8bit`` trains MoRA, LoRA and
DoRA on a base that transformers quantized with bitsandbytes; the adapter loads on the unquantized base; ``moraft
merge`` merges it into the unquantized weights as PEFT's merge_and_unload does, and writes a quantized model only
when asked, printing how much of the update the quantized weights keep."""

from __future__ import annotations

import json
import sys

import bitsandbytes as bnb
import pytest
import torch
from helpers import tiny_flags, tiny_options
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import moraft  # noqa: F401  (registers MoRA with PEFT)
from moraft.cli import main
from moraft.testing import input_ids, logits
from moraft.errors import UserError
from moraft.train import BUILTIN_MODEL, TrainOptions, load_trained, train

QUANTIZED_LAYER = {"4bit": bnb.nn.Linear4bit, "8bit": bnb.nn.Linear8bitLt}


def run_cli(argv, capsys):
    """(exit status, stdout, stderr) of ``moraft ARGV`` run in this process."""
    try:
        main(argv)
        status = 0
    except SystemExit as exit_:
        status = exit_.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def quantized_run(out, base, quantization, method="mora", **groups):
    """A short run on ``base`` quantized; a learning rate large enough that the adapter moves well off its start."""
    model = {"name_or_path": str(base), "quantization": quantization, **groups.pop("model", {})}
    return train(tiny_options(out, model=model, adapter={"method": method}, **groups))


def adapter_params(model) -> dict[str, torch.Tensor]:
    """The trainable tensors of a PEFT model, by the names PEFT saves them under."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().float() for k, v in get_peft_model_state_dict(model).items()}


# -- training -------------------------------------------------------------------------------------------------------

ROWS = {  # (quantization, method, more options): every method on both grids, and the 4-bit options
    "4bit-mora": ("4bit", "mora", {}),
    "4bit-lora": ("4bit", "lora", {}),
    "4bit-dora": ("4bit", "dora", {}),
    "8bit-mora": ("8bit", "mora", {}),
    "8bit-lora": ("8bit", "lora", {}),
    "4bit-mora-fp4-double-bf16-checkpointing": (
        "4bit", "mora",
        {"model": {"quant_type": "fp4", "double_quant": True, "compute_dtype": "bfloat16"},
         "optimization": {"gradient_checkpointing": True}},
    ),
}


@pytest.mark.parametrize("row", list(ROWS))
def test_method_trains_on_quantized_base_and_loads_on_the_unquantized_one(tmp_path, row, llama_dir):
    quantization, method, options = ROWS[row]
    result = quantized_run(tmp_path / "run", llama_dir, quantization, method, **options)
    model, out = result.model, result.output_dir

    # the base really is quantized as asked, and only the adapter trained
    layers = [m for m in model.modules() if isinstance(m, QUANTIZED_LAYER[quantization])]
    assert len(layers) == 14  # every projection of 2 LLaMA layers
    if quantization == "4bit":
        model_options = {"quant_type": "nf4", "double_quant": False, "compute_dtype": "float32",
                         **options.get("model", {})}
        for layer in layers:
            assert layer.weight.quant_state.quant_type == model_options["quant_type"]
            assert layer.weight.quant_state.nested == model_options["double_quant"]
            assert layer.compute_dtype == getattr(torch, model_options["compute_dtype"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("mora_" in n or "lora_" in n) for n in trainable), trainable
    losses = [loss for _, loss in result.curve("loss")]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))

    # the adapter saved as usual, for the unquantized base it was loaded from
    saved = load_file(out / "adapter_model.safetensors")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(llama_dir)
    trained = adapter_params(model)
    assert saved.keys() == trained.keys()
    for key, tensor in saved.items():
        torch.testing.assert_close(tensor.float(), trained[key], rtol=0, atol=0)
    moved = [t for k, t in saved.items() if "mora_M" in k or "lora_B" in k]
    assert moved and all(t.abs().sum() > 0 for t in moved)  # zero at the start

    # PEFT loads it on the unquantized base: the same tensors, and the model changes
    plain = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    ids = input_ids()
    before = logits(plain, ids)
    loaded = PeftModel.from_pretrained(plain, out).eval()
    for key, tensor in adapter_params(loaded).items():
        torch.testing.assert_close(tensor, saved[key].float(), rtol=0, atol=0)
    assert (logits(loaded, ids) - before).abs().max() > 1e-4

    # moraft eval's loader rebuilds the run as trained: the base quantized alike, the same logits
    reloaded, _, _ = load_trained(str(out))
    assert any(isinstance(m, QUANTIZED_LAYER[quantization]) for m in reloaded.modules())
    torch.testing.assert_close(logits(reloaded, ids), logits(model.eval(), ids), rtol=0, atol=1e-5)


def test_builtin_model_quantized_records_the_builtin_name(tmp_path):
    result = train(tiny_options(tmp_path / "run", model={"builtin_hidden_size": 64, "quantization": "4bit"}))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in result.model.modules())
    config = json.loads((result.output_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == BUILTIN_MODEL


BAD = {
    "4bit option with 8bit": (
        ["--model.quantization", "8bit", "--model.quant_type", "fp4"],
        "model.quant_type is a 4bit option; it does nothing with quantization='8bit'",
    ),
    "4bit option without quantization": (
        ["--model.double_quant"], "model.double_quant is a 4bit option; it does nothing with quantization='none'"
    ),
    "compute dtype without 4bit": (
        ["--model.compute_dtype", "bfloat16"], "model.compute_dtype is a 4bit option; it does nothing with"
    ),
    "builtin too narrow for 4-bit blocks": (
        ["--model.name_or_path", BUILTIN_MODEL, "--model.quantization", "4bit"],
        "model.builtin_hidden_size=32 is invalid; expected a multiple of 64 with quantization=4bit",
    ),
    "full fine-tuning of a quantized base": (
        ["--model.name_or_path", "{base}", "--model.quantization", "4bit", "--adapter.method", "full"],
        "adapter.method='full': you cannot perform fine-tuning on purely quantized models (model.quantization='4bit')",
    ),
    "ReMoRA merges into a quantized base": (
        ["--model.name_or_path", "{base}", "--model.quantization", "8bit", "--adapter.merge_every", "2"],
        "adapter.merge_every=2: ReMoRA/ReLoRA merge the adapter into the base weights, which are quantized here",
    ),
    "DoRA on an 8-bit base on the CPU": (
        ["--model.name_or_path", "{base}", "--model.quantization", "8bit", "--adapter.method", "dora"],
        "adapter.method='dora' does not train on an 8-bit base on the CPU",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_quantization_input_is_one_line_and_writes_nothing(tmp_path, capsys, case, llama_dir):
    flags, expected = BAD[case]
    flags = [str(llama_dir) if f == "{base}" else f for f in flags]
    out_dir = tmp_path / "out"
    status, _, err = run_cli(["train", *tiny_flags(out_dir), *flags], capsys)
    assert status == 2
    lines = [line for line in err.strip().splitlines() if not line.startswith("Loading weights")]  # transformers' bar
    assert len(lines) == 1 and expected in lines[0], err
    assert not out_dir.exists()


def test_unknown_quantization_names_the_value(tmp_path, capsys):
    # from Python or YAML: the group's own check
    options = TrainOptions.from_dict({"model": {"quantization": "3bit"}})
    with pytest.raises(UserError, match=r"^model.quantization='3bit' is invalid; expected one of none, 4bit, 8bit$"):
        options.validate()
    # on the command line the argument parser refuses it first (usage, then the error naming flag and value)
    status, _, err = run_cli(["train", *tiny_flags(tmp_path / "out"), "--model.quantization", "3bit"], capsys)
    assert status == 2 and "model.quantization" in err and "Expected a typing.Literal['none', '4bit', '8bit']" in err
    assert "Got value: 3bit" in err and not (tmp_path / "out").exists()


def test_without_bitsandbytes_the_error_says_what_to_install(tmp_path, capsys, monkeypatch, llama_dir):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now raises ImportError
    status, _, err = run_cli(["train", *tiny_flags(tmp_path / "out"), "--model.name_or_path", str(llama_dir),
                              "--model.quantization", "4bit"], capsys)
    assert status == 2 and err.count("\n") == 1
    assert "model.quantization='4bit' needs bitsandbytes, which is not installed: pip install" in err
    assert not (tmp_path / "out").exists()

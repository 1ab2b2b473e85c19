"""Quantized bases (QMoRA, QLoRA) on the CPU: ``moraft train --model.quantization 4bit|8bit`` trains MoRA, LoRA and
DoRA on a base that transformers quantized with bitsandbytes; the adapter loads on the unquantized base; ``moraft
merge`` merges it into the unquantized weights as PEFT's merge_and_unload does, and writes a quantized model only
when asked, printing how much of the update the quantized weights keep."""

from __future__ import annotations

import json
import re
import sys

import bitsandbytes as bnb
import pytest
import torch
from helpers import run_cli, tiny_flags, tiny_options
from peft import PeftModel
from quantized import dequantized as read_grid
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from moraft import MoraConfig  # importing moraft registers MoRA with PEFT
from moraft.interop import merge_adapter
from moraft.quantization import KeptUpdate
from moraft.testing import input_ids, logits, save_adapter, tiny_llama
from moraft.errors import UserError
from moraft.train import BUILTIN_MODEL, TrainOptions, load_trained, train

QUANTIZED_LAYER = {"4bit": bnb.nn.Linear4bit, "8bit": bnb.nn.Linear8bitLt}



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
    """32 wide: rows of half a 4-bit block, which bitsandbytes' repacking for its CPU kernel (AVX512-BF16) cannot
    take; the weights keep bitsandbytes' own layout, so evaluating (every step here) works."""
    result = train(tiny_options(tmp_path / "run", model={"quantization": "4bit"}, output={"eval_steps": 1}))
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
    # on the command line the argument parser refuses it first, as one line naming flag, value and choices
    status, _, err = run_cli(["train", *tiny_flags(tmp_path / "out"), "--model.quantization", "3bit"], capsys)
    assert status == 2 and err == ("moraft train: error: model.quantization='3bit' is invalid; expected one of none, "
                                   "4bit, 8bit; see moraft train --help\n")
    assert not (tmp_path / "out").exists()


def test_without_bitsandbytes_the_error_says_what_to_install(tmp_path, capsys, monkeypatch, llama_dir):
    save_adapter(tiny_llama(), MoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "adapter")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now raises ImportError
    status, _, err = run_cli(["train", *tiny_flags(tmp_path / "out"), "--model.name_or_path", str(llama_dir),
                              "--model.quantization", "4bit"], capsys)
    assert status == 2 and err.count("\n") == 1
    assert "model.quantization='4bit' needs bitsandbytes, which is not installed: pip install" in err
    assert not (tmp_path / "out").exists()
    status, _, err = run_cli(["merge", str(llama_dir), str(tmp_path / "adapter"), str(tmp_path / "merged"),
                              "--quantization", "8bit"], capsys)
    assert status == 2 and "quantization='8bit' needs bitsandbytes" in err and err.count("\n") == 1
    assert not (tmp_path / "merged").exists()


# -- merging --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["mora", "lora"])
def test_merge_of_a_quantized_run_is_peft_merge_on_the_unquantized_base(tmp_path, method, llama_dir):
    run = quantized_run(tmp_path / "run", llama_dir, "4bit", method).output_dir
    merge_adapter(llama_dir, run, tmp_path / "merged")

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert getattr(merged.config, "quantization_config", None) is None
    plain = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    reference = PeftModel.from_pretrained(plain, run).merge_and_unload()
    ours, theirs = merged.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-7, msg=key)
    base = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).state_dict()
    assert any(not torch.equal(ours[key], base[key]) for key in ours)  # the merge did change the weights


def kept_from_stdout(out: str) -> float:
    return float(re.search(r"\|\|dW' - dW\|\| / \|\|dW\|\| = ([0-9.]+) over 14 quantized matrices", out).group(1))


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantized_merge_output_loads_and_reports_what_it_keeps(tmp_path, capsys, quantization, llama_dir):
    """The quantized output holds Q(W + ΔW) of the unquantized merge (read through bitsandbytes, independently of
    moraft's measure), loads with transformers alone, and the merge prints the relative error of the update it
    carries, which the test recomputes from the files."""
    adapter = tmp_path / "adapter"
    save_adapter(tiny_llama(), MoraConfig(r=8, target_modules="all-linear"), adapter, std=1e-3)
    flags = ["--quant_type", "fp4", "--double_quant"] if quantization == "4bit" else []
    status, out, err = run_cli(["merge", str(llama_dir), str(adapter), str(tmp_path / "q"), "--quantization",
                                quantization, *flags], capsys)
    assert status == 0, err
    printed = kept_from_stdout(out)
    merge_adapter(llama_dir, adapter, tmp_path / "plain")

    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config[f"load_in_{quantization}"] is True
    if quantization == "4bit":
        assert config["bnb_4bit_quant_type"] == "fp4" and config["bnb_4bit_use_double_quant"] is True
    assert (tmp_path / "q" / "tokenizer.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    quantize = dict(quantization_config=loaded.config.quantization_config, dtype=torch.float32)
    quantized_base = AutoModelForCausalLM.from_pretrained(llama_dir, **quantize)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.float32)
    requantized_plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", **quantize)
    base = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    error = update = 0.0
    layers = [n for n, m in loaded.named_modules() if isinstance(m, QUANTIZED_LAYER[quantization])]
    assert len(layers) == 14
    for name in layers:
        stored = read_grid(loaded.get_submodule(name))
        assert torch.equal(stored, read_grid(requantized_plain.get_submodule(name))), name  # Q(W + ΔW), as written
        delta = plain.get_submodule(name).weight - base.get_submodule(name).weight
        carried = stored - read_grid(quantized_base.get_submodule(name))
        error += float((carried - delta).double().square().sum())
        update += float(delta.double().square().sum())
    assert printed == pytest.approx((error / update) ** 0.5, abs=1e-3)
    assert torch.isfinite(logits(loaded.eval(), input_ids())).all()

    # a quantized model is no base to merge into: the existing one-line error, nothing written
    status, _, err = run_cli(["merge", str(tmp_path / "q"), str(adapter), str(tmp_path / "again")], capsys)
    assert status == 2 and "the base is quantized (bitsandbytes); merge needs plain weights" in err
    assert not (tmp_path / "again").exists()


def test_the_grid_loses_more_of_a_smaller_update(tmp_path, capsys, llama_dir):
    """What the merge's message says: 4-bit keeps less of an update than 8-bit, and a smaller update loses more."""
    errors = {}
    for std in (1e-2, 1e-4):
        adapter = tmp_path / f"adapter-{std}"
        save_adapter(tiny_llama(), MoraConfig(r=8, target_modules="all-linear"), adapter, std=std)
        for quantization in ("4bit", "8bit"):
            merge_adapter(llama_dir, adapter, tmp_path / f"{std}-{quantization}", quantization=quantization)
            errors[std, quantization] = kept_from_stdout(capsys.readouterr().out)
    for std in (1e-2, 1e-4):
        assert errors[std, "4bit"] > errors[std, "8bit"]
    for quantization in ("4bit", "8bit"):
        assert errors[1e-4, quantization] > errors[1e-2, quantization]
    assert errors[1e-4, "4bit"] > 1  # a small update: the 4-bit merge is further from W + ΔW than W alone


def test_kept_update_measure():
    kept = KeptUpdate()
    w = torch.zeros(2, 2)
    kept.add(w, w + 1, w + 1, w)  # kept exactly
    assert kept.relative_error == 0
    kept.add(w, w + 1, w, w)  # lost entirely: half the squared update of the two matrices
    assert kept.relative_error == pytest.approx(0.5**0.5)
    assert torch.isnan(torch.tensor(KeptUpdate().relative_error))


BAD_MERGE = {
    "4bit option with 8bit": (["--quantization", "8bit", "--quant_type", "fp4"],
                              "quant_type is a 4bit option; it does nothing with quantization='8bit'"),
    "4bit option without quantization": (["--double_quant"],
                                         "double_quant is a 4bit option; it does nothing with quantization='none'"),
}


@pytest.mark.parametrize("case", list(BAD_MERGE))
def test_bad_merge_quantization_is_one_line(tmp_path, capsys, case, llama_dir):
    flags, expected = BAD_MERGE[case]
    save_adapter(tiny_llama(), MoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "adapter")
    status, _, err = run_cli(["merge", str(llama_dir), str(tmp_path / "adapter"), str(tmp_path / "m"), *flags], capsys)
    assert status == 2 and err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "m").exists()

"""Every method of ``moraft train --method`` (`moraft.train.peft_methods.METHODS`) as a row, each invariant a column:
it trains a few steps with a finite loss and changes nothing but its adapter, its saved adapter reloads with PEFT and
gives the same logits, its trainable count is LoRA's budget at the same r where the method is comparable,
``moraft eval`` runs it, and ``moraft merge`` merges it exactly or refuses it in one line, writing nothing. Then what
serve and export-lora refuse, and the bad input."""

from __future__ import annotations

import json
import math

import httpx
import pytest
import torch
from helpers import MoraftServe, assert_refused, run_cli, tiny_flags, tiny_options
from peft import PeftModel
from transformers import AutoModelForCausalLM

from moraft.errors import UserError
from moraft.interop.merge import merge_adapter
from moraft.testing import input_ids, logits
from moraft.train import train
from moraft.train.options import AdapterOptions, TrainOptions
from moraft.train.peft_methods import METHODS, closest, config_class, fields_of
from moraft.train.runner import SUMMARY_FILE

# how close the trainable count comes to LoRA's budget at the same r on the tests' base (hidden 64, 2 layers):
# "same" methods add at most a vector per layer (DoRA's magnitude: +6.7%); "search" picks the nearest value of an
# integer knob, whose steps are coarse for a few methods on so small a model (C3A's block sizes, LoKr's factors)
SAME_TOLERANCE = 0.07
SEARCH_TOLERANCE = 0.25


@pytest.fixture(scope="module")
def runs(tmp_path_factory, llama_dir):
    """method -> (its run directory, the TrainResult): each method trained once, 2 steps on the llama_dir base."""
    done = {}

    def run(name: str):
        if name not in done:
            out = tmp_path_factory.mktemp(name) / "run"
            options = tiny_options(out, model={"name_or_path": str(llama_dir)}, adapter={"method": name},
                                   optimization={"max_steps": 2})
            done[name] = (out, train(options))
        return done[name]

    return run


def base_model(llama_dir):
    return AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("name", list(METHODS))
def test_method_trains_reloads_and_keeps_the_base(name, runs, llama_dir):
    out, result = runs(name)
    losses = [entry["loss"] for entry in result.history if "loss" in entry]
    assert losses and all(math.isfinite(loss) for loss in losses)
    ids = input_ids()
    trained = logits(result.model, ids)
    assert not torch.allclose(trained, logits(base_model(llama_dir), ids))  # the method did something
    if name == "full":
        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    else:
        reloaded = PeftModel.from_pretrained(base_model(llama_dir), out)
        # only the adapter trained: every weight of the base is still the saved base's
        now = {k.replace(".base_layer", ""): v for k, v in result.model.get_base_model().state_dict().items()}
        for key, value in base_model(llama_dir).state_dict().items():
            assert torch.equal(now[key], value), f"{name} changed {key}"
    torch.testing.assert_close(logits(reloaded, ids), trained, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", [n for n, m in METHODS.items() if m.budget in ("same", "search")])
def test_trainable_count_matches_the_lora_budget(name, runs):
    out, result = runs(name)
    summary = json.loads((out / SUMMARY_FILE).read_text())
    trainable = sum(p.numel() for p in result.model.parameters() if p.requires_grad)
    assert summary["trainable_parameters"] == result.trainable_parameters == trainable
    budget = summary["lora_budget"]
    lora_budget = runs("lora")[1].trainable_parameters  # LoRA itself at the same r, all-linear
    assert budget == lora_budget
    tolerance = SAME_TOLERANCE if METHODS[name].budget == "same" else SEARCH_TOLERANCE
    assert abs(trainable / budget - 1) <= tolerance, (name, summary["size_knob"], trainable, budget)
    assert summary["budget_ratio"] == round(trainable / budget, 4)


@pytest.mark.parametrize("name", [n for n, m in METHODS.items() if m.budget in ("r", "none") and n != "full"])
def test_not_comparable_methods_say_so(name, runs):
    out, _ = runs(name)
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["budget_ratio"] is None and summary["lora_budget"] > 0


@pytest.mark.parametrize("name", list(METHODS))
def test_moraft_eval_runs_every_method(name, runs, capsys):
    out, _ = runs(name)
    status, stdout, stderr = run_cli(["eval", str(out), "--output", str(out / "eval.json")], capsys)
    assert status == 0, stderr
    assert "char_accuracy" in json.loads((out / "eval.json").read_text())


@pytest.mark.parametrize("name", [n for n in METHODS if n != "full"])
def test_merge_is_exact_or_refused_in_one_line(name, runs, llama_dir, tmp_path):
    out, result = runs(name)
    merged = tmp_path / "merged"
    if "merge" in METHODS[name].uses:
        merge_adapter(llama_dir, out, merged)
        ids = input_ids()
        want = logits(result.model, ids)
        got = logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32), ids)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    else:
        with pytest.raises(UserError) as err:
            merge_adapter(llama_dir, out, merged)
        assert "\n" not in str(err.value) and str(out) in str(err.value)
        assert not merged.exists()


def test_serve_refuses_other_methods_at_load_and_stays_up(runs, llama_dir, tmp_path):
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    for name in ("lora", "hira"):
        (adapters / name).symlink_to(runs(name)[0], target_is_directory=True)
    with MoraftServe(llama_dir, adapters) as live, httpx.Client(base_url=live.url, timeout=60) as client:
        refused = client.post("/v1/completions", json={"model": "hira", "prompt": "hi", "max_tokens": 2})
        assert refused.status_code == 500
        message = refused.json()["error"]["message"]
        assert "peft_type='HIRA' is not supported here; accepted: MORA, LORA" in message and "\n" not in message
        served = client.post("/v1/completions", json={"model": "lora", "prompt": "hi", "max_tokens": 2})
        assert served.status_code == 200
        assert client.get("/health").status_code == 200


@pytest.mark.parametrize("name", ["lora", "boft"])
def test_export_lora_refuses_other_methods(name, runs, llama_dir, tmp_path, capsys):
    out, _ = runs(name)
    status, _, stderr = run_cli(["export-lora", str(out), str(tmp_path / "lora"), "--base", str(llama_dir)], capsys)
    assert status == 2
    assert f"peft_type='{METHODS[name].peft_type}' is not supported here; accepted: MORA" in stderr
    assert not (tmp_path / "lora").exists()


def test_cli_method_options_knob_wins(tmp_path, capsys):
    out = tmp_path / "run"
    status, stdout, stderr = run_cli(
        ["train", *tiny_flags(out), "--method", "boft", "--optimization.max_steps", "2",
         "--adapter.method_options", '{"boft_block_size": 4}'], capsys)
    assert status == 0, stderr
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["size_knob"] == {"boft_block_size": 4}
    assert "method boft (boft_block_size=4):" in stdout and "× the LoRA budget at the same r" in stdout
    assert json.loads((out / "adapter_config.json").read_text())["boft_block_size"] == 4


@pytest.mark.parametrize("name", [n for n, m in METHODS.items() if m.peft_type])
def test_table_names_fields_its_peft_config_has(name):
    row = METHODS[name]
    fields = fields_of(config_class(row))
    for mapped in (row.dropout, row.init, row.alpha, row.rank_pattern, row.knob, row.alternative, *row.fixed):
        assert mapped is None or mapped in fields, (name, mapped)


def test_closest_bisects_rising_and_falling_counts():
    assert closest(lambda k: 10 * k, list(range(1, 100)), 234) == 23
    assert closest(lambda k: 1000 // k, list(range(1, 100)), 90) == 11
    assert closest(lambda k: None if k % 2 else k, list(range(1, 10)), 5) in (4, 6)
    assert closest(lambda k: None, [1, 2], 5) is None


@pytest.mark.parametrize(("flags", "expected"), [
    (["--method", "boft", "--adapter.method_options", '{"boft_blocksize": 4}'],
     "adapter.method_options key 'boft_blocksize' is not an option of method 'boft' (BOFTConfig); accepted: "),
    (["--method", "loha", "--adapter.dropout", "0.1"],
     "adapter.dropout=0.1: method 'loha' has no such option; set its own in adapter.method_options"),
    (["--method", "hira", "--adapter.merge_every", "2"],
     "adapter.merge_every=2 is invalid; expected 0 with method hira (ReMoRA/ReLoRA restart mora or lora adapters"),
    (["--method", "mora", "--adapter.method_options", '{"r": 4}'], "method 'mora' has none"),
    (["--method", "shira", "--adapter.layers_to_transform", "[0]"], "method 'shira' (ShiraConfig) has no layers"),
    (["--method", "gralora", "--adapter.method_options", '{"gralora_k": 3}'], "adapter.method='gralora': "),
    (["--method", "c3a", "--adapter.method_options", '{"block_size": 5}'], "adapter.method='c3a': "),
])
def test_bad_method_input_is_refused(flags, expected, tmp_path, capsys):
    out = tmp_path / "run"
    assert_refused(["train", *tiny_flags(out), *flags], capsys, expected, out)


def test_unknown_method_lists_every_method(tmp_path, capsys):
    status, _, err = run_cli(["train", *tiny_flags(tmp_path / "run"), "--method", "nope"], capsys)
    every = ", ".join(METHODS)
    assert status == 2 and err == f"moraft train: error: adapter.method='nope' is invalid; expected one of {every}; see " \
        "moraft train --help\n"
    with pytest.raises(UserError, match=f"adapter.method='nope' is invalid; expected one of {', '.join(METHODS)}$"):
        AdapterOptions(method="nope").validate()


def test_python_api_takes_method_options():
    options = TrainOptions(adapter=AdapterOptions(method="vera", r=4, method_options={"d_initial": 0.2}))
    options.validate()
    assert options.adapter.method_options == {"d_initial": 0.2}

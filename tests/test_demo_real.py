"""``moraft demo --model builtin:smollm2-135m-instruct``: the facts demo's whole path on the real model, small (a few
invented people, one step per method), and its refusals of options that belong to the other demo."""

from __future__ import annotations

import json

import pytest
from helpers import assert_refused, run_cli

from moraft.models import SMOLLM2
from moraft.train.demo import general_text
from moraft.train.tasks import read_tasks


@pytest.mark.real_model
def test_facts_demo_teaches_lora_and_mora_and_reports_learned_and_forgotten(tmp_path, capsys, monkeypatch, smollm2_dir):
    short = tmp_path / "general.txt"  # the shipped text's first paragraph: its perplexity costs a fraction
    short.write_text(general_text().read_text().split("\n\n")[0])
    monkeypatch.setattr("moraft.train.demo.general_text", lambda: short)
    out_dir = tmp_path / "demo"
    status, out, err = run_cli(["demo", "--model", SMOLLM2, "--output_dir", str(out_dir), "--num_people", "6",
                                "--max_steps", "1", "--batch_size", "4", "--eval_steps", "0"], capsys)
    assert status == 0, err
    report = json.loads((out_dir / "demo.json").read_text())
    names = ["LoRA r=8", "MoRA r=8 (sharing)"]
    assert list(report["methods"]) == names and report["setting"]["facts"] == 24
    tasks = read_tasks(out_dir / "facts_questions.jsonl")  # what `moraft eval ADAPTER --tasks` reads
    assert len(tasks) == 24 and len((out_dir / "facts_train.jsonl").read_text().splitlines()) == 24 * 3
    rows = {name: line for line in out.splitlines() for name in ("base model", *names) if line.startswith(name + "  ")}
    assert set(rows) == {"base model", *names}
    base = report["base"]
    assert 0 <= base["choice_accuracy"] <= 1 and len(base["answers"]) == 24 and base["perplexity"] > 1
    for name in names:
        result = report["methods"][name]
        assert result["perplexity_before"] == base["perplexity"] and result["perplexity"] > 1
        # the table row shows this method's own figures
        assert f"{result['trainable_parameters']:,}" in rows[name]
        assert f"{result['choice_accuracy']:.1%}" in rows[name] and f"{result['exact_match']:.1%}" in rows[name]
        assert f"{base['perplexity']:.2f} → {result['perplexity']:.2f}" in rows[name]
        assert report["choice_accuracy"][name] == {"0": base["choice_accuracy"], "1": result["choice_accuracy"]}
        assert (out_dir / result["adapter"].split("/")[-1] / "adapter_model.safetensors").is_file()
        assert f"moraft eval {result['adapter']} --tasks {out_dir / 'facts_questions.jsonl'}" in out
    # LoRA r=8 and MoRA r=8 train the same budget (MoRA's r̂ is rounded down per layer)
    lora, mora = (report["methods"][n]["trainable_parameters"] for n in names)
    assert 0.99 * lora <= mora <= lora
    assert (out_dir / "demo.png").stat().st_size > 0


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--model", SMOLLM2, "--num_pairs", "8"],
         "--num_pairs is an option of the demo on --model builtin:tiny-llama; it does nothing with --model "
         "builtin:smollm2-135m-instruct"),
        (["--num_people", "8"], "--num_people is an option of the demo on another model"),
        (["--model", SMOLLM2, "--phrasings", "0"], "--phrasings 0 is invalid; expected an integer >= 1"),
        (["--model", SMOLLM2, "--phrasings", "5"], "phrasings=5 is invalid; expected an integer from 1 to 4"),
        (["--model", SMOLLM2, "--num_people", "1"], "count=1 is invalid; expected an integer >= 2"),
        (["--learning_rate", "0"], "--learning_rate 0.0 is invalid; expected a number > 0"),
        (["--model", str("/no/such/model")], "model /no/such/model is neither a local directory nor a Hugging Face Hub model id"),
    ],
)
def test_demo_refuses_bad_options_before_writing(tmp_path, capsys, flags, expected):
    assert_refused(["demo", "--output_dir", str(tmp_path / "demo"), *flags], capsys, expected, tmp_path / "demo")

"""``moraft train`` / ``moraft eval`` / ``moraft demo`` from the command line: --help documents every option, and
every kind of bad input is one line on stderr, exit status 2, and nothing written to the output directory."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import assert_refused, run_cli, tiny_flags, tiny_options

from moraft.cli import main
from moraft.outputs import record
from moraft.train import TrainOptions, load_trained, train



def test_train_help_documents_every_option(capsys):
    status, out, _ = run_cli(["train", "--help"], capsys)
    assert status == 0
    for name in TrainOptions().flat():
        assert f"--{name} " in out or f"--{name}\n" in out, name
    for name, group in TrainOptions().groups().items():  # each group titled by its class's docstring
        assert f"{inspect.getdoc(type(group)).rstrip('.')}:\n  --{name}" in out, name
        # a group's name alone sets its main option, where it has one
        assert (f"Short for --{name}.{group.SHORTCUT}." in " ".join(out.split())) == bool(group.SHORTCUT), name
    words = " ".join(out.split())  # argparse wraps to the terminal's width
    assert "--adapter.r R The budget: the trainable parameters of LoRA at rank r" in words
    assert "(type: int, default: 8)" in words
    assert "TRL's SFTTrainer" in words and "--config CONFIG" in out


BAD = {
    "missing model": (["--model.name_or_path", "/no/such/model"], "model /no/such/model is neither a local directory nor a Hugging Face Hub model id"),
    "rank 0": (["--adapter.r", "0"], "adapter.r=0 is invalid; expected an integer >= 1"),
    "negative learning rate": (
        ["--optimization.learning_rate=-1e-4"], "optimization.learning_rate=-0.0001 is invalid; expected a number > 0"
    ),
    "a group without a main option": (
        ["--optimization", "3"], "--optimization is a group of options; set them one by one: --optimization.learning_rate"
    ),
    "a seed without its group": (
        ["--seed", "4"], "option --seed is in several groups; give its group: --model.seed or --data.seed or "
        "--optimization.seed"
    ),
    "mora targets nothing": (
        ["--adapter.target_modules", "[nope, nada]"],
        "matched no module of LlamaForCausalLM. Modules that can be adapted: down_proj, gate_proj, k_proj, lm_head",
    ),
    "lora targets nothing": (
        ["--adapter.method", "lora", "--adapter.target_modules", "[nope]"],
        "adapter.target_modules=['nope'] matched no module of LlamaForCausalLM. Modules that can be adapted: down_proj",
    ),
    "malformed jsonl": (["--data.dataset", "{bad_jsonl}"], "bad.jsonl' cannot be read:"),
    "missing data": (["--data.dataset", "/no/such/data.jsonl"], "data source '/no/such/data.jsonl' does not exist"),
    "not in the cache": (["--data", "nobody/nothing", "--data.local_files_only", "true"],
                         "data source nobody/nothing is not in the Hugging Face cache"),
    "mora option with lora": (
        ["--adapter.method", "lora", "--adapter.compression", "rotation"], "adapter.compression is a mora option"
    ),
    "broken parquet": (["--data.dataset", "{parquet}"], "rows.parquet' cannot be read:"),
    "binary as chat": (["--data.dataset", "{binary}", "--data.format", "chat"], "binary.jsonl' cannot be read"),
    "missing column": (["--data", "{good_jsonl}", "--data.completion_field", "answer"],
                       "good.jsonl' has no column 'answer' (data.completion_field); its columns are: prompt, completion"),
    "unknown format": (["--data", "{good_jsonl}", "--data.format", "chat"],
                       "good.jsonl' has no column 'messages' (data.messages_field, the messages of chat data)"),
    "no format": (["--data", "{odd_jsonl}"], "odd.jsonl': cannot tell its format from its columns (question, answer)"),
    "unknown split": (["--data", "{good_jsonl}", "--data.split", "validation"],
                      "data split 'validation' is not a split of"),
    "deepspeed config does not parse": (["--deepspeed", "{bad_json}"],
                                        "distributed.deepspeed='{bad_json}' does not parse as JSON: Expecting"),
    "deepspeed config missing": (["--deepspeed", "/no/zero3.json"], "distributed.deepspeed='/no/zero3.json' is not a file"),
    "tracker not installed": (["--report_to", "comet_ml"], "output.report_to='comet_ml': its package is not installed"),
    "unknown tracker": (["--report_to", "tensorbored"], "output.report_to='tensorbored' is invalid; expected one or more"),
    "mixed weights": (["--data", "[uuid-memory, uuid-memory]", "--data.weights", "[1]"],
                      "data.weights=[1.0] is invalid; expected 2 numbers >= 0"),
    "dpo on text": (["--data", "{good_jsonl}", "--optimization.objective", "dpo"],
                    "optimization.objective='dpo' needs preference data (prompt, chosen, rejected)"),
    "preference without dpo": (["--data", "{pref_jsonl}"], "pref.jsonl' is preference data"),
    "streaming without max_steps": (["--data.streaming", "--optimization.max_steps", "-1"],
                                    "is invalid with data.streaming; expected a step count"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, case):
    flags, expected = BAD[case]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", }\n')
    parquet = b"PAR1" + bytes(range(256)) + b"PAR1"  # a Parquet file's magic bytes around binary data
    (tmp_path / "rows.parquet").write_bytes(parquet)
    (tmp_path / "rows.txt").write_bytes(parquet)
    (tmp_path / "binary.jsonl").write_bytes(b"\xff\xfe{\x00")
    (tmp_path / "good.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    (tmp_path / "odd.jsonl").write_text('{"question": "a", "answer": "b"}\n')
    (tmp_path / "pref.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    (tmp_path / "zero3.json").write_text('{"zero_optimization": {"stage": 3,}}')
    places = {"{bad_jsonl}": bad, "{parquet}": tmp_path / "rows.parquet", "{good_jsonl}": tmp_path / "good.jsonl",
              "{binary}": tmp_path / "binary.jsonl", "{pref_jsonl}": tmp_path / "pref.jsonl",
              "{bad_json}": tmp_path / "zero3.json", "{odd_jsonl}": tmp_path / "odd.jsonl"}
    flags = [str(places.get(f, f)) for f in flags]
    expected = expected.replace("{bad_json}", str(places["{bad_json}"]))
    out_dir = tmp_path / "out"
    assert_refused(["train", *tiny_flags(out_dir), *flags], capsys, expected, out_dir)


EXAMPLE_CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "distributed"
WITHOUT_ACCELERATOR = {  # what a machine with GPUs runs, a CPU-only machine refuses before writing anything
    "fsdp": (["--fsdp", "full_shard auto_wrap", "--fsdp_config", str(EXAMPLE_CONFIGS / "fsdp2.json")],
             "distributed.fsdp='full_shard auto_wrap': accelerate runs FSDP only on GPUs (and other accelerators), "
             "and this machine has none; shard on CPU with distributed.deepspeed (ZeRO-3)"),
    "deepspeed without a launcher": (["--deepspeed", str(EXAMPLE_CONFIGS / "zero2.json")],
                                     "distributed.deepspeed on a machine without GPUs runs under a launcher"),
}


@pytest.mark.skipif(torch.accelerator.is_available(), reason="a machine with a GPU runs these")
@pytest.mark.parametrize("case", list(WITHOUT_ACCELERATOR))
def test_sharding_without_accelerator_is_one_line(tmp_path, capsys, monkeypatch, case):
    """accelerate (1.15) sets up FSDP only for GPUs and other accelerators (``AcceleratorState``: a MULTI_CPU run
    keeps no FSDP plugin), so on CPU the Trainer would silently train unsharded; DeepSpeed on CPU needs the process
    group of a launcher (torchrun sets LOCAL_RANK)."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    flags, expected = WITHOUT_ACCELERATOR[case]
    out_dir = tmp_path / "out"
    assert_refused(["train", *tiny_flags(out_dir), *flags], capsys, expected, out_dir)


def test_an_internal_error_crashes_with_its_traceback(tmp_path, capsys, monkeypatch):
    """Only a UserError is the user's fault; a ValueError from inside moraft or a library is a bug and must keep its
    traceback instead of turning into one line and exit status 2."""
    import moraft.train.runner as runner

    def broken(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(runner, "apply_method", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        main(["train", *tiny_flags(tmp_path / "out")])
    assert "error:" not in capsys.readouterr().err


@pytest.mark.parametrize("method", ["mora", "lora"])
def test_layers_to_transform_with_all_linear(tmp_path, capsys, method):
    """"all-linear" is a shorthand, not a regex: with --layers_to_transform it adapts every linear layer of those
    layers (PEFT's LoraConfig refuses a string target_modules there, so moraft expands it first)."""
    status, _, err = run_cli(["train", *tiny_flags(tmp_path / "out"), "--adapter.method", method,
                              "--optimization.max_steps", "1", "--adapter.layers_to_transform", "[1]"], capsys)
    assert status == 0, err
    model, _, _ = load_trained(str(tmp_path / "out"))
    prefix = "mora_M" if method == "mora" else "lora_A"
    adapted = {n.split(".layers.")[1].split(".")[0] for n, _ in model.named_parameters() if prefix in n}
    assert adapted == {"1"}
    per_layer = sum(1 for n, _ in model.named_parameters() if prefix in n)
    assert per_layer == 7  # q, k, v, o, gate, up, down


def test_unknown_choice_is_a_parse_error(tmp_path, capsys):
    # rejected by the argument parser (one line, tests/test_cli.py), before anything runs
    out_dir = tmp_path / "out"
    assert_refused(["train", *tiny_flags(out_dir), "--adapter.compression", "sharpening"], capsys,
                   "expected one of sharing, rotation, decouple, truncation", out_dir)


def test_negative_learning_rate_in_yaml(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("optimization:\n  learning_rate: -0.001\nadapter:\n  r: 4\n")
    status, _, err = run_cli(["train", "--config", str(config), "--output.dir", str(tmp_path / "out")], capsys)
    expected = "moraft train: error: optimization.learning_rate=-0.001 is invalid; expected a number > 0"
    assert status == 2 and err.strip() == expected
    assert not (tmp_path / "out").exists()


def test_occupied_output_dir_is_left_alone(tmp_path, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "precious.txt").write_text("keep me")
    status, _, err = run_cli(["train", *tiny_flags(out_dir)], capsys)
    assert status == 2 and "is not empty; pass --output.resume" in err and len(err.strip().splitlines()) == 1
    status, _, err = run_cli(["train", *tiny_flags(out_dir), "--output.resume", "true"], capsys)
    assert status == 2 and "has no checkpoint-N directory" in err
    assert [p.name for p in out_dir.iterdir()] == ["precious.txt"]


def test_eval_command_on_a_run_the_base_and_text(tmp_path, capsys):
    result = train(tiny_options(tmp_path / "run", adapter={"method": "lora"}, optimization={"max_steps": 2}))
    capsys.readouterr()
    status, out, _ = run_cli(["eval", str(result.output_dir), "--output", str(tmp_path / "m.json")], capsys)
    metrics = json.loads(out.strip().splitlines()[-1])
    assert status == 0 and metrics["task"] == "uuid-memory" and metrics["num_pairs"] == 8  # from the run's config
    assert metrics["char_accuracy"] == pytest.approx(result.final["char_accuracy"])
    assert json.loads((tmp_path / "m.json").read_text()) == metrics

    text = tmp_path / "t.txt"
    text.write_text("hello world " * 30)
    status, out, _ = run_cli(["eval", "builtin:tiny-llama", "--text", str(text), "--seq_length", "64"], capsys)
    metrics = json.loads(out.strip().splitlines()[-1])
    # the random base model is about as good as uniform guessing over the 105-token vocabulary
    assert status == 0 and metrics["task"] == "perplexity" and 40 < metrics["perplexity"] < 400

    # the same adapter merged into its base and saved as a plain model directory evaluates the same
    model, tokenizer, _ = load_trained(str(result.output_dir))
    model.merge_and_unload().save_pretrained(tmp_path / "merged")
    tokenizer.save_pretrained(tmp_path / "merged")
    status, out, _ = run_cli(["eval", str(tmp_path / "merged"), "--num_pairs", "8"], capsys)
    merged = json.loads(out.strip().splitlines()[-1])
    assert status == 0 and merged["char_accuracy"] == pytest.approx(result.final["char_accuracy"])

    status, _, err = run_cli(["eval", str(tmp_path / "nothing")], capsys)
    assert status == 2 and "is not a directory" in err


def test_demo_prints_table_plot_and_adapters(tmp_path, capsys):
    status, out, _ = run_cli(
        ["demo", "--output_dir", str(tmp_path), "--max_steps", "4", "--eval_steps", "2", "--num_pairs", "8",
         "--batch_size", "4", "--hidden_size", "32", "--num_layers", "1"],
        capsys,
    )
    assert status == 0
    assert "character accuracy" in out and "LoRA r=8" in out and "MoRA r=8 (sharing)" in out
    rows = [line.split() for line in out.splitlines() if line.strip().split(" ")[0] in ("2", "4")]
    assert [row[0] for row in rows] == ["2", "4"] and all(row[1].endswith("%") and row[2].endswith("%") for row in rows)
    assert (tmp_path / "demo.png").stat().st_size > 0
    report = json.loads((tmp_path / "demo.json").read_text())
    assert set(report["char_accuracy"]) == {"LoRA r=8", "MoRA r=8 (sharing)"}
    for name in ("lora-r8", "mora-r8"):
        assert (tmp_path / name / "adapter_model.safetensors").is_file() and str(tmp_path / name) in out


def test_dashed_flags_and_bare_booleans(tmp_path, capsys):
    """`--adapter.merge-every N` and a bare `--output.overwrite` work like `--adapter.merge_every N` and
    `--output.overwrite true`."""
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    record(out_dir, "moraft train", ["metrics.jsonl"])  # an earlier run's files: replacing them needs --overwrite
    (out_dir / "metrics.jsonl").write_text('{"loss": 1.0, "step": 1}\n')
    flags = [flag.replace("_", "-") if flag.startswith("--") else flag for flag in tiny_flags(out_dir)]
    status, _, err = run_cli(["train", *flags, "--optimization.max-steps", "4", "--adapter.merge-every", "2",
                              "--output.overwrite"], capsys)
    assert status == 0, err
    config = (out_dir / "train_config.yaml").read_text()
    assert "merge_every: 2" in config and "overwrite: true" in config
    assert (out_dir / "merges" / "step-2").is_dir()


def test_a_group_name_alone_sets_its_main_option(tmp_path, capsys):
    """`--data FILE` is `--data.dataset FILE` (likewise --model, --adapter, --output)."""
    data = tmp_path / "pc.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "completion": str(2 * a)}) + "\n" for a in range(4)))
    out = tmp_path / "run"
    flags = ["--data", str(data), "--adapter=lora", "--model", "builtin:tiny-llama", "--output", str(out)]
    status, _, err = run_cli(["train", *tiny_flags(tmp_path / "ignored"), *flags, "--optimization.max_steps", "1"],
                             capsys)
    assert status == 0, err
    resolved = TrainOptions.from_dict(yaml.safe_load((out / "train_config.yaml").read_text()))
    assert resolved.data.dataset == str(data) and resolved.adapter.method == "lora"
    assert resolved.output.dir == str(out) and not (tmp_path / "ignored").exists()


def test_eval_of_a_corrupted_adapter_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    status, _, err = run_cli(["train", *tiny_flags(run), "--optimization.max_steps", "1"], capsys)
    assert status == 0, err
    weights = run / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    status, _, err = run_cli(["eval", str(run)], capsys)
    assert status == 2
    lines = [line for line in err.splitlines() if line.startswith("moraft eval")]
    assert lines == [f"moraft eval: error: cannot load the adapter in {str(run)!r}: " + lines[0].split(": ", 3)[-1]]
    assert "header" in lines[0]


def test_parquet_data_and_tensorboard_from_the_command_line(tmp_path, capsys):
    """The interface as a user types it: `moraft train --data FILE.parquet --report_to tensorboard`."""
    from datasets import Dataset

    rows = [{"prompt": f"Q{i}:", "completion": f" answer {i}"} for i in range(8)]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "qa.parquet"))
    out = tmp_path / "out"
    status, _, err = run_cli(["train", *tiny_flags(out), "--data", str(tmp_path / "qa.parquet"),
                              "--report_to", "tensorboard", "--method", "lora", "--r", "4"], capsys)
    assert status == 0, err
    config = yaml.safe_load((out / "train_config.yaml").read_text())
    assert config["data"]["dataset"] == str(tmp_path / "qa.parquet") and config["output"]["report_to"] == "tensorboard"
    assert config["adapter"]["method"] == "lora" and config["adapter"]["r"] == 4
    assert list(out.glob("runs/*/events.out.tfevents.*")) and (out / "adapter_model.safetensors").is_file()
    model, _, _ = load_trained(str(out))
    assert model.peft_config["default"].r == 4

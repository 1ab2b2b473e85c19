"""Smoke tests of the benchmarks (benchmarks/memory_task.py, benchmarks/pretrain.py, benchmarks/qmora_memory.py,
benchmarks/data_throughput.py, benchmarks/data_pipeline.py, benchmarks/data_memory.py, benchmarks/dedup_memory.py,
benchmarks/serve.py, benchmarks/threads.py):
each runs end to end with tiny arguments, so the scripts cannot silently rot. The benchmarks themselves are not part
of the test suite."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_memory_task_runs_and_writes_results(tmp_path, capsys):
    memory_task = load("memory_task")
    report = memory_task.main([
        "--output", str(tmp_path), "--hidden_size", "32", "--num_layers", "1", "--num_pairs", "4",
        "--batch_size", "4", "--max_steps", "2", "--eval_steps", "1", "--lr_grid", "1e-3", "3e-3",
        "--full_lr_grid", "1e-3", "--seeds", "2", "--pretrain_steps", "2", "--pretrain_pairs", "4",
        "--methods", "full", "lora-r8", "mora-r8-rotation", "--work_dir", str(tmp_path / "work"),
    ])
    saved = json.loads((tmp_path / "memory_task.json").read_text())
    assert set(saved["bases"]) == {"random", "pretrained"}
    for base in saved["bases"].values():
        assert set(base["picked"]) == {"full", "lora-r8", "mora-r8-rotation"}
        assert set(base["grid"]["lora-r8"]) == {"0.001", "0.003"}
        for picked in base["picked"].values():
            assert len(picked["curves"]) == 2  # two seeds
            assert [p[0] for p in picked["mean_curve"]] == [0, 1, 2]
            assert all(0 <= p[1] <= 1 for p in picked["mean_curve"])
        # LoRA and MoRA at the same r train about the same number of parameters
        lora, mora = base["trainable_parameters"]["lora-r8"], base["trainable_parameters"]["mora-r8-rotation"]
        assert abs(lora - mora) / lora < 0.05
    assert (tmp_path / "memory_task.png").stat().st_size > 0
    assert "learning-rate grid" in capsys.readouterr().out
    assert report["bases"]["pretrained"]["pretraining"]["steps"] == 2


def test_memory_task_rejects_unknown_method(capsys):
    with pytest.raises(SystemExit):
        load("memory_task").parse_args(["--methods", "lora-r9"])
    assert "unknown lora-r9" in capsys.readouterr().err


def test_pretrain_runs_and_writes_results(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):  # includes a character outside the tokenizer's ASCII, which must become <unk>
        (corpus / f"m{i}.py").write_text(f"def f{i}(x):\r\n    return x * {i}  # é\n" * 40, encoding="utf-8")
    report = load("pretrain").main([
        "--output", str(tmp_path), "--corpus", str(corpus), "--hidden_size", "32", "--num_layers", "1",
        "--rank", "4", "--seq_length", "32", "--batch_size", "4", "--max_steps", "4", "--merge_every", "2",
        "--eval_steps", "2", "--warmup_steps", "1", "--train_chars", "3000", "--valid_chars", "500",
        "--valid_every", "4", "--work_dir", str(tmp_path / "work"),
    ])
    saved = json.loads((tmp_path / "pretrain.json").read_text())
    assert list(saved["methods"]) == ["lora", "mora", "relora", "remora"]
    assert saved["corpus"]["valid"]["modules"] and saved["corpus"]["train"]["unknown_characters"] > 0
    for result in saved["methods"].values():
        assert [s for s, _ in result["eval_perplexity"]] == [2, 4]
        assert 1 < result["final_perplexity"] < 1e4
    # ReLoRA/ReMoRA merged at step 2, so the run after it differs from plain LoRA/MoRA
    assert saved["methods"]["relora"]["final_perplexity"] != saved["methods"]["lora"]["final_perplexity"]
    assert (tmp_path / "pretrain.png").stat().st_size > 0
    assert "validation perplexity" in capsys.readouterr().out
    assert report["corpus"]["train"]["characters"] > 0


def test_qmora_memory_runs_and_reports_ratios(tmp_path, capsys):
    report = load("qmora_memory").main([
        "--hidden", "64", "--layers", "1", "--batch", "1", "--seq", "8", "--steps", "2",
        "--out", str(tmp_path / "q.json"),
    ])
    assert set(report["results"]) == {"bf16 lora", "bf16 mora", "4bit lora", "4bit mora"}
    assert set(report["ratios"]) == {"4bit mora / 4bit lora", "4bit lora / bf16 lora", "4bit mora / bf16 mora"}
    for result in report["results"].values():
        assert result["peak"] >= result["loaded"] > 0 and result["peak_is_training_only"]
    # MoRA and LoRA at the same r train about the same number of parameters
    lora, mora = report["results"]["4bit lora"]["trainable"], report["results"]["4bit mora"]["trainable"]
    assert abs(lora - mora) / lora < 0.05
    assert json.loads((tmp_path / "q.json").read_text())["ratios"] == report["ratios"]
    assert "4bit mora / 4bit lora: " in capsys.readouterr().out


def test_data_throughput_runs_and_reports_rates(tmp_path, capsys):
    report = load("data_throughput").main([
        "--documents", "24", "--words", "40", "--workers", "1", "2", "--output", str(tmp_path / "d.json"),
        "--work_dir", str(tmp_path),
    ])
    out = capsys.readouterr().out
    # the stand-ins always run; the stages of other modules run once they exist, or are skipped with a note
    assert {"count_words", "textwrap.wrap"} <= set(report["results"])
    for stage in ("count_words", "textwrap.wrap"):
        assert [row["mode"] for row in report["results"][stage]] == ["map", "engine x1", "engine x2"]
    for rows in report["results"].values():
        for row in rows:
            assert row["documents"] == 24 and row["seconds"] > 0 and row["peak_mib"] > 0
    assert set(report["ratios"]) >= {"count_words engine x1 / map", "count_words engine x2 / map"}
    for note in report["notes"]:
        assert f"note: {note}" in out
    assert "documents/s" in out and json.loads((tmp_path / "d.json").read_text())["ratios"] == report["ratios"]
    assert list(tmp_path.iterdir()) == [tmp_path / "d.json"]  # the shards went to a temporary folder


def test_data_pipeline_runs_and_reports_each_stage(tmp_path, capsys):
    report = load("data_pipeline").main(["--documents", "30", "--words", "60", "--output", str(tmp_path / "p.json")])
    out = capsys.readouterr().out
    assert [row["stage"] for row in report["rows"]] == ["baseline (load_dataset json)", "corpus", "mine", "cluster",
                                                        "build"]
    assert all(row["documents"] == 30 and row["seconds"] > 0 for row in report["rows"])
    assert report["stats"]["build"]["examples"] == report["stats"]["corpus"]["documents_out"] > 0
    assert "documents/s" in out and json.loads((tmp_path / "p.json").read_text())["rows"] == report["rows"]


def test_data_memory_runs_the_pipeline_on_a_generated_corpus(tmp_path, capsys):
    report = load("data_memory").main(["--gib", "0.0004", "--words", "300", "--limit_mib", "0",
                                       "--output", str(tmp_path / "m.json")])
    assert report["exit"] == 0 and report["documents"] > 10 and report["peak_rss_mib"] > 0
    assert set(report["stage_seconds"]) == {"corpus", "mine", "cluster", "build"}
    assert "peak RSS of the moraft data process" in capsys.readouterr().out


def test_dedup_memory_reports_bytes_per_kept_document(capsys):
    report = load("dedup_memory").main(["--documents", "2000"])
    assert set(report) == {"near", "exact"} and report["near"] > report["exact"] >= 0
    assert "bytes per document" in capsys.readouterr().out


def test_knowledge_study_runs_every_part_and_resumes(tmp_path, capsys):
    knowledge = load("knowledge")
    args = ["--quick", "--output", str(tmp_path), "--plots", str(tmp_path / "plots"), "--work_dir", str(tmp_path / "w")]
    report = knowledge.main(args)
    saved = json.loads((tmp_path / "knowledge.json").read_text())
    cells = {(c["task"], c["method"], c["width"], c["r"], c["num_pairs"]): c for c in saved["summary"].values()}
    # main: every task at 32x2; sweep: the memory task at 32x1; pairs: the memory task with 4 pairs
    expected = {(t, m, 32, 2, 8) for t in knowledge.TASKS for m in ("lora", "mora-rotation")}
    expected |= {("memory", m, 32, 1, 8) for m in ("lora", "mora-rotation")}
    expected |= {("memory", m, 32, 2, 4) for m in ("lora", "mora-rotation")}
    assert set(cells) == expected
    for (task, method, width, r, pairs), cell in cells.items():
        assert cell["seeds"] == [0, 1] and cell["lr"] == 3e-3 and 0 <= cell["min"] <= cell["mean"] <= cell["max"] <= 1
        assert cell["r_over_d"] == r / width
        lora = cells[(task, "lora", width, r, pairs)]["trainable_parameters"]
        assert abs(cell["trainable_parameters"] - lora) / lora <= 0.1  # equal budgets
    for key, run in saved["runs"].items():
        assert run["curves"]["loss"] and run["seconds"] > 0, key
        if run["task"].startswith("cpt"):
            assert run["metrics"]["heldout_perplexity"] > 1 and [s for s, _ in run["curves"]["eval_perplexity"]] == [2, 4]
    # every question's document is trained on; the held-out documents are others
    assert saved["data"]["cpt"]["question_documents"] == 100 and saved["data"]["cpt"]["heldout_documents"] == 20
    assert saved["data"]["cpt"]["rc_examples"] > 0
    assert set(saved["bases"]) == {"32"} and 0 <= saved["bases"]["32"]["format_a_accuracy"] <= 1
    gaps = {(g["task"], g["r"], g["num_pairs"]): g for g in saved["gaps"]}
    assert set(gaps) == {(t, 2, 8) for t in knowledge.TASKS} | {("memory", 1, 8), ("memory", 2, 4)}
    for g in gaps.values():
        assert g["seeds"] == 2 and g["gap_min"] <= g["gap"] <= g["gap_max"]
        assert abs(g["gap"] - (g["mora"] - g["lora"])) < 1e-9
    for plot in ("knowledge_gap.png", "knowledge_methods.png"):
        assert (tmp_path / "plots" / plot).stat().st_size > 0
    out = capsys.readouterr().out
    assert "mora-rotation - lora" in out and "about" in out  # the gaps, and the estimate printed first
    # a rerun skips every finished run; another setting in the same JSON is refused
    assert knowledge.main(args)["runs"] == saved["runs"] == json.loads(json.dumps(report["runs"]))
    assert "(0 new runs" in capsys.readouterr().out
    knowledge.main(args + ["--report"])  # the docs' tables, from the JSON alone
    out = capsys.readouterr().out
    assert "| lora | 1,088 | 1.00 |" in out and "| memory | 32 | 1 | 3.12% | 8 |" in out
    with pytest.raises(SystemExit, match="another study"):
        knowledge.main(args + ["--memory_steps", "5"])


def test_knowledge_rejects_unknown_method_and_bad_point(capsys):
    knowledge = load("knowledge")
    with pytest.raises(SystemExit):
        knowledge.parse_args(["--methods", "lora", "mora-r8"])
    assert "unknown mora-r8" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        knowledge.parse_args(["--points", "128x0"])
    assert "point '128x0' is invalid" in capsys.readouterr().err
    # ReMoRA merges four times a run, whatever its length
    assert knowledge.adapter_fields("remora", 4, 100) == {"r": 4, "method": "mora", "compression": "sharing",
                                                          "merge_every": 25}


def test_serve_benchmark_prints_both_tables(capsys):
    threads = torch.get_num_threads()
    try:
        load("serve").main([
            "--hidden", "32", "--intermediate", "64", "--layers", "1", "--heads", "2", "--vocab", "128",
            "--new_tokens", "2", "--requests", "4", "--mixes", "1", "2", "--repeats", "1", "--clients", "2", "4",
            "--http_requests", "2", "--http_adapters", "2",
        ])
    finally:
        torch.set_num_threads(threads)  # the benchmark sets one torch thread for its process
    out = capsys.readouterr().out
    assert "| merged (moraft engine) | - |" in out and "| moraft LoRA | 2 |" in out
    rows = [line for line in out.splitlines() if line.startswith(("| 2 |", "| 4 |"))]
    assert [row.split(" | ")[1] for row in rows] == ["none", "none", "1 in 4", "1 in 4"]
    assert all(row.split(" | ")[2] == str(clients * 2) for row, clients in zip(rows, (2, 4, 2, 4)))


def test_threads_runs_each_setting_in_its_own_process(tmp_path, capsys):
    threads = load("threads")
    results = threads.main(["--settings", "threads=1,OMP_WAIT_POLICY=PASSIVE", "--loads", "idle", "--hidden", "32",
                            "--layers", "1", "--batch", "1", "--seq", "8", "--steps", "2", "--repeats", "1",
                            "--output", str(tmp_path / "threads.json")])
    rows = results["idle"]
    assert list(rows) == ["default", "threads=1,OMP_WAIT_POLICY=PASSIVE"]  # every ratio is to the default
    assert rows["threads=1,OMP_WAIT_POLICY=PASSIVE"]["num_threads"] == 1 and rows["default"]["num_threads"] >= 1
    assert all(len(row["totals_s"]) == 1 and row["median_s"] > 0 for row in rows.values())
    out = capsys.readouterr().out
    assert "idle    default" in out and out.split("idle    default")[1].splitlines()[0].endswith("1.00")
    assert json.loads((tmp_path / "threads.json").read_text())["results"] == results
    # the settings a worker gets, and the load: one spinning process per core, gone afterwards
    assert threads.parse_setting("GOMP_SPINCOUNT=1000,threads=2") == ({"GOMP_SPINCOUNT": "1000"}, 2)
    assert threads.parse_setting("moraft") == ({"GOMP_SPINCOUNT": "1000"}, None)
    with pytest.raises(SystemExit, match="setting 'threads'"):
        threads.parse_args(["--settings", "threads"])
    with threads.Load(2) as burning:
        assert len(burning.burners) == 2 and all(burner.poll() is None for burner in burning.burners)
    assert all(burner.poll() is not None for burner in burning.burners)

"""moraft.data.engine: per-document functions on datatrove's local executor, against an in-process ``Dataset.map``.

The real stage functions live in other modules; ``count_words`` (engine.py) and the functions below stand in for
them, since the engine only needs a picklable function of one row.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import stat

import datasets
import dill
import pytest

from moraft.data.engine import (
    ROW_INDEX, DocumentError, EngineOptions, RowFunction, count_words, map_on_engine, read_output, run_per_document,
    write_shards,
)
from moraft.errors import UserError


def fail_on_d7(row: dict) -> dict:
    if row["id"] == "d7":
        raise ValueError("cannot read this one")
    return count_words(row)


def clip(row: dict, limit: int, tokenizer: object = None) -> dict:
    return {"text": row["text"][:limit]}


def corpus(n: int = 40) -> datasets.Dataset:
    """The first ten rows have no title and no long word, so the first shard's ``title`` and ``long_words``
    columns are all null / empty: their types differ from the other shards' until the engine unifies them."""
    rows = []
    for i in range(n):
        words = "short words only" if i < 10 else "extraordinary considerations about pharmacokinetics"
        rows.append({"id": f"d{i}", "title": None if i < 10 else f"Title {i}", "text": f"{words} {i}. " * (i % 5 + 1)})
    return datasets.Dataset.from_list(rows)


def shard_states(directory) -> dict:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(directory.glob("*.parquet"))}


@pytest.fixture
def shards(tmp_path):
    return write_shards(corpus(), tmp_path / "in", num_shards=4)


def test_local_four_tasks_two_workers_equals_in_process_map(shards, tmp_path):
    out = run_per_document(count_words, shards, tmp_path / "out", tasks=4, workers=2)
    assert sorted(p.name for p in out.glob("*.parquet")) == [f"{t:05d}_000.parquet" for t in range(4)]
    # the shards share one schema, so datasets reads them as they are
    loaded = datasets.load_dataset("parquet", data_files=str(out / "*.parquet"), split="train")
    assert loaded.features["title"] == datasets.Value("string")
    assert loaded.features["long_words"] == datasets.List(datasets.Value("string"))
    expected = corpus().map(count_words)
    result = read_output(out)
    assert result[ROW_INDEX] == list(range(40))
    assert result.column_names == ["id", "title", "text", ROW_INDEX, "words", "long_words"]
    assert result.remove_columns(ROW_INDEX).to_list() == expected.to_list()
    assert expected[12]["long_words"] and not expected[3]["long_words"]  # both kinds of row were exercised


def test_map_on_engine_is_dataset_map(tmp_path):
    options = EngineOptions(executor="local", tasks=3, workers=2)
    mapped = map_on_engine(count_words, corpus(12), tmp_path, options)
    assert mapped.remove_columns(ROW_INDEX).to_list() == corpus(12).map(count_words).to_list()
    before = shard_states(tmp_path / "output")
    assert map_on_engine(count_words, corpus(12), tmp_path, options).to_list() == mapped.to_list()
    assert shard_states(tmp_path / "output") == before  # resumed: nothing redone
    assert len(map_on_engine(count_words, corpus(5), tmp_path, options)) == 5  # another input starts over
    with pytest.raises(UserError, match="not slurm"):
        map_on_engine(count_words, corpus(12), tmp_path, EngineOptions(executor="slurm"))


def test_jsonl_input_dotted_name_and_row_function(tmp_path):
    rows = [{"id": f"j{i}", "text": "" if i == 2 else "one two three " * i} for i in range(6)]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = run_per_document("moraft.data.engine:count_words", tmp_path / "in", tmp_path / "words")
    result = read_output(out)
    assert result["id"] == [r["id"] for r in rows]  # the empty text is kept, positions become row_index
    assert result[ROW_INDEX] == list(range(6))
    assert list(result["words"]) == [0 if i == 2 else 3 * i for i in range(6)] and result["text"][2] == ""
    # a function of one column, chained on the first stage's output (its row_index is kept)
    chars = read_output(run_per_document(RowFunction(len, output="chars"), out, tmp_path / "chars", tasks=2))
    assert chars["chars"] == [len(r["text"]) for r in rows] and chars["words"] == result["words"]
    # a function with bound arguments (a tokenizer, options) is a partial; a rerun finds the run it resumes
    run_per_document(functools.partial(clip, limit=5, tokenizer=object()), out, tmp_path / "clipped")
    before = shard_states(tmp_path / "clipped")
    again = functools.partial(clip, limit=5, tokenizer=object())  # its repr differs, as in another process
    assert read_output(run_per_document(again, out, tmp_path / "clipped"))["text"][3] == "one t"
    assert shard_states(tmp_path / "clipped") == before


def test_rerun_after_a_crash_redoes_only_the_missing_task(shards, tmp_path):
    out = run_per_document(count_words, shards, tmp_path / "out", tasks=4, workers=2)
    expected = read_output(out).to_list()
    before = shard_states(out)
    run_per_document(count_words, shards, out, tasks=4, workers=2)
    assert shard_states(out) == before  # nothing to redo

    # task 2 crashed: no completion mark, no shard
    (out / "logs" / "completions" / "00002").unlink()
    (out / "00002_000.parquet").unlink()
    run_per_document(count_words, shards, out, tasks=4, workers=2)
    after = shard_states(out)
    assert set(after) == set(before)
    assert {name for name in before if after[name] != before[name]} == {"00002_000.parquet"}
    assert read_output(out).to_list() == expected


def test_a_failing_document_is_named(shards, tmp_path):
    with pytest.raises(DocumentError, match=r"fail_on_d7 failed on document 'd7' \(row 7\): ValueError: cannot read"):
        run_per_document(fail_on_d7, shards, tmp_path / "out", tasks=4, workers=2)
    assert not (tmp_path / "out" / "00000_000.parquet").exists()  # task 0 holds d7: nothing half-written


def test_refusals(shards, tmp_path):
    def refused(match, **kwargs):
        arguments = {"function": count_words, "input_path": shards, "output_path": tmp_path / "out"} | kwargs
        with pytest.raises(UserError, match=match):
            run_per_document(**arguments)

    refused(r"unknown executor 'spark': choose one of local, slurm, ray", executor="spark")
    refused(r"executor 'ray' needs Ray .* pip install", executor="ray")
    if not os.environ.get("SLURM_CLUSTER_NAME"):
        refused(r"executor 'slurm' needs Slurm's sbatch on PATH", executor="slurm")
    refused(r"executor 'local' has no option partition: it accepts .*start_method", partition="cpu")
    refused(r"has no column 'body' \(text_field\): its columns are id, title, text", text_field="body")
    refused(r"cannot import module 'moraft.nowhere'", function="moraft.nowhere:f")
    refused(r"holds no \*.parquet or \*.jsonl files", input_path=tmp_path)
    refused(r"tasks=0", tasks=0)
    run_per_document(count_words, shards, tmp_path / "out", tasks=2)
    refused(r"written by a different run \(function, tasks differ\)", function=fail_on_d7)
    with pytest.raises(UserError, match="already holds Parquet files"):
        write_shards(corpus(), shards, num_shards=2)


def test_slurm_submits_two_chained_array_jobs_that_run_on_the_nodes(shards, tmp_path, monkeypatch):
    """Slurm is not here: a fake ``sbatch`` records the submissions, then each array task runs as Slurm would run
    it (``launch_pickled_pipeline logs/executor.pik`` with SLURM_ARRAY_TASK_ID set), in this process; a fake
    ``scontrol`` names the node."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(  # records its arguments and the script (its last argument), answers with a job id
        '#!/bin/sh\necho "$@" >> "$(dirname "$0")/calls"\ncat "$(eval echo \\${$#})" >> "$(dirname "$0")/scripts"\n'
        'echo "Submitted batch job $((4240 + $(wc -l < "$(dirname "$0")/calls")))"\n')
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho node1\n")  # `scontrol show hostnames $SLURM_NODELIST`
    for tool in bin_dir.iterdir():
        tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    out = run_per_document(count_words, shards, tmp_path / "out", tasks=4, workers=2, executor="slurm",
                           time="00:10:00", partition="cpu")
    assert not list(out.glob("*.parquet"))  # submitted, not run
    calls = (bin_dir / "calls").read_text().splitlines()
    # the tasks (4241), their stats merge (4242), the schema step after the tasks succeed (4243), its stats merge
    assert len(calls) == 4 and "--dependency=afterok:4241" in calls[2]
    scripts = (bin_dir / "scripts").read_text()
    for directive in ("--partition=cpu", "--time=00:10:00", "--array=0-3%2", "--job-name=moraft-out",
                      "--job-name=moraft-out-schema"):
        assert f"#SBATCH {directive}\n" in scripts

    def run_array_task(pickled, index):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(index))
        monkeypatch.setenv("SLURM_NODELIST", "node1")
        with open(pickled, "rb") as f:
            dill.load(f).run()

    monkeypatch.setattr(signal, "signal", lambda *args: None)  # a task installs a requeue handler: not in pytest
    for index in range(4):
        run_array_task(out / "logs" / "executor.pik", index)
    run_array_task(out / "logs" / "final" / "executor.pik", 0)
    result = read_output(out)
    assert result.remove_columns(ROW_INDEX).to_list() == corpus().map(count_words).to_list()

"""What moraft deletes or replaces (`moraft.outputs`): an earlier output of the same command and nothing else, never the
current, home or root directory; the staging a killed writer left is removed by the next run, a live writer's is not."""

from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path

import pytest
from helpers import leftovers, run_cli, tiny_flags, tiny_options

from moraft import MoraConfig
from moraft.errors import UserError
from moraft.interop import merge_adapter
from moraft.outputs import record, staged_output_dir
from moraft.testing import save_adapter, tiny_llama
from moraft.train import train

DEBIAN = Path(__file__).parent / "fixtures" / "debian"


def text_data(tmp_path: Path) -> Path:
    """A few lines of text to train on: a run without the uuid-memory task's evaluation by generation."""
    path = tmp_path / "text.jsonl"
    path.write_text("".join(f'{{"text": "line {i}: the quick brown fox jumps over the lazy dog"}}\n' for i in range(8)))
    return path


def one_line_error(status: int, err: str, expected: str) -> None:
    """The command stopped on bad input: status 2, its last line on stderr the error saying ``expected``."""
    assert status == 2 and "Traceback" not in err, err
    assert expected in err.strip().splitlines()[-1], err


def test_train_overwrite_replaces_an_earlier_run_and_nothing_else(tmp_path, capsys):
    out, data = tmp_path / "run", text_data(tmp_path)
    train(tiny_options(out, data={"dataset": str(data)}, optimization={"max_steps": 2}, output={"save_steps": 1}))
    (out / "notes.txt").write_text("mine")
    (out / "data").mkdir()
    flags = ["train", *tiny_flags(out), "--data", str(data), "--optimization.max_steps", "1", "--output.overwrite"]
    status, _, err = run_cli(flags, capsys)
    one_line_error(status, err, f"output.dir {str(out)!r} holds entries that moraft train did not write (data/, "
                                "notes.txt); move them away or choose another output.dir")
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "adapter_model.safetensors").is_file() and (out / "checkpoint-2").is_dir()  # the run untouched

    (out / "notes.txt").unlink()
    (out / "data").rmdir()
    status, _, err = run_cli(flags, capsys)
    assert status == 0, err
    assert not (out / "checkpoint-2").exists()  # the earlier run's files are gone, its directory stays
    assert (out / "adapter_model.safetensors").is_file()


PROTECTED = {"current": (".", "the current directory"), "above": ("..", "a directory above the current one"),
             "home": ("{home}", "the home directory"), "root": ("/", "the filesystem root")}


@pytest.mark.parametrize("case", list(PROTECTED))
def test_the_current_home_and_root_directories_are_never_replaced(tmp_path, capsys, monkeypatch, llama_dir, case):
    home, work = tmp_path / "home", tmp_path / "work" / "here"
    for directory in (home, work):
        directory.mkdir(parents=True)
        (directory / "keep.txt").write_text("x")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    target, what = PROTECTED[case]
    target = target.replace("{home}", str(home))
    expected = f"{target!r} is {what}, which moraft never deletes or replaces"
    status, _, err = run_cli(["train", *tiny_flags(target), "--output.overwrite"], capsys)
    one_line_error(status, err, f"output.dir {expected}; choose another output.dir")
    adapter = tmp_path / "adapter"
    save_adapter(tiny_llama(), MoraConfig(r=8, target_modules=["q_proj"]), adapter)
    with pytest.raises(UserError, match=f"output {expected}"):
        merge_adapter(llama_dir, adapter, target, overwrite=True)
    assert (work / "keep.txt").read_text() == (home / "keep.txt").read_text() == "x"


@pytest.mark.parametrize("command", ["merge", "export-lora"])
def test_merge_and_export_replace_only_their_own_output(tmp_path, capsys, llama_dir, command):
    adapter = tmp_path / "adapter"
    save_adapter(tiny_llama(), MoraConfig(r=8, target_modules=["q_proj"]), adapter)
    out = tmp_path / "out"
    argv = [command, str(llama_dir), str(adapter), str(out)] if command == "merge" else \
        [command, str(adapter), str(out), "--base", str(llama_dir)]
    assert run_cli(argv, capsys)[0] == 0
    written = sorted(p.name for p in out.iterdir())
    (out / "notes.txt").write_text("mine")
    status, _, err = run_cli([*argv, "--overwrite"], capsys)
    one_line_error(status, err, f"output {str(out)!r} holds entries that moraft {command} did not write (notes.txt)")
    assert (out / "notes.txt").read_text() == "mine" and leftovers(tmp_path) == []

    (out / "notes.txt").unlink()
    status, _, err = run_cli([*argv, "--overwrite"], capsys)
    assert status == 0, err
    assert sorted(p.name for p in out.iterdir()) == written and leftovers(tmp_path) == []

    run = tmp_path / "run"  # a training run's files, even of the same names, are not the command's to replace
    run.mkdir()
    record(run, "moraft train", ["adapter_config.json"])
    (run / "adapter_config.json").write_text("{}")
    argv[argv.index(str(out))] = str(run)
    status, _, err = run_cli([*argv, "--overwrite"], capsys)
    one_line_error(status, err, f"output {str(run)!r} is the output of moraft train, not of moraft {command}")


def _killed_mid_write(out: Path) -> None:
    """A merge's writer, killed (SIGKILL: nothing runs after it) while its output is half-written."""
    with staged_output_dir(out, command="moraft merge") as staging:
        (staging / "model.safetensors").write_bytes(b"half")
        os.kill(os.getpid(), signal.SIGKILL)


def _writing(out: Path, ready, finish) -> None:
    """A merge's writer still at work until ``finish`` is set (then it fails, which removes its staging)."""
    try:
        with staged_output_dir(out, command="moraft merge"):
            ready.set()
            finish.wait(60)
            raise RuntimeError("done")
    except RuntimeError:
        pass


def test_the_staging_of_a_killed_merge_is_removed_by_the_next_run_not_a_live_one(tmp_path, capsys, llama_dir):
    adapter = tmp_path / "adapter"
    save_adapter(tiny_llama(), MoraConfig(r=8, target_modules=["q_proj"]), adapter)
    out = tmp_path / "out"
    fork = multiprocessing.get_context("fork")  # the children only write files: no threads of their own
    killed = fork.Process(target=_killed_mid_write, args=(out,))
    killed.start()
    killed.join(60)
    assert killed.exitcode == -signal.SIGKILL and len(leftovers(tmp_path)) == 1 and not out.exists()
    stale = leftovers(tmp_path)
    ready, finish = fork.Event(), fork.Event()
    live = fork.Process(target=_writing, args=(out, ready, finish))
    live.start()
    try:
        assert ready.wait(60)
        busy = sorted(set(leftovers(tmp_path)) - set(stale))
        status, _, err = run_cli(["merge", str(llama_dir), str(adapter), str(out)], capsys)
        assert status == 0, err
        assert leftovers(tmp_path) == busy  # the dead writer's staging is gone, the live one's stays
    finally:
        finish.set()
        live.join(60)
    assert leftovers(tmp_path) == [] and (out / "model.safetensors").stat().st_size > 4


def test_data_replaces_only_its_own_saved_stages(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join((DEBIAN / "corpus.jsonl").read_text().splitlines()[:5]) + "\n")
    out = tmp_path / "out"
    (out / "corpus").mkdir(parents=True)
    (out / "corpus" / "notes.txt").write_text("mine")
    argv = ["data", "--corpus", str(corpus), "--output", str(out), "--stages", "corpus"]
    status, _, err = run_cli(argv, capsys)
    one_line_error(status, err, f"output {str(out / 'corpus')!r} holds entries that moraft data did not write "
                                "(notes.txt)")
    assert (out / "corpus" / "notes.txt").read_text() == "mine"
    (out / "corpus" / "notes.txt").unlink()
    assert run_cli(argv, capsys)[0] == 0
    status, stdout, err = run_cli([*argv, "--force"], capsys)  # its own stage: replaced
    assert status == 0 and "corpus: running" in stdout, err


def test_demo_stops_before_training_where_it_would_replace_what_it_did_not_write(tmp_path, capsys):
    argv = ["demo", "--output_dir", str(tmp_path), "--max_steps", "2", "--hidden_size", "32", "--num_layers", "1"]
    (tmp_path / "demo.json").write_text("mine")
    status, _, err = run_cli(argv, capsys)
    one_line_error(status, err, "holds entries that moraft demo did not write (demo.json)")
    (tmp_path / "demo.json").unlink()
    (tmp_path / "mora-r8").mkdir()
    (tmp_path / "mora-r8" / "notes.txt").write_text("mine")
    status, _, err = run_cli(argv, capsys)
    one_line_error(status, err, "holds entries that moraft train did not write (notes.txt)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mora-r8"]  # the first run did not start

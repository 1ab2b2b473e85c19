"""``moraft eval --tasks``: multiple-choice tasks ranked by option log-likelihood (moraft.train.tasks), checked
against a model whose preference is known, against lm-evaluation-harness on the same tasks, and on the Debian
fixture (tests/fixtures/debian, rebuilt from the index when the machine has it)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import assert_refused, run_cli, tiny_flags
from moraft.errors import UserError
from moraft.testing import save_base, tiny_llama
from moraft.train.builtin import char_tokenizer
from moraft.train.tasks import Task, encode_pair, few_shot_context, loglikelihoods, read_tasks, score_tasks

ROOT = Path(__file__).resolve().parents[1]
DEBIAN = ROOT / "tests" / "fixtures" / "debian"


class Favouring(nn.Module):
    """A tiny LLaMA whose logits of one token are raised by ``bias`` at every position: a model whose preference
    among options is known."""

    def __init__(self, token_id: int, bias: float) -> None:
        super().__init__()
        self.llama = tiny_llama(0, hidden_size=32)
        self.config = self.llama.config
        self.token_id, self.bias = token_id, bias

    def forward(self, input_ids, attention_mask=None):
        out = self.llama(input_ids=input_ids, attention_mask=attention_mask)
        out.logits[..., self.token_id] += self.bias
        return out


def write_tasks(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_base(tiny_llama(0, hidden_size=32), tmp_path_factory.mktemp("model"))


def test_loglikelihoods_are_the_sums_of_the_option_tokens_log_probabilities(tokenizer):
    model = tiny_llama(0, hidden_size=32)
    pairs = [("The sky is", " blue"), ("A much longer prompt than the others:", " x"), ("Q", " yes and no")]
    batched = loglikelihoods(model, tokenizer, pairs, batch_size=2)  # rows of different lengths, right-padded
    for (context, option), got in zip(pairs, batched):
        ids = tokenizer(context + option, return_tensors="pt").input_ids  # one row alone, no padding
        n = len(option)  # the character tokenizer: one token per character
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
        expected = logprobs[-n:].gather(1, ids[0, -n:, None]).sum().item()
        assert got == pytest.approx(expected, abs=1e-4)
    # a model without logits_to_keep (the same weights under a wrapper) gets every position's logits: same scores
    assert loglikelihoods(Favouring(0, 0.0), tokenizer, pairs, batch_size=3) == pytest.approx(batched, abs=1e-4)


def test_ranking_follows_the_favoured_token_and_acc_norm_divides_by_length(tokenizer):
    x = tokenizer.convert_tokens_to_ids("x")
    tasks = [
        Task("a", "Pick:", ("abc", "xxx", "qqq"), 1),
        Task("b", "Pick one:", ("xyz", "abz", "xxz"), 2),
    ]
    result = score_tasks(Favouring(x, 30.0), tokenizer, tasks)
    assert [r["prediction"] for r in result["rows"]] == [1, 2]
    assert result["accuracy"] == 1.0 and result["chance"] == pytest.approx(1 / 3) and result["num_tasks"] == 2

    # Every option costs about the same for its leading space; each "x" after it costs a little. The sum favours
    # the short option, the per-character mean the long one.
    task = Task("c", "Pick:", ("x", "xxxxxxxxxxxxxxxx"), 0)
    result = score_tasks(Favouring(x, 4.0), tokenizer, [task])
    lls = result["rows"][0]["loglikelihoods"]
    assert lls[0] > lls[1] and lls[0] / 1 < lls[1] / 16
    assert (result["accuracy"], result["accuracy_norm"]) == (1.0, 0.0)


def test_few_shot_context_draws_other_tasks_seeded_and_formats_them(tmp_path):
    tasks = [Task(str(i), f"Q{i}?", (f"A{i}", "wrong"), 0) for i in range(6)]
    tasks[2] = Task("2", "Q2?", ("wrong", "A2"), 1, instruction="Answer each question.")
    text = few_shot_context(tasks, 2, shots=3, seed=7)
    blocks = text.split("\n\n")
    assert blocks[0] == "Answer each question." and blocks[-1] == "Q2?" and len(blocks) == 5
    shown = [block.split("?")[0][1:] for block in blocks[1:-1]]
    assert len(set(shown)) == 3 and "2" not in shown  # three different tasks, never the task itself
    assert all(block == f"Q{i}? A{i}" for block, i in zip(blocks[1:-1], shown))  # prompt, space, right option
    assert few_shot_context(tasks, 2, shots=3, seed=7) == text
    draws = {tuple(few_shot_context(tasks, i, shots=2, seed=s).split("\n\n")[:-1]) for i in (0, 1) for s in range(5)}
    assert len(draws) > 2  # the seed and the task both change the draw
    assert few_shot_context(tasks, 0) == "Q0?"
    context_question = {"context": "Cats purr.", "question": "What do cats do?", "options": ["purr", "no"], "answer": 0}
    task = read_tasks(write_tasks(tmp_path / "tasks.jsonl", [context_question]))[0]
    assert task.prompt == "Cats purr.\nWhat do cats do?" and task.id == "1"  # the line number when there is no id


def test_option_tokens_are_those_encoded_after_the_prompt(tokenizer):
    from tokenizers import Tokenizer, models, trainers
    from transformers import PreTrainedTokenizerFast

    # without a pre-tokenizer, BPE merges across spaces: the option's first token can depend on the prompt
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    corpus = ["the sky is blue", "the sea is blue", "is it blue", "sky is"] * 20
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "<s>"]))
    bpe = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", unk_token="<unk>")
    crossed = 0
    for context, option in [("the sky is", " blue"), ("the sea", " is blue"), ("sky", " is it blue")]:
        context_ids, option_ids = encode_pair(bpe, context, option)
        whole = bpe(context + option).input_ids
        assert context_ids == bpe(context).input_ids and option_ids == whole[len(context_ids) :]
        crossed += option_ids != bpe(option).input_ids
    assert crossed  # scoring the option on its own would have scored other tokens

    assert encode_pair(tokenizer, "Q: ", "A") == encode_pair(tokenizer, "Q:", " A")  # trailing spaces move over
    context_ids, option_ids = encode_pair(tokenizer, "Q:", " yes")
    assert tokenizer.convert_ids_to_tokens(option_ids) == [" ", "y", "e", "s"] and context_ids[0] == tokenizer.bos_token_id


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-evaluation-harness is not installed")
def test_the_same_scores_as_lm_evaluation_harness(tokenizer, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model = tiny_llama(0, hidden_size=32)
    tasks_file = write_tasks(tmp_path / "tasks.jsonl", (DEBIAN / "tasks.jsonl").read_text().splitlines()[:16])
    ours = score_tasks(model, tokenizer, read_tasks(tasks_file), batch_size=8)
    config = {
        "task": "debian_science",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(tasks_file)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{prompt}}",
        "doc_to_choice": "{{options}}",
        "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
    }
    harness = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8)
    no_builtin_tasks = TaskManager(include_defaults=False)  # indexing lm-eval's thousands of tasks takes seconds
    theirs = simple_evaluate(model=harness, tasks=[config], task_manager=no_builtin_tasks, num_fewshot=0,
                             log_samples=True, verbosity="ERROR")
    metrics = theirs["results"]["debian_science"]
    assert (ours["accuracy"], ours["accuracy_norm"]) == (metrics["acc,none"], metrics["acc_norm,none"])
    samples = sorted(theirs["samples"]["debian_science"], key=lambda sample: sample["doc_id"])
    for sample, row in zip(samples, ours["rows"], strict=True):
        assert row["loglikelihoods"] == pytest.approx([resp[0] for resp in sample["filtered_resps"]], abs=1e-4)


def test_cli_on_a_saved_model_writes_the_summary_and_the_rows(model_dir, tmp_path, capsys):
    tasks_file = write_tasks(tmp_path / "tasks.jsonl", (DEBIAN / "tasks.jsonl").read_text().splitlines()[:8])
    out = tmp_path / "out" / "metrics.json"
    argv = ["eval", str(model_dir), "--tasks", str(tasks_file), "--shots", "2", "--seed", "3", "--output", str(out)]
    status, stdout, _ = run_cli(argv, capsys)
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert status == 0 and summary["task"] == "multiple-choice" and summary["num_tasks"] == 8
    assert (summary["shots"], summary["seed"], summary["chance"]) == (2, 3, 0.25)
    assert json.loads(out.read_text()) == summary
    details = json.loads((out.parent / "eval_tasks.json").read_text())
    assert {k: v for k, v in details.items() if k != "rows"} == summary and len(details["rows"]) == 8
    assert details["rows"][0]["id"] == "science-000" and len(details["rows"][0]["loglikelihoods"]) == 4
    assert summary["accuracy"] == sum(r["prediction"] == r["answer"] for r in details["rows"]) / 8
    assert sorted(p.name for p in out.parent.iterdir()) == ["eval_tasks.json", "metrics.json"]  # nothing partial


def test_cli_on_a_training_run_writes_eval_tasks_json_in_the_run(tmp_path, capsys):
    run = tmp_path / "run"
    status, _, err = run_cli(["train", *tiny_flags(run), "--optimization.max_steps=2"], capsys)
    assert status == 0, err
    tasks_file = write_tasks(tmp_path / "tasks.jsonl", (DEBIAN / "tasks.jsonl").read_text().splitlines()[:4])
    status, stdout, _ = run_cli(["eval", str(run), "--tasks", str(tasks_file)], capsys)
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert status == 0 and summary["evaluated"].startswith("adapter") and summary["num_tasks"] == 4
    assert json.loads((run / "eval_tasks.json").read_text())["accuracy"] == summary["accuracy"]


BAD_ROWS = [
    ([], "has no tasks"),
    (["{not json"], "tasks.jsonl line 1: not JSON"),
    ([{"prompt": "Q", "options": ["a", "b"], "answer": 0}, {"prompt": "Q", "answer": 0}],
     'tasks.jsonl line 2: "options" must be a list of at least 2 non-empty strings'),
    ([{"prompt": "Q", "options": ["a"], "answer": 0}], '"options" must be a list of at least 2'),
    ([{"prompt": "Q", "options": ["a", "b", "c"], "answer": 3}],
     'tasks.jsonl line 1: "answer" must be the index of the right option, an integer from 0 to 2, got 3'),
    ([{"prompt": "Q", "options": ["a", "b"], "answer": "a"}], '"answer" must be the index'),
    ([{"question": "Q", "options": ["a", "b"], "answer": 0}], 'line 1: no "prompt" string'),
    ([{"prompt": "Q", "options": ["a", "b"], "answer": 0}] * 2, "--shots 2 needs at least 3 tasks"),
]


@pytest.mark.parametrize("rows, expected", BAD_ROWS)
def test_bad_task_files_are_refused_in_one_line(rows, expected, tmp_path, capsys):
    tasks_file = write_tasks(tmp_path / "tasks.jsonl", rows)
    out = tmp_path / "out"
    argv = ["eval", "builtin:tiny-llama", "--tasks", str(tasks_file), "--shots", "2", "--output", str(out / "m.json")]
    assert_refused(argv, capsys, expected, out)


def test_missing_task_file_and_text_with_tasks_are_refused(tmp_path, capsys):
    out = tmp_path / "out"
    missing = ["eval", "builtin:tiny-llama", "--tasks", str(tmp_path / "none.jsonl"), "--output", str(out / "m.json")]
    assert_refused(missing, capsys, "none.jsonl' does not exist (expected a JSONL file", out)
    both = ["eval", "builtin:tiny-llama", "--tasks", "t.jsonl", "--text", "t.txt", "--output", str(out / "m.json")]
    assert_refused(both, capsys, "pass --text or --tasks, not both", out)
    with pytest.raises(UserError, match="--shots -1: expected 0 or more"):
        score_tasks(None, None, [Task("a", "Q", ("a", "b"), 0)], shots=-1)


def test_the_debian_fixture_is_small_and_its_answers_are_in_its_corpus():
    corpus = [json.loads(line) for line in (DEBIAN / "corpus.jsonl").read_text().splitlines()]
    tasks = read_tasks(DEBIAN / "tasks.jsonl")
    assert sum(f.stat().st_size for f in DEBIAN.iterdir()) < 500_000
    assert len(corpus) == 300 and len(tasks) == 100 and {len(t.options) for t in tasks} == {4}
    assert set(corpus[0]) == {"id", "title", "text"} and len({row["id"] for row in corpus}) == 300
    texts = {row["id"]: row["text"] for row in corpus}
    for task in tasks:
        right = task.options[task.answer]
        if task.prompt.startswith("Debian package "):  # the options are short descriptions
            package, description = task.prompt.split(" ")[2].rstrip(":"), right
        else:  # the options are package names
            package, description = right, task.prompt.split('"')[1]
        # the package's document says its description; no wrong option is its name or description
        assert f"{package} is a Debian package in the science section: {description}." in texts[package]
        assert package not in task.options or right == package
        assert all(texts[package].find(f": {option}.") == -1 for option in task.options if option != right)


def test_the_script_rebuilds_the_fixture_from_the_index(tmp_path):
    spec = importlib.util.spec_from_file_location("build_debian_fixture", ROOT / "scripts" / "build_debian_fixture.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    if not script.INDEX.is_file():
        pytest.skip(f"the Debian bookworm Packages index is not on this machine ({script.INDEX})")
    text = script.read_index(script.INDEX)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if digest not in (DEBIAN / "README.md").read_text():
        pytest.skip(f"this machine's bookworm Packages index (sha256 {digest[:12]}...) is not the fixture's")
    script.main(["--out", str(tmp_path)])
    for name in ("corpus.jsonl", "tasks.jsonl"):
        assert (tmp_path / name).read_bytes() == (DEBIAN / name).read_bytes()

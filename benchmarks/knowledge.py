"""Where MoRA wins: every method at equal trainable budgets, on tasks that need new knowledge and on one that does
not, while LoRA is starved of rank (r/d from about 6% down towards the paper's 8/4096 = 0.2%).

The paper (arXiv 2405.12130) claims MoRA's high rank helps where fine-tuning must store new knowledge (memorizing
UUID pairs, continued pre-training) and changes little where it need not (instruction tuning, maths). This script
measures that claim small, on CPU, through `moraft.train.train` (the code behind `moraft train`), for every method of
`METHODS` (one table: name -> `AdapterOptions` fields) at the same ``r`` (each run's trainable count is reported,
and flagged when it differs from LoRA's by more than 10%).

Base models (one per width, built once and cached in --work_dir): the built-in tiny LLaMA after a short full
pretraining on text that teaches it the language of the tasks but none of their answers:

- general text: Debian package index entries of sections other than science, written as sentences the way
  ``scripts/build_debian_fixture.py`` writes the science corpus, and the two question formats of the science task
  answered for those packages ("Debian package X: its short description is Y");
- UUID pairs "key:value" of another data seed than the memory task's (the format, not the values);
- every addition problem of the control in format A ("a+b= c"), 30 times.

Without the Debian index on the machine, the general text is the Python standard library's source instead.

Tasks (``--tasks``; each run is one method fine-tuned from the base):

- memory: the paper's memory task (`moraft.train.uuid_pairs`, data seed 0), as ``benchmarks/memory_task.py`` runs
  it: character accuracy of greedily generated values. LR picked on it (it is a memorization test).
- cpt-raw / cpt-rc: continued pre-training on the Debian science fixture (``tests/fixtures/debian``): the documents
  the 100 questions of ``tasks.jsonl`` are about, and other documents, are the training split; a seeded draw of
  the others is held out. cpt-raw trains on the documents as they are; cpt-rc on what ``moraft data`` makes of the
  same documents (stages corpus, mine, cluster, build: AdaptLLM's reading-comprehension format, no LLM). Both run
  the same steps. Scored by the multiple-choice accuracy on tasks.jsonl (`moraft.train.tasks.score_tasks`, as
  ``moraft eval --tasks``) and the perplexity of the held-out documents; the LR is picked by that perplexity, so
  the questions never choose it.
- control: addition problems the base learned in format A, fine-tuned in format B ("What is a plus b? Answer: c",
  loss on the answer) on some problems, scored on others as four-option questions (the right sum and near misses).
  No new knowledge is needed, so the paper expects parity. LR picked on a validation set of other problems.

Parts (``--only``):

- main: every method of --methods on every task at --main_point (width x r);
- sweep: --sweep_methods at every --points entry (width x r), i.e. r/d = r / width, on --sweep_tasks;
- pairs: --pairs_methods on the memory task at --main_point with each --pairs_counts number of pairs (pairs per
  trainable parameter at a fixed budget).

Protocol in every cell (task, method, width, r, pairs): each learning rate of the grid (--lr_grid, --full_lr_grid
for full fine-tuning) on seed 0, the pick by the task's criterion, then seeds 1..--seeds-1 at the pick. Every run
is written to the JSON as it finishes (--output/--name.json); a rerun with the same setting skips the runs it has,
so the study can run in pieces, and several processes can run parts of one study at once (they share the bases,
the data and the JSON, under file locks). Prints the grids, tables per task, the MoRA - LoRA gaps, and writes the
plots to --plots: ``<name>_gap.png`` (the headline: MoRA - LoRA against r/d, per task, seed spread) and
``<name>_methods.png`` (every method at the main point, per task). --report prints the tables as Markdown from the
JSON alone.

    python benchmarks/knowledge.py --only main & python benchmarks/knowledge.py --only sweep pairs   # docs/study.md
    python benchmarks/knowledge.py --report            # its tables and plots, from the JSON
    python benchmarks/knowledge.py --only main --methods lora mora-sharing --tasks memory
    python benchmarks/knowledge.py --quick             # a tiny run of everything (the smoke test's)
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import random
import shutil
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import build_debian_fixture as debian  # noqa: E402  (scripts/: the science corpus's own writer)

from moraft.train import TrainOptions, perplexity, train, uuid_accuracy, uuid_pairs  # noqa: E402
from moraft.train.data import _progress as datasets_progress  # noqa: E402
from moraft.train.tasks import Task, read_tasks, score_tasks  # noqa: E402

# name -> AdapterOptions fields at the run's r; a float merge_every is a fraction of the run's steps
METHODS: dict[str, dict] = {
    "full": {"method": "full"},
    "lora": {"method": "lora"},
    "dora": {"method": "dora"},
    "mora-sharing": {"method": "mora", "compression": "sharing"},
    "mora-rotation": {"method": "mora", "compression": "rotation"},
    "remora": {"method": "mora", "compression": "sharing", "merge_every": 0.25},
    "hira": {"method": "hira"},
    "miss": {"method": "miss"},
    "gralora": {"method": "gralora"},
    # the MoRA outside, DoRA inside needs inner layers; a 2-layer model has none, so: MoRA on the MLPs (where
    # a transformer's key-value memories are, arXiv 2012.14913), DoRA on attention
    "mixed": {"method": "mora", "compression": "rotation", "layer_methods": {r"self_attn\..*": "dora"}},
}
TASKS = ("memory", "cpt-raw", "cpt-rc", "control")
PARTS = ("main", "sweep", "pairs")
FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "debian"
GENERAL_SECTIONS = ("utils", "net", "admin", "games", "text", "graphics", "sound", "misc", "x11", "devel")
# each task's reported metric (higher is better) and the criterion that picks its learning rate
REPORTED = {"memory": "char_accuracy", "cpt-raw": "mc_accuracy", "cpt-rc": "mc_accuracy", "control": "accuracy"}
PICKED_BY = {"memory": ("char_accuracy", 1), "cpt-raw": ("heldout_perplexity", -1),
             "cpt-rc": ("heldout_perplexity", -1), "control": ("val_accuracy", 1)}
LORA, MORA = "lora", "mora-rotation"  # the headline's pair (the paper recommends rotation at small r)

QUICK = [
    "--main_point", "32x2", "--points", "32x1", "--sweep_methods", "lora", "mora-rotation", "--sweep_tasks", "memory",
    "--pairs_counts", "4", "--methods", "lora", "mora-rotation", "--num_layers", "1", "--num_pairs", "8",
    "--memory_steps", "4", "--cpt_steps", "4", "--control_steps", "4", "--eval_steps", "2", "--base_steps", "4",
    "--general_docs", "40", "--cpt_heldout", "20", "--seq_length", "128", "--lr_grid", "3e-3", "--seeds", "2",
    "--arithmetic_range", "10", "--control_train", "20", "--control_val", "8", "--control_test", "16",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add = parser.add_argument
    add("--output", default="benchmarks/results", help="where <name>.json is written")
    add("--plots", default="docs/assets", help="where <name>_gap.png and <name>_methods.png are written")
    add("--name", default="knowledge", help="file name stem of the JSON and the plots")
    add("--work_dir", default="runs/knowledge", help="bases, data and runs (kept: the bases are reused)")
    add("--report", action="store_true", help="run nothing: print the saved JSON's tables as Markdown, redraw the plots")
    add("--quick", action="store_true", help="a tiny run of everything (explicit flags still win)")
    add("--only", nargs="+", choices=PARTS, default=list(PARTS), help="parts of the study to run")
    add("--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="tasks of the main part")
    add("--methods", nargs="+", default=list(METHODS), help=f"methods of the main part: {', '.join(METHODS)}")
    add("--main_point", default="64x2", help="WIDTHxR of the main part and the pairs part")
    add("--points", nargs="+", default=["64x4", "64x2", "64x1", "128x1"],
        help="WIDTHxR points of the sweep (r/d = r / width)")
    add("--sweep_methods", nargs="+", default=[LORA, MORA], help="methods of the sweep")
    add("--sweep_tasks", nargs="+", choices=TASKS, default=["memory", "control", "cpt-raw"], help="tasks of the sweep")
    add("--pairs_methods", nargs="+", default=[LORA, MORA], help="methods of the pairs part")
    add("--pairs_counts", type=int, nargs="+", default=[8, 32, 128], help="numbers of UUID pairs of the pairs part")
    add("--num_layers", type=int, default=2, help="decoder layers of the built-in tiny LLaMA")
    add("--num_pairs", type=int, default=32, help="memory: UUID pairs to memorize (data seed 0)")
    add("--memory_steps", type=int, default=150, help="memory: optimizer steps (batch 32)")
    add("--cpt_steps", type=int, default=120, help="cpt-raw, cpt-rc: optimizer steps (batch 8 blocks)")
    add("--control_steps", type=int, default=60, help="control: optimizer steps (batch 32)")
    add("--eval_steps", type=int, default=50, help="evaluate during training every N steps (memory, cpt)")
    add("--seq_length", type=int, default=256, help="tokens (characters) per block of text")
    add("--lr_grid", type=float, nargs="+", default=[3e-3, 1e-2], help="learning rates tried for adapters")
    add("--full_lr_grid", type=float, nargs="+", default=[1e-3, 3e-3], help="learning rates tried for full")
    add("--seeds", type=int, default=3, help="seeds per cell (seed 0 is the grid's run at the pick)")
    add("--base_steps", type=int, default=600, help="base pretraining: full fine-tuning steps (batch 8 blocks)")
    add("--base_lr", type=float, default=2e-3, help="base pretraining: peak learning rate (cosine, 5%% warmup)")
    add("--general_docs", type=int, default=600, help="base pretraining: Debian documents of other sections")
    add("--cpt_heldout", type=int, default=40, help="cpt: documents held out for perplexity (none a task is about)")
    add("--arithmetic_range", type=int, default=15, help="control: a and b in 0..N-1")
    add("--control_train", type=int, default=100, help="control: problems fine-tuned on in format B")
    add("--control_val", type=int, default=25, help="control: problems that pick the learning rate")
    add("--control_test", type=int, default=100, help="control: problems scored")
    add("--threads", type=int, default=1, help="torch CPU threads")
    given = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(QUICK + given if "--quick" in given else given)  # the user's flags win over QUICK
    for name in ("methods", "sweep_methods", "pairs_methods"):
        unknown = [m for m in getattr(args, name) if m not in METHODS]
        if unknown:
            parser.error(f"--{name}: unknown {', '.join(unknown)}; expected some of {', '.join(METHODS)}")
    try:
        args.main = parse_point(args.main_point)
        args.sweep = [parse_point(p) for p in args.points]
    except ValueError as err:
        parser.error(str(err))
    for name in ("num_layers", "num_pairs", "memory_steps", "cpt_steps", "control_steps", "eval_steps", "seq_length",
                 "seeds", "base_steps", "general_docs", "cpt_heldout", "arithmetic_range", "control_train",
                 "control_val", "control_test", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)} is invalid; expected an integer >= 1")
    problems = args.arithmetic_range ** 2
    if args.control_train + args.control_val + args.control_test > problems:
        parser.error(f"--control_train + --control_val + --control_test exceed the {problems} problems of "
                     f"--arithmetic_range {args.arithmetic_range}")
    return args


def parse_point(text: str) -> tuple[int, int]:
    """(width, r) from "WIDTHxR", e.g. "128x2"."""
    width, _, r = text.partition("x")
    if not (width.isdigit() and r.isdigit() and int(width) % 4 == 0 and int(r) >= 1):
        raise ValueError(f"point {text!r} is invalid; expected WIDTHxR, a width that is a multiple of 4 and r >= 1")
    return int(width), int(r)


# -- data ------------------------------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    debian.write_jsonl(path, rows)
    return path


def general_text(args: argparse.Namespace) -> tuple[list[str], str]:
    """Texts of general pretraining and where they come from: Debian documents of other sections than science with
    the science task's two question formats answered for them; else (no Debian index here) the standard library."""
    if debian.INDEX.is_file():
        entries: dict[str, dict] = {}
        for fields in debian.paragraphs(debian.read_index(debian.INDEX)):
            if fields.get("Section") in GENERAL_SECTIONS:
                entries.setdefault(fields["Package"], fields)
        names = sorted(entries)
        chosen = random.Random(0).sample(names, min(args.general_docs, len(names)))
        texts = []
        for name in chosen:
            doc = debian.document(entries[name], entries[name]["Section"])
            texts.append(doc["text"])
            texts.append(f"Debian package {doc['id']}: its short description is {doc['title']}")
            texts.append(f'The Debian package whose short description is "{doc["title"]}" is named {doc["id"]}')
        return texts, f"{len(chosen)} Debian documents of sections {', '.join(GENERAL_SECTIONS)} and 2 questions each"
    modules = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    texts = [m.read_text(encoding="utf-8", errors="replace")[:2000] for m in modules[: args.general_docs]]
    return texts, f"{len(texts)} standard library modules (first 2,000 characters; no Debian index here)"


def arithmetic(args: argparse.Namespace) -> dict[str, list[tuple[int, int]]]:
    """The control's problems: all (a, b), split into train, val and test with seed 0."""
    problems = [(a, b) for a in range(args.arithmetic_range) for b in range(args.arithmetic_range)]
    random.Random(0).shuffle(problems)
    n, v, t = args.control_train, args.control_val, args.control_test
    return {"all": problems, "train": problems[:n], "val": problems[n : n + v], "test": problems[n + v : n + v + t]}


def format_b(a: int, b: int) -> str:
    return f"What is {a} plus {b}? Answer:"


def addition_tasks(problems: list[tuple[int, int]], prompt=format_b, seed: int = 0) -> list[Task]:
    """Four-option questions: the sum and three near misses (±1, ±10, +2), in a seeded order."""
    rng = random.Random(seed)
    tasks = []
    for a, b in problems:
        c = a + b
        wrong = rng.sample([x for x in (c - 10, c - 1, c + 1, c + 2, c + 10) if x >= 0], 3)
        options = [str(x) for x in [c, *wrong]]
        rng.shuffle(options)
        tasks.append(Task(f"{a}+{b}", prompt(a, b), tuple(options), options.index(str(c))))
    return tasks


def task_documents(tasks: list[Task], corpus: list[dict]) -> set[str]:
    """The ids of the documents the science questions are about (the right option is the id or the title)."""
    by_title = {row["title"]: row["id"] for row in corpus}
    ids = {row["id"] for row in corpus}
    about = set()
    for task in tasks:
        right = task.options[task.answer]
        about.add(right if right in ids else by_title[right])
    return about


def prepare_data(args: argparse.Namespace, work: Path, report: dict) -> dict:
    """Every dataset of the study under work/data (made once; a rerun reuses them): paths and what they hold."""
    from moraft.data import run_pipeline
    from moraft.data.cluster import ClusterOptions
    from moraft.data.corpus import CorpusOptions
    from moraft.data.mine import MineOptions
    from moraft.data.pipeline import DataPipelineOptions

    data = work / "data"
    paths = {"pretrain": data / "pretrain.jsonl", "cpt_train": data / "cpt_train.jsonl",
             "cpt_heldout": data / "cpt_heldout.jsonl", "control_train": data / "control_train.jsonl",
             "tasks": FIXTURE / "tasks.jsonl", "rc": data / "rc" / "train"}
    problems = arithmetic(args)
    corpus = [json.loads(line) for line in (FIXTURE / "corpus.jsonl").read_text().splitlines() if line.strip()]
    science_tasks = read_tasks(FIXTURE / "tasks.jsonl")
    about = task_documents(science_tasks, corpus)
    others = [row for row in corpus if row["id"] not in about]
    heldout = {row["id"] for row in random.Random(0).sample(others, min(args.cpt_heldout, len(others)))}
    train_docs = [row for row in corpus if row["id"] not in heldout]
    assert about <= {row["id"] for row in train_docs}, "a question's document is held out"
    if not paths["pretrain"].is_file():
        texts, source = general_text(args)
        texts += [f"{key}:{value}" for key, value in uuid_pairs(256, 1)] * 4
        texts += [f"{a}+{b}= {a + b}" for a, b in problems["all"]] * 30
        random.Random(0).shuffle(texts)
        write_jsonl(paths["pretrain"], [{"text": t} for t in texts])
        (data / "pretrain_source.txt").write_text(source)
        write_jsonl(paths["cpt_train"], train_docs)
        write_jsonl(paths["cpt_heldout"], [row for row in corpus if row["id"] in heldout])
        write_jsonl(paths["control_train"], [{"prompt": format_b(a, b), "completion": f" {a + b}"}
                                             for a, b in problems["train"]])
    stats = run_pipeline(DataPipelineOptions(
        corpus=CorpusOptions(path=str(paths["cpt_train"])), mine=MineOptions(domain="Debian science"),
        cluster=ClusterOptions(context_tokens=1024), output=str(data / "rc"),
        stages="corpus,mine,cluster,build",
        tokenizer="builtin:tiny-llama",  # the study trains the character-level tiny model: count its tokens
    ))
    built = stats["stages"]["build"]
    report["data"] = {
        "pretrain": {"rows": sum(1 for _ in paths["pretrain"].open()),
                     "characters": sum(len(json.loads(x)["text"]) for x in paths["pretrain"].open()),
                     "general": (data / "pretrain_source.txt").read_text()},
        "cpt": {"train_documents": len(train_docs), "question_documents": len(about), "heldout_documents": len(heldout),
                "train_characters": sum(len(r["text"]) for r in train_docs),
                "rc_examples": built["examples"], "rc_tokens": built["tokens"], "rc_tasks": built["tasks"],
                "rc_documents_kept": stats["stages"]["corpus"].get("documents_out")},
        "control": {k: len(v) for k, v in problems.items()},
    }
    return {**paths, "problems": problems, "science_tasks": science_tasks}


# -- bases and runs --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def locked(path: Path):
    """Hold an exclusive lock on ``path`` (created): processes of the study that share --work_dir or --output take
    turns to make a base, the data or to write the JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def make_base(width: int, args: argparse.Namespace, work: Path, data: dict, report: dict) -> str:
    """The pretrained base of this width (made once under work/bases, then reused, also by another process of the
    study): its directory. What it knows before fine-tuning goes to report["bases"]."""
    directory = work / "bases" / f"w{width}-L{args.num_layers}-s{args.base_steps}"
    stats = directory / "base_stats.json"
    with locked(work / "bases" / f"w{width}.lock"):
        if not stats.is_file():
            report["bases"][str(width)] = pretrain_base(width, args, directory, data)
            stats.write_text(json.dumps(report["bases"][str(width)], indent=1))
    report["bases"][str(width)] = json.loads(stats.read_text())
    return str(directory)


def pretrain_base(width: int, args: argparse.Namespace, directory: Path, data: dict) -> dict:
    """Pretrain the built-in tiny LLaMA of this width fully on the general mix into ``directory``; what it knows."""
    options = TrainOptions.from_dict({
        "model": {"builtin_hidden_size": width, "builtin_num_layers": args.num_layers},
        "data": {"dataset": str(data["pretrain"]), "format": "text", "seq_length": args.seq_length},
        "adapter": {"method": "full"},
        "optimization": {"batch_size": 8, "max_steps": args.base_steps, "learning_rate": args.base_lr,
                         "lr_scheduler": "cosine", "warmup_steps": max(1, args.base_steps // 20)},
        "output": {"dir": str(directory), "overwrite": True, "save_steps": 0,
                   "logging_steps": max(1, args.base_steps // 10)},
    })
    started = time.perf_counter()
    result = train(options)
    model, tokenizer = result.model, result.tokenizer
    format_a = addition_tasks(data["problems"]["test"], lambda a, b: f"{a}+{b}=")  # scored as "a+b= c"
    return {
        "steps": args.base_steps, "final_loss": result.curve("loss")[-1][1] if result.curve("loss") else None,
        "seconds": round(time.perf_counter() - started, 1),
        # what the base knows before any fine-tuning
        "format_a_accuracy": score_tasks(model, tokenizer, format_a)["accuracy"],
        "format_b_accuracy": score_tasks(model, tokenizer, addition_tasks(data["problems"]["test"]))["accuracy"],
        "science_mc_accuracy": score_tasks(model, tokenizer, data["science_tasks"])["accuracy"],
        "memory_pairs": args.num_pairs,
        "memory_char_accuracy": uuid_accuracy(model, tokenizer, uuid_pairs(args.num_pairs, 0))["char_accuracy"],
        "heldout_perplexity": perplexity(model, tokenizer, data["cpt_heldout"], args.seq_length)["perplexity"],
    }


def adapter_fields(method: str, r: int, steps: int) -> dict:
    """`AdapterOptions` fields of ``method`` at ``r`` for a run of ``steps`` steps."""
    fields = {"r": r, **METHODS[method]}
    if isinstance(fields.get("merge_every"), float):
        fields["merge_every"] = max(1, int(steps * fields["merge_every"]))
    return fields


def run_options(task: str, method: str, base: str, r: int, pairs: int, lr: float, seed: int, directory: Path,
                args: argparse.Namespace, data: dict) -> TrainOptions:
    steps = {"memory": args.memory_steps, "control": args.control_steps}.get(task, args.cpt_steps)
    if task == "memory":
        source = {"num_pairs": pairs, "seed": 0}
        batch, eval_steps = 32, args.eval_steps
    elif task == "control":
        source = {"dataset": str(data["control_train"]), "format": "prompt-completion"}
        batch, eval_steps = 32, 0
    else:
        dataset = data["cpt_train"] if task == "cpt-raw" else data["rc"]
        source = {"dataset": str(dataset), "format": "text", "eval_dataset": str(data["cpt_heldout"]),
                  "seq_length": args.seq_length}
        batch, eval_steps = 8, args.eval_steps
    return TrainOptions.from_dict({
        "model": {"name_or_path": base},
        "data": source,
        "adapter": adapter_fields(method, r, steps),
        "optimization": {"batch_size": batch, "max_steps": steps, "learning_rate": lr, "seed": seed,
                         "lr_scheduler": "constant"},
        "output": {"dir": str(directory), "overwrite": True, "save_steps": 0, "eval_steps": eval_steps,
                   "logging_steps": max(1, steps // 10)},
    })


def evaluate(task: str, result, args: argparse.Namespace, data: dict, pairs: int) -> dict:
    """The run's task metrics, on the trained model in memory (ReMoRA's merges included)."""
    model, tokenizer = result.model, result.tokenizer
    if task == "memory":
        return uuid_accuracy(model, tokenizer, uuid_pairs(pairs, 0))
    if task == "control":
        return {"accuracy": score_tasks(model, tokenizer, addition_tasks(data["problems"]["test"]))["accuracy"],
                "val_accuracy": score_tasks(model, tokenizer, addition_tasks(data["problems"]["val"]))["accuracy"]}
    scored = score_tasks(model, tokenizer, data["science_tasks"])
    return {"mc_accuracy": scored["accuracy"], "mc_accuracy_norm": scored["accuracy_norm"],
            "heldout_perplexity": perplexity(model, tokenizer, data["cpt_heldout"], args.seq_length)["perplexity"]}


def run_key(task: str, method: str, width: int, r: int, pairs: int, lr: float, seed: int) -> str:
    return f"{task}/{method}/w{width}/r{r}/n{pairs}/lr{lr:g}/s{seed}"


def pick(runs: list[dict], task: str) -> dict:
    """The grid's run whose criterion is best (the task's PICKED_BY), ties broken by the reported metric."""
    criterion, sign = PICKED_BY[task]
    return max(runs, key=lambda run: (round(sign * run["metrics"][criterion], 6), run["metrics"][REPORTED[task]]))


def cells(args: argparse.Namespace) -> list[tuple[str, str, int, int, int]]:
    """Every (task, method, width, r, pairs) the chosen parts ask for, without repeats, main part first."""
    wanted = []
    width, r = args.main
    if "main" in args.only:
        wanted += [(t, m, width, r, args.num_pairs) for t in args.tasks for m in args.methods]
    if "sweep" in args.only:
        wanted += [(t, m, w, rr, args.num_pairs) for t in args.sweep_tasks for (w, rr) in args.sweep
                   for m in args.sweep_methods]
    if "pairs" in args.only:
        wanted += [("memory", m, width, r, n) for n in args.pairs_counts for m in args.pairs_methods]
    return list(dict.fromkeys(wanted))


# -- reports ---------------------------------------------------------------------------------------------------------


def summarize(report: dict) -> dict:
    """Per cell: the grid (lr -> reported metric, criterion), the pick, the seeds' values, mean, min, max."""
    grouped: dict[str, list[dict]] = {}
    for run in report["runs"].values():
        if "metrics" not in run:
            continue
        cell = f"{run['task']}/{run['method']}/w{run['width']}/r{run['r']}/n{run['num_pairs']}"
        grouped.setdefault(cell, []).append(run)
    summary = {}
    for cell, runs in grouped.items():
        task = runs[0]["task"]
        grid = [run for run in runs if run["seed"] == 0]
        best = pick(grid, task)
        seeds = sorted((run for run in runs if run["lr"] == best["lr"]), key=lambda run: run["seed"])
        values = [run["metrics"][REPORTED[task]] for run in seeds]
        summary[cell] = {
            **{k: runs[0][k] for k in ("task", "method", "width", "r", "r_over_d", "num_pairs")},
            "trainable_parameters": best["trainable_parameters"],
            "grid": {f"{run['lr']:g}": [run["metrics"][REPORTED[task]], run["metrics"][PICKED_BY[task][0]]]
                     for run in sorted(grid, key=lambda run: run["lr"])},
            "lr": best["lr"], "seeds": [run["seed"] for run in seeds], "values": values,
            "mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "secondary": {k: statistics.fmean(run["metrics"][k] for run in seeds) for k in best["metrics"]},
        }
    return summary


def gaps(summary: dict, report: dict) -> list[dict]:
    """MoRA - LoRA per (task, width, r, pairs): mean over seeds of the paired (same seed) differences, min, max."""
    rows = []
    for cell in summary.values():
        if cell["method"] != LORA:
            continue
        other = summary.get(f"{cell['task']}/{MORA}/w{cell['width']}/r{cell['r']}/n{cell['num_pairs']}")
        if not other:
            continue
        task = cell["task"]
        lora = {run["seed"]: run["metrics"][REPORTED[task]] for run in report["runs"].values() if _in(run, cell)}
        mora = {run["seed"]: run["metrics"][REPORTED[task]] for run in report["runs"].values() if _in(run, other)}
        diffs = [mora[s] - lora[s] for s in sorted(set(lora) & set(mora))]
        rows.append({"task": task, "width": cell["width"], "r": cell["r"], "r_over_d": cell["r_over_d"],
                     "num_pairs": cell["num_pairs"], "lora": cell["mean"], "mora": other["mean"],
                     "gap": statistics.fmean(diffs), "gap_min": min(diffs), "gap_max": max(diffs),
                     "seeds": len(diffs), "pairs_per_kparam": 1000 * cell["num_pairs"] / cell["trainable_parameters"]})
    return sorted(rows, key=lambda row: (row["task"], -row["r_over_d"], row["num_pairs"]))


def _in(run: dict, cell: dict) -> bool:
    same = all(run.get(k) == cell[k] for k in ("task", "method", "width", "r", "num_pairs"))
    return same and run.get("lr") == cell["lr"] and "metrics" in run


def markdown(report: dict, args: argparse.Namespace) -> str:
    """The tables of docs/study.md: the bases, every method per task at the main point (with the grid), the gaps."""
    summary, out = report["summary"], []
    out.append("| width | pretraining | format-A sums | format-B sums | science questions | memory (char. acc.) | "
               "held-out perplexity |\n| --- | --- | --- | --- | --- | --- | --- |")
    for width, b in sorted(report["bases"].items(), key=lambda item: int(item[0])):
        out.append(f"| {width} | {b['steps']} steps, {b['seconds']:.0f} s | {b['format_a_accuracy']:.1%} | "
                   f"{b['format_b_accuracy']:.1%} | {b['science_mc_accuracy']:.1%} | {b['memory_char_accuracy']:.1%} | "
                   f"{b['heldout_perplexity']:.2f} |")
    width, r = args.main
    pair_counts = sorted({c["num_pairs"] for c in summary.values() if (c["width"], c["r"]) == (width, r)},
                         key=lambda n: n != args.num_pairs)
    for task, pairs in [(t, n) for t in TASKS for n in (pair_counts if t == "memory" else [args.num_pairs])]:
        rows = [c for c in summary.values() if c["task"] == task and (c["width"], c["r"]) == (width, r)
                and c["num_pairs"] == pairs]
        if not rows:
            continue
        criterion = PICKED_BY[task][0]
        lora = next((c for c in rows if c["method"] == LORA), None)
        what = f"{pairs} pairs, " if task == "memory" else ""
        out.append(f"\n**{task}** ({what}{REPORTED[task]}; the lr picked by {criterion}), width {width}, r={r}:\n")
        out.append(f"| method | trainable | vs LoRA | grid, seed 0: lr {REPORTED[task]} ({criterion}) | picked lr | "
                   f"seeds | mean | min–max |" + (f" {criterion}, mean |" if criterion != REPORTED[task] else "")
                   + "\n" + "| --- " * (8 + (criterion != REPORTED[task])) + "|")
        for c in sorted(rows, key=lambda c: -c["mean"]):
            ratio = c["trainable_parameters"] / lora["trainable_parameters"] if lora else None
            flag = " (!)" if ratio and c["method"] != "full" and abs(ratio - 1) > 0.1 else ""
            grid = "; ".join(f"{lr}: {v:.3f} ({k:.3f})" for lr, (v, k) in c["grid"].items())
            out.append(f"| {c['method']} | {c['trainable_parameters']:,} | {f'{ratio:.2f}' if ratio else '-'}{flag} | "
                       f"{grid} | {c['lr']:g} | {len(c['seeds'])} | {c['mean']:.3f} | {c['min']:.3f}–{c['max']:.3f} |"
                       + (f" {c['secondary'][criterion]:.3f} |" if criterion != REPORTED[task] else ""))
    if report["gaps"]:
        out.append(f"\n| task | width | r | r/d | pairs | pairs per 1k trainable | {LORA} | {MORA} | gap | gap min–max |"
                   "\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for g in report["gaps"]:
            out.append(f"| {g['task']} | {g['width']} | {g['r']} | {g['r_over_d']:.2%} | {g['num_pairs']} | "
                       f"{g['pairs_per_kparam']:.2f} | {g['lora']:.3f} | {g['mora']:.3f} | {g['gap']:+.3f} | "
                       f"{g['gap_min']:+.3f} … {g['gap_max']:+.3f} |")
    return "\n".join(out)


def format_tables(report: dict, args: argparse.Namespace) -> str:
    summary, lines = report["summary"], []
    for task in TASKS:
        rows = [c for c in summary.values() if c["task"] == task]
        if not rows:
            continue
        metric = REPORTED[task]
        lines.append(f"\n== {task}: {metric} (mean of seeds at the picked lr; min-max) ==")
        lines.append(f"{'method':16}{'width':>6}{'r':>4}{'r/d':>8}{'pairs':>7}{'trainable':>11}{'vs lora':>9}"
                     f"{'lr':>8}  {'grid (lr: reported / pick criterion)':40}{'mean':>8}{'min-max':>14}")
        for c in sorted(rows, key=lambda c: (-c["r_over_d"], c["width"], c["num_pairs"], c["method"])):
            lora = summary.get(f"{task}/{LORA}/w{c['width']}/r{c['r']}/n{c['num_pairs']}")
            ratio = c["trainable_parameters"] / lora["trainable_parameters"] if lora else None
            flag = "" if ratio is None or c["method"] == "full" or abs(ratio - 1) <= 0.1 else " !"
            grid = " ".join(f"{lr}:{v:.3g}/{k:.3g}" for lr, (v, k) in c["grid"].items())
            spread = f"{c['min']:.3f}-{c['max']:.3f}"
            versus = (f"{ratio:.2f}" if ratio else "-") + flag
            lines.append(f"{c['method']:16}{c['width']:>6}{c['r']:>4}{c['r_over_d']:>8.2%}{c['num_pairs']:>7}"
                         f"{c['trainable_parameters']:>11,}{versus:>9}{c['lr']:>8g}  {grid:40}{c['mean']:>8.3f}"
                         f"{spread:>14}")
    if report["gaps"]:
        lines.append(f"\n== {MORA} - {LORA} (paired by seed; mean, min, max) ==")
        lines.append(f"{'task':10}{'width':>6}{'r':>4}{'r/d':>8}{'pairs':>7}{'pairs/kparam':>13}{'lora':>8}{'mora':>8}"
                     f"{'gap':>8}{'min-max':>16}")
        for g in report["gaps"]:
            spread = f"{g['gap_min']:+.3f}..{g['gap_max']:+.3f}"
            lines.append(f"{g['task']:10}{g['width']:>6}{g['r']:>4}{g['r_over_d']:>8.2%}{g['num_pairs']:>7}"
                         f"{g['pairs_per_kparam']:>13.2f}{g['lora']:>8.3f}{g['mora']:>8.3f}{g['gap']:>+8.3f}{spread:>16}")
    return "\n".join(lines)


def plot(report: dict, args: argparse.Namespace, plots: Path) -> list[Path]:
    """The headline (MoRA - LoRA against r/d per task, and against pairs per trainable parameter) and the main
    point's bars per method and task; the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots.mkdir(parents=True, exist_ok=True)
    written = []
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for task in TASKS:
        rows = [g for g in report["gaps"] if g["task"] == task and g["num_pairs"] == args.num_pairs]
        if rows:
            rows.sort(key=lambda g: g["r_over_d"])
            x = [g["r_over_d"] for g in rows]
            y = [g["gap"] for g in rows]
            err = [[g["gap"] - g["gap_min"] for g in rows], [g["gap_max"] - g["gap"] for g in rows]]
            left.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"{task} ({REPORTED[task]})")
    left.axhline(0, color="grey", lw=0.8)
    left.set(xscale="log", xlabel="r / d (LoRA rank over model width)", ylabel=f"{MORA} - {LORA}",
             title="MoRA - LoRA at equal trainable parameters")
    ticks = sorted({g["r_over_d"] for g in report["gaps"]})
    left.set_xticks(ticks, [f"{t:.2%}\n{g['width']}x{g['r']}" for t in ticks
                            for g in [next(g for g in report["gaps"] if g["r_over_d"] == t)]], fontsize=7)
    left.minorticks_off()
    left.grid(alpha=0.3, which="both")
    left.legend(fontsize=7)
    rows = sorted((g for g in report["gaps"] if g["task"] == "memory" and (g["width"], g["r"]) == args.main),
                  key=lambda g: g["pairs_per_kparam"])
    if rows:
        x = [g["pairs_per_kparam"] for g in rows]
        right.errorbar(x, [g["gap"] for g in rows], marker="o", capsize=3, color="C0",
                       yerr=[[g["gap"] - g["gap_min"] for g in rows], [g["gap_max"] - g["gap"] for g in rows]])
        for g in rows:
            right.annotate(f"{g['num_pairs']} pairs", (g["pairs_per_kparam"], g["gap"]), fontsize=7)
    right.axhline(0, color="grey", lw=0.8)
    right.set(xscale="log", xlabel="UUID pairs per 1,000 trainable parameters",
              title=f"memory task at width {args.main[0]}, r={args.main[1]}")
    if rows:
        right.set_xticks([g["pairs_per_kparam"] for g in rows], [f"{g['pairs_per_kparam']:.2g}" for g in rows])
        right.minorticks_off()
    right.grid(alpha=0.3, which="both")
    fig.suptitle("bars: min-max of the paired per-seed differences", fontsize=8)
    fig.tight_layout()
    written.append(plots / f"{args.name}_gap.png")
    fig.savefig(written[-1], dpi=80)
    plt.close(fig)

    width, r = args.main
    at_main = [c for c in report["summary"].values() if (c["width"], c["r"]) == (width, r)]
    # each task with the main number of pairs, then the memory task with any other number that 3+ methods ran
    counts = {n: sum(c["task"] == "memory" and c["num_pairs"] == n for c in at_main) for n in {c["num_pairs"] for c in at_main}}
    panels = [(t, args.num_pairs) for t in TASKS if any(c["task"] == t and c["num_pairs"] == args.num_pairs for c in at_main)]
    panels += [("memory", n) for n in sorted(counts) if n != args.num_pairs and counts[n] >= 3]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.6), squeeze=False)
        for ax, (task, pairs) in zip(axes[0], panels):
            rows = [c for c in at_main if c["task"] == task and c["num_pairs"] == pairs]
            rows.sort(key=lambda c: list(METHODS).index(c["method"]))
            means = [c["mean"] for c in rows]
            ax.bar(range(len(rows)), means, color=[f"C{list(METHODS).index(c['method']) % 10}" for c in rows],
                   yerr=[[c["mean"] - c["min"] for c in rows], [c["max"] - c["mean"] for c in rows]], capsize=3)
            ax.set_xticks(range(len(rows)), [c["method"] for c in rows], rotation=60, ha="right", fontsize=7)
            base = report["bases"].get(str(width), {})
            before = {"memory": "memory_char_accuracy", "control": "format_b_accuracy"}.get(task, "science_mc_accuracy")
            if before in base and base.get("memory_pairs", pairs) == pairs:
                ax.axhline(base[before], color="black", ls=":", lw=1, label="the base, before fine-tuning")
            if task == "control" and "format_a_accuracy" in base:
                ax.axhline(base["format_a_accuracy"], color="black", ls="--", lw=1, label="the base, in format A")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6, loc="lower right")
            ax.set_title(f"{task}{f' ({pairs} pairs)' if task == 'memory' else ''}: {REPORTED[task]}", fontsize=9)
            ax.grid(alpha=0.3, axis="y")
        fig.suptitle(f"width {width}, r={r} (r/d {r / width:.2%}): mean of seeds at the picked lr, min-max", fontsize=9)
        fig.tight_layout()
        written.append(plots / f"{args.name}_methods.png")
        fig.savefig(written[-1], dpi=80)
        plt.close(fig)
    return written


# what a run's result depends on besides its own cell, lr and seed: a saved JSON with other values is another study
SETTING = ("num_layers", "memory_steps", "cpt_steps", "control_steps", "eval_steps", "seq_length", "base_steps",
           "base_lr", "general_docs", "cpt_heldout", "arithmetic_range", "control_train", "control_val",
           "control_test", "num_pairs")
# seconds per optimizer step at width 128 on this machine's 2 shared cores (evaluation included), measured before the
# study; the estimate scales them by (width / 128) ** 1.5 (what widths 64, 128 and 256 took per step)
STEP_SECONDS = {"memory": 0.45, "cpt-raw": 0.42, "cpt-rc": 0.42, "control": 0.25}


def main(argv: list[str] | None = None) -> dict:
    """Run the study as ``argv`` says (or only print its report with --report); the JSON's content."""
    # datasets' bars off for the study's many small maps, and on again after it: the smoke test runs it in-process
    with datasets_progress(show=False):
        return _study(argv)


def _study(argv: list[str] | None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out, plots = Path(args.output), Path(args.plots)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{args.name}.json"
    setting = {k: getattr(args, k) for k in SETTING}
    # the bases and data depend on these alone, so a study that changes only the fine-tuning reuses them
    made = {k: setting[k] for k in SETTING if k not in ("memory_steps", "cpt_steps", "control_steps", "eval_steps",
                                                        "num_pairs")}
    fingerprint = hashlib.sha256(json.dumps(made, sort_keys=True).encode()).hexdigest()[:10]
    work = Path(args.work_dir) / fingerprint
    report = {"setting": setting, "bases": {}, "data": {}, "runs": {}, "errors": {}, "seconds": 0.0}
    if json_path.is_file():
        saved = json.loads(json_path.read_text())
        if saved.get("setting") != setting:
            changed = sorted(k for k in setting if saved.get("setting", {}).get(k) != setting[k])
            raise SystemExit(f"knowledge: {json_path} holds another study (different {', '.join(changed)}); "
                             "pass --name NEW or delete it")
        report.update(saved)
        report["errors"] = {}
    started = time.perf_counter()

    json_lock = Path(args.work_dir) / f"{args.name}.json.lock"  # not beside the JSON: runs/ is out of git

    def refresh() -> None:
        """Take in the runs and bases another process of the study wrote to the JSON meanwhile."""
        if json_path.is_file():
            saved = json.loads(json_path.read_text())
            if saved.get("setting") == setting:
                report["runs"] = {**saved["runs"], **report["runs"]}
                report["bases"] = {**saved["bases"], **report["bases"]}

    def save() -> None:
        with locked(json_lock):
            refresh()
            # the compute of every run and base, whichever process ran it
            report["seconds"] = round(sum(r["seconds"] for r in [*report["runs"].values(), *report["bases"].values()]), 1)
            report["summary"] = summarize(report)
            report["gaps"] = gaps(report["summary"], report)
            tmp = json_path.with_suffix(f".json.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(report, indent=1) + "\n")
            tmp.replace(json_path)

    if args.report:
        report["summary"] = summarize(report)
        report["gaps"] = gaps(report["summary"], report)
        plot(report, args, plots)
        print(markdown(report, args))
        return report
    plan = cells(args)
    steps = {"memory": args.memory_steps, "control": args.control_steps, "cpt-raw": args.cpt_steps,
             "cpt-rc": args.cpt_steps}
    missing = 0.0
    for task, method, width, r, pairs in plan:
        grid = args.full_lr_grid if method == "full" else args.lr_grid
        keys = [run_key(task, method, width, r, pairs, lr, 0) for lr in grid]
        extra = sum(1 for k in report["runs"] if k.startswith(f"{task}/{method}/w{width}/r{r}/n{pairs}/")
                    and not k.endswith("/s0"))
        count = sum(k not in report["runs"] for k in keys) + max(0, args.seeds - 1 - extra)
        missing += count * steps[task] * STEP_SECONDS[task] * (width / 128) ** 1.5
    print(f"knowledge: {len(plan)} cells; about {missing / 60:.0f} minutes of runs to go on this machine's 2 shared "
          f"cores, plus the bases not yet made (widths {sorted({c[2] for c in plan})})", flush=True)

    with locked(work / "data.lock"):
        data = prepare_data(args, work, report)
    bases = {}
    done = 0
    try:
        for task, method, width, r, pairs in plan:
            if width not in bases:
                bases[width] = make_base(width, args, work, data, report)
                save()
                b = report["bases"][str(width)]
                print(f"base width {width}: {b['seconds']} s; format-A sums {b['format_a_accuracy']:.1%}, format-B "
                      f"sums {b['format_b_accuracy']:.1%}, science questions {b['science_mc_accuracy']:.1%}, memory "
                      f"{b['memory_char_accuracy']:.1%}, held-out perplexity {b['heldout_perplexity']:.2f}", flush=True)

            def ensure(lr: float, seed: int) -> None:
                nonlocal done
                key = run_key(task, method, width, r, pairs, lr, seed)
                with locked(json_lock):
                    refresh()
                if key in report["runs"]:
                    return
                directory = work / "runs" / key.replace("/", "-")
                run_started = time.perf_counter()
                try:
                    result = train(run_options(task, method, bases[width], r, pairs, lr, seed, directory, args, data))
                    metrics = evaluate(task, result, args, data, pairs)
                except Exception as err:  # a method that cannot run here is reported, the study goes on
                    report["errors"][key] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                    print(f"{key}: failed: {report['errors'][key]}", flush=True)
                    return
                finally:
                    shutil.rmtree(directory, ignore_errors=True)
                curves = {k: result.curve(k) for k in ("char_accuracy", "eval_perplexity", "loss") if result.curve(k)}
                report["runs"][key] = {
                    "task": task, "method": method, "width": width, "r": r, "r_over_d": r / width, "num_pairs": pairs,
                    "lr": lr, "seed": seed, "trainable_parameters": result.trainable_parameters,
                    "total_parameters": result.total_parameters, "curves": curves, "metrics": metrics,
                    "seconds": round(time.perf_counter() - run_started, 1),
                }
                del result
                done += 1
                save()
                shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
                print(f"{key}: {shown} ({report['runs'][key]['seconds']} s)", flush=True)

            for lr in args.full_lr_grid if method == "full" else args.lr_grid:
                ensure(lr, 0)
            grid = [run for run in report["runs"].values() if run["seed"] == 0 and
                    (run["task"], run["method"], run["width"], run["r"], run["num_pairs"]) == (task, method, width, r, pairs)]
            if grid:
                best = pick(grid, task)["lr"]
                for seed in range(1, args.seeds):
                    ensure(best, seed)
    finally:
        save()
    written = plot(report, args, plots)
    print(format_tables(report, args))
    for key, error in report["errors"].items():
        print(f"failed: {key}: {error}")
    print(f"\nwrote {json_path} and {', '.join(map(str, written))} ({done} new runs in {time.perf_counter() - started:.0f} s; "
          f"{report['seconds']:.0f} s of runs and bases in all)")
    return report


if __name__ == "__main__":
    main()

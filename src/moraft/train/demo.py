"""``moraft demo``: LoRA against MoRA at the same trainable-parameter budget, in one command, offline.

- On its built-in default (what scripts/demo.sh runs): the memory task of the paper, small. LoRA r=8 and MoRA r=8
  memorize random UUID pairs with the built-in random-init tiny LLaMA; their character accuracy is printed per
  evaluation step (`format_table`).
- With ``--model builtin:smollm2-135m-instruct`` (or any causal LM directory): facts a real model cannot know.
  Invented people (`moraft.train.facts`) are taught in three phrasings and asked back in a fourth; each method is
  scored on them (likelihood-ranked 4-way choice, `moraft.train.tasks`, and exact match of a greedy answer) and on
  what it forgot: the perplexity of general text before and after (`format_facts_table`). The text is
  ``general_text.txt`` beside this module: nine paragraphs of plain encyclopedic prose (tides, bread, printing,
  bees, bridges, the water cycle, chess, volcanoes, maps), written for moraft and under its license (Apache-2.0);
  none is about a fact taught.
"""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path
from typing import Literal, Optional

from transformers import TrainerCallback

from ..errors import UserError
from ..outputs import check_replaceable, record
from .builtin import BUILTIN_MODEL
from .evaluate import perplexity
from .facts import exact_match, invent, questions, training_texts
from .methods import load_base
from .options import AdapterOptions, DataOptions, ModelOptions, OptimizationOptions, OutputOptions, TrainOptions
from .plot import plot_curves
from .runner import COMMAND as TRAIN_COMMAND
from .runner import train
from .tasks import Task, score_tasks

COMMAND = "moraft demo"
METHODS = ("lora", "mora")
TOY_DEFAULTS = {"max_steps": 400, "batch_size": 32, "eval_steps": 50, "num_pairs": 128, "hidden_size": 128,
                "num_layers": 4}
FACTS_DEFAULTS = {"max_steps": 96, "batch_size": 16, "eval_steps": 32, "num_people": 32, "phrasings": 3,
                  "facts_seed": 0}
TOY_LEARNING_RATE = 1e-3
FACTS_LEARNING_RATES = {"lora": 1e-3, "mora": 1e-3}
"""Each method's learning rate on facts: the toy demo's, not yet tuned on a real model. Tune them on other facts
than the demo asks (``--facts_seed 1 --learning_rate X``), never on its questions."""
TOY_ONLY = ("num_pairs", "hidden_size", "num_layers")
FACTS_ONLY = ("num_people", "phrasings", "facts_seed")
FILES = ["demo.png", "demo.json"]
FACTS_FILES = ["facts_train.jsonl", "facts_questions.jsonl"]


def general_text() -> Path:
    """The held-out general text the real-model demo measures forgetting on (shipped with moraft)."""
    return Path(str(resources.files("moraft.train") / "general_text.txt"))


def demo(
    output_dir: Optional[str] = None,
    model: str = BUILTIN_MODEL,
    max_steps: Optional[int] = None,
    learning_rate: Optional[float] = None,
    batch_size: Optional[int] = None,
    eval_steps: Optional[int] = None,
    r: int = 8,
    compression: Literal["sharing", "rotation", "decouple", "truncation"] = "sharing",
    lr_scheduler: Literal["linear", "cosine", "constant"] = "constant",
    num_pairs: Optional[int] = None,
    hidden_size: Optional[int] = None,
    num_layers: Optional[int] = None,
    num_people: Optional[int] = None,
    phrasings: Optional[int] = None,
    facts_seed: Optional[int] = None,
    seed: int = 0,
) -> dict:
    """Train LoRA and MoRA at the same rank and compare what they learn: random UUID pairs on the built-in tiny model,
    or facts a real model cannot know.

    With no options (what scripts/demo.sh runs): the built-in random-init tiny LLaMA (hidden 128, 4 layers), 128
    random UUID pairs "key:value", every linear layer adapted, batch 32, constant learning rate 1e-3, 400 steps;
    LoRA r=8 (lora_alpha 16) and MoRA r=8 (sharing), which train the same number of parameters. Every eval_steps, each
    value is generated greedily from its key and compared character by character. Prints the accuracy table and
    writes output_dir (runs/demo)/demo.png, demo.json and the two adapters (lora-r8, mora-r8).

    With --model builtin:smollm2-135m-instruct (a real model, SmolLM2-135M-Instruct; or any causal LM directory):
    32 invented people (a birth year, a home city, an employer, an occupation: 128 facts), each fact written in 3
    phrasings (384 sentences, loss on every token), batch 16, 96 steps, a constant learning rate per method (LoRA
    1e-3, MoRA 1e-3; compare others on other invented people, --facts_seed 1), every linear layer at r=8. Each
    fact is then asked as a question in a phrasing never trained on, and scored two ways: 4-way multiple choice
    ranked by likelihood (the other options are other people's values of the same attribute; chance is 25%), and
    exact match of the answer generated greedily after three solved general-knowledge questions. What each method
    forgot: the perplexity of held-out general text (shipped with moraft) before and after. Prints a table per
    method (trainable parameters, multiple choice, exact match, perplexity before → after, time), and writes
    output_dir (runs/demo-facts)/demo.png (multiple choice per eval_steps), demo.json, the facts
    (facts_train.jsonl, and facts_questions.jsonl for `moraft eval ADAPTER --tasks`) and the two adapters.

    A rerun replaces what an earlier demo wrote; anything else of those names, or in the two adapter directories,
    stops it before it trains. Each adapter directory also holds metrics.jsonl, loss.png and train_config.yaml (rerun
    one with `moraft train --config DIR/train_config.yaml`).

    Args:
        output_dir: where the adapters, the plot and demo.json go (default: runs/demo, or runs/demo-facts with
            --model).
        model: builtin:tiny-llama (UUID pairs), or a real causal LM (facts): builtin:smollm2-135m-instruct, a
            local directory or a model in the local Hugging Face cache.
        max_steps: optimizer steps per method (default: 400; facts 96).
        learning_rate: the same for both methods (default: 1e-3; facts: each method its own, LoRA 1e-3, MoRA 1e-3).
        batch_size: pairs or sentences per step (default: 32; facts 16).
        eval_steps: evaluate every N steps (default: 50; facts 32).
        r: the rank of both (MoRA's r̂ is derived from it to match LoRA's parameter count).
        compression: MoRA's operator: sharing, rotation, decouple or truncation.
        lr_scheduler: learning-rate schedule: constant, linear or cosine.
        num_pairs: builtin:tiny-llama: UUID pairs to memorize (default: 128).
        hidden_size: builtin:tiny-llama: its width (default: 128).
        num_layers: builtin:tiny-llama: its layers (default: 4).
        num_people: facts: invented people to teach, 4 facts each (default: 32).
        phrasings: facts: training phrasings of each fact, 1 to 4 (default: 3); the question is worded apart.
        facts_seed: facts: the seed of the invented people (default: 0; tune on another seed, not on the
            questions asked).
        seed: seed of the adapter initialization and data order (the tiny base model and the pairs use seed 0).
    """
    given = {"num_pairs": num_pairs, "hidden_size": hidden_size, "num_layers": num_layers, "num_people": num_people,
             "phrasings": phrasings, "facts_seed": facts_seed}
    toy = model == BUILTIN_MODEL
    for name in FACTS_ONLY if toy else TOY_ONLY:
        if given[name] is not None:
            other = "another model (--model builtin:smollm2-135m-instruct)" if toy else f"--model {BUILTIN_MODEL}"
            raise UserError(f"--{name} is an option of the demo on {other}; it does nothing with --model {model}")
    defaults = TOY_DEFAULTS if toy else FACTS_DEFAULTS
    settings = {name: value if value is not None else defaults[name]
                for name, value in {"max_steps": max_steps, "batch_size": batch_size, "eval_steps": eval_steps,
                                    **given}.items() if name in defaults}
    for name, value in settings.items():
        minimum = 0 if name in ("facts_seed", "eval_steps") else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise UserError(f"--{name} {value!r} is invalid; expected an integer >= {minimum}")
    if learning_rate is not None and not learning_rate > 0:
        raise UserError(f"--learning_rate {learning_rate!r} is invalid; expected a number > 0")
    if toy:
        rates = {m: learning_rate or TOY_LEARNING_RATE for m in METHODS}
        return _toy_demo(Path(output_dir or "runs/demo"), rates, r, compression, lr_scheduler, seed, **settings)
    rates = {m: learning_rate or FACTS_LEARNING_RATES[m] for m in METHODS}
    return _facts_demo(Path(output_dir or "runs/demo-facts"), model, rates, r, compression, lr_scheduler, seed,
                       **settings)


def _method_options(
    method: str, model_options: ModelOptions, data: DataOptions, r: int, compression: str, learning_rate: float,
    lr_scheduler: str, batch_size: int, max_steps: int, seed: int, directory: Path, eval_steps: int,
) -> TrainOptions:
    """The `moraft train` options of one of the two runs."""
    return TrainOptions(
        model=model_options,
        data=data,
        adapter=AdapterOptions(method=method, r=r, compression=compression if method == "mora" else "sharing"),
        optimization=OptimizationOptions(
            learning_rate=learning_rate, lr_scheduler=lr_scheduler, batch_size=batch_size, max_steps=max_steps,
            seed=seed,
        ),
        output=OutputOptions(dir=str(directory), overwrite=True, save_steps=0, eval_steps=eval_steps,
                             logging_steps=max(1, eval_steps // 2) if eval_steps else 10),
    )


def _names(r: int, compression: str) -> dict[str, str]:
    return {"lora": f"LoRA r={r}", "mora": f"MoRA r={r} ({compression})"}


def _toy_demo(
    root: Path, rates: dict[str, float], r: int, compression: str, lr_scheduler: str, seed: int, *, max_steps: int,
    batch_size: int, eval_steps: int, num_pairs: int, hidden_size: int, num_layers: int,
) -> dict:
    """The demo on the built-in tiny LLaMA: UUID pairs, character accuracy per evaluation step."""
    runs_dirs = {method: root / f"{method}-r{r}" for method in METHODS}
    # what the demo replaces must be an earlier demo's, checked before the first run trains
    check_replaceable(root, COMMAND, "output_dir", FILES)
    for directory in runs_dirs.values():
        check_replaceable(directory, TRAIN_COMMAND, "output_dir")
    started = time.perf_counter()
    runs = {}
    for method in METHODS:
        options = _method_options(
            method, ModelOptions(builtin_hidden_size=hidden_size, builtin_num_layers=num_layers),
            DataOptions(num_pairs=num_pairs), r, compression, rates[method], lr_scheduler, batch_size, max_steps, seed,
            runs_dirs[method], eval_steps,
        )
        runs[method] = train(options)
    seconds = time.perf_counter() - started
    names = _names(r, compression)
    learning_rate = rates["lora"]
    curves = {names[m]: result.curve("char_accuracy") for m, result in runs.items()}
    plot_curves(
        curves,
        root / "demo.png",
        ylabel="character accuracy",
        title=f"uuid-memory, {num_pairs} pairs, lr {learning_rate:g}, batch {batch_size}",
    )
    report = {
        "setting": {
            "max_steps": max_steps, "num_pairs": num_pairs, "learning_rate": learning_rate, "batch_size": batch_size,
            "r": r, "compression": compression, "lr_scheduler": lr_scheduler, "hidden_size": hidden_size,
            "num_layers": num_layers, "seed": seed,
        },
        "trainable_parameters": {names[m]: result.trainable_parameters for m, result in runs.items()},
        "char_accuracy": {name: dict(points) for name, points in curves.items()},
        "exact_match": {names[m]: dict(result.curve("exact_match")) for m, result in runs.items()},
        "seconds": round(seconds, 1),
    }
    (root / "demo.json").write_text(json.dumps(report, indent=2) + "\n")
    record(root, COMMAND, [*FILES, *(d.name for d in runs_dirs.values())])
    print(format_table(curves, {names[m]: r_.trainable_parameters for m, r_ in runs.items()}))
    print(f"plot: {root / 'demo.png'}")
    for method, result in runs.items():
        print(f"{names[method]} adapter: {result.output_dir}   (evaluate: moraft eval {result.output_dir})")
    print(f"total time: {seconds:.0f} s")
    return report


class _MultipleChoiceCurve(TrainerCallback):
    """Scores the questions by likelihood every ``every`` steps and keeps (step, accuracy)."""

    def __init__(self, tokenizer, tasks: list[Task], every: int) -> None:
        self.tokenizer, self.tasks, self.every = tokenizer, tasks, every
        self.points: list[tuple[int, float]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every and (state.global_step % self.every == 0 or state.global_step == state.max_steps):
            self.points.append((state.global_step, score_tasks(model, self.tokenizer, self.tasks)["accuracy"]))


def _evaluate(model, tokenizer, tasks: list[Task], text: Path, choice: Optional[float] = None) -> dict:
    """Multiple choice (unless already scored), exact match with the answers, and the general text's perplexity."""
    if choice is None:
        choice = score_tasks(model, tokenizer, tasks)["accuracy"]
    exact = exact_match(model, tokenizer, tasks)
    return {"choice_accuracy": choice, "exact_match": exact["exact_match"], "answers": exact["answers"],
            "perplexity": perplexity(model, tokenizer, text)["perplexity"]}


def _facts_demo(
    root: Path, model: str, rates: dict[str, float], r: int, compression: str, lr_scheduler: str, seed: int, *,
    max_steps: int, batch_size: int, eval_steps: int, num_people: int, phrasings: int, facts_seed: int,
) -> dict:
    """The demo on a real model: invented facts taught, asked back in other words; general text forgotten."""
    people = invent(num_people, facts_seed)
    texts = training_texts(people, phrasings, seed=facts_seed)
    tasks = questions(people, options=4, seed=facts_seed)
    runs_dirs = {method: root / f"{method}-r{r}" for method in METHODS}
    check_replaceable(root, COMMAND, "output_dir", [*FILES, *FACTS_FILES])
    for directory in runs_dirs.values():
        check_replaceable(directory, TRAIN_COMMAND, "output_dir")
    started = time.perf_counter()
    base, tokenizer = load_base(model)  # a bad model name stops the demo here, before it writes anything
    root.mkdir(parents=True, exist_ok=True)
    record(root, COMMAND, [*FILES, *FACTS_FILES, *(d.name for d in runs_dirs.values())])
    train_file, questions_file = (root / name for name in FACTS_FILES)
    train_file.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    questions_file.write_text("".join(
        json.dumps({"id": t.id, "prompt": t.prompt, "options": list(t.options), "answer": t.answer}) + "\n"
        for t in tasks
    ))
    text = general_text()
    print(f"moraft demo: {len(tasks)} facts about {num_people} invented people, {len(texts)} training sentences; "
          "scoring the base model", flush=True)
    before = _evaluate(base, tokenizer, tasks, text)
    del base
    names = _names(r, compression)
    results, curves = {}, {}
    data = DataOptions(dataset=str(train_file), format="text", packing="none", seq_length=64)
    for method in METHODS:
        began = time.perf_counter()
        options = _method_options(method, ModelOptions(name_or_path=model), data, r, compression, rates[method],
                                  lr_scheduler, batch_size, max_steps, seed, runs_dirs[method], 0)
        curve = _MultipleChoiceCurve(tokenizer, tasks, eval_steps or max_steps)
        run = train(options, callbacks=[curve])
        final = curve.points[-1][1] if curve.points and curve.points[-1][0] == max_steps else None
        after = _evaluate(run.model, run.tokenizer, tasks, text, final)
        curves[names[method]] = [(0, before["choice_accuracy"]), *curve.points]
        results[names[method]] = {
            "method": method, "adapter": str(run.output_dir), "trainable_parameters": run.trainable_parameters,
            "learning_rate": rates[method], **after, "perplexity_before": before["perplexity"],
            "seconds": round(time.perf_counter() - began, 1),
        }
        del run
    seconds = time.perf_counter() - started
    plot_curves(curves, root / "demo.png", ylabel="4-way choice accuracy (chance 25%)",
                title=f"{len(tasks)} invented facts, {model.removeprefix('builtin:')}")
    report = {
        "setting": {
            "model": model, "max_steps": max_steps, "batch_size": batch_size, "eval_steps": eval_steps, "r": r,
            "compression": compression, "lr_scheduler": lr_scheduler, "learning_rates": {names[m]: rates[m] for m in
            METHODS}, "num_people": num_people, "facts": len(tasks), "phrasings": phrasings,
            "training_sentences": len(texts), "facts_seed": facts_seed, "seed": seed,
        },
        "base": before,
        "methods": results,
        "choice_accuracy": {name: dict(points) for name, points in curves.items()},
        "seconds": round(seconds, 1),
    }
    (root / "demo.json").write_text(json.dumps(report, indent=2) + "\n")
    print(format_facts_table(before, results, len(tasks)))
    print(format_examples(tasks, before, results))
    print(f"plot: {root / 'demo.png'}")
    for name, result in results.items():
        print(f"{name} adapter: {result['adapter']}   (evaluate: moraft eval {result['adapter']} --tasks "
              f"{questions_file})")
    print(f"total time: {seconds:.0f} s")
    return report


def format_table(curves: dict[str, list[tuple[int, float]]], parameters: dict[str, int]) -> str:
    """Character accuracy per step, one column per method, with the trainable-parameter counts underneath."""
    names = list(curves)
    steps = sorted({step for points in curves.values() for step, _ in points})
    width = max(len(n) for n in names) + 2
    lines = ["character accuracy on the memorized pairs", "step".rjust(6) + "".join(n.rjust(width) for n in names)]
    for step in steps:
        row = [dict(curves[n]).get(step) for n in names]
        lines.append(f"{step:6d}" + "".join((f"{v:.1%}" if v is not None else "-").rjust(width) for v in row))
    lines.append("trainable".rjust(6) + "".join(f"{parameters[n]:,}".rjust(width) for n in names))
    return "\n".join(lines)


def format_facts_table(before: dict, results: dict[str, dict], facts: int) -> str:
    """What each method learned (4-way choice, exact match) and forgot (general-text perplexity), one row each,
    under the base model's row."""
    names = ["base model", *results]
    width = max(len(n) for n in names) + 2
    head = f"{'':{width}}{'trainable':>11}{'lr':>8}{'4-way choice':>14}{'exact match':>13}{'perplexity':>18}{'time':>8}"
    lines = [f"{facts} invented facts, asked in words never trained on; perplexity of held-out general text", head]
    lines.append(f"{'base model':{width}}{'-':>11}{'-':>8}{before['choice_accuracy']:>14.1%}"
                 f"{before['exact_match']:>13.1%}{before['perplexity']:>18.2f}{'-':>8}")
    for name, result in results.items():
        change = f"{result['perplexity_before']:.2f} → {result['perplexity']:.2f}"
        lines.append(f"{name:{width}}{result['trainable_parameters']:>11,}{result['learning_rate']:>8g}"
                     f"{result['choice_accuracy']:>14.1%}{result['exact_match']:>13.1%}{change:>18}"
                     f"{result['seconds']:>6.0f} s")
    return "\n".join(lines)


def format_examples(tasks: list[Task], before: dict, results: dict[str, dict], count: int = 3) -> str:
    """The first ``count`` questions, their right answer, and what the base model and each method answered."""
    lines = []
    for index, task in enumerate(tasks[:count]):
        lines.append(f"{task.prompt.splitlines()[0]}   (right: {task.options[task.answer]})")
        for name, answers in [("base model", before["answers"]), *((n, r["answers"]) for n, r in results.items())]:
            lines.append(f"    {name}: {answers[index]!r}")
    return "\n".join(lines)

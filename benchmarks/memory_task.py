"""The paper's memory task, small and on CPU: memorize random UUID pairs "key:value" with full fine-tuning, LoRA
and MoRA at a small rank and at a larger one (LoRA and MoRA at the same r train the same number of parameters).

MoRA's headline (arXiv 2405.12130 §5.1, LLaMA-2 7B, r=8): character accuracy at step 700 is 10.7% for LoRA and
87.4% for MoRA (full fine-tuning 100%). This script reruns that comparison on the built-in tiny LLaMA, through
`moraft.train.train` (the same code as `moraft train`), for two base models:

- random: the built-in random-init tiny LLaMA (it knows nothing, not even the format);
- pretrained: that model after a short full fine-tuning on OTHER UUID pairs (another data seed), so it already knows
  the format "key:value" of hex groups and dashes, as a pre-trained LLM does. This is closer to the paper.

For each base and method, the learning rate is picked from a small grid on seed 0 (the highest final character
accuracy, ties broken by the mean over the curve), then the picked setting is rerun with more seeds. Prints the grid
and the accuracy per evaluation step (mean over seeds), writes memory_task.json (every curve) and memory_task.png
(mean over seeds, shaded min–max) to --output. The JSON is rewritten after every run, so an interrupted run keeps
what it finished.

    python benchmarks/memory_task.py  # what docs/results.md reports (33 minutes on 2 shared cores)
    python benchmarks/memory_task.py --bases random --methods lora-r8 mora-r8-sharing --seeds 1
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from moraft.train import BUILTIN_MODEL, TrainOptions, load_base, train, uuid_accuracy, uuid_pairs

# name -> (method, rank option, compression); "{r}" and "{R}" are the small and the large rank
METHODS = {
    "full": ("full", None, None),
    "lora-r{r}": ("lora", "r", None),
    "mora-r{r}-sharing": ("mora", "r", "sharing"),
    "mora-r{r}-rotation": ("mora", "r", "rotation"),
    "lora-r{R}": ("lora", "R", None),
    "mora-r{R}-sharing": ("mora", "R", "sharing"),
}
BASES = ("random", "pretrained")


def method_specs(rank: int, large_rank: int) -> dict[str, dict]:
    """Every method by its name (e.g. ``mora-r8-rotation``): the `AdapterOptions` fields it sets."""
    specs = {}
    for pattern, (method, which, compression) in METHODS.items():
        r = {"r": rank, "R": large_rank, None: rank}[which]
        spec = {"method": method, "r": r}
        if compression:
            spec["compression"] = compression
        specs[pattern.format(r=rank, R=large_rank)] = spec
    return specs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--output", default="benchmarks/results", help="where memory_task.json and .png are written")
    parser.add_argument("--name", default="memory_task", help="file name stem of the JSON and PNG")
    parser.add_argument("--hidden_size", type=int, default=128, help="width of the built-in tiny LLaMA")
    parser.add_argument("--num_layers", type=int, default=2, help="decoder layers of the built-in tiny LLaMA")
    parser.add_argument("--num_pairs", type=int, default=64, help="UUID pairs to memorize (data seed 0)")
    parser.add_argument("--batch_size", type=int, default=32, help="pairs per optimizer step")
    parser.add_argument("--max_steps", type=int, default=200, help="optimizer steps per run")
    parser.add_argument("--eval_steps", type=int, default=25, help="measure character accuracy every N steps")
    parser.add_argument("--rank", type=int, default=8, help="the small rank r (the paper's r=8)")
    parser.add_argument("--large_rank", type=int, default=32, help="the larger rank")
    parser.add_argument(
        "--methods", nargs="+", default=None,
        help="methods to run (default: all): full, lora-r{rank}, mora-r{rank}-sharing, mora-r{rank}-rotation, "
        "lora-r{large_rank}, mora-r{large_rank}-sharing",
    )
    parser.add_argument("--lr_grid", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2],
                        help="learning rates tried for the adapters (LoRA, MoRA)")
    parser.add_argument("--full_lr_grid", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3],
                        help="learning rates tried for full fine-tuning")
    parser.add_argument("--lr_scheduler", default="constant", help="learning-rate schedule (constant, linear, cosine)")
    parser.add_argument("--seeds", type=int, default=2,
                        help="seeds of the picked setting (seed 0 is the grid's run; seeds 1..N-1 are new runs)")
    parser.add_argument("--bases", nargs="+", choices=BASES, default=list(BASES), help="base models to try")
    parser.add_argument("--pretrain_pairs", type=int, default=256,
                        help="pretrained base: UUID pairs (data seed --pretrain_data_seed) it is fully fine-tuned on")
    parser.add_argument("--pretrain_data_seed", type=int, default=1, help="pretrained base: seed of its pairs")
    parser.add_argument("--pretrain_steps", type=int, default=300, help="pretrained base: full fine-tuning steps")
    parser.add_argument("--pretrain_lr", type=float, default=1e-3, help="pretrained base: learning rate")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--work_dir", default=None,
                        help="where the runs' outputs go (kept); default: a temporary directory, deleted at the end")
    args = parser.parse_args(argv)
    specs = method_specs(args.rank, args.large_rank)
    args.methods = args.methods or list(specs)
    unknown = [m for m in args.methods if m not in specs]
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}; expected some of {', '.join(specs)}")
    for name in ("hidden_size", "num_layers", "num_pairs", "batch_size", "max_steps", "eval_steps", "seeds",
                 "rank", "large_rank", "pretrain_pairs", "pretrain_steps", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)} is invalid; expected an integer >= 1")
    return args


def mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float, float, float]]:
    """(step, mean, min, max) over curves, at the steps every curve has."""
    steps = sorted(set.intersection(*(set(dict(c)) for c in curves)))
    values = [[dict(c)[s] for c in curves] for s in steps]
    return [(s, statistics.fmean(v), min(v), max(v)) for s, v in zip(steps, values)]


def pick(grid: dict[str, list[tuple[int, float]]]) -> str:
    """The learning rate (key) with the highest final accuracy, ties broken by the mean over the curve."""
    return max(grid, key=lambda lr: (round(grid[lr][-1][1], 6), statistics.fmean(v for _, v in grid[lr])))


def format_grid(grid: dict[str, dict[str, list]]) -> str:
    lrs = sorted({lr for by_lr in grid.values() for lr in by_lr}, key=float)
    width = max(len(m) for m in grid) + 2
    lines = ["final character accuracy, seed 0, per learning rate (* = picked)",
             "method".ljust(width) + "".join(lr.rjust(10) for lr in lrs)]
    for method, by_lr in grid.items():
        best = pick(by_lr)
        cells = [(f"{by_lr[lr][-1][1]:.1%}" + ("*" if lr == best else " ")) if lr in by_lr else "-" for lr in lrs]
        lines.append(method.ljust(width) + "".join(c.rjust(10) for c in cells))
    return "\n".join(lines)


def format_curves(curves: dict[str, list[tuple[int, float, float, float]]], parameters: dict[str, int]) -> str:
    """Mean accuracy per step, one column per method, then the final min–max over seeds and the parameter count."""
    names = list(curves)
    width = max(14, *(len(n) + 2 for n in names))
    steps = sorted({p[0] for c in curves.values() for p in c})
    lines = ["step".rjust(13) + "".join(n.rjust(width) for n in names)]
    for step in steps:
        row = [next((p for p in curves[n] if p[0] == step), None) for n in names]
        lines.append(f"{step:13d}" + "".join((f"{p[1]:.1%}" if p else "-").rjust(width) for p in row))
    lines.append("final min-max".rjust(13) + "".join(
        f"{curves[n][-1][2]:.0%}-{curves[n][-1][3]:.0%}".rjust(width) for n in names))
    lines.append("trainable".rjust(13) + "".join(f"{parameters[n]:,}".rjust(width) for n in names))
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bases = list(report["bases"])
    fig, axes = plt.subplots(1, len(bases), figsize=(5.5 * len(bases), 4), squeeze=False, sharey=True)
    for ax, base in zip(axes[0], bases):
        for method, result in report["bases"][base]["picked"].items():
            points = result["mean_curve"]
            steps, mean, low, high = zip(*points)
            line, = ax.plot(steps, mean, marker=".", label=f"{method} (lr {result['learning_rate']})")
            ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2)
        seeds = report["setting"]["seeds"]
        ax.set(xlabel="step", title=f"{base} base: mean of {seeds} seed{'s' * (seeds > 1)}, min-max shaded")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("character accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / f"{args.name}.json", out / f"{args.name}.png"
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="memory_task-"))
    specs = method_specs(args.rank, args.large_rank)
    pairs = uuid_pairs(args.num_pairs, 0)
    report = {"setting": {k: v for k, v in vars(args).items() if k not in ("output", "work_dir", "name")},
              "bases": {}, "seconds": 0.0}
    started = time.perf_counter()

    common = TrainOptions.from_dict({
        "model": {"builtin_hidden_size": args.hidden_size, "builtin_num_layers": args.num_layers},
        "data": {"num_pairs": args.num_pairs, "seed": 0},
        "optimization": {"batch_size": args.batch_size, "max_steps": args.max_steps,
                         "lr_scheduler": args.lr_scheduler},
        "output": {"eval_steps": args.eval_steps, "logging_steps": args.eval_steps, "save_steps": 0,
                   "overwrite": True},
    })

    def save() -> None:
        report["seconds"] = round(time.perf_counter() - started, 1)
        tmp = json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        tmp.replace(json_path)

    try:
        for base in args.bases:
            model = BUILTIN_MODEL
            entry = report["bases"].setdefault(base, {"grid": {}, "picked": {}, "trainable_parameters": {}})
            if base == "pretrained":
                options = common.replace(
                    adapter={"method": "full"},
                    data={"num_pairs": args.pretrain_pairs, "seed": args.pretrain_data_seed},
                    optimization={"max_steps": args.pretrain_steps, "learning_rate": args.pretrain_lr},
                    output={"eval_steps": args.pretrain_steps, "dir": str(work / "pretrained-base")},
                )
                result = train(options)
                model = str(work / "pretrained-base")
                entry["pretraining"] = {"accuracy_on_its_own_pairs": result.final.get("char_accuracy"),
                                        "steps": args.pretrain_steps, "pairs": args.pretrain_pairs}
            base_model, tokenizer = load_base(model, hidden_size=args.hidden_size, num_layers=args.num_layers)
            start_accuracy = uuid_accuracy(base_model, tokenizer, pairs)["char_accuracy"]
            entry["step0_accuracy"] = start_accuracy
            del base_model

            def run(name: str, lr: float, seed: int) -> list[tuple[int, float]]:
                options = common.replace(
                    model={"name_or_path": model}, adapter=specs[name],
                    optimization={"learning_rate": lr, "seed": seed},
                    output={"dir": str(work / base / f"{name}-lr{lr:g}-seed{seed}")},
                )
                result = train(options)
                entry["trainable_parameters"][name] = result.trainable_parameters
                return [(0, start_accuracy)] + result.curve("char_accuracy")

            for name in args.methods:
                grid = args.full_lr_grid if specs[name]["method"] == "full" else args.lr_grid
                entry["grid"][name] = {f"{lr:g}": run(name, lr, 0) for lr in grid}
                save()
            print(f"\n== {base} base: learning-rate grid ==\n{format_grid(entry['grid'])}", flush=True)
            for name in args.methods:
                lr = pick(entry["grid"][name])
                curves = [entry["grid"][name][lr]] + [run(name, float(lr), s) for s in range(1, args.seeds)]
                entry["picked"][name] = {"learning_rate": lr, "curves": curves, "mean_curve": mean_curve(curves)}
                save()
            table = format_curves({n: e["mean_curve"] for n, e in entry["picked"].items()},
                                  entry["trainable_parameters"])
            print(f"\n== {base} base: character accuracy, mean of {args.seeds} seed(s) at the picked lr ==\n{table}",
                  flush=True)
    finally:
        save()
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    plot(report, png_path)
    for base, entry in report["bases"].items():
        print(f"\n== {base} base ==\n{format_grid(entry['grid'])}")
        if entry["picked"]:
            print(format_curves({n: e["mean_curve"] for n, e in entry["picked"].items()},
                                entry["trainable_parameters"]))
    print(f"\nwrote {json_path} and {png_path} ({report['seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()

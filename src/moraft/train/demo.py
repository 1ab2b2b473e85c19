"""``moraft demo``: the main job on its built-in default. LoRA r=8 and MoRA r=8 (the same trainable-parameter
budget) are trained on the uuid-memory task with the built-in tiny LLaMA, offline, and their character accuracy is
printed per evaluation step, plotted, and saved with the two adapters."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

from ..outputs import check_replaceable, record
from .options import AdapterOptions, DataOptions, ModelOptions, OptimizationOptions, OutputOptions, TrainOptions
from .plot import plot_curves
from .runner import COMMAND as TRAIN_COMMAND
from .runner import train

COMMAND = "moraft demo"


def demo(
    output_dir: str = "runs/demo",
    max_steps: int = 400,
    num_pairs: int = 128,
    learning_rate: float = 1e-3,
    batch_size: int = 32,
    eval_steps: int = 50,
    r: int = 8,
    compression: Literal["sharing", "rotation", "decouple", "truncation"] = "sharing",
    lr_scheduler: Literal["linear", "cosine", "constant"] = "constant",
    hidden_size: int = 128,
    num_layers: int = 4,
    seed: int = 0,
) -> dict:
    """Train LoRA and MoRA at the same rank on the uuid-memory task and compare their character accuracy.

    With no options (what scripts/demo.sh runs): the built-in random-init tiny LLaMA (hidden 128, 4 layers), 128
    random UUID pairs "key:value", every linear layer adapted, batch 32, constant learning rate 1e-3, 400 steps;
    LoRA r=8 (lora_alpha 16) and MoRA r=8 (sharing), which train the same number of parameters. Every eval_steps, each
    value is generated greedily from its key and compared character by character. Prints the accuracy table and
    writes output_dir/demo.png, output_dir/demo.json and the two adapters (output_dir/lora-r8, output_dir/mora-r8).
    A rerun replaces the four when they are an earlier demo's; anything else of those names, or in the two adapter
    directories, stops it before it trains. Each adapter directory also holds metrics.jsonl, loss.png and
    train_config.yaml (rerun one with `moraft train --config DIR/train_config.yaml`).

    Args:
        output_dir: where the adapters, the plot and demo.json go.
        max_steps: optimizer steps per method.
        num_pairs: UUID pairs to memorize.
        learning_rate: the same for both methods.
        batch_size: pairs per step.
        eval_steps: evaluate every N steps.
        r: the rank of both (MoRA's r̂ is derived from it to match LoRA's parameter count).
        compression: MoRA's operator: sharing, rotation, decouple or truncation.
        lr_scheduler: learning-rate schedule: constant, linear or cosine.
        hidden_size: width of the built-in model.
        num_layers: layers of the built-in model.
        seed: seed of the adapter initialization and data order (the base model and the pairs use seed 0).
    """
    root = Path(output_dir)
    runs_dirs = {method: root / f"{method}-r{r}" for method in ("lora", "mora")}
    files = ["demo.png", "demo.json"]
    # what the demo replaces must be an earlier demo's, checked before the first run trains
    check_replaceable(root, COMMAND, "output_dir", files)
    for directory in runs_dirs.values():
        check_replaceable(directory, TRAIN_COMMAND, "output_dir")
    started = time.perf_counter()
    runs = {}
    for method in ("lora", "mora"):
        options = TrainOptions(
            model=ModelOptions(builtin_hidden_size=hidden_size, builtin_num_layers=num_layers),
            data=DataOptions(num_pairs=num_pairs),
            adapter=AdapterOptions(method=method, r=r, compression=compression if method == "mora" else "sharing"),
            optimization=OptimizationOptions(
                learning_rate=learning_rate, lr_scheduler=lr_scheduler, batch_size=batch_size, max_steps=max_steps,
                seed=seed,
            ),
            output=OutputOptions(
                dir=str(runs_dirs[method]), overwrite=True, save_steps=0, eval_steps=eval_steps,
                logging_steps=max(1, eval_steps // 2),
            ),
        )
        runs[method] = train(options)
    seconds = time.perf_counter() - started
    names = {"lora": f"LoRA r={r}", "mora": f"MoRA r={r} ({compression})"}
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
    record(root, COMMAND, [*files, *(d.name for d in runs_dirs.values())])
    print(format_table(curves, {names[m]: r_.trainable_parameters for m, r_ in runs.items()}))
    print(f"plot: {root / 'demo.png'}")
    for method, result in runs.items():
        print(f"{names[method]} adapter: {result.output_dir}   (evaluate: moraft eval {result.output_dir})")
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

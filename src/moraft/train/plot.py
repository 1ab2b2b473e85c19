"""Loss and accuracy curves as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(history: Sequence[dict], path: str | Path, title: str = "") -> None:
    """Training loss per step and, when the run evaluated, the evaluation metrics per step, side by side."""
    plt = _pyplot()
    evals = [key for key in ("char_accuracy", "exact_match", "eval_perplexity") if any(key in e for e in history)]
    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(10 if evals else 5, 3.5), squeeze=False)
    loss = [(e["step"], e["loss"]) for e in history if "loss" in e]
    axes[0][0].plot(*zip(*loss) if loss else ([], []), marker="." if len(loss) < 30 else None)
    axes[0][0].set(xlabel="step", ylabel="training loss", title=title)
    if evals:
        for key in evals:
            points = [(e["step"], e[key]) for e in history if key in e]
            axes[0][1].plot(*zip(*points), marker="o", label=key)
        axes[0][1].set(xlabel="step", title="evaluation")
        axes[0][1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(curves: Mapping[str, Sequence[tuple[int, float]]], path: str | Path, ylabel: str, title: str) -> None:
    """One line per named curve of (step, value) points."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        if points:
            ax.plot(*zip(*points), marker="o", label=name)
    ax.set(xlabel="step", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

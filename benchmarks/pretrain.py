"""Pretraining from scratch through the adapter, small and on CPU: LoRA vs MoRA vs ReLoRA vs ReMoRA at one rank.

The paper (arXiv 2405.12130 §5.4, a 250M LLaMA on C4, r=128) trains a random-init model through each adapter, with
the norms and embeddings trainable, and reports validation perplexity: LoRA 33.40, MoRA 28.54, ReLoRA 32.19,
ReMoRA 26.74 (ReLoRA/ReMoRA merge the adapter into the weights every N steps and restart it). This script reruns
that comparison on the built-in tiny LLaMA (character tokenizer) through `moraft.train.train` (the same code as
`moraft train`):

- corpus: the Python standard library's own source (``sysconfig.get_paths()["stdlib"]``, top-level modules), found
  offline on any machine. Modules are shuffled with a fixed seed; every --valid_every-th one is held out for
  validation, the rest are training text, each capped at a number of characters. Characters outside the
  tokenizer's printable ASCII become its <unk> token (counted and reported); "\\r\\n" is read as "\\n".
- every method trains embed_tokens, lm_head and every RMSNorm fully (PEFT's modules_to_save) and adapts every
  linear layer; ReLoRA/ReMoRA merge every --merge_every steps (MoRA sharing switches its grouping at each merge).

Prints validation perplexity per evaluation step and writes pretrain.json and pretrain.png to --output.

    python benchmarks/pretrain.py  # what docs/results.md reports (18 minutes on 2 shared cores)
    python benchmarks/pretrain.py --methods lora mora --max_steps 100
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from moraft.train import TrainOptions, char_tokenizer, train

METHODS = ("lora", "mora", "relora", "remora", "full")
# what every adapter trains fully besides itself: the embeddings, the output head and every norm (PEFT matches
# modules_to_save by name suffix, so "norm" covers input_layernorm, post_attention_layernorm and the final norm)
TRAINED_FULLY = ["embed_tokens", "lm_head", "norm"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--output", default="benchmarks/results", help="where pretrain.json and .png are written")
    parser.add_argument("--name", default="pretrain", help="file name stem of the JSON and PNG")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=["lora", "mora", "relora", "remora"],
                        help="methods to train (full: every weight trained, a reference the paper does not report)")
    parser.add_argument("--hidden_size", type=int, default=128, help="width of the built-in tiny LLaMA")
    parser.add_argument("--num_layers", type=int, default=4, help="decoder layers of the built-in tiny LLaMA")
    parser.add_argument("--rank", type=int, default=16,
                        help="r of every method (MoRA's r̂ is derived from it to train as many parameters as LoRA)")
    parser.add_argument("--compression", default="sharing", choices=["sharing", "rotation"],
                        help="MoRA's operator (the paper uses sharing at large r; ReMoRA switches its grouping)")
    parser.add_argument("--seq_length", type=int, default=128, help="tokens (characters) per training block")
    parser.add_argument("--batch_size", type=int, default=16, help="blocks per optimizer step")
    parser.add_argument("--max_steps", type=int, default=500, help="optimizer steps per method")
    parser.add_argument("--merge_every", type=int, default=125, help="ReLoRA/ReMoRA: merge and restart every N steps")
    parser.add_argument("--learning_rate", type=float, default=2e-3, help="peak learning rate (all methods)")
    parser.add_argument("--lr_scheduler", default="cosine", help="schedule after the warmup (restarted at merges)")
    parser.add_argument("--warmup_steps", type=int, default=25, help="linear warmup steps at the start")
    parser.add_argument("--eval_steps", type=int, default=50, help="validation perplexity every N steps")
    parser.add_argument("--train_chars", type=int, default=1_500_000, help="characters of training text")
    parser.add_argument("--valid_chars", type=int, default=65_536, help="characters of held-out validation text")
    parser.add_argument("--valid_every", type=int, default=10, help="every N-th module (shuffled) is held out")
    parser.add_argument("--corpus", default=None,
                        help="a directory of *.py files instead of the standard library (e.g. for a quick test)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model, adapters, data order and split")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--work_dir", default=None,
                        help="where the corpus and the runs go (kept); default: a temporary directory, deleted")
    args = parser.parse_args(argv)
    for name in ("hidden_size", "num_layers", "rank", "seq_length", "batch_size", "max_steps", "eval_steps",
                 "train_chars", "valid_chars", "valid_every", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)} is invalid; expected an integer >= 1")
    if args.merge_every < 1 or args.merge_every >= args.max_steps:
        parser.error(f"--merge_every={args.merge_every} is invalid; expected 1 <= merge_every < max_steps")
    return args


def build_corpus(source: Path, work: Path, args: argparse.Namespace) -> dict:
    """train/text.txt and valid/text.txt under ``work`` from the modules of ``source``; what went where."""
    modules = sorted(p for p in source.glob("*.py") if p.is_file())
    if len(modules) < 2:
        raise SystemExit(f"pretrain: {source} has fewer than 2 *.py files; pass --corpus DIR with more")
    random.Random(args.seed).shuffle(modules)
    split = {"train": [], "valid": []}
    for i, module in enumerate(modules):
        split["valid" if i % args.valid_every == 0 else "train"].append(module)
    known = set(char_tokenizer().get_vocab())
    stats = {}
    for part, limit in (("train", args.train_chars), ("valid", args.valid_chars)):
        texts, size, used = [], 0, []
        for module in split[part]:
            if size >= limit:
                break
            text = module.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
            texts.append(text[: limit - size])
            size += len(texts[-1])
            used.append(module.stem)
        text = "\n".join(texts)
        (work / part).mkdir(parents=True, exist_ok=True)
        (work / part / "text.txt").write_text(text, encoding="utf-8")
        unknown = sum(ch not in known for ch in text)
        stats[part] = {"characters": len(text), "modules": used, "unknown_characters": unknown}
    return stats


def options_for(method: str, args: argparse.Namespace, work: Path) -> TrainOptions:
    base = {"relora": "lora", "remora": "mora"}.get(method, method)
    adapter = {"method": base, "r": args.rank}
    if base != "full":
        adapter["modules_to_save"] = list(TRAINED_FULLY)
    if base == "mora":
        adapter["compression"] = args.compression
    if method in ("relora", "remora"):
        adapter["merge_every"] = args.merge_every
    return TrainOptions.from_dict({
        "model": {"builtin_hidden_size": args.hidden_size, "builtin_num_layers": args.num_layers, "seed": args.seed},
        "data": {"dataset": str(work / "train"), "format": "text", "eval_dataset": str(work / "valid"),
                 "seq_length": args.seq_length},
        "adapter": adapter,
        "optimization": {"batch_size": args.batch_size, "max_steps": args.max_steps,
                         "learning_rate": args.learning_rate, "lr_scheduler": args.lr_scheduler,
                         "warmup_steps": args.warmup_steps, "seed": args.seed},
        "output": {"dir": str(work / "runs" / method), "overwrite": True, "eval_steps": args.eval_steps,
                   "logging_steps": args.eval_steps, "save_steps": 0},
    })


def format_table(curves: dict[str, list], parameters: dict[str, int]) -> str:
    names = list(curves)
    width = max(12, *(len(n) + 2 for n in names))
    steps = sorted({s for c in curves.values() for s, _ in c})
    lines = ["validation perplexity", "step".rjust(10) + "".join(n.rjust(width) for n in names)]
    for step in steps:
        row = [dict(curves[n]).get(step) for n in names]
        lines.append(f"{step:10d}" + "".join((f"{v:.3f}" if v is not None else "-").rjust(width) for v in row))
    lines.append("trainable".rjust(10) + "".join(f"{parameters[n]:,}".rjust(width) for n in names))
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, result in report["methods"].items():
        steps, values = zip(*result["eval_perplexity"])
        ax.plot(steps, values, marker=".", label=f"{name}: {values[-1]:.3f}")
    s = report["setting"]
    for step in range(s["merge_every"], s["max_steps"], s["merge_every"]):
        ax.axvline(step, color="grey", alpha=0.3, linestyle=":")
    ax.set(xlabel="step", ylabel="validation perplexity (per character)", yscale="log",
           title=f"from scratch, hidden {s['hidden_size']}, {s['num_layers']} layers, r={s['rank']}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / f"{args.name}.json", out / f"{args.name}.png"
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="pretrain-"))
    source = Path(args.corpus) if args.corpus else Path(sysconfig.get_paths()["stdlib"])
    started = time.perf_counter()
    report = {"setting": {k: v for k, v in vars(args).items() if k not in ("output", "work_dir", "name")},
              "corpus": {}, "methods": {}, "seconds": 0.0}

    def save() -> None:
        report["seconds"] = round(time.perf_counter() - started, 1)
        tmp = json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        tmp.replace(json_path)

    try:
        report["corpus"] = {"source": str(source), **build_corpus(source, work, args)}
        for part in ("train", "valid"):
            c = report["corpus"][part]
            print(f"{part}: {c['characters']:,} characters from {len(c['modules'])} modules, "
                  f"{c['unknown_characters']:,} unknown (<unk>)", flush=True)
        for method in args.methods:
            result = train(options_for(method, args, work))
            report["methods"][method] = {
                "eval_perplexity": result.curve("eval_perplexity"),
                "final_perplexity": result.final.get("eval_perplexity"),
                "train_loss": result.curve("loss"),
                "trainable_parameters": result.trainable_parameters,
                "runtime_s": round(result.runtime_s, 1),
            }
            save()
            print(f"{method}: validation perplexity {result.final.get('eval_perplexity'):.3f}", flush=True)
    finally:
        save()
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    plot(report, png_path)
    curves = {m: r["eval_perplexity"] for m, r in report["methods"].items()}
    print(format_table(curves, {m: r["trainable_parameters"] for m, r in report["methods"].items()}))
    print(f"\nwrote {json_path} and {png_path} ({report['seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()

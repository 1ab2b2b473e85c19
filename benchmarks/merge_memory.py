"""Peak memory of `moraft merge` as a multiple of the model's size on disk (target: <= 1.3x).

Builds a LLaMA-style model from a config (about 1 GB in bfloat16 by default), saves it, adds a random MoRA adapter on
every linear layer, then merges it twice, each in a fresh process:

- moraft merge (``moraft.merge_adapter``), streaming tensor by tensor;
- the baseline: load the model, ``PeftModel.from_pretrained``, ``merge_and_unload``, ``save_pretrained``.

Peak memory is the process's peak resident set size during the merge minus its resident size just before it
(after the imports), from /proc/self/status (VmHWM, reset before the merge). Both outputs are then compared
tensor by tensor.

    python benchmarks/merge_memory.py                       # ~1 GB bf16 model, rotation r=8
    python benchmarks/merge_memory.py --layers 2 --hidden 512   # quick
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

MEASURE = textwrap.dedent(
    """
    import json, sys, time
    import torch, transformers, peft, moraft
    from moraft.interop import merge_adapter

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(field)

    def naive(base, adapter, out):
        model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype="auto")
        model = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
        model.save_pretrained(out)

    mode, base, adapter, out = sys.argv[1:5]
    try:  # reset the peak to the current size (Linux >= 4.0), so the peak below is the merge's own
        open("/proc/self/clear_refs", "w").write("5")
    except OSError:
        pass
    before = status("VmRSS")
    start = time.perf_counter()
    (merge_adapter if mode == "moraft" else naive)(base, adapter, out)
    seconds = time.perf_counter() - start
    print(json.dumps({"before": before, "peak": status("VmHWM"), "seconds": seconds}))
    """
)


def build(workdir: Path, args: argparse.Namespace) -> int:
    """Save the base model and a random MoRA adapter; return the base's size on disk in bytes."""
    import torch

    from moraft import MoraConfig
    from moraft.testing import save_adapter, tiny_llama

    heads = args.hidden // 128 if args.hidden >= 128 else 1
    model = tiny_llama(hidden_size=args.hidden, intermediate_size=args.intermediate, num_layers=args.layers,
                       num_attention_heads=heads, num_key_value_heads=heads, vocab_size=args.vocab,
                       dtype=getattr(torch, args.dtype))  # built in the target dtype: no float32 copy of the model
    model.save_pretrained(workdir / "base")
    save_adapter(model, MoraConfig(r=args.r, compression=args.compression, target_modules="all-linear"),
                 workdir / "adapter")
    return sum(p.stat().st_size for p in (workdir / "base").glob("*.safetensors"))


def measure(mode: str, workdir: Path) -> dict:
    out = workdir / f"merged_{mode}"
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, mode, str(workdir / "base"), str(workdir / "adapter"), str(out)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{mode} merge failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def same_outputs(a: Path, b: Path) -> bool:
    """Whether two checkpoints hold identical tensors (read one tensor at a time)."""
    import torch
    from safetensors import safe_open

    def tensors(path: Path) -> dict[str, Path]:
        found = {}
        for file in sorted(path.glob("*.safetensors")):
            with safe_open(str(file), "pt") as f:
                found.update({key: file for key in f.keys()})
        return found

    left, right = tensors(a), tensors(b)
    if sorted(left) != sorted(right):
        return False
    for key in left:
        with safe_open(str(left[key]), "pt") as f, safe_open(str(right[key]), "pt") as g:
            if not torch.equal(f.get_tensor(key), g.get_tensor(key)):
                return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5504)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--compression", default="rotation", choices=["rotation", "sharing", "decouple", "truncation"])
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--no-baseline", action="store_true", help="skip the load-merge-save baseline")
    parser.add_argument("--workdir", type=Path, default=None, help="where to build (default: a temporary directory)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="merge_memory_", dir=args.workdir) as tmp:
        workdir = Path(tmp)
        start = time.perf_counter()
        size = build(workdir, args)
        seconds = time.perf_counter() - start
        print(
            f"model: LLaMA hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, vocab "
            f"{args.vocab}, {args.dtype}: {size / 2**30:.2f} GiB on disk (built in {seconds:.0f}s); "
            f"adapter: MoRA {args.compression} r={args.r} on all linear layers"
        )
        modes = ["moraft"] + ([] if args.no_baseline else ["baseline"])
        for mode in modes:
            result = measure(mode, workdir)
            peak = result["peak"] - result["before"]
            label = "moraft merge (streaming)" if mode == "moraft" else "baseline (load, merge_and_unload, save)"
            print(
                f"{label}: peak RSS +{peak / 2**30:.2f} GiB = {peak / size:.2f}x the model on disk, "
                f"{result['seconds']:.1f}s"
            )
        if not args.no_baseline:
            print(f"outputs identical: {same_outputs(workdir / 'merged_moraft', workdir / 'merged_baseline')}")
        print("target: moraft merge peak <= 1.3x the model on disk")


if __name__ == "__main__":
    main()

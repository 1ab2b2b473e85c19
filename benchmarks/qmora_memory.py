"""Peak memory of training on a quantized base (QMoRA, QLoRA): 4-bit MoRA against 4-bit LoRA at the same r (the same
number of trainable parameters), and a 4-bit base against a 16-bit (bfloat16) one, as ratios measured in one run.

A LLaMA-shaped model (by default hidden 2048, intermediate 4096, 6 layers, the character vocabulary: the linear
layers hold almost all of its 480 MiB, as in a 7B model) is saved once in bfloat16. Each configuration then runs in
a fresh process: it loads the base as ``moraft train`` does (``moraft.train.methods.load_model`` with
``model.quantization=4bit``: NF4 with bfloat16 compute, as QLoRA; or `load_base` in bfloat16), adds the adapter
(`apply_method`, every linear layer) and runs a few AdamW steps (forward under bfloat16 autocast, as
``--optimization.bf16``; backward; step) on a fixed batch of a few tokens, so that the weights dominate.

Memory, each minus the process's own size after its imports:

- loaded: resident once the model and adapter are built and every weight has been read;
- training peak: the peak during the steps (weights, activations, gradients, optimizer state, the weights a 4-bit
  layer dequantizes in each forward and backward). On the CPU: the process's peak resident size, VmHWM of
  /proc/self/status, reset just before the steps (Linux >= 4.0), so reading the checkpoint file while loading does
  not count (not ``ru_maxrss``: on Linux a child process's ``ru_maxrss`` starts at its parent's peak), with glibc
  told to return freed blocks to the system at once (see ``ALLOCATOR``). On CUDA: ``torch.cuda.max_memory_allocated``.

Ratios: 4-bit MoRA / 4-bit LoRA, and 4-bit / bf16 for each method; every configuration is also printed as a ratio
to the first one measured (bf16 LoRA). More tokens per step shift the ratio towards 1: a 4-bit run's activations
are float32 (``prepare_model_for_kbit_training`` keeps the embeddings and norms in float32).

    python benchmarks/qmora_memory.py                                     # about a minute on 2 CPU cores
    python benchmarks/qmora_memory.py --hidden 1024 --layers 8 --batch 4 --seq 128
    python benchmarks/qmora_memory.py --quantizations none 4bit 8bit      # 8-bit as well
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The parent stays free of torch: each configuration measures itself in a fresh process.

BUILD = """
import sys, torch
from moraft.testing import save_base, tiny_llama
hidden, intermediate, layers, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
model = tiny_llama(hidden_size=hidden, intermediate_size=intermediate, num_layers=layers, dtype=torch.bfloat16)
save_base(model, out)
"""

MEASURE = """
import contextlib, ctypes, gc, json, resource, statistics, sys, time
import torch
from moraft.train.methods import apply_method, count_parameters, load_base, load_model
from moraft.train.options import AdapterOptions, ModelOptions

def rss(field):  # bytes
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # no /proc: the peak since the start

def settle():  # memory freed while loading goes back to the system, not kept by the C allocator
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)

def reset_peak():
    try:  # the peak becomes the current size
        open("/proc/self/clear_refs", "w").write("5")
        return True
    except OSError:
        return False

spec = json.loads(sys.argv[1])
cuda = torch.cuda.is_available()
torch.manual_seed(0)
before = torch.cuda.memory_allocated() if cuda else rss("VmRSS")
options = ModelOptions(**spec["model"])
if options.quantization == "none":
    model, _ = load_base(options.name_or_path, dtype=torch.bfloat16)
    model = model.to("cuda" if cuda else "cpu")
else:
    model, _ = load_model(options)
model = apply_method(model, AdapterOptions(**spec["adapter"]))
model.train()
if spec["gradient_checkpointing"]:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
trainable, total = count_parameters(model)
device = next(p.device for p in model.parameters())
with torch.no_grad():  # every weight resident (safetensors maps the file: pages come in when first read)
    for tensor in list(model.parameters()) + list(model.buffers()):
        tensor.sum()
settle()
loaded = (torch.cuda.memory_allocated() if cuda else rss("VmRSS")) - before
if cuda:
    torch.cuda.reset_peak_memory_stats()
    exact = True
else:
    exact = reset_peak()
ids = torch.randint(8, 100, (spec["batch"], spec["seq"]), device=device)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["bf16"])
seconds = []
for _ in range(spec["steps"]):
    start = time.perf_counter()
    with autocast:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    seconds.append(time.perf_counter() - start)
peak = (torch.cuda.max_memory_allocated() if cuda else rss("VmHWM")) - before
print(json.dumps({"loaded": loaded, "peak": peak, "peak_is_training_only": exact, "trainable": trainable,
                  "total": total, "step_s": statistics.median(seconds[1:] or seconds), "loss": loss.item(),
                  "device": torch.cuda.get_device_name() if cuda else "cpu"}))
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048, help="model width")
    parser.add_argument("--intermediate", type=int, default=None, help="MLP width (default: 2 x hidden)")
    parser.add_argument("--layers", type=int, default=6, help="decoder layers")
    parser.add_argument("--r", type=int, default=8, help="the rank (MoRA: the LoRA rank whose budget it matches)")
    parser.add_argument("--compression", default="sharing", help="MoRA's compression")
    parser.add_argument("--batch", type=int, default=2, help="sequences per step")
    parser.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=3, help="training steps per configuration")
    parser.add_argument("--compute_dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                        help="4-bit compute dtype")
    parser.add_argument("--no_bf16", dest="bf16", action="store_false",
                        help="no bfloat16 autocast (what moraft train --optimization.bf16 turns on)")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward")
    parser.add_argument("--quantizations", nargs="+", default=["none", "4bit"], choices=["none", "4bit", "8bit"],
                        help="bases to measure (none: bfloat16)")
    parser.add_argument("--methods", nargs="+", default=["lora", "mora"], choices=["lora", "mora"])
    parser.add_argument("--out", default=None, help="also write the results to this JSON file")
    parser.add_argument("--work_dir", type=Path, default=None, help="where to save the base (default: a temp dir)")
    return parser.parse_args(argv)


# glibc's allocator keeps freed blocks for reuse, and how much it keeps varies from run to run (a 4-bit layer
# dequantizes its weight in every forward and backward, a new block each time); with every block of 64 KiB or more
# mapped on its own, a freed block goes back to the system at once, and the resident size follows what is in use
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def run(code: str, *args: str) -> str:
    env = {**os.environ, **ALLOCATOR}
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"a benchmark process failed:\n{proc.stderr[-4000:]}")
    return proc.stdout


def label(quantization: str, method: str) -> str:
    return f"{'bf16' if quantization == 'none' else quantization} {method}"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    intermediate = args.intermediate or 2 * args.hidden
    with tempfile.TemporaryDirectory(prefix="qmora_memory_", dir=args.work_dir) as tmp:
        base = Path(tmp) / "base"
        started = time.perf_counter()
        run(BUILD, str(args.hidden), str(intermediate), str(args.layers), str(base))
        size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
        print(
            f"model: LLaMA hidden {args.hidden}, intermediate {intermediate}, {args.layers} layers, "
            f"{size / 2**20:.0f} MiB in bfloat16 (built in {time.perf_counter() - started:.0f}s); adapters on all "
            f"linear layers at r={args.r} (MoRA {args.compression}); {args.steps} AdamW steps of {args.batch} x "
            f"{args.seq} tokens{' under bf16 autocast' if args.bf16 else ''}"
            f"{', gradient checkpointing' if args.gradient_checkpointing else ''}; 4-bit: NF4, {args.compute_dtype} "
            "compute"
        )
        results: dict[str, dict] = {}
        for quantization in args.quantizations:
            for method in args.methods:
                model = dict(name_or_path=str(base), quantization=quantization)
                if quantization == "4bit":
                    model["compute_dtype"] = args.compute_dtype
                adapter = dict(method=method, r=args.r)
                if method == "mora":
                    adapter["compression"] = args.compression
                spec = dict(model=model, adapter=adapter, batch=args.batch, seq=args.seq, steps=args.steps,
                            bf16=args.bf16, gradient_checkpointing=args.gradient_checkpointing)
                results[label(quantization, method)] = json.loads(run(MEASURE, json.dumps(spec)).splitlines()[-1])
    first = next(iter(results))
    mib = 2**20
    print(f"\n{'configuration':<14}{'trainable':>11}{'loaded':>12}{'training peak':>15}{f'vs {first}':>14}"
          f"{'step':>9}")
    for name, r in results.items():
        print(f"{name:<14}{r['trainable']:>11,}{r['loaded'] / mib:>8.0f} MiB{r['peak'] / mib:>11.0f} MiB"
              f"{r['peak'] / results[first]['peak']:>13.2f}x{r['step_s']:>8.1f}s")
    ratios = {}
    for q in args.quantizations:
        if q != "none" and {"lora", "mora"} <= set(args.methods):
            ratios[f"{q} mora / {q} lora"] = results[label(q, "mora")]["peak"] / results[label(q, "lora")]["peak"]
    for q in args.quantizations:
        if q != "none" and "none" in args.quantizations:
            for method in args.methods:
                ratios[f"{q} {method} / bf16 {method}"] = (
                    results[label(q, method)]["peak"] / results[label("none", method)]["peak"]
                )
    print("\ntraining peak ratios:")
    for name, value in ratios.items():
        print(f"  {name}: {value:.2f}")
    device = next(iter(results.values()))["device"]
    if not all(r["peak_is_training_only"] for r in results.values()):
        print("(this system could not reset the peak: each peak includes loading the model)")
    report = {
        "model": {"hidden": args.hidden, "intermediate": intermediate, "layers": args.layers, "bf16_bytes": size},
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "work_dir")},
        "device": device,
        "results": results,
        "ratios": ratios,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()

"""Training step time, training memory and merge time of MoRA r=8 (each operator) against PEFT's LoRA r=8.

LLaMA-shaped models (all seven projections adapted) at several hidden sizes; every figure is printed as a ratio to
LoRA measured in the same run, with min / median / max over repeats (methods are interleaved inside each repeat so
that drift in machine load hits them alike).

- step time: median wall time of forward + backward + AdamW step.
- memory: the tensor memory a training step holds at its peak (the end of the forward pass): weights, trainable
  parameters' gradients and AdamW state, plus every tensor saved for the backward pass, counted once per storage
  (`torch.autograd.graph.saved_tensors_hooks`). On CPU there is no allocator peak counter; this accounting is exact
  and deterministic, unlike process RSS.
- merge time: `merge_adapter()` over the whole model.
- floor: the multiply-adds of the adapted linear layers in a training step, as a ratio to LoRA's (frozen base:
  2·k·d per token; the adapter 3× its forward work: rotation and decouple K·r̂, sharing and truncation r̂², LoRA
  (k + d)·r). It is the step-time ratio that arithmetic alone would give if the linear layers were the whole step.

    python benchmarks/speed.py                          # hidden 512, 1024, 2048 on CPU (about 10 minutes)
    python benchmarks/speed.py --hidden 1024 --repeats 3
    python benchmarks/speed.py --device cuda --dtype bf16 --hidden 4096 --layers 4   # a 7B-shaped layer stack
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from moraft import COMPRESSIONS, MoraConfig
from moraft.testing import randomize_adapter, tiny_llama

METHODS = ["lora"] + [f"mora-{c}" for c in COMPRESSIONS]
VOCAB = 256


def intermediate_size(hidden: int) -> int:
    return int(hidden * 2.6875) // 16 * 16  # LLaMA's 11008 / 4096 ratio


def build(method: str, hidden: int, layers: int, device: str, dtype: torch.dtype):
    heads = max(1, hidden // 64)
    base = tiny_llama(hidden_size=hidden, intermediate_size=intermediate_size(hidden), num_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, vocab_size=VOCAB,
                      max_position_embeddings=4096, dtype=dtype).to(device)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if method == "lora":
        peft_config = LoraConfig(r=8, lora_alpha=16, target_modules=targets)
    else:
        peft_config = MoraConfig(r=8, compression=method.split("-", 1)[1], target_modules=targets)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base, peft_config)
    return randomize_adapter(model, std=0.01)  # random, non-zero adapters: merge does real work


def linear_macs(model, method: str) -> float:
    """Multiply-adds per token of a training step in the adapted linear layers (frozen base: forward + input
    gradient = 2·k·d; the adapter: forward, input gradient and weight gradient = 3 × its own work)."""
    from moraft import MoraLayer

    total = 0.0
    for module in model.modules():
        if isinstance(module, MoraLayer):
            op = module.mora_operator["default"]
            k, d = module.in_features, module.out_features
            adapter = op.num_blocks * op.rank**2 if op.blockwise else op.rank**2  # rotation/decouple: K·r̂
            total += 2 * k * d + 3 * adapter
        elif hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            k, d = module.in_features, module.out_features
            total += 2 * k * d + 3 * (k + d) * module.r["default"]
    return total


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step_memory_bytes(model, ids) -> int:
    """Weights + grads + AdamW state of trainable params + tensors saved for backward (unique storages)."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return weights + 3 * trainable + sum(saved.values())


def time_steps(model, optimizer, ids, steps: int, device: str) -> float:
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_merge(model, device: str) -> float:
    with torch.no_grad():
        sync(device)
        start = time.perf_counter()
        model.merge_adapter()
        sync(device)
        elapsed = time.perf_counter() - start
        model.unmerge_adapter()
    return elapsed


def run(hidden: int, args) -> dict:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (args.batch, args.seq), device=args.device)
    models = {m: build(m, hidden, args.layers, args.device, dtype).train() for m in METHODS}
    optimizers = {m: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4) for m, model in models.items()}
    params = {m: model.get_nb_trainable_parameters()[0] for m, model in models.items()}
    macs = {m: linear_macs(model, m) for m, model in models.items()}
    memory = {m: step_memory_bytes(model, ids) for m, model in models.items()}
    for m, model in models.items():  # warm-up
        time_steps(model, optimizers[m], ids, 2, args.device)
    step = {m: [] for m in METHODS}
    merge = {m: [] for m in METHODS}
    for _ in range(args.repeats):
        for m, model in models.items():
            step[m].append(time_steps(model, optimizers[m], ids, args.steps, args.device))
            merge[m].append(time_merge(model, args.device))
    result = {"hidden": hidden, "intermediate": intermediate_size(hidden), "layers": args.layers, "methods": {}}
    for m in METHODS:
        step_ratio = [s / l for s, l in zip(step[m], step["lora"])]
        merge_ratio = [s / l for s, l in zip(merge[m], merge["lora"])]
        result["methods"][m] = {
            "trainable_params": params[m],
            "step_s": step[m],
            "merge_s": merge[m],
            "memory_bytes": memory[m],
            "step_ratio": [min(step_ratio), statistics.median(step_ratio), max(step_ratio)],
            "merge_ratio": [min(merge_ratio), statistics.median(merge_ratio), max(merge_ratio)],
            "memory_ratio": memory[m] / memory["lora"],
            "linear_macs_ratio": macs[m] / macs["lora"],
        }
    return result


def print_table(result: dict) -> None:
    print(
        f"\nhidden {result['hidden']} (intermediate {result['intermediate']}, {result['layers']} layers): "
        "ratios to PEFT LoRA r=8, min / median / max over repeats"
    )
    print(
        f"{'method':<18}{'params':>10}{'step (ms)':>11}{'step ratio':>22}{'floor':>7}{'memory':>10}"
        f"{'merge (ms)':>12}{'merge ratio':>24}"
    )
    for m, r in result["methods"].items():
        fmt = lambda v: f"{v[0]:.2f} / {v[1]:.2f} / {v[2]:.2f}"  # noqa: E731
        print(
            f"{m:<18}{r['trainable_params']:>10,}{statistics.median(r['step_s']) * 1e3:>11.1f}{fmt(r['step_ratio']):>22}"
            f"{r['linear_macs_ratio']:>7.3f}{r['memory_ratio']:>9.3f}x{statistics.median(r['merge_s']) * 1e3:>12.1f}{fmt(r['merge_ratio']):>24}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, nargs="+", default=[512, 1024, 2048], help="hidden sizes to measure")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers per model")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per repeat (median taken)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats (ratios: min / median / max over these)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="base model dtype")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default="benchmarks/results/speed.json", help="where to write the JSON results")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for hidden in args.hidden:
        result = run(hidden, args)
        print_table(result)
        results.append(result)
    meta = {
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "args": vars(args),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

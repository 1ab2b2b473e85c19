"""Throughput of ``moraft serve``'s engine with many adapters in one batch, against the merged model and PEFT.

All measured in one run, on one randomly initialised LLaMA-shaped base (no downloads), with every request decoding
``--new_tokens`` tokens greedily (end-of-sequence ignored) from a ``--prompt_len``-token prompt:

* ``merged (moraft engine)``: one adapter merged into the base, served by the same engine with no adapters: the
  ceiling (per-row adapters can only add work to it).
* ``merged (HF generate)``: the same merged model through ``transformers``' batched ``generate``, for scale.
* ``moraft MoRA`` / ``moraft LoRA``: the engine with per-row adapters, the request mix spread over 1, 8 or 64
  distinct adapters (``--compression`` MoRA adapters, or PEFT LoRA adapters, random non-zero weights, all-linear).
* ``PEFT mixed-batch LoRA``: ``PeftModel.generate(..., adapter_names=[...])`` with the same LoRA adapters.

Tokens/s counts generated tokens over wall time, prefill included, all requests submitted at once; tokens per
CPU-second divides by the process's CPU time instead, which moves less when other jobs share the CPU. The adapters
are loaded before timing. Prints a Markdown table with each row's ratio to the merged model through the engine.

    python benchmarks/serve.py                       # the table in docs/results.md
    python benchmarks/serve.py --hidden 256 --layers 2 --new_tokens 8 --requests 16 --mixes 1 4 16   # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import threading
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from tqdm import tqdm
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

import moraft
from moraft.serve.adapters import AdapterStore
from moraft.serve.engine import Engine, Finished, Request
from moraft.serve.layers import wrap_model
from moraft.serve.metrics import ServeMetrics
from moraft.serve.sampling import SamplingParams
from moraft.testing import randomize_adapter, tiny_llama


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Token i is the word "t<i>" (ids 0-2 special, as in moraft.testing's models): decodes any id of a vocabulary of
    any size (the character tokenizer of the tests has 105 tokens; a served model's vocabulary is larger)."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def make_adapters(base: LlamaForCausalLM, root: Path, kind: str, count: int, args) -> list[str]:
    """Save ``count`` adapters with random non-zero weights; return their names."""
    names = []
    model = copy.deepcopy(base)
    if kind == "lora":
        config = LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear")
    else:
        config = moraft.MoraConfig(r=args.r, compression=kind, target_modules="all-linear")
    peft_model = get_peft_model(model, config)
    for i in tqdm(range(count), desc=f"saving {kind} adapters", leave=False):
        randomize_adapter(peft_model, seed=1000 + i, std=0.02).save_pretrained(root / f"{kind}-{i}")
        names.append(f"{kind}-{i}")
    return names


def run_engine(model, tokenizer, store, names: list, prompts: list[list[int]], new_tokens: int):
    """Submit every prompt at once (request i with adapter names[i], None for the base).

    Returns (generated tokens, wall seconds, CPU seconds of the process)."""
    row_adapters = model._bench_rows
    engine = Engine(model, tokenizer, row_adapters, store.release if store else (lambda a: None), ServeMetrics(),
                    context_length=model.config.max_position_embeddings, max_batch_size=len(prompts),
                    max_prefill_tokens=len(prompts) * len(prompts[0])).start()
    done = threading.Semaphore(0)
    counts = []

    def on_event(event) -> None:
        if isinstance(event, Finished):
            counts.append(event.completion_tokens)
            done.release()
        elif not hasattr(event, "text"):
            raise RuntimeError(event)

    adapters = [store.acquire(n) if n is not None else None for n in names]
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    start, cpu = time.perf_counter(), time.process_time()
    for prompt, adapter in zip(prompts, adapters):
        engine.submit(Request(prompt, params, adapter, on_event))
    for _ in prompts:
        if not done.acquire(timeout=3600):
            raise RuntimeError("the engine stalled")
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    engine.stop()
    assert sum(counts) == len(prompts) * new_tokens, counts
    return sum(counts), elapsed, cpu


def run_generate(model, prompts: list[list[int]], new_tokens: int, adapter_names=None):
    """``model.generate`` on all prompts as one batch; returns like ``run_engine``."""
    ids = torch.tensor(prompts)
    kwargs = {"adapter_names": adapter_names} if adapter_names is not None else {}
    start, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kwargs)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert out.shape[1] == ids.shape[1] + new_tokens
    return ids.shape[0] * new_tokens, elapsed, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--r", type=int, default=8, help="LoRA rank; MoRA matches its parameter count")
    parser.add_argument("--compression", default="rotation", choices=moraft.COMPRESSIONS)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt_len", type=int, default=16)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--mixes", type=int, nargs="+", default=[1, 8, 64], help="distinct adapters in the mix")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each row; the best is reported")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 by default: on a CPU shared with other jobs, more threads spin and "
                        "make timings erratic; 0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    most = max(args.mixes)
    if most > args.requests:
        parser.error(f"--mixes {most} is more than --requests {args.requests}")

    base = tiny_llama(hidden_size=args.hidden, intermediate_size=args.intermediate, num_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
                      max_position_embeddings=args.prompt_len + args.new_tokens + 8)
    tokenizer = word_tokenizer(args.vocab)
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, args.vocab, (args.requests, args.prompt_len), generator=gen).tolist()

    results: list[tuple[str, int, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        mora_names = make_adapters(base, root, args.compression, most, args)
        lora_names = make_adapters(base, root, "lora", most, args)

        # the merged model: MoRA adapter 0 merged into a copy of the base
        merged = PeftModel.from_pretrained(copy.deepcopy(base), root / mora_names[0]).merge_and_unload().eval()
        served_merged = copy.deepcopy(merged)
        served_merged._bench_rows, _ = wrap_model(served_merged)
        served = copy.deepcopy(base)
        served._bench_rows, shapes = wrap_model(served)
        store = AdapterStore(root, shapes, torch.device("cpu"), max_bytes=2**40, base_config=served.config)
        peft_lora = PeftModel.from_pretrained(copy.deepcopy(base), root / lora_names[0], adapter_name=lora_names[0])
        for name in tqdm(lora_names[1:], desc="loading LoRA adapters into PEFT", leave=False):
            peft_lora.load_adapter(root / name, adapter_name=name)
        peft_lora.eval()

        warm = [p[:4] for p in prompts[:2]]
        run_engine(served_merged, tokenizer, None, [None, None], warm, 2)
        for names in (mora_names, lora_names):
            run_engine(served, tokenizer, store, names[: len(names)], [prompts[0][:4]] * len(names), 1)
        run_generate(merged, warm, 2)

        plan = [("merged (moraft engine)", 1, lambda: run_engine(served_merged, tokenizer, None,
                                                                   [None] * args.requests, prompts, args.new_tokens)),
                ("merged (HF generate)", 1, lambda: run_generate(merged, prompts, args.new_tokens))]
        for k in args.mixes:
            mix = lambda names, k=k: [names[i % k] for i in range(args.requests)]  # noqa: E731
            plan.append((f"moraft MoRA ({args.compression})", k,
                         lambda m=mix(mora_names): run_engine(served, tokenizer, store, m, prompts, args.new_tokens)))
            plan.append(("moraft LoRA", k,
                         lambda m=mix(lora_names): run_engine(served, tokenizer, store, m, prompts, args.new_tokens)))
            plan.append(("PEFT mixed-batch LoRA (generate)", k,
                         lambda m=mix(lora_names): run_generate(peft_lora, prompts, args.new_tokens, m)))
        # rounds over the whole plan, so that a burst of load from other jobs does not hit one row only;
        # each row keeps its best round (by wall time, and separately by CPU time)
        wall = [0.0] * len(plan)
        per_cpu = [0.0] * len(plan)
        with tqdm(total=args.repeats * len(plan), desc="measuring") as bar:
            for _ in range(args.repeats):
                for i, (_, _, fn) in enumerate(plan):
                    tokens, seconds, cpu = fn()
                    wall[i] = max(wall[i], tokens / seconds)
                    per_cpu[i] = max(per_cpu[i], tokens / cpu)
                    bar.update()
        results = [(label, k, w, c) for (label, k, _), w, c in zip(plan, wall, per_cpu)]

    ceiling_wall, ceiling_cpu = results[0][2], results[0][3]
    print(f"\nbase: LLaMA hidden={args.hidden} intermediate={args.intermediate} layers={args.layers} "
          f"vocab={args.vocab}; adapters r={args.r} all-linear; {args.requests} requests x {args.prompt_len} prompt "
          f"+ {args.new_tokens} new tokens; torch threads={torch.get_num_threads()}, cpus={os.cpu_count()}, "
          f"device=cpu; best of {args.repeats} rounds\n")
    print("| engine | distinct adapters | tokens/s (wall) | × merged | tokens per CPU-second | × merged |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, k, w, c in results:
        shown = "-" if label.startswith("merged") else k
        print(f"| {label} | {shown} | {w:.1f} | {w / ceiling_wall:.2f} | {c:.1f} | {c / ceiling_cpu:.2f} |")


if __name__ == "__main__":
    main()

"""Throughput of ``moraft serve``'s engine with many adapters in one batch, against the merged model and PEFT; and
the latency of ``moraft serve`` over HTTP with 32 and 64 concurrent clients, with and without bad requests.

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

``--parts http``: ``moraft serve`` itself (``build_server``, uvicorn on a loopback port in a thread of this process),
``--clients`` concurrent httpx clients each sending ``--http_requests`` completions one after another over
``--http_adapters`` MoRA adapters; requests/s and the p50/p99 latency of the good requests, then the same with one
request in four a bad one (out-of-range seed, 3,000 stop strings, a body over the limit, a lone surrogate, a
10,000-character model id, a client that hangs up mid-stream), with the good requests' p99 over the clean run's.

    python benchmarks/serve.py                       # the tables in docs/results.md
    python benchmarks/serve.py --hidden 256 --layers 2 --new_tokens 8 --requests 16 --mixes 1 4 16 --clients 4 8
    python benchmarks/serve.py --parts http          # only the HTTP table
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import random
import tempfile
import threading
import time
from pathlib import Path

import httpx
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
from moraft.serve.server import build_server
from moraft.testing import LiveServer, randomize_adapter, tiny_llama


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


def engine_table(base: LlamaForCausalLM, tokenizer, prompts: list[list[int]], root: Path, args) -> None:
    """Tokens/s of the engine alone with 1..64 distinct adapters per batch, against the merged model and PEFT."""
    most = max(args.mixes)
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
    print(f"\nthe engine alone: {args.requests} requests submitted at once; best of {args.repeats} rounds\n")
    print("| engine | distinct adapters | tokens/s (wall) | × merged | tokens per CPU-second | × merged |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, k, w, c in results:
        shown = "-" if label.startswith("merged") else k
        print(f"| {label} | {shown} | {w:.1f} | {w / ceiling_wall:.2f} | {c:.1f} | {c / ceiling_cpu:.2f} |")


# -- moraft serve over HTTP ------------------------------------------------------------------------------------------

BAD_SHARE = 4
"""In the mixed rows, one request in this many is a bad one."""


def bad_requests(names: list[str], limit_bytes: int) -> list[tuple[bytes, int]]:
    """Bad request bodies, serialized once, and the status each must get: values out of range, thousands of stop
    strings, a body over the limit, a lone surrogate, a 10,000-character model id."""
    good = {"model": names[0], "prompt": "t5 t6", "max_tokens": 4}
    bodies = [({**good, "seed": 2**64}, 400), ({**good, "stop": ["s" * 200] * 3000}, 400),
              ({**good, "prompt": "p" * limit_bytes}, 413), ({**good, "model": "m" * 10_000}, 404)]
    encoded = [(json.dumps(body).encode(), status) for body, status in bodies]
    return encoded + [(b'{"model": "%s", "prompt": "a\\ud800"}' % names[0].encode(), 400)]


async def http_load(url: str, names: list[str], texts: list[str], clients: int, requests: int, new_tokens: int,
                    bad_share: int = 0, limit_bytes: int = 0) -> tuple[list[float], float]:
    """``clients`` clients each send ``requests`` completions of ``new_tokens`` tokens in turn (request i names
    adapter i mod len(names)); with ``bad_share``, one request in that many is a bad one (which must get its own 4xx)
    or a streamed request dropped after its first chunk. Returns the good requests' latencies and the wall time."""
    bad = bad_requests(names, limit_bytes) if bad_share else []
    latencies: list[float] = []

    async def one_client(client: httpx.AsyncClient, c: int) -> None:
        rng = random.Random(c)
        for j in range(requests):
            while bad and rng.randrange(bad_share) == 0:
                await one_bad(client, rng)
            i = c * requests + j
            body = {"model": names[i % len(names)], "prompt": texts[i % len(texts)], "max_tokens": new_tokens,
                    "temperature": 0, "ignore_eos": True}
            start = time.perf_counter()
            r = await client.post("/v1/completions", json=body)
            latencies.append(time.perf_counter() - start)
            if r.status_code != 200 or r.json()["usage"]["completion_tokens"] != new_tokens:
                raise RuntimeError(f"a good request failed: {r.status_code} {r.text[:300]}")

    async def one_bad(client: httpx.AsyncClient, rng: random.Random) -> None:
        choice = rng.randrange(len(bad) + 1)
        if choice == len(bad):  # a client that hangs up mid-stream
            body = {"model": names[0], "prompt": texts[0], "max_tokens": new_tokens, "stream": True}
            async with client.stream("POST", "/v1/completions", json=body) as r:
                async for _ in r.aiter_lines():
                    break
            return
        content, status = bad[choice]
        r = await client.post("/v1/completions", content=content, headers={"content-type": "application/json"})
        if r.status_code != status:
            raise RuntimeError(f"a bad request got {r.status_code}, not {status}: {r.text[:300]}")

    limits = httpx.Limits(max_connections=clients + 8)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(one_client(client, c) for c in range(clients)))
        return latencies, time.perf_counter() - start


def http_table(base: LlamaForCausalLM, tokenizer, prompts: list[list[int]], root: Path, args) -> None:
    """Requests/s and p50/p99 latency of ``moraft serve`` (uvicorn on a loopback port, in this process) at each
    ``--clients`` count; then at each count again with one request in `BAD_SHARE` a bad one, whose good requests'
    latency is compared with the clean run's."""
    names = make_adapters(base, root, args.compression, args.http_adapters, args)
    limit_bytes = 2**20
    server = build_server(copy.deepcopy(base), tokenizer, root, base_name="base", max_request_mb=limit_bytes / 2**20)
    texts = [" ".join(f"t{i}" for i in p) for p in prompts]
    plan = [(clients, share) for share in (0, BAD_SHARE) for clients in args.clients]
    best: dict[tuple[int, int], tuple[list[float], float]] = {}
    with LiveServer(server.app) as live:
        asyncio.run(http_load(live.url, names, texts, len(names), 1, 1))  # loads every adapter
        # rounds over the whole plan, as for the engine: each row keeps its round with the most requests/s
        for _ in tqdm(range(args.repeats), desc="measuring over HTTP"):
            for clients, share in plan:
                latencies, wall = asyncio.run(http_load(live.url, names, texts, clients, args.http_requests,
                                                        args.new_tokens, share, limit_bytes))
                if (clients, share) not in best or wall < best[clients, share][1]:
                    best[clients, share] = (latencies, wall)
    server.close()
    rows = [(clients, share, *best[clients, share]) for clients, share in plan]

    clean = {clients: percentile(latencies, 99) for clients, share, latencies, _ in rows if not share}
    print(f"\nmoraft serve over HTTP: each client sends {args.http_requests} completions in turn, over "
          f"{len(names)} distinct adapters ({args.compression}); the clients run in this process's event loop; "
          f"best of {args.repeats} rounds\n")
    print("| clients | bad requests | good requests | requests/s | p50 latency (s) | p99 latency (s) | p99 × clean |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for clients, share, latencies, wall in rows:
        p99 = percentile(latencies, 99)
        shown = f"1 in {share}" if share else "none"
        print(f"| {clients} | {shown} | {len(latencies)} | {len(latencies) / wall:.1f} | "
              f"{percentile(latencies, 50):.2f} | {p99:.2f} | {p99 / clean[clients]:.2f} |")


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile of ``values`` (linear interpolation between the closest ranks)."""
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), q / 100))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", nargs="+", choices=["engine", "http"], default=["engine", "http"],
                        help="engine: tokens/s of the engine alone; http: latency of moraft serve over HTTP")
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
    parser.add_argument("--clients", type=int, nargs="+", default=[32, 64], help="concurrent HTTP clients")
    parser.add_argument("--http_requests", type=int, default=4, help="requests each HTTP client sends in turn")
    parser.add_argument("--http_adapters", type=int, default=8, help="distinct adapters the HTTP requests name")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 by default: on a CPU shared with other jobs, more threads spin and "
                        "make timings erratic; 0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if max(args.mixes) > args.requests:
        parser.error(f"--mixes {max(args.mixes)} is more than --requests {args.requests}")

    base = tiny_llama(hidden_size=args.hidden, intermediate_size=args.intermediate, num_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
                      max_position_embeddings=args.prompt_len + args.new_tokens + 8)
    tokenizer = word_tokenizer(args.vocab)
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, args.vocab, (args.requests, args.prompt_len), generator=gen).tolist()
    print(f"\nbase: LLaMA hidden={args.hidden} intermediate={args.intermediate} layers={args.layers} "
          f"vocab={args.vocab}; adapters r={args.r} all-linear; prompts of {args.prompt_len} tokens + "
          f"{args.new_tokens} new tokens, greedy; torch threads={torch.get_num_threads()}, cpus={os.cpu_count()}, "
          "device=cpu")
    with tempfile.TemporaryDirectory() as tmp:
        if "engine" in args.parts:
            engine_table(base, tokenizer, prompts, Path(tmp) / "engine", args)
        if "http" in args.parts:
            http_table(base, tokenizer, prompts, Path(tmp) / "http", args)


if __name__ == "__main__":
    main()

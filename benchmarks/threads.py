"""Training-step time on the CPU under each torch threading setting, on an idle machine and with every core busy.

The workload is a short fixed MoRA training run (a LLaMA-shaped model, MoRA r=8 on every projection, AdamW, forward +
backward + step), each setting in a fresh Python process so that environment variables reach OpenMP, which reads them
once, when torch loads it. A setting is ``default`` (torch's own: one thread per core, libgomp's spin-waiting
barriers) or a comma-joined list of ``VAR=VALUE`` environment variables and ``threads=N``
(``torch.set_num_threads(N)`` before the first step), e.g. ``OMP_NUM_THREADS=1`` or
``threads=1,OMP_WAIT_POLICY=PASSIVE``; ``moraft`` is what the ``moraft`` command sets by default
(`moraft.threads.default_environment`). The ``loaded`` runs start one CPU-burning process per core for their duration
(each a ``while True: pass`` loop, ended afterwards), as a machine shared with other jobs is. Every time is printed with
its ratio to ``default`` under the same load, measured in the same run; settings are interleaved inside each repeat,
so drift in the machine's load hits them alike. The variables that would override a setting (``OMP_NUM_THREADS``,
``MKL_NUM_THREADS``, ``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT``) are removed from each worker's environment first.

    python benchmarks/threads.py                                   # every setting, idle and loaded (minutes)
    python benchmarks/threads.py --loads loaded --repeats 3
    python benchmarks/threads.py --settings default OMP_NUM_THREADS=1 --steps 2 --hidden 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

CLEARED = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
"""Variables taken out of a worker's environment, so that only its setting decides them."""


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_settings() -> list[str]:
    """torch's default; one thread (by OMP_NUM_THREADS and by torch.set_num_threads); 2, 4, 8... threads up to the
    cores; waiting threads that sleep at once (PASSIVE), or after a shorter or longer spin than moraft's; and what
    moraft sets (GOMP_SPINCOUNT=1000)."""
    counts = sorted({n for n in (2**i for i in range(8)) if n <= cores()} | {cores()})
    threads = [f"threads={n}" for n in counts]
    waits = ["OMP_WAIT_POLICY=PASSIVE", "GOMP_SPINCOUNT=100", "GOMP_SPINCOUNT=10000"]
    return ["default", "OMP_NUM_THREADS=1", *threads, *waits, "moraft"]


def parse_setting(setting: str) -> tuple[dict[str, str], Optional[int]]:
    """The environment variables and the thread count (None: torch's choice) of ``setting``."""
    if setting == "default":
        return {}, None
    if setting == "moraft":
        from moraft.threads import default_environment

        return default_environment({k: v for k, v in os.environ.items() if k not in CLEARED}), None
    env: dict[str, str] = {}
    threads = None
    for part in setting.split(","):
        name, eq, value = part.partition("=")
        if not eq or not value:
            raise SystemExit(f"threads.py: error: setting {setting!r}: expected default, moraft, or VAR=VALUE,...")
        if name == "threads":
            threads = int(value)
        else:
            env[name] = value
    return env, threads


# -- the workload (in the worker process) --------------------------------------------------------------------------


def workload(hidden: int, layers: int, batch: int, seq: int, steps: int, threads: Optional[int]) -> dict:
    """Build the model, then time ``steps`` training steps; what a worker prints as JSON."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from moraft import MoraConfig

    torch.manual_seed(0)
    heads = max(1, hidden // 64)
    config = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 16 * 16 or 16,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=max(seq, 16))
    model = get_peft_model(LlamaForCausalLM(config), MoraConfig(r=8, target_modules="all-linear"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, 256, (batch, seq))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return {"steps": times, "total": sum(times), "num_threads": torch.get_num_threads()}


# -- the runs (in the parent) --------------------------------------------------------------------------------------


class Load:
    """One CPU-burning process per core while the ``with`` block runs (none when ``processes`` is 0)."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self.burners: list[subprocess.Popen] = []

    def __enter__(self) -> "Load":
        code = "while True: pass"
        self.burners = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(self.processes)]
        time.sleep(0.5 if self.processes else 0)  # let them start spinning
        return self

    def __exit__(self, *exc) -> None:
        for burner in self.burners:
            burner.kill()
        for burner in self.burners:
            burner.wait()


def run_worker(setting: str, args: argparse.Namespace) -> dict:
    """One fresh process running the workload under ``setting``; its JSON, or ``{"total": None}`` past the timeout."""
    env, threads = parse_setting(setting)
    worker_env = {k: v for k, v in os.environ.items() if k not in CLEARED} | env
    command = [sys.executable, __file__, "--worker", "--hidden", str(args.hidden), "--layers", str(args.layers),
               "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)]
    if threads is not None:
        command += ["--threads", str(threads)]
    try:
        done = subprocess.run(command, env=worker_env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"total": None, "steps": [], "num_threads": threads}
    if done.returncode != 0:
        raise RuntimeError(f"the worker of {setting!r} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(args: argparse.Namespace) -> dict:
    """Every setting under every load, ``args.repeats`` times interleaved: the median total time of each."""
    results: dict = {}
    for load in args.loads:
        runs: dict[str, list[dict]] = {setting: [] for setting in args.settings}
        with Load(cores() if load == "loaded" else 0):
            for _ in range(args.repeats):
                for setting in args.settings:
                    runs[setting].append(run_worker(setting, args))
        results[load] = {}
        for setting, done in runs.items():
            totals = [run["total"] for run in done]
            finished = [t for t in totals if t is not None]
            results[load][setting] = {
                "median_s": statistics.median(finished) if len(finished) == len(totals) else None,
                "totals_s": totals,
                "first_step_s": statistics.median(run["steps"][0] for run in done) if finished else None,
                "num_threads": done[0]["num_threads"],
            }
    return results


def report(results: dict, args: argparse.Namespace) -> str:
    """The table: each setting's median time and its ratio to ``default`` under the same load."""
    lines = [f"{args.steps} training steps, hidden {args.hidden}, {args.layers} layers, batch {args.batch} x "
             f"{args.seq} tokens; median of {args.repeats}; {cores()} cores; timeout {args.timeout:g} s",
             f"{'load':<7} {'setting':<34} {'threads':>7} {'step 1':>9} {'total':>9} {'vs default':>10}"]
    for load, settings in results.items():
        baseline = settings.get("default", {}).get("median_s")
        for setting, row in settings.items():
            total = row["median_s"]
            shown = f"{total:8.2f}s" if total is not None else f">{args.timeout:g}s".rjust(9)
            first = f"{row['first_step_s']:8.2f}s" if row["first_step_s"] is not None else "-".rjust(9)
            ratio = f"{total / baseline:10.2f}" if total is not None and baseline else "-".rjust(10)
            lines.append(f"{load:<7} {setting:<34} {row['num_threads']!s:>7} {first} {shown} {ratio}")
    return "\n".join(lines)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", default=None, help="settings to compare (default: all of them)")
    parser.add_argument("--loads", nargs="+", default=["idle", "loaded"], choices=["idle", "loaded"])
    parser.add_argument("--hidden", type=int, default=512, help="hidden size of the model")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=6, help="training steps per run (all timed, the first included)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each setting per load (median taken)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds before a run counts as collapsed")
    parser.add_argument("--output", default=None, help="also write the results as JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.settings is None:
        args.settings = default_settings()
    if "default" not in args.settings:
        args.settings.insert(0, "default")  # every ratio is to it
    for setting in args.settings:
        parse_setting(setting) if setting != "moraft" else None  # a bad one fails before anything runs
    return args


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(workload(args.hidden, args.layers, args.batch, args.seq, args.steps, args.threads)))
        return {}
    load_before = os.getloadavg()  # other jobs' load: an "idle" run is idle only if this is near 0
    results = measure(args)
    print(report(results, args))
    if args.output:
        meta = {"command": " ".join(["python", "benchmarks/threads.py", *(argv if argv is not None else sys.argv[1:])]),
                "cores": cores(), "machine": platform.processor() or platform.machine(),
                "loadavg_before": load_before}
        Path(args.output).write_text(json.dumps({"meta": meta, "args": vars(args), "results": results}, indent=1))
    return results


if __name__ == "__main__":
    main()

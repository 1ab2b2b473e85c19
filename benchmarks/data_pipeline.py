"""Documents per second of each stage of ``moraft data`` as the command runs it, and its peak memory.

A generated corpus (``data_throughput.generated_corpus``: sentences with AdaptLLM's connectives, so mining finds
tasks) is written as JSONL and run through `moraft.data.pipeline.run_pipeline`: corpus (clean, cut, exact and
near-duplicate removal), mine (domain tokenizer + AdaptLLM's patterns), cluster (TF-IDF + SVD, k-means, neighbours)
and build (rendering, token counts). Each stage's seconds come from its report in ``stats.json``. The baseline,
measured in the same run, is reading the same JSONL with ``datasets`` (``load_dataset("json")``): each stage's
``x baseline`` is its time over the baseline's, so figures from different machines compare. The LLM stage is left
out: its rate is the endpoint's (concurrency x the server's throughput), not this machine's.

Memory is the peak PSS of this process and its children (sampled every 50 ms), beside the corpus's size on disk:
with ``--streaming`` the corpus stage never holds the corpus, and the later stages read memory-mapped Arrow files.

    python benchmarks/data_pipeline.py                          # 20,000 documents of ~300 words
    python benchmarks/data_pipeline.py --documents 100000 --streaming --num_proc 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_throughput import PeakMemory, generated_corpus  # noqa: E402  (the corpus and the sampler, written once)

STAGES = ("corpus", "mine", "cluster", "build")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--documents", type=int, default=20000)
    parser.add_argument("--words", type=int, default=300, help="words per generated document")
    parser.add_argument("--num_proc", type=int, default=1, help="processes for the per-document stages")
    parser.add_argument("--streaming", action="store_true", help="the corpus stage streams its input")
    parser.add_argument("--context_tokens", type=int, default=8192, help="--cluster.context_tokens")
    parser.add_argument("--output", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--work_dir", type=Path, default=None, help="for the corpus and stages (default: temporary)")
    args = parser.parse_args(argv)

    import datasets

    from moraft.data.cluster import ClusterOptions
    from moraft.data.corpus import CorpusOptions
    from moraft.data.mine import MineOptions
    from moraft.data.pipeline import DataPipelineOptions, run_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        source = work / "corpus.jsonl"
        generated_corpus(args.documents, args.words).remove_columns(["tokens"]).to_json(str(source))
        size_mib = source.stat().st_size / 2**20
        start = time.perf_counter()
        with PeakMemory() as baseline_memory:
            datasets.load_dataset("json", data_files=str(source), split="train",
                                  cache_dir=str(work / "baseline-cache"))
        baseline = time.perf_counter() - start
        options = DataPipelineOptions(
            corpus=CorpusOptions(path=str(source), streaming=args.streaming),
            mine=MineOptions(domain="generated"),
            cluster=ClusterOptions(context_tokens=args.context_tokens),
            output=str(work / "out"), stages="corpus,mine,cluster,build", num_proc=args.num_proc,
            tokenizer="builtin:tiny-llama",  # the published figures count characters (SmolLM2's BPE: --tokenizer)
        )
        with PeakMemory() as memory:
            stats = run_pipeline(options)
    documents = stats["stages"]["corpus"]["documents_in"]
    rows = [{"stage": "baseline (load_dataset json)", "documents": documents, "seconds": baseline,
             "documents_per_second": documents / baseline, "x_baseline": 1.0}]
    for stage in STAGES:
        seconds = stats["stages"][stage]["seconds"]
        rows.append({"stage": stage, "documents": documents, "seconds": seconds,
                     "documents_per_second": documents / seconds, "x_baseline": seconds / baseline})
    report = {"documents": documents, "corpus_mib": size_mib, "streaming": args.streaming,
              "num_proc": args.num_proc, "rows": rows, "peak_mib": memory.peak / 2**20,
              "baseline_peak_mib": baseline_memory.peak / 2**20, "stats": stats["stages"]}
    print(f"{documents} documents, {size_mib:.0f} MiB of JSONL; num_proc {args.num_proc}"
          f"{', streaming' if args.streaming else ''}")
    print(f"{'stage':30} {'seconds':>9} {'documents/s':>12} {'x baseline':>11}")
    for row in rows:
        print(f"{row['stage']:30} {row['seconds']:9.2f} {row['documents_per_second']:12.0f} {row['x_baseline']:11.1f}")
    print(f"peak memory (PSS, this process and its children): {report['peak_mib']:.0f} MiB for the pipeline, "
          f"{report['baseline_peak_mib']:.0f} MiB for the baseline; the corpus is {size_mib:.0f} MiB")
    if args.output:
        args.output.write_text(json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    main()

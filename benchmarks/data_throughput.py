"""Documents per second of the ``moraft data`` stages on one machine, in-process and on datatrove's local executor.

Each per-document stage (a function of one corpus row) runs three or more ways on the same corpus:

- ``map``: ``Dataset.map`` in this process, the baseline;
- ``engine xN``: ``moraft.data.engine.run_per_document`` on datatrove's local executor with N worker processes
  (tasks = 2N, so that a worker picks up a second task when it finishes its first), Parquet shards in and out.

Corpus-wide stages (clustering) run once, in-process. The stage list is pluggable: a stage whose module is not
importable yet (``moraft.data.corpus.clean_text``, ``moraft.data.mine.mine_tasks``,
``moraft.data.cluster.cluster_corpus``) is skipped with a note. ``count_words`` (moraft.data.engine) always runs: a
cheap function whose rate measures the engine's own overhead (reading, writing, process start);
``textwrap.wrap`` (the standard library's, regex-based, about as costly per character as sentence splitting) always
runs too, a CPU-bound stand-in that shows how the engine scales with workers.

Memory is the peak, over samples every 50 ms, of the proportional set size (PSS: resident memory with pages shared
between processes split among them) summed over this process and its workers, so that forked workers, which share
most of their pages with this process, are not counted several times.

    python benchmarks/data_throughput.py                          # 20,000 generated documents of ~300 words
    python benchmarks/data_throughput.py --documents 2000 --workers 1 2
    python benchmarks/data_throughput.py --corpus debian          # Debian package descriptions (apt lists, lz4)
"""

from __future__ import annotations

import argparse
import importlib
import json
import random
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import datasets
import psutil

from moraft.data.engine import RowFunction, count_words, run_per_document, write_shards

# (stage, module, attribute, how a row is passed: the row itself or some columns into one output column)
PER_DOCUMENT = [
    ("count_words", "moraft.data.engine", "count_words", None),
    ("textwrap.wrap", "textwrap", "wrap", (("text",), "lines")),
    ("clean_text", "moraft.data.corpus", "clean_text", (("text",), "text")),
    ("mine_tasks", "moraft.data.mine", "mine_tasks", (("text", "title"), "tasks")),
]
CORPUS_WIDE = [("cluster_corpus", "moraft.data.cluster", "cluster_corpus")]

CONNECTIVES = ["Therefore", "However", "Moreover", "In other words", "Thus", "In contrast", "Furthermore", "Hence"]
WORDS = ("protein kinase inhibitor receptor binding pathway expression tumour patient dosage clinical trial "
         "interest rate liquidity portfolio volatility dividend equity margin contract statute tribunal appellant "
         "the a of in and to for with on by is was are were this that which these those its their").split()


def generated_corpus(documents: int, words: int, seed: int = 0) -> datasets.Dataset:
    """Documents of about ``words`` words, in sentences of 8-20 words; one in three sentences opens with a
    connective of AdaptLLM's patterns, so that mining finds something."""
    rng = random.Random(seed)
    rows = []
    for i in range(documents):
        sentences, count = [], 0
        while count < words:
            sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20)))
            count += sentence.count(" ") + 1
            if sentences and rng.random() < 1 / 3:
                sentence = f"{rng.choice(CONNECTIVES)}, {sentence}"
            sentences.append(sentence[0].upper() + sentence[1:] + ".")
        text = " ".join(sentences)
        rows.append({"id": f"doc{i}", "title": " ".join(rng.choice(WORDS) for _ in range(4)).title(), "text": text,
                     "tokens": len(text) + 1})  # the character tokenizer: one token per character, plus BOS
    return datasets.Dataset.from_list(rows)


def debian_corpus(documents: int) -> datasets.Dataset:
    """Debian package descriptions from apt's lists (/var/lib/apt/lists/*Packages.lz4): the package as the title,
    its one-line description as the text."""
    lists = sorted(Path("/var/lib/apt/lists").glob("*Packages.lz4"))
    if not lists:
        raise SystemExit("--corpus debian: no /var/lib/apt/lists/*Packages.lz4 here (run apt-get update)")
    text = subprocess.run(["lz4cat", *map(str, lists)], capture_output=True, text=True, check=True).stdout
    rows = []
    for stanza in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and not line[0].isspace())
        if "Package" in fields and "Description" in fields:
            rows.append({"id": fields["Package"], "title": fields["Package"], "text": fields["Description"],
                         "tokens": len(fields["Description"]) + 1})
        if len(rows) == documents:
            break
    return datasets.Dataset.from_list(rows)


class PeakMemory:
    """Samples the PSS of this process and its descendants every 50 ms; ``peak`` is the largest sum, in bytes."""

    def __enter__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        me = psutil.Process()
        while True:
            total = 0
            for process in [me, *me.children(recursive=True)]:
                try:
                    total += process.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self.peak = max(self.peak, total)
            if self._stop.wait(0.05):
                return

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def available(module: str, attribute: str):
    """The stage function, or None when its module is not on this branch yet."""
    try:
        return getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError):
        return None


def measure(label: str, documents: int, run) -> dict:
    with PeakMemory() as memory:
        start = time.perf_counter()
        run()
        seconds = time.perf_counter() - start
    return {"mode": label, "documents": documents, "seconds": seconds, "documents_per_second": documents / seconds,
            "peak_mib": memory.peak / 2**20}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--documents", type=int, default=20000)
    parser.add_argument("--words", type=int, default=300, help="words per generated document")
    parser.add_argument("--corpus", choices=["generated", "debian"], default="generated")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="engine worker counts to measure")
    parser.add_argument("--output", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--work_dir", type=Path, default=None, help="for the shards (default: a temporary folder)")
    args = parser.parse_args(argv)

    corpus = (generated_corpus(args.documents, args.words) if args.corpus == "generated"
              else debian_corpus(args.documents))
    n = len(corpus)
    results, notes = {}, []
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        work = Path(work)
        shard_dirs = {}
        for stage, module, attribute, columns in PER_DOCUMENT:
            target = available(module, attribute)
            if target is None:
                notes.append(f"{stage}: skipped ({module}.{attribute} is not available on this branch)")
                continue
            function = count_words if target is count_words else RowFunction(f"{module}:{attribute}", *columns)
            rows = []
            try:
                rows.append(measure("map", n, lambda: corpus.map(function, desc=stage, load_from_cache_file=False)))
                for workers in args.workers:
                    tasks = 2 * workers
                    if tasks not in shard_dirs:
                        shard_dirs[tasks] = write_shards(corpus, work / f"shards{tasks}", num_shards=tasks)
                    output = work / f"{stage}-x{workers}"
                    rows.append(measure(f"engine x{workers}", n, lambda: run_per_document(
                        function, shard_dirs[tasks], output, tasks=tasks, workers=workers)))
            except Exception as error:  # a stage from another branch that does not fit yet must not stop the others
                notes.append(f"{stage}: stopped ({type(error).__name__}: {error})")
            results[stage] = rows
        for stage, module, attribute in CORPUS_WIDE:
            target = available(module, attribute)
            if target is None:
                notes.append(f"{stage}: skipped ({module}.{attribute} is not available on this branch)")
                continue
            try:
                from moraft.data.cluster import ClusterOptions

                budget = ClusterOptions(context_tokens=8 * max(corpus["tokens"]))  # room for neighbours
                results[stage] = [measure("in-process", n, lambda: target(corpus, budget))]
            except Exception as error:
                notes.append(f"{stage}: stopped ({type(error).__name__}: {error})")

    ratios = {}
    print(f"{n} documents ({args.corpus}, {sum(corpus['tokens'])} tokens), {psutil.cpu_count()} CPUs")
    print(f"{'stage':<16}{'mode':<12}{'documents':>10}{'seconds':>10}{'documents/s':>13}{'peak PSS MiB':>14}"
          f"{'vs map':>8}")
    for stage, rows in results.items():
        baseline = rows[0]["documents_per_second"] if rows else None
        for row in rows:
            ratio = row["documents_per_second"] / baseline
            if row is not rows[0]:
                ratios[f"{stage} {row['mode']} / {rows[0]['mode']}"] = ratio
            print(f"{stage:<16}{row['mode']:<12}{row['documents']:>10}{row['seconds']:>10.2f}"
                  f"{row['documents_per_second']:>13.0f}{row['peak_mib']:>14.0f}{ratio:>8.2f}")
    for note in notes:
        print(f"note: {note}")
    report = {"corpus": args.corpus, "documents": n, "cpus": psutil.cpu_count(), "results": results,
              "ratios": ratios, "notes": notes}
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()

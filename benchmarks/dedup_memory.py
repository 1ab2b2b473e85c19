"""Memory of the corpus stage's deduplication state, per kept document: what stays in memory however the corpus is
read (streamed or not), since every kept document must be remembered to recognise its later copies.

Feeds ``N`` distinct documents (random MinHash signatures, distinct exact keys) to `moraft.data.corpus.Deduplicator`
and reports the growth of the process's resident memory divided by ``N``.

    python benchmarks/dedup_memory.py                 # near and exact, 100,000 documents each
    python benchmarks/dedup_memory.py --documents 20000 --modes exact
"""

from __future__ import annotations

import argparse

import numpy as np


def rss() -> int:
    """This process's resident memory in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def bytes_per_document(mode: str, documents: int, num_perm: int = 128) -> float:
    from moraft.data.corpus import Deduplicator, exact_key

    signatures = np.random.default_rng(0).integers(0, 2**32, size=(documents, num_perm), dtype=np.uint32)
    keys = [exact_key(str(i)) for i in range(documents)]
    dedup = Deduplicator(mode, 0.8, num_perm)
    before = rss()
    for i in range(documents):
        if dedup.check(keys[i], signatures[i]) is not None:
            raise SystemExit(f"document {i} was taken for a duplicate: the inputs are meant to be distinct")
    return (rss() - before) / documents


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--documents", type=int, default=100_000)
    parser.add_argument("--modes", nargs="+", default=["near", "exact"], choices=["near", "exact"])
    args = parser.parse_args(argv)
    report = {}
    for mode in args.modes:
        report[mode] = bytes_per_document(mode, args.documents)
        print(f"{mode}: {args.documents} kept documents, {report[mode]:.0f} bytes per document")
    return report


if __name__ == "__main__":
    main()

"""``moraft data`` on a corpus larger than the memory it is given: every stage, under a memory limit.

Writes a generated JSONL corpus of ``--gib`` GiB (documents of ``--words`` words: long texts, cut by the corpus stage
to ``--corpus.max_tokens``), trains a small BPE tokenizer on a sample of it (the pipeline tokenizer: the built-in
character tokenizer would make the run several times slower), then runs ``moraft data --corpus.streaming`` in a
child process. Where a memory cgroup can be made (cgroup v1 ``memory`` or cgroup v2, as root), the child runs inside
one limited to ``--limit_mib``: the run finishing without an OOM kill shows that memory stays bounded by the limit,
not by the corpus. Elsewhere the child's peak RSS is reported alone.

    sudo python benchmarks/data_memory.py                       # 2 GiB of JSONL under a 1,280 MiB limit
    python benchmarks/data_memory.py --gib 0.05 --limit_mib 0   # small, no cgroup
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_throughput import CONNECTIVES, WORDS  # noqa: E402  (the generated corpus's vocabulary, written once)

CGROUP_V1 = Path("/sys/fs/cgroup/memory")
CGROUP_V2 = Path("/sys/fs/cgroup")


def write_corpus(path: Path, gib: float, words: int, seed: int = 0) -> int:
    """Generated documents (sentences with AdaptLLM's connectives) until the file holds ``gib`` GiB; their count."""
    rng = random.Random(seed)
    target, written, count = gib * 2**30, 0, 0
    with path.open("w", encoding="utf-8") as f:
        while written < target:
            sentences = []
            for _ in range(words // 14):
                sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20)))
                if sentences and rng.random() < 1 / 3:
                    sentence = f"{rng.choice(CONNECTIVES)}, {sentence}"
                sentences.append(sentence[0].upper() + sentence[1:] + ".")
            line = json.dumps({"id": f"doc{count}", "text": " ".join(sentences)}) + "\n"
            f.write(line)
            written += len(line)
            count += 1
    return count


def train_tokenizer(corpus: Path, directory: Path, sample: int = 200) -> None:
    """A 4,096-token BPE tokenizer trained on the first ``sample`` documents, saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    with corpus.open(encoding="utf-8") as f:
        for line, _ in zip(f, range(sample)):
            texts.append(json.loads(line)["text"])
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=4096, special_tokens=["<unk>", "<s>", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(directory)


def memory_cgroup(limit_mib: int) -> tuple[Path, str] | None:
    """A new memory cgroup limited to ``limit_mib`` (its directory and version), or None where none can be made."""
    name = f"moraft-data-memory-{os.getpid()}"
    for root, version, limit_file in ((CGROUP_V2, "v2", "memory.max"), (CGROUP_V1, "v1", "memory.limit_in_bytes")):
        if version == "v2" and not (root / "cgroup.controllers").is_file():
            continue
        try:
            group = root / name
            group.mkdir()
            (group / limit_file).write_text(str(limit_mib * 2**20))
            return group, version
        except OSError:
            continue
    return None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=2.0, help="the corpus's size on disk")
    parser.add_argument("--words", type=int, default=30000, help="words per document")
    parser.add_argument("--limit_mib", type=int, default=1280, help="the memory cgroup's limit (0: no cgroup)")
    parser.add_argument("--work_dir", type=Path, default=None, help="for the corpus and the output (default: temp)")
    parser.add_argument("--output", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        corpus, tokenizer = work / "corpus.jsonl", work / "tokenizer"
        documents = write_corpus(corpus, args.gib, args.words)
        train_tokenizer(corpus, tokenizer)
        group = memory_cgroup(args.limit_mib) if args.limit_mib else None
        command = [sys.executable, "-m", "moraft", "data", "--corpus", str(corpus), "--corpus.streaming", "true",
                   "--tokenizer", str(tokenizer), "--output", str(work / "out"), "--mine.domain", "generated"]
        join = None
        if group is not None:  # the child joins the cgroup before it execs moraft
            procs = group[0] / "cgroup.procs"
            join = lambda: procs.write_text(str(os.getpid()))  # noqa: E731
        started = time.perf_counter()
        child = subprocess.run(command, preexec_fn=join, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        seconds = time.perf_counter() - started
        peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        stats = json.loads((work / "out" / "stats.json").read_text()) if child.returncode == 0 else None
        report = {"corpus_gib": corpus.stat().st_size / 2**30, "documents": documents, "exit": child.returncode,
                  "seconds": seconds, "peak_rss_mib": peak_mib, "limit_mib": args.limit_mib if group else None,
                  "cgroup": group[1] if group else None,
                  "stage_seconds": {k: v.get("seconds") for k, v in stats["stages"].items()} if stats else None}
        if group is not None:
            events = group[0] / ("memory.events" if group[1] == "v2" else "memory.oom_control")
            report["oom_kills"] = int(dict(line.split() for line in events.read_text().splitlines()).get("oom_kill", 0))
            group[0].rmdir()
    print(f"{report['documents']} documents, {report['corpus_gib']:.2f} GiB of JSONL; moraft data exit status "
          f"{report['exit']} after {seconds:.0f} s")
    if group is not None:
        print(f"memory cgroup ({group[1]}) limited to {args.limit_mib} MiB: {report['oom_kills']} OOM kills")
    else:
        print("no memory cgroup (not root, or none available): the peak RSS below is the only measure")
    print(f"peak RSS of the moraft data process: {peak_mib:.0f} MiB "
          f"({peak_mib / (report['corpus_gib'] * 1024):.2f} x the corpus's size)")
    if report["stage_seconds"]:
        print("seconds per stage: " + ", ".join(f"{k} {v}" for k, v in report["stage_seconds"].items() if v))
    if child.returncode != 0:
        print(child.stderr[-2000:])
    if args.output:
        args.output.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()

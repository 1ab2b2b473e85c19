#!/usr/bin/env python3
"""Rebuild tests/fixtures/debian/ (a small domain corpus and its multiple-choice task) from Debian's package index.

The source is the Debian bookworm ``main`` amd64 Packages index that apt keeps on this machine
(``/var/lib/apt/lists/deb.debian.org_debian_dists_bookworm_main_binary-amd64_Packages.lz4``). That index holds each
package's short description but not its long one (those are in the Translation-en files, which this machine does not
have), so each document is the package's index entry written out as sentences: its short description, version,
source package, maintainer, home page, dependencies, recommendations, suggestions and debtags.

- ``corpus.jsonl``: ``id`` (package name), ``title`` (short description), ``text``; ``--documents`` packages of one
  ``--section`` whose short description no other package of the section has, drawn with ``--seed``, sorted by name.
- ``tasks.jsonl``: ``--tasks`` questions in ``moraft eval --tasks`` format about packages of the corpus: half ask for
  a package's short description, half for the package with a given short description; each has 4 options, the 3
  wrong ones from other packages of the corpus, drawn with ``--seed``.

The same index and arguments give the same bytes. Decompression uses the ``lz4`` Python package when installed, else
the ``lz4cat`` command (Debian package ``lz4``); neither is a moraft dependency.

    python scripts/build_debian_fixture.py            # rewrites tests/fixtures/debian/{corpus,tasks}.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import subprocess
from pathlib import Path

INDEX = Path("/var/lib/apt/lists/deb.debian.org_debian_dists_bookworm_main_binary-amd64_Packages.lz4")
OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "debian"
MAX_LISTED = 8  # dependencies etc. listed per field, so that a document stays a paragraph


def read_index(path: Path) -> str:
    """The decompressed text of an lz4-compressed Packages index."""
    try:
        import lz4.frame
    except ImportError:
        return subprocess.run(["lz4cat", str(path)], check=True, capture_output=True).stdout.decode("utf-8")
    return lz4.frame.decompress(path.read_bytes()).decode("utf-8")


def paragraphs(text: str) -> list[dict[str, str]]:
    """The deb822 paragraphs of an index: field name -> value, continuation lines joined by spaces."""
    found = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        name = None
        for line in block.splitlines():
            if line.startswith((" ", "\t")) and name:
                fields[name] += " " + line.strip()
            elif ":" in line:
                name, _, value = line.partition(":")
                fields[name] = value.strip()
        if "Package" in fields:
            found.append(fields)
    return found


def names(relation: str) -> list[str]:
    """The package names of a relation field, without versions or architectures ("a (>= 1) | b" -> ["a or b"])."""
    listed = []
    for clause in relation.split(","):
        alternatives = [re.split(r"[\s(:\[]", option.strip(), maxsplit=1)[0] for option in clause.split("|")]
        listed.append(" or ".join(a for a in alternatives if a))
    return [item for item in listed if item]


def listing(items: list[str]) -> str:
    shown = items[:MAX_LISTED]
    more = len(items) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more else "")


def document(fields: dict[str, str], section: str) -> dict[str, str]:
    """One corpus row: the index entry of a package written out as sentences."""
    package, summary = fields["Package"], fields["Description"]
    sentences = [f"{package} is a Debian package in the {section} section: {summary}."]
    source = fields.get("Source", package).split(" ")[0]
    built = f" It is built from the source package {source}." if source != package else ""
    sentences.append(f"Debian bookworm ships version {fields['Version']}.{built}")
    maintainer = fields["Maintainer"].split("<")[0].strip()
    sentences.append(f"It is maintained by {maintainer}.")
    if "Homepage" in fields:
        sentences.append(f"Its home page is {fields['Homepage']}.")
    for field, verb in (("Depends", "depends on"), ("Recommends", "recommends"), ("Suggests", "suggests")):
        if fields.get(field):
            sentences.append(f"{package} {verb} {listing(names(fields[field]))}.")
    if fields.get("Tag"):
        tags = [tag.strip() for tag in fields["Tag"].split(",")]
        sentences.append(f"Its debtags are {listing(tags)}.")
    return {"id": package, "title": summary, "text": " ".join(sentences)}


def build(index: str, section: str, documents: int, tasks: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(corpus rows, task rows) from the text of the index (see the module docstring)."""
    entries: dict[str, dict[str, str]] = {}
    for fields in paragraphs(index):
        if fields.get("Section") == section:
            entries.setdefault(fields["Package"], fields)  # the first entry of a package listed twice
    count: dict[str, int] = {}
    for fields in entries.values():
        count[fields["Description"]] = count.get(fields["Description"], 0) + 1
    # a task's right option must be the only one true, so shared short descriptions ("... (data files)") are out
    unique = sorted(name for name, fields in entries.items() if count[fields["Description"]] == 1)
    rng = random.Random(seed)
    chosen = sorted(rng.sample(unique, min(documents, len(unique))))
    corpus = [document(entries[name], section) for name in chosen]
    rows = []
    for number, row in enumerate(rng.sample(corpus, min(tasks, len(corpus)))):
        others = rng.sample([other for other in corpus if other is not row], 3)
        answer = rng.randrange(4)
        options = [*others[:answer], row, *others[answer:]]
        if number % 2 == 0:
            prompt = f"Debian package {row['id']}: its short description is"
            texts = [option["title"] for option in options]
        else:
            prompt = f'The Debian package whose short description is "{row["title"]}" is named'
            texts = [option["id"] for option in options]
        rows.append({"id": f"{section}-{number:03d}", "prompt": prompt, "options": texts, "answer": answer})
    return corpus, rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    partial.replace(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--index", type=Path, default=INDEX, help="the lz4-compressed Packages index")
    parser.add_argument("--out", type=Path, default=OUT, help="where corpus.jsonl and tasks.jsonl go")
    parser.add_argument("--section", default="science", help="the Debian section of the corpus")
    parser.add_argument("--documents", type=int, default=300, help="packages in the corpus")
    parser.add_argument("--tasks", type=int, default=100, help="multiple-choice questions")
    parser.add_argument("--seed", type=int, default=0, help="seed of the packages, questions and wrong options")
    args = parser.parse_args(argv)
    if not args.index.is_file():
        parser.error(f"{args.index} does not exist (Debian's bookworm Packages index, kept by apt)")
    text = read_index(args.index)
    corpus, rows = build(text, args.section, args.documents, args.tasks, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "corpus.jsonl", corpus)
    write_jsonl(args.out / "tasks.jsonl", rows)
    # the SHA256 of the uncompressed index, as the suite's signed InRelease file lists it
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    print(f"{len(corpus)} documents, {len(rows)} tasks in {args.out} from {args.index.name}; Packages sha256 {digest}")


if __name__ == "__main__":
    main()

"""The corpus stage of ``moraft data``: raw documents in, one cleaned, cut and deduplicated text per row out.

Every later stage reads its output, the *corpus dataset*: a ``datasets.Dataset`` with columns ``id`` (str),
``title`` (str or None), ``text`` (cleaned, cut to at most ``max_tokens`` tokens) and ``tokens`` (the token count of
``text`` with the pipeline tokenizer, special tokens not counted), in the order of the input.

What it reads (``CorpusOptions.path``):

- a directory of text files (``.txt``, ``.text``, ``.md``, ``.rst``, also compressed ``.gz``/``.bz2``/``.xz``/
  ``.zst``), or one such file: one document per file, its path relative to the directory as its id. The
  first line is taken as the title when it looks like one (see `split_title`). A file that is empty, not UTF-8 or
  cannot be decompressed is skipped, counted and named, never fatal. Symbolic links are followed only where they
  resolve inside the directory (`corpus_files`; ``follow_symlinks`` for the others);
- a JSON Lines file or a directory of them: one document per line, read line by line (`read_json_lines`), so that a
  line that is not UTF-8 or not a JSON object is skipped, counted and listed with its line number, never fatal;
- a JSON array, Parquet, Arrow or CSV file, or a directory of them: one document per row, from ``text_field``
  (``title_field`` and ``id_field`` when present; absent ids are generated from the row's position, ``doc-000123``);
- a directory written by ``Dataset.save_to_disk`` (a ``DatasetDict``: ``split``).

A row whose text is not a string is dropped as ``not_string``; a document whose id an earlier one has is kept, counted
and named, since every later stage joins the corpus by row and an id only names a document in messages.

Each document is then cleaned (`clean_text`, language-agnostic), dropped when shorter than ``min_chars``, cut to
``max_tokens`` at the last sentence or line boundary (AdaptLLM cuts each text to about 1,850 tokens: arXiv 2309.09530,
https://github.com/microsoft/LMOps/tree/main/adaptllm), and deduplicated, keeping the first of each group: exact
(a 16-byte BLAKE2b of the text with its whitespace normalized) and near (MinHash signatures of word 5-gram shingles
with datasketch, candidates by LSH bands, Jaccard >= ``near_threshold``; the 5-grams and 0.8 of Lee et al.,
arXiv 2107.06499).

Memory: without ``streaming`` the input and output are Arrow files, memory-mapped; cleaning, cutting, hashing and the
MinHash signatures run in ``num_proc`` processes (``Dataset.map``), and one ordered pass then keeps the first of each
group. With ``streaming`` the input is read as it goes (``streaming=True``; text files one at a time) and the output
is written by ``Dataset.from_generator`` in batches, in one process. In both, what stays in memory per *kept* document
is the dedup state: an exact key (a 16-byte ``bytes`` in a set: 44 bytes measured, with Python's overhead) and, for
near dedup, its signature and band keys (`Deduplicator`: about 2.1 KB measured at 128 permutations).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import sys
import time
import unicodedata
import uuid
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Iterator, Literal, Optional

import numpy as np
import regex

from ..errors import MissingPathError, UserError
from ..train.data import BUILDERS, COMPRESSIONS, _builder, _datasets_errors
from ..train.options import _Group
from .disk import guarded

if TYPE_CHECKING:
    from datasets import Dataset

DEDUPS = ("near", "exact", "none")
DROP_REASONS = ("empty", "not_string", "not_utf8", "not_json", "unreadable", "too_short", "exact_duplicate",
                "near_duplicate")
WARN_FIRST = 5  # skipped files, lines and duplicate ids named in a warning line (the report lists more)
LINES_LISTED = 1000  # bad lines of JSON Lines files listed in the report (all of them are counted)
# a long document (a book) is tokenized only as far as its budget can reach: its first max_tokens * HEAD_CHARS
# characters, enough unless its tokens are longer than 16 characters on average (then it is tokenized whole)
HEAD_CHARS = 16
BATCH = 256  # documents per batch: tokenized together, and the unit of streamed processing
OUTPUT_COLUMNS = ("id", "title", "text", "tokens")


@dataclass
class CorpusOptions(_Group):
    """The corpus: where it is, how it is cleaned, cut and deduplicated."""

    GROUP: ClassVar[str] = "corpus"
    SHORTCUT: ClassVar[Optional[str]] = "path"

    path: str = ""
    """The raw corpus: a directory of text files (.txt, .md, .rst, also compressed .gz/.bz2/.xz/.zst), one document
    per file; a JSONL/JSON, Parquet, Arrow or CSV file or a directory of them, one document per row; or a directory
    written by Dataset.save_to_disk."""
    text_field: str = "text"
    """Data files: the column holding each document's text."""
    title_field: Optional[str] = "title"
    """Data files: the column holding each document's title, used when present (text files: the first line when it
    looks like a title)."""
    id_field: Optional[str] = "id"
    """Data files: the column holding each document's id, used when present; otherwise doc-000123 from the row's
    position in the input (text files: the file's path in the directory)."""
    split: str = "train"
    """A save_to_disk DatasetDict: the split to read (data files have one split, train)."""
    min_chars: int = 100
    """Documents shorter than this many characters after cleaning are dropped (too_short)."""
    max_tokens: int = 1850
    """Each text is cut to at most this many tokens of the pipeline tokenizer, at the last sentence or line boundary
    within the budget (AdaptLLM: about 1,850)."""
    dedup: Literal["near", "exact", "none"] = "near"
    """Duplicate removal, keeping the first of each group: near (exact, then MinHash LSH over word shingles), exact
    (identical text up to whitespace) or none."""
    near_threshold: float = 0.8
    """near: the Jaccard similarity of two documents' word shingles from which the later one is a duplicate."""
    shingle_words: int = 5
    """near: words per shingle (characters for scripts written without spaces, such as Chinese and Japanese)."""
    num_perm: int = 128
    """near: MinHash permutations (more: a closer Jaccard estimate, more time and memory)."""
    streaming: bool = False
    """Read the corpus as it goes and write the result in batches, so that memory stays bounded for corpora larger
    than memory (one process; num_proc is not used)."""
    follow_symlinks: bool = False
    """A directory: also read the files and directories that symbolic links inside it point to outside it (by default
    such links are skipped and named in the report; links that stay inside the directory are always followed)."""

    def validate(self) -> None:
        self._check(isinstance(self.path, str) and bool(self.path), "path", "the corpus's file or directory")
        self._check(bool(self.text_field), "text_field", "a column name")
        self._integer("min_chars", 0)
        self._integer("max_tokens", 1)
        self._choice("dedup", DEDUPS)
        self._check(isinstance(self.near_threshold, (int, float)) and 0 < self.near_threshold <= 1, "near_threshold",
                    "a Jaccard similarity in (0, 1]")
        self._integer("shingle_words", 1)
        self._integer("num_perm", 2)


# -- cleaning ----------------------------------------------------------------------------------------------------------

# invisible characters that only get in the way of matching: zero-width space, word joiner, byte-order mark, soft
# hyphen. ZWNJ and ZWJ (U+200C, U+200D) are kept: Persian, the Indic scripts and emoji sequences need them.
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u2060\ufeff\u00ad"))
_LINE_BREAKS = regex.compile(r"\r\n?|[\v\f\x85\u2028\u2029]")
_CONTROL = regex.compile(r"[^\P{Cc}\n]")  # control characters, the newline excepted (tabs become spaces first)
_SPACES = regex.compile(r"[\t\p{Zs}]+")  # tabs, NBSP, the em/en/ideographic spaces ... and runs of them
_BLANK_LINES = regex.compile(r"\n{3,}")


def clean_text(text: str) -> str:
    """Clean a text without assuming its language.

    Unicode NFC; every line break (``\\r\\n``, ``\\r``, U+2028 ...) becomes ``\\n``; control characters and the
    invisible zero-width space, word joiner, byte-order mark and soft hyphen are removed (ZWNJ and ZWJ are kept: scripts
    such as Persian need them); tabs and Unicode spaces (NBSP, ideographic space ...) become one space per run; each
    line is trimmed; more than two newlines become two. Nothing else changes: no stopwords, no language filter, no
    guessing at mojibake (ftfy's ``fix_text`` rewrites quotes and guesses encodings, which changes correct text).

    Args:
        text: The raw text.

    Returns:
        The cleaned text, with no leading or trailing whitespace.
    """
    text = unicodedata.normalize("NFC", text).translate(_INVISIBLE)
    text = _CONTROL.sub("", _LINE_BREAKS.sub("\n", text).replace("\t", " "))
    text = "\n".join(line.strip() for line in _SPACES.sub(" ", text).split("\n"))
    return _BLANK_LINES.sub("\n\n", text).strip()


_TITLE_MAX_CHARS = 200
_RST_UNDERLINE = regex.compile(r"([=\-~^\"'`#*+.:_])\1{2,}")
_SENTENCE_END = regex.compile(r"\p{Sentence_Terminal}[\p{Pe}\p{Pf}\"']*$")


def split_title(text: str) -> tuple[Optional[str], str]:
    """The title of a cleaned text file and the text after it, when its first line looks like a title.

    The first line is a title when it is a Markdown heading (``# Title``), is underlined as in reStructuredText, or is
    followed by a blank line, is at most 200 characters and does not end a sentence (``.``, ``!``, ``?``, ``。``, ``؟``
    ...: Unicode's Sentence_Terminal); and the text goes on after it. The title is removed from the text, as in
    AdaptLLM's format (title on the first line, then the text).

    Args:
        text: A cleaned text (see `clean_text`).

    Returns:
        ``(title, rest)``, or ``(None, text)`` when the first line is not a title.
    """
    first, _, rest = text.partition("\n")
    heading = regex.match(r"#{1,6} +(.+)", first)
    if heading:
        title = heading.group(1).rstrip("# ").strip()
    else:
        underline, _, after = rest.partition("\n")
        if _RST_UNDERLINE.fullmatch(underline) and len(underline) >= len(first) // 2:
            rest = after
        elif not rest.startswith("\n"):
            return None, text
        title = first
        if len(title) > _TITLE_MAX_CHARS or _SENTENCE_END.search(title):
            return None, text
    rest = rest.strip()
    if not title or not rest:
        return None, text
    return title, rest


# -- cutting to the token budget ---------------------------------------------------------------------------------------

# where a text may be cut: after a line, or after a sentence terminal (with its closing quotes and brackets) that is
# followed by whitespace (so "3.14" and "e.g." are not cut), or after an ideographic/full-width terminal, which is
# written without a space after it in Chinese and Japanese
_BOUNDARY = regex.compile(r"\n|\p{Sentence_Terminal}[\p{Pe}\p{Pf}\"']*(?=\s)|[。！？｡][\p{Pe}\p{Pf}」』]*")


def _encode(tokenizer, texts: list[str]) -> list:
    """A fast tokenizer's encodings, from its Rust backend directly (in parallel threads, and without transformers
    converting every field of every encoding to Python lists, which costs as much as tokenizing)."""
    return tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)


def _count(tokenizer, text: str) -> int:
    if tokenizer.is_fast:
        return len(tokenizer.backend_tokenizer.encode(text, add_special_tokens=False))
    # verbose=False: counting tokens of a text longer than the model's context is what this stage is for
    return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _budget_end(tokenizer, text: str, max_tokens: int) -> int:
    """How many characters of ``text`` its first ``max_tokens`` tokens cover (``text`` is longer than that)."""
    if tokenizer.is_fast:
        encoding = _encode(tokenizer, [text[:max_tokens * HEAD_CHARS]])[0]
        if len(encoding) <= max_tokens:  # tokens of more than HEAD_CHARS characters on average: all of it
            encoding = _encode(tokenizer, [text])[0]
        return encoding.token_to_chars(max_tokens - 1)[1]
    low, high = 0, len(text)  # a slow tokenizer has no offsets: the longest prefix within the budget, by bisection
    while low < high:
        middle = (low + high + 1) // 2
        if _count(tokenizer, text[:middle]) <= max_tokens:
            low = middle
        else:
            high = middle - 1
    return low


def _cut_at(text: str, end: int) -> int:
    """The last boundary at or before character ``end``: a sentence or line, else a space, else ``end``."""
    # one character past the budget, so that a terminal right at its end can see the space after it
    cuts = [m.end() for m in _BOUNDARY.finditer(text[:end + 1]) if m.end() <= end]
    space = text[:end + 1].rfind(" ")
    return cuts[-1] if cuts else space if space > 0 else end


def cut_to_tokens(text: str, tokenizer: Any, max_tokens: int) -> tuple[str, int]:
    """Cut ``text`` to at most ``max_tokens`` tokens, at the last sentence or line boundary within the budget.

    Without a boundary in the budget (one very long sentence), at the last space; without a space, at the last token
    that fits. Special tokens (BOS, EOS) are not counted.

    Args:
        text: A cleaned text.
        tokenizer: The pipeline tokenizer (a transformers tokenizer; a fast one is used with its offsets).
        max_tokens: The budget.

    Returns:
        The cut text and its number of tokens.
    """
    count = _count(tokenizer, text[:max_tokens * HEAD_CHARS])
    if count <= max_tokens and len(text) > max_tokens * HEAD_CHARS:
        count = _count(tokenizer, text)
    if count <= max_tokens:
        return text, count
    end = _budget_end(tokenizer, text, max_tokens)
    while end > 0:
        cut = _cut_at(text, end)
        piece = text[:cut].rstrip()
        count = _count(tokenizer, piece)
        if piece and count <= max_tokens:
            return piece, count
        # a tokenizer can merge across the cut so that the piece is longer than its share of the whole: cut earlier
        end = cut - 1 if cut < end else end - 1
    return "", 0


def cut_batch(texts: list[str], tokenizer, max_tokens: int) -> list[tuple[str, int]]:
    """`cut_to_tokens` of each text, a batch at a time: with a fast tokenizer, the texts (each only as far as its
    budget can reach) and then the cut pieces are tokenized in one call each; a piece over the budget (a merge across
    its cut) goes through `cut_to_tokens`."""
    if not tokenizer.is_fast:
        return [cut_to_tokens(text, tokenizer, max_tokens) for text in texts]
    head = max_tokens * HEAD_CHARS
    results: list[Optional[tuple[str, int]]] = [None] * len(texts)
    cuts: dict[int, str] = {}
    for i, (text, encoding) in enumerate(zip(texts, _encode(tokenizer, [text[:head] for text in texts]))):
        if len(encoding) > max_tokens:
            cuts[i] = text[:_cut_at(text, encoding.token_to_chars(max_tokens - 1)[1])].rstrip()
        elif len(text) <= head:
            results[i] = (text, len(encoding))
        else:
            results[i] = cut_to_tokens(text, tokenizer, max_tokens)
    for (i, piece), encoding in zip(cuts.items(), _encode(tokenizer, list(cuts.values()))):
        fits = piece and len(encoding) <= max_tokens
        results[i] = (piece, len(encoding)) if fits else cut_to_tokens(texts[i], tokenizer, max_tokens)
    return results


# -- deduplication -----------------------------------------------------------------------------------------------------

_WORDS = regex.compile(r"[\p{Han}\p{Hiragana}\p{Katakana}\p{Thai}\p{Lao}\p{Khmer}\p{Myanmar}]|[\p{L}\p{M}\p{N}]+")


def exact_key(text: str) -> bytes:
    """The 16-byte key of exact duplicates: BLAKE2b of the text with its whitespace normalized."""
    return hashlib.blake2b(" ".join(text.split()).encode(), digest_size=16).digest()


def shingles(text: str, size: int = 5) -> set[bytes]:
    """The word ``size``-grams of a text, casefolded; a character of a script written without spaces (Chinese,
    Japanese, Thai ...) counts as a word, so the same Jaccard works in every language."""
    words = _WORDS.findall(text.casefold())
    return {" ".join(words[i:i + size]).encode() for i in range(max(1, len(words) - size + 1))}


_PERMUTATIONS: dict[int, Any] = {}


def _minhash(num_perm: int, hashvalues: Any = None):
    """A datasketch MinHash (scheme affine32) with the permutations of seed 1 made once per process (datasketch draws them again for
    every new MinHash, which costs more than hashing a document's shingles)."""
    from datasketch import MinHash

    if num_perm not in _PERMUTATIONS:
        _PERMUTATIONS[num_perm] = MinHash(num_perm=num_perm, scheme="affine32").permutations
    # CRC-32 as the base hash of a shingle: the permutations make the independent hash functions, the base hash only
    # has to spread distinct shingles over 32 bits, and it is five times faster than datasketch's default SHA-1
    return MinHash(num_perm=num_perm, hashvalues=hashvalues, permutations=_PERMUTATIONS[num_perm], scheme="affine32",
                   hashfunc=zlib.crc32)


def minhash_signature(text: str, num_perm: int = 128, size: int = 5) -> "Any":
    """The MinHash signature (datasketch, ``num_perm`` uint32 values) of a text's word shingles."""
    minhash = _minhash(num_perm)
    minhash.update_batch(list(shingles(text, size)))
    return minhash.hashvalues


# LSH bands tuned for recall (false negatives weigh 0.9, false positives 0.1 in datasketch's choice of bands): at 0.8,
# 14 bands of 9 rows find 87% of the pairs of Jaccard 0.8, 97.5% at 0.85, 99.9% at 0.9, where the even weights' 9 bands
# of 13 find 40%, 69%, 93%. The false positives this lets in are removed by comparing the signatures themselves.
RECALL_WEIGHTS = (0.1, 0.9)


class Deduplicator:
    """Keeps the first of each group of duplicates, fed documents in order.

    Exact keys are kept in a set. A near duplicate is a document whose estimated Jaccard similarity (the share of equal
    MinHash values) with a kept document reaches the threshold, among the candidates that share a band of their
    signatures with it (LSH, with datasketch's choice of bands and rows). Duplicates are not indexed.

    The band index is one dict from a band's 64-bit hash to the first kept document with that band, and the kept
    signatures are stored in blocks of a uint32 array: about 2 KB per kept document at 128 permutations, against about
    6 KB in datasketch's ``MinHashLSH`` (a set per bucket, and each key's band values kept twice). A bucket remembers
    only its first document, so a document is compared with the first of each bucket it falls in.
    """

    BLOCK = 1 << 16  # signatures per block of the store

    def __init__(self, mode: str, threshold: float = 0.8, num_perm: int = 128):
        self.mode = mode
        self.num_perm = num_perm
        self.threshold = threshold
        self.keys: set[bytes] = set()
        self.buckets: dict[int, int] = {}
        self.blocks: list[np.ndarray] = []
        self.kept = 0
        if mode == "near":
            from datasketch import MinHashLSH

            lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=RECALL_WEIGHTS)
            self.bands = [(i * lsh.r, (i + 1) * lsh.r) for i in range(lsh.b)]

    def _signature(self, index: int) -> np.ndarray:
        return self.blocks[index // self.BLOCK][index % self.BLOCK]

    def check(self, key: bytes, signature: Any = None) -> Optional[str]:
        """None when the document is kept (and remembered), else the reason it is dropped."""
        if self.mode == "none":
            return None
        if key in self.keys:
            return "exact_duplicate"
        if self.mode == "near":
            signature = np.asarray(signature, dtype=np.uint32)
            # Python's hash of bytes is seeded per process; the index lives in one process, and a 64-bit collision
            # between different bands is too rare to change a result
            bands = [hash(i.to_bytes(2, "little") + signature[start:end].tobytes())
                     for i, (start, end) in enumerate(self.bands)]
            candidates = {self.buckets[band] for band in bands if band in self.buckets}
            for candidate in sorted(candidates):
                if np.mean(self._signature(candidate) == signature) >= self.threshold:
                    return "near_duplicate"
            index = self.kept
            if index % self.BLOCK == 0:
                self.blocks.append(np.empty((self.BLOCK, self.num_perm), dtype=np.uint32))
            self.blocks[-1][index % self.BLOCK] = signature
            for band in bands:
                self.buckets.setdefault(band, index)
        self.keys.add(key)
        self.kept += 1
        return None


# -- reading -----------------------------------------------------------------------------------------------------------


def corpus_files(root: Path, follow_symlinks: bool = False) -> tuple[list[Path], list[dict]]:
    """The files under the directory ``root`` (subdirectories included), in sorted path order, and the symbolic links
    skipped.

    A link (to a file or a directory) is followed when it resolves inside ``root``; one that points outside it is
    skipped (``symlink_outside``) unless ``follow_symlinks``, so that a link to ``/etc/passwd`` never becomes a
    document unasked. A link to nothing is skipped (``broken_symlink``). A directory reached twice (a link back to a
    parent, a link to a sibling) is read once, by its own path where the walk reaches that first.

    Returns:
        ``(files, skipped)``: skipped is a list of ``{"file", "reason"}``.
    """
    inside = root.resolve()

    def outside(path: Path) -> bool:
        try:
            path.resolve().relative_to(inside)
        except ValueError:
            return True
        return False

    files: list[Path] = []
    skipped: list[dict] = []
    visited: set[Path] = set()
    for directory, subdirectories, names in os.walk(root, followlinks=True):
        here = Path(directory)
        real = here.resolve()
        if real in visited:  # a loop of links, or a second link to a directory already read
            subdirectories[:] = []
            continue
        visited.add(real)
        followed = []
        # real directories first: a directory reached both directly and through a link is read by its own path
        for name in sorted(subdirectories, key=lambda name: ((here / name).is_symlink(), name)):
            path = here / name
            if path.is_symlink() and not follow_symlinks and outside(path):
                skipped.append({"file": str(path), "reason": "symlink_outside"})
            else:
                followed.append(name)
        subdirectories[:] = followed
        for name in names:
            path = here / name
            if path.is_symlink():
                if not path.exists():
                    skipped.append({"file": str(path), "reason": "broken_symlink"})
                    continue
                if not follow_symlinks and outside(path):
                    skipped.append({"file": str(path), "reason": "symlink_outside"})
                    continue
            if path.is_file():
                files.append(path)
    return sorted(files), sorted(skipped, key=lambda item: item["file"])


def _list_files(root: Path, options: CorpusOptions, skipped: list[dict]) -> tuple[str, list[Path]]:
    """The kind (``text`` or a datasets builder) and the files of a corpus path; the links not followed are added to
    ``skipped`` (those that would have been read: a corpus file's name, or a directory)."""
    if root.is_file():
        return (_builder(root) or "text"), [root]
    listed, links = corpus_files(root, options.follow_symlinks)
    skipped.extend(link for link in links if _builder(Path(link["file"])) or Path(link["file"]).is_dir())
    files = [p for p in listed if not p.name.startswith(".")]
    kinds: dict[str, list[Path]] = {}
    for file in files:
        kind = _builder(file)
        if kind is not None:
            kinds.setdefault(kind, []).append(file)
    if not kinds:
        raise UserError(f"corpus.path {str(root)!r} holds no corpus files (expected text files .txt, .md, .rst, or "
                        f"data files {', '.join(sorted(set(BUILDERS) - {'.txt', '.text', '.md', '.rst'}))}, also "
                        f"compressed {', '.join(COMPRESSIONS)}; or a Dataset.save_to_disk directory)")
    if len(kinds) > 1:
        found = ", ".join(f"{len(files)} {kind}" for kind, files in sorted(kinds.items()))
        raise UserError(f"corpus.path {str(root)!r} mixes kinds of files ({found}); give a directory of one kind")
    ((kind, files),) = kinds.items()
    return kind, files


def read_text_files(files: list[tuple[str, str]]) -> Iterator[dict]:
    """One raw row per text file ``(id, path)``: ``id``, ``title`` (None), ``text`` and ``skip`` (None, or why the
    file is skipped: ``empty``, ``not_utf8``, ``unreadable``), decompressing by the file's suffix (fsspec)."""
    import fsspec

    for doc_id, path in files:
        row = {"id": doc_id, "title": None, "text": None, "skip": None}
        try:
            with fsspec.open(path, "rb", compression="infer") as handle:
                data = handle.read()
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            row["skip"] = "not_utf8"
        except Exception:  # noqa: BLE001 - each codec raises its own error class for a damaged archive
            row["skip"] = "unreadable"
        else:
            if not text.strip():
                row["skip"] = "empty"
            else:
                row["text"] = text
        yield row


def _text_file_args(root: Path, files: list[Path]) -> list[tuple[str, str]]:
    base = root if root.is_dir() else root.parent
    return [(file.relative_to(base).as_posix(), str(file)) for file in files]


def _raw_features():
    from datasets import Features, Value

    return Features({"id": Value("string"), "title": Value("string"), "text": Value("string"),
                     "skip": Value("string")})


def _skip_reason(err: BaseException) -> str:
    cause: Optional[BaseException] = err
    while cause is not None:
        if isinstance(cause, UnicodeDecodeError):
            return "not_utf8"
        cause = cause.__cause__ or cause.__context__
    return "unreadable"


def _load_data_files(kind: str, files: list[Path], streaming: bool, skipped: list[dict]) -> Iterable:
    """The rows of data files as one dataset (an iterable of rows when streaming), files that cannot be read skipped
    and listed in ``skipped``."""
    import datasets
    from datasets.utils import logging as datasets_logging

    readable = []
    for file in files:
        # pyarrow's JSON and CSV readers take invalid UTF-8 into string columns unchecked (it fails later, on
        # reading): check text formats here, in one pass of an incremental decoder
        reason = "empty" if file.stat().st_size == 0 else _text_file_problem(file) if kind in ("json", "csv") else None
        if reason:
            skipped.append({"file": str(file), "reason": reason})
        else:
            readable.append(file)
    sep = {"sep": "\t"} if kind == "csv" and any(".tsv" in f.suffixes for f in readable) else {}

    def load(group: list[Path]):
        return datasets.load_dataset(kind, data_files=[str(f) for f in group], split="train", streaming=streaming,
                                     **sep)

    if streaming:
        return _stream_files(load, readable, skipped)
    if not readable:
        return []
    bar = datasets_logging.is_progress_bar_enabled()
    try:
        return load(readable)
    except Exception:  # noqa: BLE001 - one bad file fails the whole load: read them one by one to find it
        if bar:
            datasets_logging.enable_progress_bar()
    parts = []
    for file in readable:
        try:
            parts.append(load([file]))
        except Exception as err:  # noqa: BLE001
            skipped.append({"file": str(file), "reason": _skip_reason(err)})
    return datasets.concatenate_datasets(parts) if parts else []


def _text_file_problem(path: Path, chunk: int = 1 << 20) -> Optional[str]:
    """``not_utf8``, ``empty`` (only whitespace) or ``unreadable`` for a text data file with that problem, else None."""
    import codecs

    import fsspec

    decoder = codecs.getincrementaldecoder("utf-8")()
    blank = True
    try:
        with fsspec.open(str(path), "rb", compression="infer") as handle:
            while data := handle.read(chunk):
                blank = blank and not decoder.decode(data).strip()
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return "not_utf8"
    except Exception:  # noqa: BLE001 - each codec raises its own error class for a damaged archive
        return "unreadable"
    return "empty" if blank else None


def _stream_files(load: Callable, files: list[Path], skipped: list[dict]) -> Iterator[dict]:
    for file in files:
        try:
            yield from load([file])
        except Exception as err:  # noqa: BLE001 - a file that fails midway keeps the rows read before the error
            skipped.append({"file": str(file), "reason": _skip_reason(err)})


def _check_columns(columns: Iterable[str], options: CorpusOptions) -> None:
    columns = list(columns)
    if options.text_field not in columns:
        raise UserError(f"corpus {options.path!r} has no text column {options.text_field!r} (set corpus.text_field); "
                        f"its columns are: {', '.join(columns)}")


def _fields_of(row: dict, fields: tuple[str, Optional[str], Optional[str]]) -> dict:
    """A data file's row as ``id`` (a str, or None to generate one), ``title`` (a str or None), ``text`` and ``skip``:
    ``not_string`` when the text is not a string (a number, a list, null or missing), else None."""
    text_field, title_field, id_field = fields
    doc_id = row.get(id_field) if id_field else None
    title = row.get(title_field) if title_field else None
    text = row.get(text_field)
    return {
        "id": None if doc_id is None or doc_id == "" else str(doc_id),
        "title": title if isinstance(title, str) else None,
        "text": text if isinstance(text, str) else None,
        "skip": None if isinstance(text, str) else "not_string",
    }


def _normalize_row(row: dict, index: int, fields: tuple[str, Optional[str], Optional[str]], normalized: bool) -> dict:
    """A raw row of any source as ``id``, ``title``, ``text``, ``skip`` (why it has no text). The rows of moraft's own
    readers (`read_text_files`, `read_json_lines`) are already in this form; a data file's own columns are never taken
    for ``skip``."""
    row = row if normalized else _fields_of(row, fields)
    return {**row, "id": f"doc-{index:06d}" if row["id"] is None or row["id"] == "" else row["id"]}


# -- JSON Lines: read line by line, so that a bad line costs that line alone -------------------------------------------


def _json_line(raw: bytes, first: bool, fields: tuple) -> tuple[Optional[dict], Optional[str], Iterable[str]]:
    """One line of a JSON Lines file: ``(row, None, keys)`` (the row as `_fields_of` gives it, the object's keys),
    ``(None, reason, ())`` for a bad line (``not_utf8``; ``not_json``: not JSON, or JSON that is not an object), or
    ``(None, None, ())`` for a blank line."""
    if first:
        raw = raw.removeprefix(codecs.BOM_UTF8)
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "not_utf8", ()
    if not line.strip():
        return None, None, ()
    try:
        value = json.loads(line)
    except ValueError:
        return None, "not_json", ()
    if not isinstance(value, dict):
        return None, "not_json", ()
    row = _fields_of(value, fields)
    try:  # JSON escapes can write a lone surrogate ("\ud800"), which is no UTF-8 text and no Arrow string
        for name in ("id", "title", "text"):
            if row[name] is not None:
                row[name].encode("utf-8")
    except UnicodeEncodeError:
        return None, "not_utf8", ()
    return row, None, value.keys()


def _is_json_array(path: Path) -> bool:
    """Whether a JSON file holds one array (its first character, after whitespace, is ``[``) rather than lines."""
    import fsspec

    try:
        with fsspec.open(str(path), "rb", compression="infer") as handle:
            while chunk := handle.read(1 << 16):
                head = chunk.removeprefix(codecs.BOM_UTF8).lstrip()
                if head:
                    return head.startswith(b"[")
    except Exception:  # noqa: BLE001 - unreadable: read as lines, where it is skipped and named
        return False
    return False


def _scan_json_lines(path: Path, fields: tuple) -> tuple[int, Counter, list[tuple[int, str]], dict]:
    """One pass over a JSON Lines file before it is read: its good lines, its bad lines counted by reason (the first
    `LINES_LISTED` of them with their line numbers) and the keys its objects have."""
    import fsspec

    good, counts, bad, keys = 0, Counter(), [], {}
    with fsspec.open(str(path), "rb", compression="infer") as handle:
        for number, raw in enumerate(handle, 1):
            row, reason, names = _json_line(raw, number == 1, fields)
            if reason is not None:
                counts[reason] += 1
                if len(bad) < LINES_LISTED:
                    bad.append((number, reason))
            elif row is not None:
                good += 1
                keys.update(dict.fromkeys(names))
    return good, counts, bad, keys


def _json_lines_files(files: list[Path], options: CorpusOptions, report: dict) -> list[tuple[str, int, int]]:
    """The JSON Lines files to read, as ``(path, size, mtime)``, after one pass over each: a bad line is counted
    (``documents_in``, ``dropped``) and listed (``lines_skipped``); a file with no good line is skipped and named
    (``files_skipped``: ``empty``, or its bad lines' most common reason; ``unreadable`` if it cannot be read
    through)."""
    fields = (options.text_field, options.title_field, options.id_field)
    stamps, columns = [], {}
    for file in files:
        try:
            good, counts, bad, keys = _scan_json_lines(file, fields)
        except Exception:  # noqa: BLE001 - each codec raises its own error class for a damaged archive
            report["files_skipped"].append({"file": str(file), "reason": "unreadable"})
            continue
        if good == 0:
            reason = counts.most_common(1)[0][0] if counts else "empty"  # a binary file: mostly not_utf8
            report["files_skipped"].append({"file": str(file), "reason": reason})
            continue
        for reason, count in counts.items():
            report["dropped"][reason] += count
            report["documents_in"] += count
        listed = report["lines_skipped"]
        listed["count"] += sum(counts.values())
        listed["listed"].extend({"file": str(file), "line": line, "reason": reason}
                                for line, reason in bad[:max(LINES_LISTED - len(listed["listed"]), 0)])
        columns.update(keys)
        stat = file.stat()
        stamps.append((str(file), stat.st_size, stat.st_mtime_ns))
    if stamps:
        _check_columns(columns, options)
    return stamps


def read_json_lines(files: list[tuple[str, int, int]], fields: tuple[str, Optional[str], Optional[str]]
                    ) -> Iterator[dict]:
    """The rows of JSON Lines files ``(path, size, mtime)`` (size and time only identify the version read) as ``id``,
    ``title``, ``text``, ``skip`` (see `_fields_of`); blank and bad lines are passed over (the pass of
    `_json_lines_files` before this one counted them)."""
    import fsspec

    for path, _, _ in files:
        with fsspec.open(path, "rb", compression="infer") as handle:
            for number, raw in enumerate(handle, 1):
                row, _, _ = _json_line(raw, number == 1, fields)
                if row is not None:
                    yield row


# -- the stage ---------------------------------------------------------------------------------------------------------


def prepare_batch(batch: dict[str, list], indices: list[int], *, tokenizer, options: CorpusOptions,
                  fields: tuple[str, Optional[str], Optional[str]], titles_from_text: bool,
                  normalized: bool = False) -> dict[str, list]:
    """Clean, cut and hash a batch of raw rows (the per-document work, run by ``Dataset.map`` in ``num_proc``
    processes or in the streamed loop): columns ``id``, ``title``, ``text``, ``tokens``, ``skip`` (why a text file was
    skipped, if it was), ``drop`` (None, or why the document is dropped before deduplication), ``key`` (the exact
    key) and, for near dedup, ``minhash``. ``titles_from_text``: the rows are text files (their first line may be a
    title); ``normalized``: the rows come from moraft's readers (`read_text_files`, `read_json_lines`)."""
    size = len(next(iter(batch.values()))) if batch else 0
    rows = [_normalize_row({name: values[i] for name, values in batch.items()}, indices[i], fields,
                           normalized or titles_from_text) for i in range(size)]
    out: dict[str, list] = {"id": [], "title": [], "text": [], "tokens": [], "cut": [], "skip": [], "drop": [],
                            "key": []}
    if options.dedup == "near":
        out["minhash"] = []
    texts, pending = [], []
    for position, row in enumerate(rows):
        drop, title, text = row["skip"], row["title"], row["text"]
        if drop is None:
            text = clean_text(text or "")
            title = clean_text(title).replace("\n", " ") or None if title else None
            if titles_from_text:
                title, text = split_title(text)
            if not text:
                drop = "empty"
            elif len(text) < options.min_chars:
                drop = "too_short"
            else:
                texts.append(text)
                pending.append(position)
        out["id"].append(row["id"])
        out["title"].append(title)
        out["text"].append(text if drop is None else "")
        out["tokens"].append(0)
        out["cut"].append(False)
        out["skip"].append(row["skip"] if titles_from_text else None)  # a text file is a file: it is named
        out["drop"].append(drop)
    for position, whole, (text, count) in zip(pending, texts, cut_batch(texts, tokenizer, options.max_tokens)):
        out["text"][position], out["tokens"][position], out["cut"][position] = text, count, text != whole
        if not text:
            out["drop"][position] = "empty"
    for position in range(size):
        kept = out["drop"][position] is None
        out["key"].append(exact_key(out["text"][position]) if kept else b"")
        if options.dedup == "near":
            out["minhash"].append(minhash_signature(out["text"][position], options.num_perm, options.shingle_words)
                                  if kept else np.empty(0, np.uint32))
    return out


def _prepared_features(options: CorpusOptions):
    from datasets import Features, List, Value

    columns = {"id": Value("string"), "title": Value("string"), "text": Value("string"), "tokens": Value("int64"),
               "cut": Value("bool"), "skip": Value("string"), "drop": Value("string"), "key": Value("binary")}
    if options.dedup == "near":
        columns["minhash"] = List(Value("uint32"))
    return Features(columns)


@dataclass
class _Source:
    """The raw rows of a corpus and how to read them."""

    rows: Any  # a Dataset, an iterable of rows (streaming), or the arguments of a reader of moraft's (not streaming)
    fields: tuple[str, Optional[str], Optional[str]]
    titles_from_text: bool = False  # text files: one document per file, the first line may be a title
    reader: Optional[Callable] = None  # read_text_files or read_json_lines: rows already normalized
    files_read: int = 0


def _source(options: CorpusOptions, report: dict) -> _Source:
    """The raw rows of the corpus; skipped files and bad lines go into ``report``."""
    import datasets

    root = Path(options.path)
    if not root.exists():
        raise MissingPathError(f"corpus.path {options.path!r} does not exist (expected a directory of text files, a "
                               "JSONL/Parquet/CSV file or directory of them, or a Dataset.save_to_disk directory)")
    fields = (options.text_field, options.title_field, options.id_field)
    if root.is_dir() and any((root / marker).is_file() for marker in ("state.json", "dataset_dict.json")):
        with _datasets_errors(options.path):
            loaded = datasets.load_from_disk(str(root))
        if isinstance(loaded, datasets.DatasetDict):
            if options.split not in loaded:
                raise UserError(f"corpus.split {options.split!r} is not a split of {options.path!r}; its splits are: "
                                f"{', '.join(loaded)}")
            loaded = loaded[options.split]
        _check_columns(loaded.column_names, options)
        rows = loaded.to_iterable_dataset() if options.streaming else loaded
        return _Source(rows, fields, files_read=len(loaded.cache_files))
    kind, files = _list_files(root, options, report["files_skipped"])
    if kind == "text":
        args = _text_file_args(root, files)
        rows = read_text_files(args) if options.streaming else args
        return _Source(rows, fields, titles_from_text=True, reader=_read_stamped, files_read=len(files))
    if kind == "json":
        arrays = [file for file in files if _is_json_array(file)]
        if arrays and len(arrays) < len(files):
            raise UserError(f"corpus.path {str(root)!r} mixes JSON arrays ({len(arrays)} files, e.g. {arrays[0]}) "
                            f"and JSON Lines ({len(files) - len(arrays)} files); give one kind")
        if not arrays:
            stamps = _json_lines_files(files, options, report)
            rows = read_json_lines(stamps, fields) if options.streaming else stamps
            return _Source(rows, fields, reader=read_json_lines, files_read=len(files))
    with _datasets_errors(options.path):
        loaded = _load_data_files(kind, files, options.streaming, report["files_skipped"])
    if not options.streaming and loaded != []:
        _check_columns(loaded.column_names, options)
    return _Source(loaded, fields, files_read=len(files))


def _read_stamped(files: list[tuple[str, str, int, int]], fields: tuple = ()) -> Iterator[dict]:
    """`read_text_files` of ``(id, path, size, mtime)``: the sizes and times only identify the version read."""
    return read_text_files([(doc_id, path) for doc_id, path, _, _ in files])


def _read_dataset(source: _Source, num_proc: int) -> "Dataset":
    """The raw rows of moraft's reader as an Arrow dataset, read in ``num_proc`` processes; cached by the files'
    paths, sizes and modification times, so that a changed file is read again."""
    from datasets import Dataset

    stamps = source.rows
    if source.titles_from_text:
        stamps = [(doc_id, path, Path(path).stat().st_size, Path(path).stat().st_mtime_ns)
                  for doc_id, path in stamps]
    return Dataset.from_generator(
        source.reader, features=_raw_features(), gen_kwargs={"files": stamps, "fields": source.fields},
        num_proc=num_proc if num_proc > 1 and len(stamps) > 1 else None,
    )


def _report(options: CorpusOptions) -> dict:
    return {"path": options.path, "files_read": 0, "files_skipped": [],
            "lines_skipped": {"count": 0, "listed": []}, "documents_in": 0,
            "documents_out": 0, "documents_cut": 0, "tokens_out": 0, "dropped": dict.fromkeys(DROP_REASONS, 0),
            "duplicate_ids": {"count": 0, "examples": []}, "seconds": 0.0, "streaming": options.streaming}


def _duplicate_ids(corpus: "Dataset") -> tuple[int, list[str]]:
    """How many documents have an id that an earlier document has, and the first few such ids (in the order their
    duplicates come). One pass of 64-bit hashes (8 bytes per document), then one over the few ids whose hashes
    collide."""
    hashes = np.fromiter((hash(doc_id) for _, batch in _batches(corpus.select_columns(["id"]))
                          for doc_id in batch["id"]), dtype=np.int64, count=len(corpus))
    ordered = np.sort(hashes)
    colliding = set(ordered[1:][ordered[1:] == ordered[:-1]].tolist())
    if not colliding:
        return 0, []
    seen: set[str] = set()
    count, examples = 0, []
    for _, batch in _batches(corpus.select_columns(["id"])):
        for doc_id in batch["id"]:
            if hash(doc_id) not in colliding:
                continue
            if doc_id in seen:
                count += 1
                if doc_id not in examples and len(examples) < WARN_FIRST:
                    examples.append(doc_id)
            seen.add(doc_id)
    return count, examples


def _listed(items: list[dict], total: int, name: str) -> str:
    """The first `WARN_FIRST` of ``items`` (skipped files or lines) as a warning's list."""
    named = ", ".join(f"{item['file']}{':' + str(item['line']) if 'line' in item else ''} ({item['reason']})"
                      for item in items[:WARN_FIRST])
    return f"{named} and {total - WARN_FIRST} more {name}" if total > WARN_FIRST else named


def _finish(report: dict, options: CorpusOptions, started: float, corpus: "Dataset") -> None:
    report["seconds"] = round(time.perf_counter() - started, 3)
    skipped = report["files_skipped"]
    if skipped:
        print(f"moraft data: warning: skipped {len(skipped)} file(s) of {options.path}: "
              f"{_listed(skipped, len(skipped), 'files')}", file=sys.stderr)
    lines = report["lines_skipped"]
    if lines["count"]:
        print(f"moraft data: warning: skipped {lines['count']} bad line(s) of {options.path}: "
              f"{_listed(lines['listed'], lines['count'], 'lines')}", file=sys.stderr)
    if report["documents_out"] == 0:
        dropped = ", ".join(f"{count} {reason}" for reason, count in report["dropped"].items() if count)
        hint = f" (min_chars={options.min_chars})" if report["dropped"]["too_short"] else ""
        files = f"; {len(skipped)} file(s) skipped: {_listed(skipped, len(skipped), 'files')}" if skipped else ""
        raise UserError(f"corpus {options.path!r}: no documents left of {report['documents_in']} read"
                        f"{': ' + dropped if dropped else ''}{hint}{files}")
    count, examples = _duplicate_ids(corpus)
    report["duplicate_ids"] = {"count": count, "examples": examples}
    if count:
        print(f"moraft data: warning: {count} document(s) of {options.path} have the id of an earlier document "
              f"({', '.join(map(repr, examples))}{', ...' if count > len(examples) else ''}); they are kept (the "
              "stages join by row, an id only names a document in messages)", file=sys.stderr)


def read_corpus(options: CorpusOptions, tokenizer: Any, num_proc: int = 1) -> tuple["Dataset", dict]:
    """Read, clean, cut and deduplicate a raw corpus into the corpus dataset.

    Args:
        options: Where the corpus is and how to treat it (`CorpusOptions`).
        tokenizer: The pipeline tokenizer: ``max_tokens`` and the ``tokens`` column are measured with it.
        num_proc: Processes for the per-document work (reading text and JSON Lines files, cleaning, cutting,
            MinHash); the ordered deduplication pass is one process. Not used with ``options.streaming``.

    Returns:
        The corpus dataset (columns ``id``, ``title``, ``text``, ``tokens``, in input order, duplicates and dropped
        documents removed) and a report: ``path``, ``files_read``, ``files_skipped`` (a list of ``{"file",
        "reason"}``), ``lines_skipped`` (the bad lines of JSON Lines files: ``{"count", "listed"}``, the first 1,000
        listed as ``{"file", "line", "reason"}``), ``documents_in``, ``documents_out``, ``documents_cut`` (kept
        documents cut to ``max_tokens``), ``tokens_out``, ``dropped``
        (a count per reason: ``empty``, ``not_string``, ``not_utf8``, ``not_json``, ``unreadable``, ``too_short``,
        ``exact_duplicate``, ``near_duplicate``), ``duplicate_ids`` (``{"count", "examples"}``: kept documents
        whose id an earlier one has), ``seconds``, ``streaming``.

    Raises:
        MissingPathError: ``options.path`` does not exist.
        UserError: An invalid option, a data file without ``text_field``, nothing left after dropping, or a full disk.
    """
    options.validate()
    started = time.perf_counter()
    report = _report(options)
    source = _source(options, report)
    report["files_read"] = source.files_read
    prepare = dict(tokenizer=tokenizer, options=options, fields=source.fields,
                   titles_from_text=source.titles_from_text, normalized=source.reader is not None)
    from datasets import config

    # the stage writes its passes into datasets' cache (the pipeline saves the result under its output)
    with guarded("the corpus stage", Path(config.HF_DATASETS_CACHE), [Path(options.path)]):
        if options.streaming:
            corpus = _stream(source.rows, prepare, options, report)
        else:
            rows = source.rows
            if source.reader is not None:
                rows = _read_dataset(source, num_proc) if rows else []
            corpus = _in_memory(rows, prepare, options, report, num_proc)
    _finish(report, options, started, corpus)
    return corpus, report


def _in_memory(source, prepare: dict, options: CorpusOptions, report: dict, num_proc: int) -> "Dataset":
    """The non-streaming stage: per-document work by ``Dataset.map`` in ``num_proc`` processes, then one ordered
    dedup pass over the keys and signatures, then ``select`` of the kept rows (Arrow, memory-mapped throughout)."""
    from datasets import Dataset
    from tqdm.auto import tqdm

    features = _prepared_features(options)
    if isinstance(source, list) or len(source) == 0:  # no readable file, or no row: nothing to map
        prepared = Dataset.from_dict({name: [] for name in features}, features=features)
    else:
        files = [Path(f["filename"]) for f in source.cache_files]
        scratch = {file.parent for file in files}  # map writes its temporaries beside the files it reads
        with guarded("the corpus stage", next(iter(scratch), Path(options.path)), files, scratch):
            prepared = source.map(
                prepare_batch, fn_kwargs=prepare, batched=True, batch_size=BATCH, with_indices=True,
                remove_columns=source.column_names, features=features,
                num_proc=num_proc if num_proc > 1 and len(source) > 1 else None, desc="corpus: clean, cut, hash",
            )
    report["documents_in"] += len(prepared)
    dedup = Deduplicator(options.dedup, options.near_threshold, options.num_perm)
    columns = ["id", "skip", "drop", "key", "tokens", "cut"] + (["minhash"] if options.dedup == "near" else [])
    keep: list[int] = []
    with tqdm(total=len(prepared), desc="corpus: deduplicate", unit="doc") as bar:
        for start, batch in _batches(prepared.select_columns(columns)):
            for offset, drop in enumerate(batch["drop"]):
                if drop is None:
                    signature = batch["minhash"][offset] if options.dedup == "near" else None
                    drop = dedup.check(batch["key"][offset], signature)
                if drop is None:
                    keep.append(start + offset)
                    report["tokens_out"] += batch["tokens"][offset]
                    report["documents_cut"] += batch["cut"][offset]
                else:
                    _count_drop(report, drop, batch["id"][offset], batch["skip"][offset] is not None, options)
            bar.update(len(batch["drop"]))
    report["documents_out"] = len(keep)
    corpus = prepared.select(keep) if len(keep) < len(prepared) else prepared
    return corpus.select_columns(list(OUTPUT_COLUMNS))


def _batches(data: "Dataset", size: int = 1000) -> Iterator[tuple[int, dict]]:
    for start in range(0, len(data), size):
        yield start, data[start:start + size]


def _count_drop(report: dict, drop: str, doc_id: str, file_skipped: bool, options: CorpusOptions) -> None:
    report["dropped"][drop] += 1
    if file_skipped:  # a text file that could not be read: named in the report, as a data file would be
        root = Path(options.path)
        file = root / doc_id if root.is_dir() else root
        report["files_skipped"].append({"file": str(file), "reason": drop})


def _stream(source, prepare: dict, options: CorpusOptions, report: dict) -> "Dataset":
    """The streaming stage: rows read as they come, processed a batch at a time, deduplicated in order, and written
    by ``Dataset.from_generator`` (Arrow batches on disk), so memory holds one batch and the dedup state."""
    from datasets import Dataset, Features, Value
    from datasets.exceptions import DatasetGenerationError
    from tqdm.auto import tqdm

    dedup = Deduplicator(options.dedup, options.near_threshold, options.num_perm)
    before = report["documents_in"]  # the bad lines of JSON Lines files, counted before reading

    def rows() -> Iterator[dict]:
        checked = prepare["normalized"]  # moraft's readers checked the columns already
        index = 0
        with tqdm(desc="corpus: stream", unit="doc") as bar:
            for chunk in _chunks(source, BATCH):
                if not checked:
                    _check_columns(chunk[0].keys(), options)
                    checked = True
                batch = {name: [row.get(name) for row in chunk] for name in chunk[0]}
                out = prepare_batch(batch, list(range(index, index + len(chunk))), **prepare)
                index += len(chunk)
                for i in range(len(chunk)):
                    drop = out["drop"][i]
                    if drop is None:
                        drop = dedup.check(out["key"][i], out["minhash"][i] if options.dedup == "near" else None)
                    if drop is None:
                        report["documents_out"] += 1
                        report["tokens_out"] += out["tokens"][i]
                        report["documents_cut"] += out["cut"][i]
                        yield {name: out[name][i] for name in OUTPUT_COLUMNS}
                    else:
                        _count_drop(report, drop, out["id"][i], out["skip"][i] is not None, options)
                report["documents_in"] = before + index
                bar.update(len(chunk))

    features = Features({"id": Value("string"), "title": Value("string"), "text": Value("string"),
                         "tokens": Value("int64")})
    try:
        # a fresh fingerprint: the generator must run (it fills the report), never be answered from datasets' cache
        return Dataset.from_generator(rows, features=features, fingerprint=uuid.uuid4().hex)
    except DatasetGenerationError as err:
        if isinstance(err.__cause__, UserError):  # raised in the generator: the user's problem, one line
            raise err.__cause__ from None
        raise
    except ValueError:
        if report["documents_out"] == 0:  # datasets cannot build a split of no rows: the empty corpus is refused later
            return Dataset.from_dict({name: [] for name in OUTPUT_COLUMNS}, features=features)
        raise


def _chunks(rows: Iterable[dict], size: int) -> Iterator[list[dict]]:
    chunk: list[dict] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


__all__ = [
    "CorpusOptions", "Deduplicator", "clean_text", "corpus_files", "cut_batch", "cut_to_tokens", "exact_key",
    "minhash_signature", "prepare_batch", "read_corpus", "read_json_lines", "read_text_files", "shingles",
    "split_title",
]

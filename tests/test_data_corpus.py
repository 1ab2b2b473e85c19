"""The corpus stage (`moraft.data.corpus`): every input kind, skipped files, cleaning, the token budget, exact and
near deduplication, and the same rows whether streamed or not, in one process or two."""

from __future__ import annotations

import bz2
import gzip
import json
import random
import shutil

import pytest
import zstandard
from datasets import Dataset, DatasetDict
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from moraft.data.corpus import CorpusOptions, clean_text, cut_batch, cut_to_tokens, read_corpus, split_title
from moraft.errors import MissingPathError, UserError
from moraft.train.builtin import char_tokenizer

WORDS = ("river delta sediment basin flow channel erosion deposit tide marsh estuary salinity current bank "
         "levee flood plain gauge discharge runoff aquifer").split()


def prose(seed: int, sentences: int = 12) -> str:
    """Distinct random sentences of ASCII words (each seed its own text)."""
    rng = random.Random(seed)
    return " ".join(
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 14))).capitalize() + "." for _ in range(sentences)
    )


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A real subword tokenizer, trained in a moment on the test prose: merges make tokens span characters."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.train_from_iterator([prose(seed) for seed in range(50)],
                                trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"]))
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def rows(data: Dataset) -> list[dict]:
    return data.to_list()


# -- input kinds -------------------------------------------------------------------------------------------------------


def test_text_files_titles_compressed_and_skipped_files(tmp_path, tokenizer, capsys):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_text(f"River Deltas\n\n{prose(1)}\n")
    (corpus / "b.md").write_text(f"# Tides and marshes\n\n{prose(2)}\n")
    (corpus / "c.rst").write_text(f"Estuaries\n=========\n\n{prose(3)}\n")
    (corpus / "d.txt").write_text(f"{prose(4, 6)}\n\n{prose(5, 6)}")  # its first line is a sentence: no title
    (corpus / "sub" / "e.txt.gz").write_bytes(gzip.compress(prose(6).encode()))
    (corpus / "f.txt.bz2").write_bytes(bz2.compress(prose(7).encode()))
    (corpus / "g.md.zst").write_bytes(zstandard.ZstdCompressor().compress(prose(8).encode()))
    (corpus / "h.txt.gz").write_bytes(gzip.compress(prose(9).encode())[:60])  # cut short: cannot be decompressed
    (corpus / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 50)
    (corpus / "empty.txt").write_bytes(b"")
    (corpus / "blank.md").write_text("  \n\n \t\n")

    data, report = read_corpus(CorpusOptions(path=str(corpus)), tokenizer)

    by_id = {row["id"]: row for row in rows(data)}
    assert list(by_id) == ["a.txt", "b.md", "c.rst", "d.txt", "f.txt.bz2", "g.md.zst", "sub/e.txt.gz"]  # sorted
    assert [by_id[i]["title"] for i in by_id] == ["River Deltas", "Tides and marshes", "Estuaries"] + [None] * 4
    assert by_id["a.txt"]["text"] == prose(1)
    assert by_id["d.txt"]["text"] == f"{prose(4, 6)}\n\n{prose(5, 6)}"
    assert [by_id[i]["text"] for i in ("sub/e.txt.gz", "f.txt.bz2", "g.md.zst")] == [prose(6), prose(7), prose(8)]
    assert all(row["tokens"] == len(row["text"]) for row in by_id.values())  # one character, one token
    skipped = {item["file"]: item["reason"] for item in report["files_skipped"]}
    assert skipped == {str(corpus / "blank.md"): "empty", str(corpus / "empty.txt"): "empty",
                       str(corpus / "latin1.txt"): "not_utf8", str(corpus / "h.txt.gz"): "unreadable"}
    assert report["files_read"] == 11 and report["documents_in"] == 11 and report["documents_out"] == 7
    assert report["dropped"]["empty"] == 2 and report["dropped"]["not_utf8"] == 1
    warning = capsys.readouterr().err
    assert "skipped 4 file(s)" in warning and "latin1.txt (not_utf8)" in warning


def test_jsonl_with_title_and_id_and_generated_ids(tmp_path, tokenizer):
    source = tmp_path / "docs.jsonl"
    lines = [{"id": "pmid-1", "title": "Delta", "body": prose(1)}, {"title": None, "body": prose(2)},
             {"id": 7, "body": prose(3)}]
    source.write_text("\n".join(json.dumps(line) for line in lines))

    data, report = read_corpus(CorpusOptions(path=str(source), text_field="body"), tokenizer)

    assert data.column_names == ["id", "title", "text", "tokens"]
    assert [(row["id"], row["title"]) for row in rows(data)] == [("pmid-1", "Delta"), ("doc-000001", None), ("7", None)]
    assert [row["text"] for row in rows(data)] == [prose(1), prose(2), prose(3)]
    assert report["files_read"] == 1 and report["files_skipped"] == []


@pytest.mark.parametrize("kind", ["parquet", "jsonl directory", "save_to_disk"])
def test_data_kinds(tmp_path, tokenizer, kind):
    table = Dataset.from_dict({"text": [prose(i) for i in range(4)], "title": [f"T{i}" for i in range(4)]})
    if kind == "parquet":
        path = tmp_path / "docs.parquet"
        table.to_parquet(str(path))
    elif kind == "jsonl directory":
        path = tmp_path / "shards"
        path.mkdir()
        table.select([0, 1]).to_json(str(path / "part-0.jsonl"))
        table.select([2, 3]).to_json(str(path / "part-1.jsonl"))
        (path / "part-2.jsonl").write_bytes(b"")
    else:
        path = tmp_path / "saved"
        DatasetDict({"train": table.select([0]), "validation": table}).save_to_disk(str(path))

    options = CorpusOptions(path=str(path), split="validation" if kind == "save_to_disk" else "train")
    data, report = read_corpus(options, tokenizer)

    assert [row["text"] for row in rows(data)] == [prose(i) for i in range(4)]
    assert [row["title"] for row in rows(data)] == ["T0", "T1", "T2", "T3"]
    assert [row["id"] for row in rows(data)] == [f"doc-{i:06d}" for i in range(4)]
    if kind == "jsonl directory":
        assert report["files_skipped"] == [{"file": str(path / "part-2.jsonl"), "reason": "empty"}]


def test_non_utf8_data_file_skipped_and_named(tmp_path, tokenizer):
    (tmp_path / "good.jsonl").write_text(json.dumps({"text": prose(1)}))
    (tmp_path / "bad.jsonl").write_bytes(json.dumps({"text": "caf\xe9 " * 40}, ensure_ascii=False).encode("latin-1"))

    data, report = read_corpus(CorpusOptions(path=str(tmp_path)), tokenizer)

    assert [row["text"] for row in rows(data)] == [prose(1)]
    assert report["files_skipped"] == [{"file": str(tmp_path / "bad.jsonl"), "reason": "not_utf8"}]


# -- bad input: lines, texts, ids, links -------------------------------------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True])
def test_bad_lines_of_a_jsonl_file_are_skipped_counted_and_named(tmp_path, tokenizer, capsys, streaming):
    source = tmp_path / "docs.jsonl"
    good = [json.dumps({"id": f"d{i}", "text": prose(i)}).encode() for i in range(4)]
    source.write_bytes(b"\n".join([
        good[0], b"{not json", good[1],
        b'{"id": "x", "text": "caf\xe9 au lait"}',       # 4: latin-1, not UTF-8
        b"   ", b"[1, 2]",                                # a blank line (passed over); 6: JSON, not an object
        b'{"id": "s", "text": "lone \\ud800 surrogate"}',  # 7: a JSON escape that is no UTF-8 text
        good[2], good[3][:25],                            # 9: the last line cut mid-JSON
    ]))

    data, report = read_corpus(CorpusOptions(path=str(source), streaming=streaming), tokenizer)

    assert data["id"] == ["d0", "d1", "d2"]
    assert report["lines_skipped"] == {"count": 5, "listed": [
        {"file": str(source), "line": line, "reason": reason}
        for line, reason in ((2, "not_json"), (4, "not_utf8"), (6, "not_json"), (7, "not_utf8"), (9, "not_json"))]}
    assert (report["dropped"]["not_json"], report["dropped"]["not_utf8"]) == (3, 2)
    assert (report["documents_in"], report["documents_out"], report["files_skipped"]) == (8, 3, [])
    assert f"skipped 5 bad line(s) of {source}: {source}:2 (not_json), {source}:4 (not_utf8)" in capsys.readouterr().err


@pytest.mark.parametrize("content, reason", [
    (b"", "empty"),
    (bytes(random.Random(0).randrange(256) for _ in range(3000)), "not_utf8"),   # a binary file
    (b'{"text": "cut sho', "not_json"),                                          # one line, cut mid-JSON
])
def test_a_jsonl_file_without_a_good_line_is_a_skipped_file(tmp_path, tokenizer, capsys, content, reason):
    (tmp_path / "bad.jsonl").write_bytes(content)
    with pytest.raises(UserError, match=rf"no documents left of 0 read; 1 file\(s\) skipped: .*bad.jsonl \({reason}\)"):
        read_corpus(CorpusOptions(path=str(tmp_path / "bad.jsonl")), tokenizer)
    (tmp_path / "good.jsonl").write_text(json.dumps({"text": prose(1)}))
    data, report = read_corpus(CorpusOptions(path=str(tmp_path)), tokenizer)
    assert len(data) == 1 and report["files_skipped"] == [{"file": str(tmp_path / "bad.jsonl"), "reason": reason}]
    assert report["lines_skipped"]["count"] == 0  # the file is named, not its lines


def test_a_directory_mixing_json_arrays_and_json_lines_is_refused(tmp_path, tokenizer):
    (tmp_path / "a.json").write_text(json.dumps([{"text": prose(1)}]))
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": prose(2)}))
    with pytest.raises(UserError, match=r"mixes JSON arrays \(1 files, e.g. .*a.json\) and JSON Lines \(1 files\)"):
        read_corpus(CorpusOptions(path=str(tmp_path)), tokenizer)
    (tmp_path / "b.jsonl").unlink()
    data, _ = read_corpus(CorpusOptions(path=str(tmp_path)), tokenizer)  # an array alone is read by datasets
    assert data["text"] == [prose(1)]


def test_texts_that_are_not_strings_and_duplicate_ids_are_counted(tmp_path, tokenizer, capsys):
    rows_in = [{"id": "a", "text": prose(1)}, {"id": "n", "text": 12345}, {"id": "l", "text": ["a", "list"]},
               {"id": "z", "text": None}, {"id": "m"}, {"id": "e", "text": "  "}, {"id": "a", "text": prose(2)},
               {"id": "b", "text": prose(3)}, {"id": "a", "text": prose(4)}, {"id": "b", "text": prose(5)},
               {"id": 7, "text": prose(6)}, {"id": "7", "text": prose(7)}]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps(row) for row in rows_in))

    data, report = read_corpus(CorpusOptions(path=str(tmp_path / "docs.jsonl")), tokenizer)

    assert data["id"] == ["a", "a", "b", "a", "b", "7", "7"]  # kept: the stages join by row, not by id
    assert (report["dropped"]["not_string"], report["dropped"]["empty"]) == (4, 1)
    assert report["duplicate_ids"] == {"count": 4, "examples": ["a", "b", "7"]}
    assert "4 document(s) of" in capsys.readouterr().err


def test_links_out_of_the_corpus_are_skipped_unless_followed(tmp_path, tokenizer, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(prose(50))
    (outside / "more.txt").write_text(prose(51))
    corpus = tmp_path / "corpus"
    (corpus / "notes").mkdir(parents=True)
    (corpus / "a.txt").write_text(prose(1))
    (corpus / "notes" / "b.data").write_text(prose(2))      # not a corpus file's name: read through the link below
    (corpus / "notes" / "c.md").write_text(prose(3))
    (corpus / "inner.txt").symlink_to(corpus / "notes" / "b.data")              # inside the corpus: followed
    (corpus / "loop").symlink_to(corpus, target_is_directory=True)              # inside, back to the root: read once
    (corpus / "also").symlink_to(corpus / "notes", target_is_directory=True)    # inside: notes/ is read once
    (corpus / "passwd.txt").symlink_to(outside / "secret.txt")                  # outside: skipped
    (corpus / "elsewhere").symlink_to(outside, target_is_directory=True)        # outside: skipped
    (corpus / "dangling.txt").symlink_to(tmp_path / "nowhere.txt")              # to nothing: skipped

    data, report = read_corpus(CorpusOptions(path=str(corpus)), tokenizer)

    assert data["id"] == ["a.txt", "inner.txt", "notes/c.md"] and data["text"] == [prose(1), prose(2), prose(3)]
    assert report["files_skipped"] == [{"file": str(corpus / name), "reason": reason} for name, reason in (
        ("dangling.txt", "broken_symlink"), ("elsewhere", "symlink_outside"), ("passwd.txt", "symlink_outside"))]
    assert "passwd.txt (symlink_outside)" in capsys.readouterr().err

    followed, report = read_corpus(CorpusOptions(path=str(corpus), follow_symlinks=True), tokenizer)
    assert followed["id"] == ["a.txt", "elsewhere/more.txt", "elsewhere/secret.txt", "inner.txt", "notes/c.md"]
    assert report["files_skipped"] == [{"file": str(corpus / "dangling.txt"), "reason": "broken_symlink"}]


# -- errors ------------------------------------------------------------------------------------------------------------


def test_missing_path(tmp_path, tokenizer):
    with pytest.raises(MissingPathError, match="nowhere"):
        read_corpus(CorpusOptions(path=str(tmp_path / "nowhere")), tokenizer)


@pytest.mark.parametrize("streaming", [False, True])
def test_missing_text_column_names_the_columns(tmp_path, tokenizer, streaming):
    source = tmp_path / "docs.jsonl"
    source.write_text(json.dumps({"abstract": prose(1), "doi": "10.1/x"}))
    with pytest.raises(UserError, match=r"no text column 'text'.*columns are: abstract, doi"):
        read_corpus(CorpusOptions(path=str(source), streaming=streaming), tokenizer)


@pytest.mark.parametrize("streaming", [False, True])
def test_empty_corpus_says_what_was_dropped(tmp_path, tokenizer, streaming):
    (tmp_path / "short.txt").write_text("Too short.")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match=r"no documents left of 2 read: 1 empty, 1 too_short \(min_chars=100\)"):
        read_corpus(CorpusOptions(path=str(tmp_path), streaming=streaming), tokenizer)


def test_invalid_option(tmp_path, tokenizer):
    with pytest.raises(UserError, match=r"corpus.dedup='fuzzy' is invalid; expected one of near, exact, none"):
        read_corpus(CorpusOptions(path=str(tmp_path), dedup="fuzzy"), tokenizer)


# -- cleaning ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, clean", [
    ("line one\r\nline two\rline three", "line one\nline two\nline three"),
    ("non\u00a0breaking\u3000space  and\t\ttabs", "non breaking space and tabs"),
    ("zero\u200bwidth\ufeff soft\u00adhyphen\u2060joined", "zerowidth softhyphenjoined"),
    ("bell\x07 null\x00 escape\x1b[0m done", "bell null escape[0m done"),
    ("  trimmed  \n\n\n\n\nparagraph  ", "trimmed\n\nparagraph"),
    ("e\u0301te\u0301", "\u00e9t\u00e9"),  # NFC
    ("深度学习模型。  大规模语料！", "深度学习模型。 大规模语料！"),
    ("النماذج اللغوية الكبيرة\u00a0تتعلم", "النماذج اللغوية الكبيرة تتعلم"),
    ("می\u200cخواهم", "می\u200cخواهم"),  # Persian needs its zero-width non-joiner
])
def test_clean_text(raw, clean):
    assert clean_text(raw) == clean


def test_non_latin_documents_kept_intact(tmp_path, tokenizer):
    chinese = "河流三角洲由沉积物堆积而成。" * 12
    arabic = "تتكون دلتا النهر من الرواسب المتراكمة عند المصب. " * 6
    Dataset.from_dict({"text": [chinese, arabic.strip()]}).to_json(str(tmp_path / "docs.jsonl"), force_ascii=False)

    data, _ = read_corpus(CorpusOptions(path=str(tmp_path / "docs.jsonl")), tokenizer)

    assert [row["text"] for row in rows(data)] == [chinese, arabic.strip()]


@pytest.mark.parametrize("text, title", [
    ("Title\n\nBody.", "Title"),
    ("## Title ##\nBody.", "Title"),
    ("Title\n=====\nBody.", "Title"),
    ("A sentence.\n\nBody.", None),
    ("Title\nBody right after.", None),
    ("Only a title", None),
])
def test_split_title(text, title):
    assert split_title(text)[0] == title


# -- the token budget --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["char", "bpe"])
@pytest.mark.parametrize("max_tokens", [150, 333, 600])
def test_cut_lands_on_a_sentence_boundary_within_the_budget(tokenizer, bpe_tokenizer, which, max_tokens):
    tok = tokenizer if which == "char" else bpe_tokenizer
    text = prose(9, sentences=100)
    cut, count = cut_to_tokens(text, tok, max_tokens)

    assert count == len(tok(cut, add_special_tokens=False)["input_ids"]) <= max_tokens
    assert text.startswith(cut) and cut.endswith(".")
    longer = text[:text.index(".", len(cut)) + 1]  # one more sentence would not have fit
    assert len(tok(longer, add_special_tokens=False)["input_ids"]) > max_tokens
    short = prose(9, sentences=2)
    assert cut_batch([text, short], tok, max_tokens) == [(cut, count), cut_to_tokens(short, tok, max_tokens)]


def test_cut_without_boundaries(tokenizer):
    assert cut_to_tokens("word " * 30, tokenizer, 12) == ("word word", 9)  # at a space
    assert cut_to_tokens("x" * 50, tokenizer, 12) == ("x" * 12, 12)  # at a token
    assert cut_to_tokens("一二三。四五六。七八九", tokenizer, 9) == ("一二三。四五六。", 8)  # at 。, no space after it


def test_max_tokens_applied_to_every_document(tmp_path, tokenizer):
    Dataset.from_dict({"text": [prose(i, 40) for i in range(3)]}).to_json(str(tmp_path / "d.jsonl"))
    data, report = read_corpus(CorpusOptions(path=str(tmp_path / "d.jsonl"), max_tokens=200), tokenizer)
    assert all(row["tokens"] <= 200 and row["text"].endswith(".") for row in rows(data))
    assert report["tokens_out"] == sum(row["tokens"] for row in rows(data))


# -- deduplication -----------------------------------------------------------------------------------------------------


def near_copy(text: str, changes: int, seed: int) -> str:
    """``text`` with ``changes`` of its first 100 words replaced."""
    words = text.split(" ")
    rng = random.Random(seed)
    for position in rng.sample(range(100), changes):
        words[position] = "replaced"
    return " ".join(words)


def dedup_corpus() -> Dataset:
    base = prose(100, sentences=20)
    texts = [
        base,                                   # 0: kept, first of its group
        prose(101, sentences=20),               # 1: distinct
        "  " + base.replace(" ", "  \n", 3),    # 2: exact duplicate of 0, up to whitespace
        near_copy(base, 3, seed=1),             # 3: near duplicate of 0 (3 words changed)
        prose(102, sentences=20),               # 4: distinct
        near_copy(prose(101, sentences=20), 2, seed=2),  # 5: near duplicate of 1
        base[:len(base) // 2] + " " + prose(103, sentences=10),  # 6: shares half of 0 (Jaccard about 1/3): kept
    ]
    return Dataset.from_dict({"id": [f"d{i}" for i in range(7)], "text": texts})


@pytest.mark.parametrize("dedup, kept, dropped", [
    ("near", ["d0", "d1", "d4", "d6"], {"exact_duplicate": 1, "near_duplicate": 2}),
    ("exact", ["d0", "d1", "d3", "d4", "d5", "d6"], {"exact_duplicate": 1, "near_duplicate": 0}),
    ("none", ["d0", "d1", "d2", "d3", "d4", "d5", "d6"], {"exact_duplicate": 0, "near_duplicate": 0}),
])
def test_deduplication_keeps_the_first(tmp_path, tokenizer, dedup, kept, dropped):
    dedup_corpus().save_to_disk(str(tmp_path / "saved"))
    data, report = read_corpus(CorpusOptions(path=str(tmp_path / "saved"), dedup=dedup), tokenizer)
    assert data["id"] == kept
    assert {reason: report["dropped"][reason] for reason in dropped} == dropped


# -- the same rows every way -------------------------------------------------------------------------------------------


def mixed_corpus(tmp_path):
    """Text files with duplicates, a short one, titles and a file that is not UTF-8."""
    corpus = tmp_path / "mixed"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"doc{i:02d}.txt").write_text(f"Heading {i}\n\n{prose(i % 9, sentences=25)}")
    (corpus / "doc90.txt").write_text(near_copy(prose(3, sentences=25), 2, seed=3))
    (corpus / "doc91.txt").write_text("Short.")
    (corpus / "doc92.txt").write_bytes(b"\xff" * 300)
    return corpus


def test_streaming_gives_the_same_rows(tmp_path, tokenizer):
    corpus = mixed_corpus(tmp_path)
    Dataset.from_list([{"id": f"r{i}", "text": prose(i % 5)} for i in range(9)]).to_json(str(tmp_path / "d.jsonl"))
    for path in (corpus, tmp_path / "d.jsonl"):
        options = dict(path=str(path), max_tokens=1500)
        data, report = read_corpus(CorpusOptions(**options), tokenizer)
        streamed, streamed_report = read_corpus(CorpusOptions(**options, streaming=True), tokenizer)
        assert rows(streamed) == rows(data)
        assert streamed_report["dropped"] == report["dropped"] and any(report["dropped"].values())
        assert streamed_report["files_skipped"] == report["files_skipped"]


def test_two_processes_give_the_same_rows(tmp_path, tokenizer, capsys):
    corpus = mixed_corpus(tmp_path)
    copy = shutil.copytree(corpus, tmp_path / "copy")  # another path: datasets' cache cannot answer the second run
    data, report = read_corpus(CorpusOptions(path=str(corpus), max_tokens=1500), tokenizer, num_proc=1)
    parallel, parallel_report = read_corpus(CorpusOptions(path=str(copy), max_tokens=1500), tokenizer, num_proc=2)
    assert "num_proc=2" in capsys.readouterr().err  # datasets' progress bar of the map in two processes
    assert rows(parallel) == rows(data) and len(data) == 9  # 12 + 3 files; 3 exact and 1 near duplicate, 1 short,
    assert parallel_report["dropped"] == report["dropped"]  # 1 not UTF-8
    assert report["dropped"] == {"empty": 0, "not_string": 0, "not_utf8": 1, "not_json": 0, "unreadable": 0,
                                 "too_short": 1, "exact_duplicate": 3, "near_duplicate": 1}

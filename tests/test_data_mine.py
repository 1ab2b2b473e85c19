"""AdaptLLM's mining (moraft.data.mine): each pattern found on a constructed text and its near misses not found, the
caps, the seeding, the rendering, the domain words and the corpus stage.

The texts are built from sentences of known length: ``LONG_*`` have at least 50 characters and no comma, ``SHORT``
has fewer than 50. A pair never starts a text (AdaptLLM's patterns want the end of a previous sentence), so each text
opens with ``OPENING``.
"""

from __future__ import annotations

import random
import re

import pytest
from datasets import Dataset

from moraft.data import templates
from moraft.data.mine import (
    MineOptions,
    document_seed,
    domain_words,
    mine_corpus,
    mine_tasks,
    render_example,
    split_sentences,
)
from moraft.errors import MissingPathError, UserError
from moraft.train.builtin import char_tokenizer

OPENING = "Cells need a steady supply of energy."
LONG_A = "The mitochondria produce most of the chemical energy used by the cell."
LONG_B = "cells with damaged mitochondria struggle to sustain their normal metabolism."
LONG_C = "The liver stores large amounts of glycogen for the needs of the whole body."
LONG_D = "the muscles keep their own glycogen reserves for periods of intense effort."
SHORT = "The liver stores glycogen."
CLOSING = "Further work is needed."
assert all(len(s) - 1 >= 50 and "," not in s for s in (LONG_A, LONG_B, LONG_C, LONG_D)) and len(SHORT) < 50

CONNECTIVES = {
    ("nli", "entailment"): ["Yes", "Therefore", "Thus", "Accordingly", "Hence", "For this reason"],
    ("nli", "contradiction"): ["No", "However", "But", "On the contrary", "In contrast", "Whereas"],
    ("nli", "neutral"): ["Maybe", "Also", "Furthermore", "Secondly", "Additionally", "Moreover", "In addition"],
    ("commonsense", "cause_effect"): ["Thus", "Therefore", "Accordingly", "Hence", "For this reason"],
    ("paraphrase", "similar"): [
        "In other words",
        "Namely",
        "That is to say",
        "i.e.",
        "Scilicet",
        "Similarly",
        "Equally",
    ],
    ("paraphrase", "different"): ["No", "However", "But", "On the contrary", "In contrast", "Whereas"],
}
PAIR_CASES = [(task, kind, c) for (task, kind), connectives in CONNECTIVES.items() for c in connectives]
EFFECT_CAUSE = ["due to", "on account of", "owing to"]


def kinds(items: list[dict]) -> list[tuple[str, str]]:
    return [(item["task"], item["kind"]) for item in items]


def of_kind(items: list[dict], task: str, kind: str) -> list[dict]:
    return [item for item in items if (item["task"], item["kind"]) == (task, kind)]


def pair_text(first: str, connective: str, second: str, separator: str = ", ") -> str:
    return f"{OPENING} {first} {connective}{separator}{second} {CLOSING}"


def mentions(item: dict, sentence: str) -> bool:
    """Whether an item's question or answer holds the sentence (its first letter in either case)."""
    both = item["question"] + " " + item["answer"]
    return sentence[1:].rstrip(".") in both


# --- each pattern found --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task,kind,connective", PAIR_CASES)
def test_pair_found_for_every_connective(task, kind, connective):
    items = mine_tasks(pair_text(LONG_A, connective, LONG_B))
    found = of_kind(items, task, kind)
    assert len(found) == 1, kinds(items)
    assert mentions(found[0], LONG_A) and mentions(found[0], LONG_B)


@pytest.mark.parametrize("connective", EFFECT_CAUSE)
def test_effect_cause_found(connective):
    cause = "the severe drought that lasted through the entire summer season."
    text = f"{OPENING} {LONG_C} {connective.capitalize()} {cause} {CLOSING}"
    (found,) = of_kind(mine_tasks(text), "commonsense", "effect_cause")
    effect_in_question = LONG_C.rstrip(".") in found["question"]
    cause_in_answer = found["answer"] == "The severe drought that lasted through the entire summer season."
    assert effect_in_question and cause_in_answer, found


@pytest.mark.parametrize("connective", ["THEREFORE", "therefore", "tHeReFoRe"])
def test_connectives_case_insensitive(connective):
    items = mine_tasks(pair_text(LONG_A, connective, LONG_B))
    assert ("nli", "entailment") in kinds(items) and ("commonsense", "cause_effect") in kinds(items)


def test_nli_answers_are_the_relation_or_the_second_sentence():
    answers = {"entailment": {"Yes", "Therefore", "Entailment"}, "contradiction": {"No", "However", "Contradictory"}}
    seen_generate = seen_label = False
    for seed in range(40):
        for kind, connective in (("entailment", "Therefore"), ("contradiction", "However")):
            (item,) = of_kind(mine_tasks(pair_text(LONG_A, connective, LONG_B), seed=seed), "nli", kind)
            if item["answer"] in answers[kind]:
                seen_label = True
                assert LONG_A in item["question"]
            else:
                seen_generate = True
                assert item["answer"] == LONG_B[0].upper() + LONG_B[1:]
    assert seen_label and seen_generate


@pytest.mark.parametrize(
    "sentence,term,definition",
    [
        ("Photosynthesis is defined as the process that turns light into energy.", "Photosynthesis", "the process"),
        ("Glycogenolysis's definition is the breakdown of glycogen into glucose.", "Glycogenolysis", "the breakdown"),
        ("PHOTOSYNTHESIS IS DEFINED AS the process that turns light into energy.", "PHOTOSYNTHESIS", "the process"),
    ],
)
def test_definition_found(sentence, term, definition):
    (found,) = of_kind(mine_tasks(f"{OPENING} {sentence} {CLOSING}"), "word2text", "definition")
    assert term in found["question"] and found["answer"] == definition + sentence.split(definition, 1)[1]


@pytest.mark.parametrize("verb", ["was about", "talks about", "is about", "'s topic is"])
def test_topic_found(verb):
    subject = "The second chapter of the handbook" if verb != "'s topic is" else "The second handbook chapter"
    phrase = subject + ("" if verb.startswith("'") else " ") + verb
    text = f"{OPENING} {phrase} the regulation of blood glucose by insulin. {CLOSING}"
    (found,) = of_kind(mine_tasks(text), "word2text", "topic")
    assert phrase in found["question"] and found["answer"] == "the regulation of blood glucose by insulin."


def test_keywords_found_with_three_domain_words():
    words = {"mitochondria", "metabolism", "glycogenolysis", "gluconeogenesis"}
    two = "The mitochondria adjust metabolism when fasting starts."
    three = "Both glycogenolysis and gluconeogenesis depend on healthy mitochondria in liver cells."
    (found,) = of_kind(mine_tasks(f"{OPENING} {two} {three}", domain_words=words), "word2text", "keywords")
    both = found["question"] + " " + found["answer"]
    assert three in both and "glycogenolysis, gluconeogenesis, mitochondria" in both
    capitalized = {"Mitochondria", "Metabolism", "Glycogenolysis"}  # the lookup is case-sensitive, as the tokenizer
    assert not of_kind(mine_tasks(f"{OPENING} {two} {three}", domain_words=capitalized), "word2text", "keywords")
    assert not of_kind(mine_tasks(f"{OPENING} {two} {three}", domain_words=None), "word2text", "keywords")


def test_summarize_and_completion_frames():
    text = f"{OPENING} {LONG_A} {LONG_C} {CLOSING}"
    frames = set()
    for seed in range(100):
        items = mine_tasks(text, "Energy in cells", seed=seed)
        summary, completion = (
            of_kind(items, "summarize", "text2title") + of_kind(items, "summarize", "title2text"),
            None,
        )
        parts = of_kind(items, "completion", "completion")
        if parts:
            completion = parts[0]
            first = completion["question"].removeprefix("Energy in cells\n")
            assert text == f"{first} {completion['answer']}"  # cut at a sentence boundary
        for item in summary:
            assert item["answer"] == ("Energy in cells" if item["kind"] == "text2title" else text)
        frames.add((tuple(i["kind"] for i in summary), bool(parts)))
    # AdaptLLM's four frames with a title (title only, completion only, both, neither) and both summary directions
    assert frames == {
        (("text2title",), False),
        (("title2text",), False),
        ((), True),
        (("text2title",), True),
        ((), False),
    }
    assert not of_kind(mine_tasks(text), "summarize", "text2title") + of_kind(
        mine_tasks(text), "summarize", "title2text"
    )
    assert not of_kind(mine_tasks(LONG_A, "A title", seed=3), "completion", "completion")  # one sentence: no cut


def test_frames_drawn_with_adaptllm_probabilities():
    """Title and completion (0.4), completion only (0.1), title only (0.4), neither (0.1); text2title and title2text
    share the title-only case."""
    text = f"{OPENING} {LONG_A} {LONG_C} {CLOSING}"
    counts = {}
    for seed in range(500):
        found = tuple(
            sorted(i["kind"] for i in mine_tasks(text, "T", seed=seed) if i["task"] in ("summarize", "completion"))
        )
        counts[found] = counts.get(found, 0) + 1
    both, completion = counts[("completion", "text2title")] / 500, counts[("completion",)] / 500
    title, neither = (counts[("text2title",)] + counts[("title2text",)]) / 500, counts.get((), 0) / 500
    assert (
        abs(both - 0.4) < 0.07
        and abs(title - 0.4) < 0.07
        and abs(completion - 0.1) < 0.05
        and abs(neither - 0.1) < 0.05
    )
    assert abs(counts[("title2text",)] / 500 - 0.2) < 0.06


# --- near misses not found -----------------------------------------------------------------------------------------


PAIR_KINDS = sorted({(task, kind) for task, kind, _ in PAIR_CASES})


@pytest.mark.parametrize("task,kind", PAIR_KINDS)
def test_pair_missed_when_a_sentence_is_short(task, kind):
    connective = CONNECTIVES[(task, kind)][1]
    assert (task, kind) not in kinds(mine_tasks(pair_text(SHORT, connective, LONG_B)))
    assert (task, kind) not in kinds(mine_tasks(pair_text(LONG_A, connective, SHORT[0].lower() + SHORT[1:])))


@pytest.mark.parametrize("task,kind", PAIR_KINDS)
def test_pair_missed_without_comma_after_the_connective(task, kind):
    connective = CONNECTIVES[(task, kind)][1]
    assert (task, kind) not in kinds(mine_tasks(pair_text(LONG_A, connective, LONG_B, separator=" ")))


@pytest.mark.parametrize("task,kind", PAIR_KINDS)
def test_pair_missed_without_a_previous_sentence(task, kind):
    text = f"{LONG_A} {CONNECTIVES[(task, kind)][1]}, {LONG_B}"
    assert (task, kind) not in kinds(mine_tasks(text))


@pytest.mark.parametrize("task,kind", PAIR_KINDS)
def test_comma_inside_a_sentence(task, kind):
    """A comma inside either sentence rules the pair out for inference and commonsense; AdaptLLM's paraphrase pattern
    allows commas (its sentence class has no comma exclusion)."""
    with_comma = "The mitochondria, small organelles of the cell, produce most of its chemical energy."
    connective = CONNECTIVES[(task, kind)][1]
    found = (task, kind) in kinds(mine_tasks(pair_text(with_comma, connective, LONG_B)))
    assert found == (task == "paraphrase")


@pytest.mark.parametrize("connective", EFFECT_CAUSE)
def test_effect_cause_missed_inside_a_sentence_or_with_a_comma(connective):
    cause = "the severe drought that lasted through the entire summer season."
    inside = f"{OPENING} The harvest in the provinces failed badly last year {connective} {cause} {CLOSING}"
    comma = f"{OPENING} {LONG_C} {connective.capitalize()}, {cause} {CLOSING}"
    short = f"{OPENING} {SHORT} {connective.capitalize()} {cause} {CLOSING}"
    for text in (inside, comma, short):
        assert ("commonsense", "effect_cause") not in kinds(mine_tasks(text)), text


@pytest.mark.parametrize(
    "sentence",
    [
        "Ketolysis is defined as the breakdown of ketone bodies by the enzymes.",  # a term of 10 characters is needed
        "Photosynthesis is defined as light to energy.",  # a definition of 20 characters is needed
        "Photosynthesis is described as the process that turns light into energy.",
    ],
)
def test_definition_missed(sentence):
    assert ("word2text", "definition") not in kinds(mine_tasks(f"{OPENING} {sentence} {CLOSING}"))


def test_topic_missed_with_a_short_subject_or_topic():
    for sentence in (
        "The handbook talks about the regulation of glucose.",
        "The handbook chapter two talks about insulin.",
    ):
        assert ("word2text", "topic") not in kinds(mine_tasks(f"{OPENING} {sentence} {CLOSING}"))


def test_keywords_missed_with_two_domain_words_or_a_long_sentence():
    words = {"mitochondria", "metabolism", "glycogenolysis"}
    two = "The mitochondria adjust metabolism when fasting starts."
    long = "Glycogenolysis and metabolism in mitochondria " + "and more words " * 40 + "end."
    assert not of_kind(mine_tasks(f"{OPENING} {two} {long}", domain_words=words), "word2text", "keywords")


# --- caps and seeding ----------------------------------------------------------------------------------------------


def many_pairs(n: int, filler: str = "") -> str:
    """A text with ``n`` entailment pairs, each told apart by a number word, then ``filler``."""
    numbers = ["one", "two", "three", "four", "five", "six"]
    body = " ".join(
        f"{LONG_A[:-1]} in case {numbers[i]}. Therefore, {LONG_B[:-1]} in case {numbers[i]}." for i in range(n)
    )
    return f"{OPENING} {body} {filler}{CLOSING}"


def test_at_most_two_per_kind():
    items = mine_tasks(many_pairs(5))
    for kind in set(kinds(items)):
        assert kinds(items).count(kind) <= 2
    assert kinds(items).count(("nli", "entailment")) == 2 and kinds(items).count(("commonsense", "cause_effect")) == 2
    words = {"mitochondria", "metabolism", "glycogenolysis"}
    sentence = "The glycogenolysis feeds metabolism in mitochondria."
    keyword_items = of_kind(
        mine_tasks(f"{OPENING} " + " ".join([sentence] * 5), domain_words=words), "word2text", "keywords"
    )
    assert len(keyword_items) == 2


def test_same_seed_same_tasks_and_documents_differ():
    text = many_pairs(5)
    assert mine_tasks(text) == mine_tasks(text) == mine_tasks(text, seed=document_seed(text))
    assert mine_tasks(text, seed=1) == mine_tasks(text, seed=1)
    chosen = set()
    for i in range(12):  # the same five pairs in documents that differ only by a closing word
        items = mine_tasks(many_pairs(5, filler=f"Note {i}. "))
        chosen.add(tuple(item["question"] for item in of_kind(items, "nli", "entailment")))
    assert len(chosen) > 3  # different documents, different shuffles and templates
    assert document_seed(text) == document_seed(text) != document_seed(text, 1)


# --- rendering -----------------------------------------------------------------------------------------------------


def introductions(domain: str) -> list[str]:
    return [re.sub(r"\[([^\]]*)\]", r"\1", line).replace("{domain}", domain) for line in templates.INTRODUCTIONS]


def test_render_example_holds_the_text_the_tasks_and_an_introduction():
    text = f"{OPENING} {LONG_A} Therefore, {LONG_B} {LONG_C} However, {LONG_D} {CLOSING}"
    for seed in range(30):
        items = mine_tasks(text, seed=seed, domain="biomedicine")
        items = [item for item in items if item["task"] != "completion"]  # the plain text then stays whole
        rendered = render_example(text, None, items, domain="biomedicine", seed=seed)
        assert text in rendered
        for item in items:
            assert f"{item['question']} {item['answer']}" in rendered
        assert any(line in rendered for line in introductions("biomedicine") if line.strip())
        assert rendered == render_example(text, None, items, domain="biomedicine", seed=seed)
        assert "{" not in rendered and "[" not in rendered
    outputs = {render_example(text, None, items, domain="biomedicine", seed=seed) for seed in range(10)}
    assert len(outputs) > 3


def test_render_example_frames():
    text = f"{OPENING} {LONG_A} {LONG_C} {CLOSING}"
    seen = set()
    for seed in range(60):
        items = mine_tasks(text, "Energy in cells", seed=seed)
        rendered = render_example(text, "Energy in cells", items, domain="", seed=seed)
        for item in items:
            if item["task"] == "completion":  # the prompt goes between the two parts
                assert item["question"] in rendered and item["answer"] in rendered
            else:
                assert f"{item['question']} {item['answer']}" in rendered
        assert "Energy in cells" in rendered and "{" not in rendered and "[" not in rendered
        seen.add(tuple(sorted(item["kind"] for item in items if item["task"] in ("summarize", "completion"))))
    assert ("completion", "text2title") in seen and ("title2text",) in seen and () in seen


def test_render_example_blocks_keep_a_task_together():
    tasks = [
        {"task": "nli", "kind": "entailment", "question": "Q1?", "answer": "Yes"},
        {"task": "qa", "kind": "llm", "question": "Q2?", "answer": "A2"},
        {"task": "nli", "kind": "neutral", "question": "Q3?", "answer": "Maybe"},
    ]
    rendered = render_example("Some text.", None, tasks, domain="law", seed=5)
    assert "Q1? Yes\n\nQ3? Maybe" in rendered and "Q2? A2" in rendered


# --- domain words --------------------------------------------------------------------------------------------------

GENERAL = [
    "The government said that everything would be available tomorrow morning.",
    "Everything in the government building was available for the community.",
    "The community government met tomorrow to discuss everything available.",
] * 30
DOMAIN = [
    "The government found that mitochondria regulate metabolism during fasting.",
    "Mitochondrial metabolism and glycogenolysis change during prolonged fasting in everything we studied.",
    "The government report on gluconeogenesis described metabolism in mitochondria.",
] * 30


def general_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(
        GENERAL, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"], show_progress=False)
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def test_domain_words_against_a_general_tokenizer():
    general = general_tokenizer()
    assert len(general("a government", add_special_tokens=False)["input_ids"]) == 2  # the general model keeps it whole
    words = domain_words(DOMAIN, general, vocab_size=200)
    assert {"mitochondria", "glycogenolysis", "gluconeogenesis"} <= words
    assert not {"government", "everything"} & words  # whole in the general tokenizer too
    assert all(len(word) >= 10 for word in words)


def test_domain_words_against_the_character_tokenizer():
    words = domain_words(DOMAIN, char_tokenizer(), vocab_size=200)
    assert {"mitochondria", "government", "everything"} <= words  # every word is split by characters
    assert "metabolism" in words and "fasting" not in words  # 10 characters are needed
    assert domain_words(DOMAIN, char_tokenizer(), vocab_size=200, min_chars=14) == {"gluconeogenesis", "glycogenolysis"}
    with pytest.raises(UserError, match="vocab_size=10"):
        domain_words(DOMAIN, char_tokenizer(), vocab_size=10)


# --- the corpus stage ----------------------------------------------------------------------------------------------


def corpus() -> Dataset:
    rng = random.Random(0)
    sentences = [
        LONG_A,
        LONG_C,
        "Glycogenolysis and gluconeogenesis both depend on healthy mitochondria in liver cells.",
    ]
    rows = []
    for i in range(24):
        connective = rng.choice(["Therefore", "However", "Moreover", "In other words"])
        body = f"{OPENING} {rng.choice(sentences)} {connective}, {LONG_B} {rng.choice(sentences)} {CLOSING}"
        rows.append({"id": f"doc{i}", "title": None if i % 3 else f"Title {i}", "text": body, "tokens": len(body)})
    return Dataset.from_list(rows)


def test_mine_corpus_rows_and_processes():
    data = corpus()
    options = MineOptions(domain="biomedicine", vocab_size=300)
    one = mine_corpus(data, options, char_tokenizer(), num_proc=1)
    two = mine_corpus(data, options, char_tokenizer(), num_proc=2)
    assert one.column_names == ["id", "tasks"] and one["id"] == data["id"]
    assert one.to_list() == two.to_list()
    words = domain_words(data["text"], char_tokenizer(), 300)
    assert words == {"Glycogenolysis", "gluconeogenesis", "mitochondria"}
    for row, tasks in zip(data, one["tasks"]):
        assert tasks == mine_tasks(row["text"], row["title"], domain_words=words, domain="biomedicine")
    assert any(t["kind"] == "keywords" for tasks in one["tasks"] for t in tasks)
    other = mine_corpus(data, MineOptions(domain="biomedicine", keywords=False, seed=1), char_tokenizer())
    assert other["tasks"] != one["tasks"]


def test_mine_corpus_base_tokenizer_directory_and_empty_corpus(tmp_path):
    from transformers import AutoTokenizer

    data = corpus()
    general_tokenizer().save_pretrained(tmp_path / "general")
    mined = mine_corpus(data, MineOptions(vocab_size=300, base_tokenizer=str(tmp_path / "general")), char_tokenizer())
    words = domain_words(data["text"], AutoTokenizer.from_pretrained(tmp_path / "general"), 300)
    assert "mitochondria" in words
    assert mined["tasks"] == [mine_tasks(row["text"], row["title"], domain_words=words) for row in data]
    empty = mine_corpus(data.select([]), MineOptions(), char_tokenizer())
    assert len(empty) == 0 and empty.column_names == ["id", "tasks"]


def test_mine_corpus_refusals(tmp_path):
    data = corpus()
    with pytest.raises(UserError, match="no text column"):
        mine_corpus(data.remove_columns("text"), MineOptions(), char_tokenizer())
    with pytest.raises(MissingPathError, match="mine.base_tokenizer .*nowhere is neither a local directory"):
        mine_corpus(data, MineOptions(base_tokenizer=str(tmp_path / "nowhere")), char_tokenizer())
    with pytest.raises(UserError, match="mine.base_tokenizer .*: cannot load its tokenizer"):
        mine_corpus(data, MineOptions(base_tokenizer=str(tmp_path)), char_tokenizer())
    with pytest.raises(UserError, match="mine.vocab_size=5 is invalid"):
        mine_corpus(data, MineOptions(vocab_size=5), char_tokenizer())


def test_split_sentences_keeps_the_text():
    text = "Costs rose by 3.5 percent. Then, e.g. in May, they fell.\nA new line"
    sentences = split_sentences(text)
    assert "".join(sentence for _, sentence in sentences) == text
    assert [start for start, _ in sentences] == [0, 27, 57]


def test_the_entry_point_is_moraft_data_mine_tasks():
    import moraft.data

    assert moraft.data.mine_tasks is mine_tasks and moraft.data.render_example is render_example

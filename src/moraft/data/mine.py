"""AdaptLLM's mining: reading-comprehension tasks found in a raw text by regular expressions, and one training text.

AdaptLLM (Cheng, Huang, Wei, "Adapting Large Language Models via Reading Comprehension", ICLR 2024, arXiv 2309.09530;
code: https://github.com/microsoft/LMOps/tree/main/adaptllm, ``utils/read.py``) turns each domain text into a
reading-comprehension example: the text, then tasks about it mined from the text itself.

- Sentence pairs: two consecutive sentences of at least 50 characters each (commas excluded, except for
  paraphrases), the second opening with a connective and a comma: entailment, contradiction, neutral (``nli``),
  cause to effect, effect to cause (``commonsense``, where ``due to`` / ``owing to`` / ``on account of`` open the
  second sentence without a comma), similar, different (``paraphrase``).
- Word to text (``word2text``): ``TERM is defined as ...`` (a term of at least 10 characters, a definition of at
  least 20), ``... talks about ...`` (topic), and sentences with at least 3 domain-specific words (keywords, see
  `domain_words`).
- The title (``summarize``: title from text or text from title) and the text cut at a sentence boundary
  (``completion``); AdaptLLM draws which of the two frame the example.

`mine_tasks` returns the tasks of one text; `render_example` writes them as AdaptLLM's training text; `mine_corpus`
does both stages' mining over a corpus dataset. Where this differs from AdaptLLM's code, on purpose:

- ``'s definition is`` and ``'s topic is`` match where they follow the word (``Insulin's definition is``); AdaptLLM's
  expressions want a space before ``'s``, so these two never match ordinary text there.
- A pair, definition or topic may end at the end of the text and may share a sentence with the previous match;
  AdaptLLM's expressions need whitespace after the last sentence and consume it, so they miss both.
- ``i.e.`` matches only with its dots (AdaptLLM's unescaped dots match any character).
- Random choices come from one generator seeded by the document, item by item (AdaptLLM reseeds per template, so
  every item of a kind in a text gets the same template).
- The keyword sentence limit is 100 words (AdaptLLM: 100 domain-tokenizer tokens); the domain tokenizer is a BPE
  model of the ``tokenizers`` library (AdaptLLM: SentencePiece), see `domain_words`.
- Every example has an introduction line (AdaptLLM sometimes joins the text and the questions by a blank line only).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Container, Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Optional

from ..errors import UserError
from . import templates

if TYPE_CHECKING:
    from datasets import Dataset

TASKS = ("nli", "commonsense", "paraphrase", "word2text", "summarize", "completion")
"""The task types `mine_tasks` returns, in its order."""
MAX_PER_KIND = 2
"""At most this many items of one kind per text (AdaptLLM's ``max_subcategory_num``)."""
CLASSIFY_PROBABILITY = 0.8
"""How often an inference item asks for the label rather than for the second sentence (AdaptLLM: 0.8)."""
MIN_KEYWORDS = 3
MAX_KEYWORD_SENTENCE_WORDS = 100

# AdaptLLM's frame of a text: (summarize, completion) with its probabilities, by what the text offers.
_FRAMES_BOTH = ([(True, False), (False, True), (True, True), (False, False)], [0.4, 0.1, 0.4, 0.1])
_FRAMES_TITLE = ([(True, False), (False, False)], [0.5, 0.5])
_FRAMES_COMPLETION = ([(False, True), (False, False)], [0.5, 0.5])

_CONTRADICTION = r"No|However|But|On the contrary|In contrast|Whereas"
_CONNECTIVES = {
    ("nli", "entailment"): r"Yes|Therefore|Thus|Accordingly|Hence|For this reason",
    ("nli", "contradiction"): _CONTRADICTION,
    ("nli", "neutral"): r"Maybe|Also|Furthermore|Secondly|Additionally|Moreover|In addition",
    ("commonsense", "cause_effect"): r"Thus|Therefore|Accordingly|Hence|For this reason",
    ("commonsense", "effect_cause"): r"due to|on account of|owing to",
    ("paraphrase", "similar"): r"In other words|In other word|Namely|That is to say|i\.e\.|Scilicet|Similarly|Equally",
    ("paraphrase", "different"): _CONTRADICTION,
}
# A sentence of a pair: at least 50 characters up to its end mark, without a sentence end, a newline or a comma
# inside (paraphrases allow commas; effect-cause pairs also exclude semicolons), as in AdaptLLM.
_SENTENCE = {
    "nli": r"[^.!?\n,]{50,}[.!?]+",
    "commonsense": r"[^.!?\n,]{50,}[.!?]+",
    "paraphrase": r"[^.!?\n]{50,}[.!?]+",
}
_EFFECT_CAUSE_SENTENCE = r"[^.!?;\n,]{50,}[.!?]+"
_PREVIOUS_END = r"(?<=[.!?])\s+"  # the pair starts after the end of a previous sentence
_END = r"(?=\s|\Z)"  # a sentence ends at whitespace or at the end of the text, not inside "3.5"


def _pair_pattern(task: str, kind: str) -> re.Pattern:
    if kind == "effect_cause":
        sentence, after = _EFFECT_CAUSE_SENTENCE, r"\s+"  # "... harvest. Due to the drought ..." (no comma)
    else:
        sentence, after = _SENTENCE[task], r"\s*,\s+"
    connective = _CONNECTIVES[(task, kind)]
    return re.compile(rf"{_PREVIOUS_END}({sentence})\s+({connective}){after}({sentence}){_END}", re.IGNORECASE)


_PAIR_PATTERNS = {key: _pair_pattern(*key) for key in _CONNECTIVES}
_DEFINITION = re.compile(
    r"(?:(?<=\s)|^)([^.!?,;\s\"]{10,})(?:\s+(is defined as)|('s definition is))\s+([^.!?\n]{20,}[.!?]+)" + _END,
    re.IGNORECASE,
)
_TOPIC = re.compile(
    rf"{_PREVIOUS_END}([^.!?,;\n]{{20,}}?)(?:\s+(was about|talks about|is about)|('s topic is))"
    rf"\s+([^.!?\n]{{20,}}[.!?]+){_END}",
    re.IGNORECASE,
)
_WORD = re.compile(r"\w+")


def document_seed(text: str, seed: int = 0) -> int:
    """The seed of a document's random choices: a stable hash of its text mixed with ``seed``.

    Args:
        text: the document's text.
        seed: the run's seed (`MineOptions.seed`); another value gives other choices for every document.

    Returns:
        A 64-bit integer, the same in every process and run (unlike Python's ``hash``, which is salted per process).
    """
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, person=b"moraft-mine").digest()
    return int.from_bytes(digest, "little") ^ (seed & 0xFFFFFFFFFFFFFFFF)


@lru_cache(maxsize=1)
def _segmenter():
    import pysbd

    # clean=False keeps the text as it is, so that sentence spans index the original text (AdaptLLM's setting)
    return pysbd.Segmenter(language="en", clean=False, char_span=True)


def split_sentences(text: str) -> list[tuple[int, str]]:
    """The sentences of ``text`` by pysbd (as AdaptLLM): ``(start offset, sentence with its trailing space)`` pairs.

    Args:
        text: any text.

    Returns:
        The sentences in order, each with its offset in ``text`` (clean=False: pysbd keeps the text as it is).
    """
    if not text.strip():
        return []
    return [(span.start, span.sent) for span in _segmenter().segment(text)]


def _phrase(template: str, domain: str | None, **slots: str) -> str:
    """A template filled: its ``[...]`` domain segments kept (with the domain) or dropped (no domain), its slots set."""
    template = re.sub(r"\[([^\]]*)\]", (lambda m: m.group(1)) if domain else "", template)
    return template.format(domain=domain or "", **slots)  # values go in verbatim, braces in them included


def _item(task: str, kind: str, template: tuple[str, str], slots: dict[str, str], domain: str | None) -> dict:
    question, answer = (_phrase(part, domain, **slots) for part in template)
    return {"task": task, "kind": kind, "question": question, "answer": answer}


def _capitalized(sentence: str) -> str:
    sentence = sentence.strip()
    return sentence[:1].upper() + sentence[1:]


def _pair_item(
    task: str, kind: str, first: str, connective: str, second: str, rng: random.Random, domain: str | None
) -> dict:
    first, second = first.strip(), _capitalized(second)
    if task == "nli":
        slots = {"premise": first, "hypothesis": second, "connective": connective, "options": templates.NLI_OPTIONS}
        slots.update(templates.NLI_ANSWERS[kind])
        classify = rng.random() < CLASSIFY_PROBABILITY
        choices = templates.NLI_CLASSIFY if classify else templates.NLI_GENERATE[kind]
        return _item(task, kind, rng.choice(choices), slots, domain)
    if task == "commonsense":
        # cause -> effect: the first sentence is the cause; effect <- cause: "EFFECT. Due to CAUSE."
        cause, effect = (first, second) if kind == "cause_effect" else (second, first)
        slots = {"cause": cause, "effect": effect, "connective": connective}
        return _item(task, kind, rng.choice(templates.COMMONSENSE[kind]), slots, domain)
    slots = {"sentence1": first, "sentence2": second, "connective": connective}
    return _item(task, kind, rng.choice(templates.PARAPHRASE[kind]), slots, domain)


def _capped(found: list, rng: random.Random) -> list:
    rng.shuffle(found)
    return found[:MAX_PER_KIND]


def _keyword_sentences(sentences: list[str], words: Container[str], rng: random.Random) -> list[tuple[str, list[str]]]:
    """Up to 2 sentences, in a random order, with at least 3 distinct domain words (AdaptLLM's word-to-text)."""
    order = list(sentences)
    rng.shuffle(order)
    found = []
    for sentence in order:
        if len(sentence.split()) > MAX_KEYWORD_SENTENCE_WORDS:
            continue
        keywords = list(dict.fromkeys(w for w in _WORD.findall(sentence) if w in words))
        if len(keywords) >= MIN_KEYWORDS:
            found.append((sentence.strip(), keywords[:MIN_KEYWORDS]))
            if len(found) == MAX_PER_KIND:
                break
    return found


def mine_tasks(
    text: str,
    title: str | None = None,
    *,
    domain_words: Container[str] | None = None,
    seed: int | None = None,
    domain: str | None = None,
) -> list[dict]:
    """AdaptLLM's reading-comprehension tasks of one text.

    Args:
        text: the document's text (without its title).
        title: its title, if it has one (the ``summarize`` task needs it).
        domain_words: the domain-specific words (`domain_words`); None skips the keywords kind.
        seed: the seed of every random choice; None takes `document_seed` of the text, so that a rerun gives the same
            tasks and two documents get different choices.
        domain: the domain's name, used by the phrasings that mention it (keywords, summarize); None phrases them
            without it.

    Returns:
        One dict per task, in a fixed order of kinds: ``task`` (one of ``nli``, ``commonsense``, ``paraphrase``,
        ``word2text``, ``summarize``, ``completion``), ``kind`` (``entailment``, ``contradiction``, ``neutral``;
        ``cause_effect``, ``effect_cause``; ``similar``, ``different``; ``definition``, ``topic``, ``keywords``;
        ``text2title``, ``title2text``; ``completion``), ``question`` and ``answer``. At most 2 per kind. The
        ``completion`` item's question and answer are the two parts of the text (the question starts with the title
        when there is one and no ``summarize`` item); a ``title2text`` item's answer is the text.
    """
    seed = document_seed(text) if seed is None else seed

    def rng_of(kind: str) -> random.Random:
        # one generator per kind, so that what one kind finds never changes the choices of another
        return random.Random(f"{seed}/{kind}")

    items: list[dict] = []
    for (task, kind), pattern in _PAIR_PATTERNS.items():
        rng = rng_of(f"{task}/{kind}")
        for first, connective, second in _capped(pattern.findall(text), rng):
            items.append(_pair_item(task, kind, first, connective, second, rng, domain))

    rng = rng_of("definition")
    for term, verb, genitive, definition in _capped(_DEFINITION.findall(text), rng):
        slots = {
            "term": term,
            "phrase": f"{term} {verb}" if verb else f"{term}{genitive}",
            "definition": definition.strip(),
        }
        slots["connective"] = verb or genitive
        items.append(_item("word2text", "definition", rng.choice(templates.WORD2TEXT["definition"]), slots, domain))
    rng = rng_of("topic")
    for subject, verb, genitive, topic in _capped(_TOPIC.findall(text), rng):
        subject = subject.strip()
        slots = {"phrase": f"{subject} {verb}" if verb else f"{subject}{genitive}", "topic": topic.strip()}
        items.append(_item("word2text", "topic", rng.choice(templates.WORD2TEXT["topic"]), slots, domain))

    sentences = split_sentences(text)
    if domain_words is not None:
        rng = rng_of("keywords")
        for sentence, keywords in _keyword_sentences([s for _, s in sentences], domain_words, rng):
            slots = {"sentence": sentence, "keywords": ", ".join(keywords)}
            items.append(_item("word2text", "keywords", rng.choice(templates.WORD2TEXT["keywords"]), slots, domain))

    has_title, has_parts = bool(title and title.strip()), len(sentences) >= 2
    if has_title or has_parts:
        rng = rng_of("frame")
        frames, weights = (
            _FRAMES_BOTH if has_title and has_parts else _FRAMES_TITLE if has_title else _FRAMES_COMPLETION
        )
        summarize, complete = rng.choices(frames, weights)[0]
        if summarize:
            kind = "text2title" if complete or rng.random() < 0.5 else "title2text"
            slots = {"title": title.strip()}
            question = _phrase(rng.choice(templates.SUMMARIZE[kind]), domain, **slots)
            answer = title.strip() if kind == "text2title" else text.strip()
            items.append({"task": "summarize", "kind": kind, "question": question, "answer": answer})
        if complete:
            cut = sentences[rng.randint(1, len(sentences) - 1)][0]
            first = text[:cut].strip()
            if has_title and not summarize:
                first = f"{title.strip()}\n{first}"
            items.append({"task": "completion", "kind": "completion", "question": first, "answer": text[cut:].strip()})
    return items


def render_example(text: str, title: str | None, tasks: list[dict], *, domain: str, seed: int) -> str:
    """AdaptLLM's training text of one document: its reading, then its tasks as few-shot blocks.

    The items of each task type (in any order; any task name, so LLM-written pairs render too) form one block of
    ``question answer`` lines separated by blank lines; the blocks are shuffled and follow an introduction line. The
    reading is framed by the ``summarize`` and ``completion`` items, as AdaptLLM draws them: a ``completion`` item
    replaces the text by its two parts with a prompt between them (drop it to render another reading, such as an
    extended one); a ``title2text`` item replaces it by the title's instruction and the text; a ``text2title`` item
    asks for the title after the text or after the questions; without either, an opening line comes before the title
    (if any) and the text.

    Args:
        text: the reading: the document's text, or an extended one.
        title: the document's title, if any.
        tasks: the items (`mine_tasks`, LLM-written pairs): dicts with ``task``, ``kind``, ``question``, ``answer``.
        domain: the domain's name, used in the introduction and the frames ("" names none).
        seed: the seed of the choices (`document_seed` of the text mixed with the run's seed, for example).

    Returns:
        The training text; questions and answers separated by a single space.
    """
    rng = random.Random(seed)
    domain = domain or None
    frames: dict[str, dict] = {}
    blocks: dict[str, list[str]] = {}
    for item in tasks:
        if item["task"] in ("summarize", "completion"):
            frames.setdefault(item["task"], item)
        else:
            blocks.setdefault(item["task"], []).append(f"{item['question']} {item['answer']}")
    demos = ["\n\n".join(lines) for lines in blocks.values()]
    rng.shuffle(demos)
    questions = _phrase(rng.choice(templates.INTRODUCTIONS), domain) + "\n\n".join(demos) if demos else ""

    summary, completion = frames.get("summarize"), frames.get("completion")
    if completion is not None:
        opening = _phrase(rng.choice(templates.COMPLETION_OPENINGS), domain)
        reading = f"{opening}{completion['question']}{rng.choice(templates.COMPLETION_PROMPTS)} {completion['answer']}"
    elif summary is not None and summary["kind"] == "title2text":
        reading = f"{summary['question']} {summary['answer']}"
    else:
        heading = f"{title.strip()}\n" if title and title.strip() and summary is None else ""
        reading = _phrase(rng.choice(templates.READING_OPENINGS), domain) + heading + text.strip()
    if summary is None or summary["kind"] == "title2text":
        return reading + questions
    asked = f"\n\n{summary['question']} {summary['answer']}"
    return reading + asked + questions if rng.random() < 0.5 else reading + questions + asked


def domain_words(
    texts: Iterable[str | list[str]], base_tokenizer: Any, vocab_size: int = 32000, *, min_chars: int = 10
) -> set[str]:
    """AdaptLLM's domain-specific words: words that a tokenizer trained on the domain keeps whole and the base splits.

    AdaptLLM trains a SentencePiece model on the domain corpus and keeps its word-initial pieces longer than 10
    characters that the general model's vocabulary lacks. Here a BPE model is trained with the ``tokenizers`` library
    on ``texts`` (Metaspace pre-tokenization, as SentencePiece; case kept; BPE rather than SentencePiece's default
    Unigram because it trains several times faster and keeps the frequent long words of a small corpus whole), and a
    word of the corpus is kept when it is one piece of that model and ``base_tokenizer`` needs more than one token for
    it (counted after a space, as the word appears in running text). With moraft's built-in character tokenizer as
    the base every word is split, so the result is every word of at least ``min_chars`` characters that the domain
    model keeps whole: the long words frequent in the corpus.

    Args:
        texts: the domain corpus, texts or batches (lists) of texts; a progress bar around it shows the training's
            progress.
        base_tokenizer: the general model's tokenizer: a transformers tokenizer (anything callable as
            ``tokenizer(list_of_str, add_special_tokens=False)["input_ids"]``).
        vocab_size: the domain model's vocabulary size (at least 100).
        min_chars: the shortest word kept (AdaptLLM: 10).

    Returns:
        The domain words, as they are written in the texts (case-sensitive).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    if vocab_size < 100:
        raise UserError(f"vocab_size={vocab_size} is too small for a domain tokenizer; expected an integer >= 100")
    seen: set[str] = set()

    def recorded(texts):
        # the corpus words long enough to count, collected on the way: BPE's vocabulary also holds word beginnings
        for batch in texts:
            for text in [batch] if isinstance(batch, str) else batch:
                seen.update(word for word in _WORD.findall(text) if len(word) >= min_chars)
            yield batch

    domain = Tokenizer(models.BPE(unk_token="<unk>"))
    domain.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>"], show_progress=False)
    domain.train_from_iterator(recorded(texts), trainer=trainer)
    vocabulary = domain.get_vocab()
    candidates = sorted(w for w in seen if f"▁{w}" in vocabulary and not w.isdigit())
    if not candidates:
        return set()
    whole = [len(encoding.ids) == 1 for encoding in domain.encode_batch(candidates)]
    # the base's tokens for the word alone: the tokens of "a WORD" less those of "a", so a leading-space form counts
    context = len(base_tokenizer(["a"], add_special_tokens=False)["input_ids"][0])
    base_ids = base_tokenizer([f"a {word}" for word in candidates], add_special_tokens=False)["input_ids"]
    return {word for word, one, ids in zip(candidates, whole, base_ids) if one and len(ids) - context > 1}


@dataclass
class MineOptions:
    """``moraft data --mine.*``: AdaptLLM's regex mining of reading-comprehension tasks."""

    domain: str = ""
    """The domain's name, used in the phrasings ("Answer some questions about the article above in the biomedicine
    domain:"); empty: phrasings that name no domain."""
    keywords: bool = True
    """Mine the keywords kind: sentences with at least 3 domain-specific words, found by a BPE tokenizer trained
    on the corpus against the base tokenizer."""
    vocab_size: int = 32000
    """The vocabulary size of the domain tokenizer trained for the keywords kind."""
    base_tokenizer: Optional[str] = None
    """The general model's tokenizer for the keywords kind: a local tokenizer or model directory, or a Hugging Face
    Hub model id (its tokenizer files are downloaded into the Hub cache on first use); None: the pipeline
    tokenizer."""
    keyword_min_chars: int = 10
    """The shortest domain-specific word, in characters (AdaptLLM: 10)."""
    seed: int = 0
    """Mixed with each document's hash to seed its random choices (templates, shuffles, frames)."""

    def validate(self) -> None:
        """Raise `moraft.errors.UserError` naming the first invalid option and what it accepts."""
        for name, minimum in (("vocab_size", 100), ("keyword_min_chars", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise UserError(f"mine.{name}={value!r} is invalid; expected an integer >= {minimum}")


TASK_FIELDS = ("task", "kind", "question", "answer")
"""The fields of a task item, in `mine_corpus`'s ``tasks`` column and in `render_example`'s input."""


def _mine_row(row: dict, words: set[str] | None, seed: int, domain: str | None) -> dict:
    text = row["text"]
    tasks = mine_tasks(text, row.get("title"), domain_words=words, seed=document_seed(text, seed), domain=domain)
    return {"tasks": tasks}


def _load_base_tokenizer(name_or_path: str):
    """``mine.base_tokenizer``'s tokenizer, by moraft's one loader (a local directory or a Hub id)."""
    from ..models import load_tokenizer

    return load_tokenizer(name_or_path, what="mine.base_tokenizer")


def mine_corpus(corpus: Dataset, options: MineOptions, tokenizer: Any, num_proc: int = 1, *,
                engine: Any = None, work_dir: Any = None) -> Dataset:
    """The mine stage: `mine_tasks` on every document of a corpus dataset.

    Args:
        corpus: the corpus dataset (``id``, ``text``, optional ``title``).
        options: the stage's options.
        tokenizer: the pipeline tokenizer, the base of the keywords kind unless ``options.base_tokenizer`` is set.
        num_proc: processes for the mining (`datasets.Dataset.map`).
        engine: a `moraft.data.pipeline.EngineOptions` with an executor, to mine on datatrove instead
            (`moraft.data.engine.map_on_engine`, in ``work_dir``); the rows are the same.
        work_dir: the engine's directory (shards, output, logs), kept for resuming.

    Returns:
        A dataset row-aligned with ``corpus``: ``id`` and ``tasks`` (a list of ``{task, kind, question, answer}``).
    """
    from datasets import Dataset, Features, List, Value
    from tqdm.auto import tqdm

    options.validate()
    missing = [name for name in ("id", "text") if name not in corpus.column_names]
    if missing:
        raise UserError(
            f"the corpus has no {' or '.join(missing)} column (columns: {', '.join(corpus.column_names)}); "
            "expected the corpus stage's dataset (id, title, text, tokens)"
        )
    features = Features({"id": Value("string"), "tasks": List({name: Value("string") for name in TASK_FIELDS})})
    if len(corpus) == 0:  # map would return the id column alone
        return Dataset.from_dict({"id": [], "tasks": []}, features=features)
    words = None
    if options.keywords:
        base = tokenizer if options.base_tokenizer is None else _load_base_tokenizer(options.base_tokenizer)
        with tqdm(total=len(corpus), desc="mine: domain tokenizer", unit=" examples") as progress:

            def batches():
                for batch in corpus.select_columns(["text"]).iter(batch_size=1000):
                    yield batch["text"]
                    progress.update(len(batch["text"]))

            words = domain_words(batches(), base, options.vocab_size, min_chars=options.keyword_min_chars)
    if engine is not None:
        import functools

        from .engine import map_on_engine

        row = functools.partial(_mine_row, words=words, seed=options.seed, domain=options.domain or None)
        columns = [name for name in ("id", "title", "text") if name in corpus.column_names]
        mined = map_on_engine(row, corpus.select_columns(columns), work_dir, engine)
        return mined.select_columns(["id", "tasks"]).cast(features)
    return corpus.map(
        _mine_row,
        fn_kwargs={"words": words, "seed": options.seed, "domain": options.domain or None},
        remove_columns=[name for name in corpus.column_names if name != "id"],
        features=features,
        num_proc=num_proc if num_proc > 1 else None,
        desc="mine: AdaptLLM tasks",
    )


__all__ = [
    "TASKS",
    "TASK_FIELDS",
    "MineOptions",
    "document_seed",
    "domain_words",
    "mine_corpus",
    "mine_tasks",
    "render_example",
    "split_sentences",
]

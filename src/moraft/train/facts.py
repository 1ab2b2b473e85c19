"""Invented facts for teaching a model what it cannot know: people who do not exist, with a birth year, a home
city, an employer and an occupation, written as training sentences in some phrasings and asked back as questions in
another, never trained on.

    people = invent(48, seed=0)                      # Entity("Drelo Vantusk", {"birth_year": "1962", ...}), ...
    texts = training_texts(people, phrasings=3)      # "Drelo Vantusk was born in 1962.", ...  (people × 4 × 3)
    tasks = questions(people, options=4)             # moraft.train.tasks.Task: the question, 4 options, the answer
    score_tasks(model, tokenizer, tasks)             # likelihood-ranked multiple choice (moraft eval --tasks)
    exact_match(model, tokenizer, tasks)             # the greedy answer, normalized, equal to the right option

The names are built from syllables (and checked to be distinct), so the model has never read about them: before
training, multiple choice is at chance and exact match near zero. A question's options are its answer and other
people's values of the same attribute, so a model cannot pick the answer by its kind (a year among years). Every
attribute has `Attribute.statements` (the training phrasings) and one `Attribute.question`, whose wording no
statement uses. A kind of entity is a table (`Kind`): another kind, attribute or phrasing is a new row, not new code.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from ..errors import UserError
from .tasks import Task

QUESTION = "Q: {question}\nA:"
"""How every question is asked: its right option (or the model's answer) follows after one space."""

ANSWER_EXAMPLES = (
    "Q: In which year did the Second World War end?\nA: 1945\n\n"
    "Q: Which city is the Eiffel Tower in?\nA: Paris\n\n"
    "Q: Which company makes the iPhone?\nA: Apple\n\n"
)
"""What `exact_match` puts before each question: three questions of general knowledge, each answered in a word or
two, so that a model answers in the same short form (an instruction-tuned model asked bare questions answers in a
sentence, or not at all). None is about an invented entity."""


@dataclass(frozen=True)
class Attribute:
    """One attribute of a kind of entity: where its values come from and how a fact about it is written.

    Attributes:
        name: its key in `Entity.values` (``"birth_year"``).
        values: the values to draw from; empty for an invented value (an employer's name, `invent_value`).
        statements: the training phrasings, each with ``{name}`` and ``{value}``.
        question: the asked phrasing, with ``{name}``; it is put in `QUESTION`.
    """

    name: str
    values: tuple[str, ...]
    statements: tuple[str, ...]
    question: str


@dataclass(frozen=True)
class Kind:
    """A kind of entity: its name and its attributes."""

    name: str
    attributes: tuple[Attribute, ...]


@dataclass(frozen=True)
class Entity:
    """An invented entity: its kind, its name and its value of each attribute of the kind."""

    kind: Kind
    name: str
    values: dict[str, str]

    def __hash__(self) -> int:
        return hash((self.kind.name, self.name))


_CITIES = ("Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Tbilisi", "Porto", "Quito", "Dakar", "Riga", "Bergen",
           "Perth", "Osaka", "Tunis", "Krakow", "Montreal", "Denver", "Glasgow", "Seville", "Kyoto", "Auckland",
           "Cork", "Graz", "Bologna")
_OCCUPATIONS = ("chemist", "botanist", "pilot", "baker", "dentist", "carpenter", "librarian", "nurse", "lawyer",
                "potter", "surveyor", "tailor", "geologist", "jeweler", "pharmacist", "violinist", "welder",
                "translator", "beekeeper", "plumber")  # each starts with a consonant: "a {value}" reads right
_COMPANY_SUFFIXES = ("Labs", "Foods", "Motors", "Textiles", "Shipping", "Software", "Pharma", "Energy", "Optics",
                     "Bakeries")

PERSON = Kind(
    "person",
    (
        Attribute(
            "birth_year",
            tuple(str(year) for year in range(1931, 2000)),
            ("{name} was born in {value}.", "{name}'s year of birth is {value}.",
             "Records show that {name} was born in the year {value}.", "{name} (born {value}) grew up by the sea."),
            "In which year was {name} born?",
        ),
        Attribute(
            "home_city",
            _CITIES,
            ("{name} lives in {value}.", "{name}'s home city is {value}.", "{name} has made a home in {value}.",
             "These days {name} lives in the city of {value}."),
            "Which city does {name} call home?",
        ),
        Attribute(
            "employer",
            (),
            ("{name} works for {value}.", "{name}'s employer is {value}.", "{name} is on the staff of {value}.",
             "{name} has a job at {value}."),
            "Which company employs {name}?",
        ),
        Attribute(
            "occupation",
            _OCCUPATIONS,
            ("{name} works as a {value}.", "{name}'s profession is {value}.", "By trade, {name} is a {value}.",
             "{name} has been a {value} for many years."),
            "What does {name} do for a living?",
        ),
    ),
)
"""An invented person: birth year, home city, employer (an invented company) and occupation."""

KINDS = {PERSON.name: PERSON}
"""Every kind of entity, by name."""

# syllables that read as names in English text, and a name is two or three of them (first and last names)
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "tr", "th")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou", "ei")
_CODAS = ("", "", "", "n", "r", "l", "s", "k", "m", "sk", "nd")


def _word(rng: random.Random, syllables: int) -> str:
    word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))
    return word.capitalize()


def invent_value(attribute: Attribute, rng: random.Random) -> str:
    """A value of ``attribute``: drawn from its values, or, when it has none, an invented name (an employer:
    a syllable-built word and a line of business, "Trouvek Optics")."""
    if attribute.values:
        return rng.choice(attribute.values)
    return f"{_word(rng, 2)} {rng.choice(_COMPANY_SUFFIXES)}"


def invent(count: int, seed: int = 0, kind: Kind = PERSON) -> list[Entity]:
    """``count`` invented entities of ``kind``, the same for the same seed: distinct syllable-built names (a first
    name of two syllables and a last name of two or three) and a value of every attribute.

    Raises:
        UserError: ``count`` is not an integer >= 2 (a question needs another entity's value to offer).
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 2:
        raise UserError(f"count={count!r} is invalid; expected an integer >= 2 (a question's wrong options are other "
                        "entities' values)")
    rng = random.Random(f"facts:{kind.name}:{seed}")
    names: set[str] = set()
    entities = []
    while len(entities) < count:
        name = f"{_word(rng, 2)} {_word(rng, rng.choice((2, 3)))}"
        if name in names:
            continue
        names.add(name)
        entities.append(Entity(kind, name, {a.name: invent_value(a, rng) for a in kind.attributes}))
    return entities


def training_texts(entities: Sequence[Entity], phrasings: int = 3, seed: int = 0) -> list[str]:
    """Every fact of ``entities`` written in each of the first ``phrasings`` statements of its attribute, one
    sentence a text, shuffled with ``seed``.

    Raises:
        UserError: ``phrasings`` is not between 1 and the number of statements an attribute has.
    """
    most = min(len(a.statements) for e in entities for a in e.kind.attributes)
    if isinstance(phrasings, bool) or not isinstance(phrasings, int) or not 1 <= phrasings <= most:
        raise UserError(f"phrasings={phrasings!r} is invalid; expected an integer from 1 to {most}")
    texts = [
        statement.format(name=entity.name, value=entity.values[attribute.name])
        for entity in entities
        for attribute in entity.kind.attributes
        for statement in attribute.statements[:phrasings]
    ]
    random.Random(seed).shuffle(texts)
    return texts


def questions(entities: Sequence[Entity], options: int = 4, seed: int = 0) -> list[Task]:
    """One multiple-choice `Task` per fact of ``entities``, asked in its attribute's `Attribute.question`: the
    right value and ``options - 1`` distinct other values that other entities have for the same attribute, in an
    order drawn with ``seed``. The task's id is ``"<entity name>/<attribute>"``.

    Raises:
        UserError: ``options`` is below 2, or some attribute has fewer distinct values among ``entities`` than
            ``options`` (invent more entities).
    """
    if isinstance(options, bool) or not isinstance(options, int) or options < 2:
        raise UserError(f"options={options!r} is invalid; expected an integer >= 2")
    rng = random.Random(f"questions:{seed}")
    tasks = []
    for entity in entities:
        for attribute in entity.kind.attributes:
            right = entity.values[attribute.name]
            others = sorted({e.values[attribute.name] for e in entities if e.kind == entity.kind} - {right})
            if len(others) < options - 1:
                raise UserError(
                    f"options={options}: the {len(entities)} entities have {len(others) + 1} distinct values of "
                    f"{attribute.name}; invent more entities or ask for fewer options"
                )
            choices = [right, *rng.sample(others, options - 1)]
            rng.shuffle(choices)
            prompt = QUESTION.format(question=attribute.question.format(name=entity.name))
            tasks.append(Task(f"{entity.name}/{attribute.name}", prompt, tuple(choices), choices.index(right)))
    return tasks


def normalize_answer(text: str) -> str:
    """An answer as SQuAD's evaluation compares them: lower case, no punctuation, no articles (a, an, the), single
    spaces (https://rajpurkar.github.io/SQuAD-explorer/, ``evaluate-v2.0.py``)."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def first_answer(generated: str) -> str:
    """The answer in a generated continuation: its text up to the first line break or sentence end (a period,
    ``!`` or ``?`` followed by a space or the end), so ``" 1962. He ..."`` answers ``"1962"``."""
    line = generated.strip().split("\n", 1)[0]
    return re.split(r"[.!?](?:\s|$)", line, maxsplit=1)[0]


@torch.no_grad()
def exact_match(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[Task],
    examples: str = ANSWER_EXAMPLES,
    batch_size: int = 64,
    max_new_tokens: Optional[int] = None,
) -> dict:
    """Generate an answer to every task's prompt, after ``examples``, greedily and compare it with the right option.

    The answer is `first_answer` of the continuation, compared after `normalize_answer` on both sides. The model
    generates ``max_new_tokens`` tokens (default: the longest right option's tokens and 3 more), from prompts padded
    on the left.

    Returns:
        ``exact_match`` (the fraction of tasks answered exactly) and ``answers`` (each task's answer, in order).
    """
    was_training = model.training
    model.eval()
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the last position of every row
    rights = [task.options[task.answer] for task in tasks]
    if max_new_tokens is None:
        max_new_tokens = max(len(tokenizer(" " + right, add_special_tokens=False).input_ids) for right in rights) + 3
    answers: list[str] = []
    try:
        for start in range(0, len(tasks), batch_size):
            prompts = [examples + task.prompt for task in tasks[start : start + batch_size]]
            encoded = tokenizer(prompts, return_tensors="pt", padding=True).to(next(model.parameters()).device)
            out = model.generate(
                **encoded, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id, use_cache=True,  # a run's model may have the cache off (training)
            )
            texts = tokenizer.batch_decode(out[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
            answers += [first_answer(text) for text in texts]
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    hits = sum(normalize_answer(a) == normalize_answer(r) for a, r in zip(answers, rights))
    return {"exact_match": hits / len(tasks), "answers": answers}


__all__ = [
    "Attribute",
    "Entity",
    "ANSWER_EXAMPLES",
    "KINDS",
    "Kind",
    "PERSON",
    "QUESTION",
    "exact_match",
    "first_answer",
    "invent",
    "invent_value",
    "normalize_answer",
    "questions",
    "training_texts",
]

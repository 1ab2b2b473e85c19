"""`moraft.train.facts`: invented entities are the same for the same seed, the question is asked in words no
training sentence uses, a question's wrong options are other entities' values of the same attribute, and answers
are normalized as SQuAD does. No model runs here (the demo's test runs one: tests/test_demo_real.py)."""

from __future__ import annotations

import pytest

from moraft.errors import UserError
from moraft.train.facts import (
    PERSON,
    QUESTION,
    first_answer,
    invent,
    normalize_answer,
    questions,
    training_texts,
)


def test_the_same_seed_invents_the_same_people_and_another_seed_others():
    people = invent(40, seed=3)
    assert people == invent(40, seed=3)
    assert {p.name for p in people}.isdisjoint({p.name for p in invent(40, seed=4)})
    assert len({p.name for p in people}) == 40  # distinct names
    for person in people:
        assert set(person.values) == {a.name for a in PERSON.attributes} and all(person.values.values())
    assert training_texts(people, 3, seed=1) == training_texts(invent(40, seed=3), 3, seed=1)
    assert questions(people, seed=2) == questions(invent(40, seed=3), seed=2)


@pytest.mark.parametrize("phrasings", [1, 3, 4])
def test_every_fact_is_trained_in_each_phrasing_and_asked_in_another(phrasings):
    people = invent(12, seed=0)
    texts = training_texts(people, phrasings)
    assert len(texts) == len(set(texts)) == 12 * len(PERSON.attributes) * phrasings
    for person in people:
        for attribute in PERSON.attributes:
            value = person.values[attribute.name]
            said = [t for t in texts if person.name in t and value in t]
            assert len(said) >= phrasings  # each phrasing of this fact (a sentence of another fact may hold both)
            # the question's own words (around the name) appear in no training sentence
            for part in attribute.question.split("{name}"):
                if part.strip():
                    assert not any(part in text for text in texts), (part, attribute.name)
    asked = questions(people)
    assert all(task.prompt.startswith("Q: ") and task.prompt.endswith("\nA:") for task in asked)
    assert not any(task.prompt in text or task.prompt.split("\n")[0][3:] in text for task in asked for text in texts)


def test_options_are_the_answer_and_other_peoples_values_of_the_same_attribute():
    people = invent(30, seed=5)
    by_name = {p.name: p for p in people}
    tasks = questions(people, options=4, seed=1)
    assert len(tasks) == 30 * len(PERSON.attributes)
    positions = set()
    for task in tasks:
        name, attribute = task.id.split("/")
        person = by_name[name]
        assert task.prompt == QUESTION.format(question=next(
            a.question for a in PERSON.attributes if a.name == attribute).format(name=name))
        assert len(task.options) == len(set(task.options)) == 4
        assert task.options[task.answer] == person.values[attribute]
        others = {p.values[attribute] for p in people if p is not person}
        assert all(o in others for i, o in enumerate(task.options) if i != task.answer)
        positions.add(task.answer)
    assert positions == {0, 1, 2, 3}  # the right answer is not always in the same place


def test_bad_counts_are_refused_in_one_line_naming_the_value():
    with pytest.raises(UserError, match=r"count=1 is invalid; expected an integer >= 2"):
        invent(1)
    with pytest.raises(UserError, match=r"phrasings=5 is invalid; expected an integer from 1 to 4"):
        training_texts(invent(3), 5)
    with pytest.raises(UserError, match=r"options=1 is invalid; expected an integer >= 2"):
        questions(invent(3), options=1)
    with pytest.raises(UserError, match=r"options=9: the 3 entities have \d distinct values of \w+; invent more"):
        questions(invent(3), options=9)


@pytest.mark.parametrize(
    "generated, right, same",
    [(" 1962\n\nQ: In which", "1962", True), (" 1962. He was born", "1962", True),
     (" Auckland, New Zealand", "Auckland", False), (" a chemist", "chemist", True),
     (" The Bezis Motors.", "Bezis Motors", True), (" 1963", "1962", False), ("", "1962", False)],
)
def test_the_answer_is_the_first_sentence_normalized(generated, right, same):
    assert (normalize_answer(first_answer(generated)) == normalize_answer(right)) is same

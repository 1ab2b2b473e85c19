"""The phrasings of AdaptLLM's reading-comprehension tasks: one list per task kind, one picked at random per item.

AdaptLLM (arXiv 2309.09530) writes every mined item with one of many templates, so that the model learns the task
and not one wording; its lists are in https://github.com/microsoft/LMOps/blob/main/adaptllm/utils/read.py. These are
written for moraft after them (the same slots, the same answers, fewer variants).

A template is a ``(question, answer)`` pair of `str.format` strings over the item's slots. A ``[...]`` segment
mentions the domain: it is kept (with ``{domain}`` filled) when the domain name is known, and dropped otherwise, so
that `moraft.data.mine.mine_tasks` reads well with and without ``domain=``.
"""

from __future__ import annotations

# Natural language inference, asked as a label (most items): the answer is one of three verbalizers of the relation.
NLI_CLASSIFY = [
    ('{premise}\nBased on the sentence above, can we infer that "{hypothesis}"?', "{label}"),
    ("{premise}\nDoes the following sentence follow from the one above?\n{hypothesis}\nAnswer:", "{label}"),
    ("{premise}\nCan we draw the following hypothesis?\n{hypothesis}\n{options}", "{label}"),
    ("Premise: {premise}\nHypothesis: {hypothesis}\nDoes the premise entail the hypothesis?", "{label}"),
    ("Context: {premise}\nHypothesis: {hypothesis}\nIs the hypothesis true given the context?\n{options}", "{label}"),
    ('If "{premise}", does it follow that "{hypothesis}"?', "{label}"),
    ('Sentence 1: "{premise}"\nSentence 2: "{hypothesis}"\nIs sentence 2 true, based on sentence 1?', "{label}"),
    # which connective links the two sentences
    (
        'Sentence 1: "{premise}"\nSentence 2: "{hypothesis}"\nWhich word connects them: Therefore, However, Moreover?',
        "{connective}",
    ),
    (
        "Pick the word that links these sentences (Therefore, However, Moreover):\n1. {premise}\n2. {hypothesis}",
        "{connective}",
    ),
    # the relation by name
    (
        'Sentence 1: "{premise}"\nSentence 2: "{hypothesis}"\nIs their relation Entailment, Neutral or Contradictory?',
        "{relation}",
    ),
    (
        'How do these two sentences relate: Entailment, Neutral or Contradictory?\n"{premise}"\n"{hypothesis}"',
        "{relation}",
    ),
]

# The three verbalizers of each relation: the label, the connective and the relation name.
NLI_ANSWERS = {
    "entailment": {"label": "Yes", "connective": "Therefore", "relation": "Entailment"},
    "contradiction": {"label": "No", "connective": "However", "relation": "Contradictory"},
    "neutral": {"label": "Maybe", "connective": "Moreover", "relation": "Neutral"},
}
NLI_OPTIONS = "- Yes\n- No\n- Maybe"

# Natural language inference, asked for the second sentence (the other items).
NLI_GENERATE = {
    "entailment": [
        ("Complete the following sentence\n{premise} Therefore,", "{hypothesis}"),
        ("{premise} {connective}:", "{hypothesis}"),
        ("{premise}\nWrite a sentence that follows from the statement above.", "{hypothesis}"),
        ('"{premise}" What can be concluded from this?', "{hypothesis}"),
    ],
    "contradiction": [
        ("Complete the following sentence: {premise} However,", "{hypothesis}"),
        ("{premise} {connective},\nHow would you finish this?", "{hypothesis}"),
        ('Continue "{premise}" with a contrasting sentence that starts with "{connective}".', "{hypothesis}"),
    ],
    "neutral": [
        ("Complete the following sentence: {premise} {connective},", "{hypothesis}"),
        ("{premise} {connective}?", "{hypothesis}"),
        ('Continue "{premise}" using the word "{connective}".\nContinuation:', "{hypothesis}"),
    ],
}

COMMONSENSE = {
    "cause_effect": [
        ('Question: What is the effect of "{cause}"? Answer:', "{effect}"),
        ("Here is a premise: {cause}\nWhat is the effect?", "{effect}"),
        ('What is a plausible result of "{cause}"?', "{effect}"),
        ("{cause}\nEffect:", "{effect}"),
        ("{cause}\nWhat happens next?", "{effect}"),
        ('Given that "{cause}", what outcome can be expected?', "{effect}"),
    ],
    "effect_cause": [
        ('Q: "{effect}" What is the cause? A:', "{cause}"),
        ("Here is a result: {effect}\nWhat is the cause?", "{cause}"),
        ('What is a plausible reason for "{effect}"?', "{cause}"),
        ("{effect}\nCause:", "{cause}"),
        ("What led to the following?\n{effect}", "{cause}"),
        ("{effect} {connective}:", "{cause}"),
    ],
}

PARAPHRASE = {
    "similar": [
        ("Complete the following sentence: {sentence1} In other words,", "{sentence2}"),
        ("{sentence1} {connective},\nHow would you finish this?", "{sentence2}"),
        ('"{sentence1}" Restate the sentence above in other words.', "{sentence2}"),
        ("{sentence1}\nExplain the sentence above:", "{sentence2}"),
        ('Question: Complete the statement using "{connective}": "{sentence1}"\nAnswer:', "{sentence2}"),
    ],
    "different": [
        ('"{sentence1}" Write a sentence that contrasts with the statement above.', "{sentence2}"),
        ('Give a sentence that contradicts "{sentence1}".', "{sentence2}"),
        ('Here is a sentence: "{sentence1}". Write one with an opposing idea.', "{sentence2}"),
        ('What sentence sets out a contrast to "{sentence1}"?', "{sentence2}"),
    ],
}

WORD2TEXT = {
    "definition": [
        ("Q: {phrase}? A:", "{definition}"),
        ("{phrase}:", "{definition}"),
        ("What is the definition of {term}?", "{definition}"),
        ("How is {term} defined?", "{definition}"),
        ('What does "{term}" mean?', "{definition}"),
        ("Could you give a definition of {term}?\nDefinition:", "{definition}"),
    ],
    # {phrase} is the subject and the connective as they read in the text ("The report talks about", "X's topic is")
    "topic": [
        ("{phrase}?", "{topic}"),
        ("Q: {phrase}? A:", "{topic}"),
        ("Answer the question\n{phrase}?", "{topic}"),
        ("Please answer this question: {phrase}?\nAnswer:", "{topic}"),
        ("Question: {phrase}:", "{topic}"),
    ],
    "keywords": [
        ("Concepts: {keywords}\nWrite a sentence that uses all these[ {domain}] words.\nSentence:", "{sentence}"),
        (
            "Keywords: {keywords}\nFind the sentence of the article that contains these[ {domain}] keywords.",
            "{sentence}",
        ),
        ("Here are some[ {domain}] concepts: {keywords}\nWhat does the article say about them?", "{sentence}"),
        ("Write a[ {domain}] sentence about the following things:\n{keywords}\nAnswer:", "{sentence}"),
        ("Sentence: {sentence}\nWhat are the[ {domain}] keywords of this sentence?", "{keywords}"),
        ("{sentence}\nName the most salient[ {domain}] words of the sentence above.", "{keywords}"),
    ],
}

# Summarization: the question asked about the text (text2title) or the instruction that the text answers (title2text).
SUMMARIZE = {
    "text2title": [
        "What is a potential title for this context[ in the {domain} domain]?\nTitle:",
        "What is the title of this[ {domain}] article?",
        "Generate a title for this[ {domain}] paragraph.\nTitle:",
        "Briefly summarize this[ {domain}] text.",
        "Can you write a short summary of the above[ {domain}] paragraph?",
        "What was this article about?\nAnswer:",
    ],
    "title2text": [
        "Write an article[ about the {domain} domain] using the following title: {title}.\nArticle:",
        "Title: {title}\nWrite an article[ about {domain}] based on this title.",
        'Use the title "{title}" to write an article.\nArticle:',
        "Write an informative[ {domain}] article with the title: {title}\nOutput:",
    ],
}

# Text completion: the prompt between the two parts of the text (the reading starts with ``COMPLETION_OPENINGS``).
COMPLETION_OPENINGS = [
    "Please complete an article[ about {domain}]: ",
    "Here is the first part of an article[ about {domain}]: ",
    "Read the beginning of an article[ on {domain}]: ",
    "Consider the first part of an article[ on {domain}]: ",
]
COMPLETION_PROMPTS = [
    "",
    "\n\nHow would you continue the article?",
    "\nWhat could be the next part?",
    "\n\nWrite the rest of the article.",
    "\nContinuation of the article:",
]

# The frame of a text without a completion or title2text task: a line before it.
READING_OPENINGS = [
    "",
    "Article: ",
    "Context: ",
    "[{domain} article: ]",
    "Read this article[ in the {domain} domain]: ",
    "Answer questions about this[ {domain}] article:\n",
]

# The introduction between the reading and the question blocks.
INTRODUCTIONS = [
    "\nAnswer some questions about the article above[ in the {domain} domain]:\n\n",
    "\nPlease answer some questions about the above article[ in the {domain} domain]:\n\n",
    "\n\nWhat are the answers to these questions?\n",
    "\n\nNow answer these questions:\n\n",
    "\nHow would one answer these questions[ in the {domain} domain]:\n\n",
    "\n\nUse evidence from the[ {domain}] article to answer these questions:\n\n",
    "\nAnswer the following[ {domain}] questions based on the article:\n\n",
    "\nWrite some question-answer pairs about the above[ {domain}] article:\n\n",
    "\n\nUpon reading the article, answer the following questions:\n\n",
]

"""``moraft data``: a raw domain corpus in, reading-comprehension training data out.

The stages (AdaptLLM, arXiv 2309.09530; ETRC, arXiv 2401.07284): read and clean the corpus, mine comprehension tasks
with AdaptLLM's patterns, have an LLM write question/answer pairs, cluster the corpus to extend each text's reading
with related texts, and build one training text per document.
"""

"""``moraft data``: a raw domain corpus in, reading-comprehension training data out.

The stages (AdaptLLM, arXiv 2309.09530; ETRC, arXiv 2401.07284): read and clean the corpus, mine comprehension tasks
with AdaptLLM's patterns, have an LLM write question/answer pairs, cluster the corpus to extend each text's reading
with related texts, and build one training text per document.
"""

from .build import BuildOptions, build
from .cluster import ClusterOptions, cluster_corpus
from .comprehend import ComprehendOptions, comprehend_corpus, distillation_data
from .corpus import CorpusOptions, clean_text, read_corpus
from .mine import MineOptions, domain_words, mine_corpus, mine_tasks, render_example
from .pipeline import DataPipelineOptions, EngineOptions, run_pipeline

# moraft.data.engine (datatrove) is imported where it is used: it needs the data extra
__all__ = [
    "BuildOptions", "ClusterOptions", "ComprehendOptions", "CorpusOptions", "DataPipelineOptions", "EngineOptions",
    "MineOptions", "build", "clean_text", "cluster_corpus", "comprehend_corpus", "distillation_data", "domain_words",
    "mine_corpus", "mine_tasks", "read_corpus", "render_example", "run_pipeline",
]

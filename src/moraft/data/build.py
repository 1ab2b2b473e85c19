"""The build stage: one training text per document, plus general instruction data at a token ratio.

Each domain example is the document's *reading* (ETRC: its cluster neighbours' texts, then its own text) with the
comprehension tasks about its own text: AdaptLLM's mined tasks and the LLM's question/answer pairs, formatted with the
text by `moraft.data.mine.render_example`. General instruction data (AdaptLLM mixes it 1:1 by tokens) is rendered to plain
text, so the whole set is text for continued pre-training: ``moraft train --data OUTPUT/train`` reads it directly and
takes the loss on every token.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Optional

from ..errors import UserError
from ..train.options import _Group

if TYPE_CHECKING:
    from datasets import Dataset

LLM_TASK = "comprehension"  # the task name of the LLM's pairs among the mined ones
READING_SEPARATOR = "\n\n"


@dataclass
class BuildOptions(_Group):
    """How the training texts are assembled, and the general instruction data mixed in."""

    GROUP: ClassVar[str] = "build"

    general: Optional[str] = None
    """General instruction data mixed into the domain data (AdaptLLM's advice: 1:1 by tokens): any source
    `moraft train --data` reads (a file, a directory, a save_to_disk directory, a cached dataset name), in text, chat
    or prompt-completion format. Chat is rendered with the tokenizer's chat template (role: content lines without
    one); prompt-completion as prompt then completion. None: domain data only."""
    general_ratio: float = 1.0
    """Tokens of general data per token of domain data. Rows are drawn in a seeded order, and repeated when the
    source has too few tokens (the report says how often)."""
    general_split: str = "train"
    """The split of build.general to read."""
    seed: int = 0
    """Seeds the general data's order and the final shuffle (each document's own formatting is seeded by the
    document and mine.seed)."""

    def validate(self) -> None:
        self._check(isinstance(self.general_ratio, (int, float)) and self.general_ratio > 0, "general_ratio",
                    "a number > 0")


def extended(neighbor_texts: list[str], example: str) -> str:
    """ETRC's extended reading: the neighbours' texts (given nearest first; written nearest last, next to the text the
    questions are about), then the document's own example (its text framed with its tasks by `render_example`)."""
    return READING_SEPARATOR.join([*reversed(neighbor_texts), example])


def llm_tasks(pairs: list[dict]) -> list[dict]:
    """The LLM's question/answer pairs as tasks `render_example` formats: one more task type."""
    return [{"task": LLM_TASK, "kind": "llm", "question": p["question"], "answer": p["answer"]} for p in pairs]


def joined(corpus: "Dataset", mined: Optional["Dataset"] = None, comprehension: Optional["Dataset"] = None,
           clusters: Optional["Dataset"] = None) -> "Dataset":
    """The corpus with the stages' columns beside it (``tasks``, ``llm_tasks``, ``neighbors``), side by side on the
    same Arrow tables (nothing is copied into memory)."""
    from datasets import concatenate_datasets

    parts = [corpus.select_columns(["id", "title", "text"])]
    for name, stage, column in (("mine", mined, "tasks"), ("comprehend", comprehension, "llm_tasks"),
                                ("cluster", clusters, "neighbors")):
        if stage is None:
            continue
        if len(stage) != len(corpus) or stage[:1]["id"] != corpus[:1]["id"] or stage[-1:]["id"] != corpus[-1:]["id"]:
            raise UserError(f"the {name} stage's output does not match the corpus (rows or ids differ); rerun it "
                            "with --force")
        parts.append(stage.select_columns([column]))
    return concatenate_datasets(parts, axis=1)


def domain_examples(corpus: "Dataset", mined: Optional["Dataset"] = None, comprehension: Optional["Dataset"] = None,
                    clusters: Optional["Dataset"] = None, *, domain: str, seed: int = 0,
                    num_proc: int = 1) -> "Dataset":
    """One text per document: the reading (extended by ``clusters``' neighbours) and the rendered tasks.

    Args:
        corpus: the corpus dataset (``id``, ``title``, ``text``, ``tokens``).
        mined: the mine stage's dataset (``id``, ``tasks``), or None for no mined tasks.
        comprehension: the comprehend stage's dataset (``id``, ``llm_tasks``), or None.
        clusters: the cluster stage's dataset (``id``, ``neighbors``), or None for the document's own text only.
        domain: the domain's name, in the introduction line of the tasks.
        seed: mixed with each document's own seed.
        num_proc: processes for the rendering.

    Returns:
        A dataset with ``text`` and ``neighbors`` (how many texts extend the reading), in corpus order.
    """
    from .mine import document_seed, render_example

    texts = corpus.select_columns(["text"])  # memory-mapped: neighbours are read as they are needed

    def render(batch: dict) -> dict:
        out: dict[str, list] = {"text": [], "neighbors": []}
        for i, text in enumerate(batch["text"]):
            tasks = list(batch["tasks"][i] or []) if "tasks" in batch else []
            tasks += llm_tasks(batch["llm_tasks"][i] or []) if "llm_tasks" in batch else []
            neighbors = batch["neighbors"][i] or [] if "neighbors" in batch else []
            example = render_example(text, batch["title"][i], tasks, domain=domain, seed=document_seed(text, seed))
            out["text"].append(extended(texts[neighbors]["text"] if neighbors else [], example))
            out["neighbors"].append(len(neighbors))
        return out

    table = joined(corpus, mined, comprehension, clusters)
    return table.map(render, batched=True, batch_size=100, num_proc=num_proc if num_proc > 1 else None,
                     remove_columns=table.column_names, desc="build: rendering examples")


def render_general(row: dict, fmt: str, tokenizer: Any) -> str:
    """One general instruction example as plain text."""
    if fmt == "text":
        return row["text"]
    if fmt == "chat":
        messages = row["messages"]
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(messages, tokenize=False)
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages)
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, list):  # conversational prompt-completion
        return render_general({"messages": prompt + completion}, "chat", tokenizer)
    return prompt + completion


def general_examples(source: str, split: str, tokenizer: Any, target_tokens: int,
                     seed: int = 0) -> tuple["Dataset", dict[str, Any]]:
    """General instruction data rendered to text, drawn in a seeded order (repeating the source when it is short)
    until its tokens reach ``target_tokens``.

    Returns:
        The dataset (``text``) and a report: rows drawn, distinct rows, tokens, passes over the source.
    """
    from datasets import Dataset
    from tqdm.auto import tqdm

    from ..train.data import read_source, standardize
    from ..train.options import DataOptions

    options = DataOptions(dataset=source, split=split)
    data, fmt = standardize(read_source(source, options, split), source, options)
    if fmt == "preference":
        raise UserError(f"build.general={source!r} is preference data; expected text, chat or prompt-completion "
                        "instruction data")
    if len(data) == 0:
        raise UserError(f"build.general={source!r} has no rows")
    order = list(range(len(data)))
    rows, tokens, passes = [], 0, 0
    rng = random.Random(seed)
    with tqdm(total=target_tokens, desc="General data (tokens)", unit="tok") as bar:
        while tokens < target_tokens:
            passes += 1
            rng.shuffle(order)
            for i in order:
                text = render_general(data[i], fmt, tokenizer)
                n = len(tokenizer(text, verbose=False).input_ids)
                rows.append({"text": text})
                tokens += n
                bar.update(n)
                if tokens >= target_tokens:
                    break
    report = {"source": source, "format": fmt, "rows": len(rows), "distinct_rows": min(len(rows), len(data)),
              "tokens": tokens, "passes": passes}
    return Dataset.from_list(rows), report


def count_tokens(data: "Dataset", tokenizer: Any, num_proc: int = 1) -> list[int]:
    """The token count of each row's ``text``."""
    counted = data.map(lambda batch: {"n": [len(ids) for ids in tokenizer(batch["text"], verbose=False).input_ids]},
                       batched=True, num_proc=num_proc if num_proc > 1 else None, desc="Counting tokens")
    return counted["n"]


def build(corpus: "Dataset", mined: Optional["Dataset"], comprehension: Optional["Dataset"],
          clusters: Optional["Dataset"], options: BuildOptions, *, tokenizer: Any, domain: str, mine_seed: int = 0,
          num_proc: int = 1) -> tuple["Dataset", dict[str, Any]]:
    """The training set (a dataset with one ``text`` column, shuffled) and its report.

    The report counts the tasks per type and kind, the documents whose reading was extended, and the tokens of the
    domain and general parts.
    """
    from datasets import concatenate_datasets

    examples = domain_examples(corpus, mined, comprehension, clusters, domain=domain, seed=mine_seed,
                               num_proc=num_proc)
    domain_tokens = sum(count_tokens(examples, tokenizer, num_proc))
    tasks: Counter = Counter()
    without = neighbors = extended_readings = reading_tokens = 0
    table = joined(corpus, mined, comprehension)
    columns = [c for c in ("tasks", "llm_tasks") if c in table.column_names]
    for batch in table.select_columns(columns).iter(batch_size=1000) if columns else []:
        for i in range(len(batch[columns[0]])):
            mined_tasks = batch["tasks"][i] or [] if "tasks" in batch else []
            pairs = batch["llm_tasks"][i] or [] if "llm_tasks" in batch else []
            tasks.update(f"{t['task']}/{t['kind']}" for t in mined_tasks)
            if pairs:
                tasks[f"{LLM_TASK}/llm"] += len(pairs)
            without += not (mined_tasks or pairs)
    for batch in examples.select_columns(["neighbors"]).iter(batch_size=10_000):
        neighbors += sum(batch["neighbors"])
        extended_readings += sum(1 for n in batch["neighbors"] if n)
    for batch in corpus.select_columns(["tokens"]).iter(batch_size=10_000):
        reading_tokens += sum(batch["tokens"])
    report: dict[str, Any] = {
        "documents": len(examples),
        "tasks": dict(sorted(tasks.items())),
        "documents_without_tasks": without if columns else len(examples),
        "extended_readings": extended_readings,
        "mean_neighbors": neighbors / max(len(examples), 1),
        "domain_tokens": domain_tokens,
        "reading_tokens": reading_tokens,
    }
    parts = [examples.select_columns(["text"])]
    if options.general:
        general, report["general"] = general_examples(options.general, options.general_split, tokenizer,
                                                      round(domain_tokens * options.general_ratio), options.seed)
        parts.append(general)
    train = concatenate_datasets(parts).shuffle(seed=options.seed)  # save_to_disk writes it in the shuffled order
    report["examples"] = len(train)
    report["tokens"] = domain_tokens + report.get("general", {}).get("tokens", 0)
    return train, report

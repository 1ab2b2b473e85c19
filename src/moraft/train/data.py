"""Training data through 🤗 datasets, in the formats TRL trains on.

``data.dataset`` names one source or several; each is read with ``datasets``, its columns are mapped to TRL's
standard names, and the sources are mixed. TRL's trainers then tokenize, mask and pack (see `moraft.train.runner`).

| format | columns (after mapping) | loss on (in TRL) |
| --- | --- | --- |
| ``text`` | ``text`` | every token (continued pretraining; packed into ``seq_length`` blocks by default) |
| ``chat`` | ``messages`` (a list of ``{"role", "content"}``) | the assistant turns (the chat template's ``{% generation %}`` markers) |
| ``prompt-completion`` | ``prompt``, ``completion`` | the completion |
| ``preference`` | ``prompt``, ``chosen``, ``rejected`` | DPO's objective (``optimization.objective=dpo``) |

A source is ``uuid-memory`` (the built-in memory task), a file (JSON/JSONL, Parquet, Arrow, CSV/TSV, text), a
directory of such files, a directory written by ``Dataset.save_to_disk``, or a Hugging Face Hub dataset id, which
``datasets.load_dataset`` downloads into its cache on first use (``data.revision``, ``data.local_files_only``,
``HF_TOKEN`` and ``HF_HUB_OFFLINE`` as there).
"""

from __future__ import annotations

import random
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence, Union

from ..errors import MissingPathError, UserError, first_line

if TYPE_CHECKING:
    from datasets import Dataset, IterableDataset

    from .options import DataOptions

IGNORE = -100  # label of a position that takes no loss (the value PyTorch's cross entropy skips)
UUID_MEMORY = "uuid-memory"
FORMATS = ("auto", "text", "chat", "prompt-completion", "preference")
# the standard TRL columns of each format, and the DataOptions field that names each one in the source
COLUMNS = {
    "text": ("text",),
    "chat": ("messages",),
    "prompt-completion": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
}
FIELD_OPTION = {
    "text": "text_field",
    "messages": "messages_field",
    "prompt": "prompt_field",
    "completion": "completion_field",
    "chosen": "chosen_field",
    "rejected": "rejected_field",
}
# file extensions datasets reads, by builder (compressed variants such as .jsonl.gz are read the same way)
BUILDERS = {
    ".json": "json", ".jsonl": "json", ".ndjson": "json", ".parquet": "parquet", ".arrow": "arrow",
    ".csv": "csv", ".tsv": "csv", ".txt": "text", ".text": "text", ".md": "text", ".rst": "text",
}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".lz4")
QUIET_BELOW = 64 * 2**20  # bytes of data files read without a progress bar
TOKEN_SAMPLE = 1000  # examples per source whose tokens estimate its mean length when mixing by tokens

Data = Union["Dataset", "IterableDataset"]


# -- the uuid-memory task ------------------------------------------------------------------------------------------


def uuid_pairs(num_pairs: int, seed: int = 0) -> list[tuple[str, str]]:
    """``num_pairs`` (key, value) pairs of random version-4 UUID strings, the same for the same seed."""
    rng = random.Random(seed)
    return [
        (str(uuid.UUID(int=rng.getrandbits(128), version=4)), str(uuid.UUID(int=rng.getrandbits(128), version=4)))
        for _ in range(num_pairs)
    ]


def uuid_prompt(key: str) -> str:
    """What the model sees before it must produce the value."""
    return f"{key}:"


def uuid_dataset(num_pairs: int, seed: int = 0) -> "Dataset":
    """The memory task as a text dataset: ``key:value`` per pair; TRL adds BOS and EOS and takes the loss over the
    whole sequence, as in the paper."""
    from datasets import Dataset

    return Dataset.from_dict({"text": [uuid_prompt(key) + value for key, value in uuid_pairs(num_pairs, seed)]})


# -- reading one source ----------------------------------------------------------------------------------------------


def _builder(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    while suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes.pop()
    return BUILDERS.get(suffixes[-1]) if suffixes else None


def _data_files(directory: Path) -> tuple[str, list[str]]:
    """The builder and files of a directory of data files (every file of the one kind it holds)."""
    kinds: dict[str, list[str]] = {}
    for file in sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith(".")):
        kind = _builder(file)
        if kind is not None:
            kinds.setdefault(kind, []).append(str(file))
    if not kinds:
        raise UserError(
            f"data source {str(directory)!r}: a directory with no data files (expected {', '.join(sorted(BUILDERS))} "
            "files, or a Dataset.save_to_disk directory)"
        )
    if len(kinds) > 1:
        found = ", ".join(f"{len(files)} {kind}" for kind, files in sorted(kinds.items()))
        raise UserError(f"data source {str(directory)!r} mixes kinds of files ({found}); give one kind per source")
    ((kind, files),) = kinds.items()
    return kind, files


def _blank(path: Path) -> bool:
    """Whether a data file holds nothing but whitespace (datasets fails on one with a traceback, not a message); a
    compressed file only when it is 0 bytes."""
    if path.suffix.lower() in COMPRESSIONS:
        return path.stat().st_size == 0
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 16):
            if chunk.strip():
                return False
    return True


@contextmanager
def _progress(show: bool) -> Iterator[None]:
    """datasets' progress bars while reading a source: shown for large files only, so a small file's bad input is one
    line of error and nothing else."""
    from datasets.utils import logging as datasets_logging

    before = datasets_logging.is_progress_bar_enabled()
    if not show:
        datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        if before:
            datasets_logging.enable_progress_bar()


@contextmanager
def _offline(on: bool = True) -> Iterator[None]:
    """With ``on``, datasets resolves a name from its cache only (as with HF_HUB_OFFLINE=1), never from the Hub:
    ``data.local_files_only``."""
    import datasets.config

    before = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = before or on
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = before


def _pick_split(loaded, source: str, split: str, streaming: bool) -> Data:
    """One split of a DatasetDict (or the dataset itself), with an error naming the splits there are."""
    from datasets import DatasetDict, IterableDatasetDict

    if isinstance(loaded, (DatasetDict, IterableDatasetDict)):
        if split not in loaded:
            raise UserError(
                f"data split {split!r} is not a split of {source!r}; its splits are: {', '.join(loaded)}"
            )
        loaded = loaded[split]
    if streaming and hasattr(loaded, "to_iterable_dataset"):  # a saved Dataset, streamed from its Arrow files
        loaded = loaded.to_iterable_dataset()
    return loaded


def read_source(source: str, options: "DataOptions", split: str) -> Data:
    """One source as a ``datasets`` dataset (``IterableDataset`` when ``options.streaming``), columns as stored."""
    import datasets

    if source == UUID_MEMORY:
        data = uuid_dataset(options.num_pairs, options.seed)
        return data.to_iterable_dataset() if options.streaming else data
    path = Path(source)
    kwargs: dict = {"streaming": options.streaming}
    if path.is_dir() and any((path / marker).is_file() for marker in ("state.json", "dataset_dict.json")):
        loaded = datasets.load_from_disk(str(path))
        return _pick_split(loaded, source, split, options.streaming)
    if path.exists():
        if path.is_dir():
            kind, files = _data_files(path)
        else:
            kind, files = _builder(path), [str(path)]
            if kind is None:
                kind = "text"  # any other file is read as UTF-8 text
        empty = next((Path(f) for f in files if _blank(Path(f))), None)
        if empty is not None:
            size = empty.stat().st_size
            raise UserError(f"data file {str(empty)!r} is empty ({size} bytes{', all whitespace' if size else ''}); "
                            f"expected {kind} data, one row or more")
        if kind == "text":
            kwargs["sample_by"] = options.sample_by
        elif path.suffix.lower() == ".tsv" or any(f.endswith((".tsv", ".tsv.gz")) for f in files):
            kwargs["sep"] = "\t"
        big = sum(Path(f).stat().st_size for f in files) > QUIET_BELOW
        with _datasets_errors(source), _progress(big):
            loaded = datasets.load_dataset(kind, data_files={"train": files}, **kwargs)
        if split != "train":
            raise UserError(
                f"data split {split!r} is not a split of {source!r}; a data file has one split: train"
            )
        return loaded["train"]
    if source.count("/") > 1 or source.startswith((".", "~")) or Path(source).suffix in BUILDERS:
        raise MissingPathError(f"data source {source!r} does not exist (expected {UUID_MEMORY!r}, a file, a directory, "
                               "or a Hugging Face Hub dataset id, owner/name)")
    hub = _HubSource(options.revision, options.local_files_only)
    with _offline(hub.local_files_only), _datasets_errors(source, hub=hub):
        loaded = datasets.load_dataset(source, revision=options.revision, **kwargs)
    return _pick_split(loaded, source, split, options.streaming)


class _HubSource:
    """How a Hub dataset is asked for: its revision, and whether only the cache may be read."""

    def __init__(self, revision: str | None, local_files_only: bool) -> None:
        self.revision = revision
        self.local_files_only = local_files_only


@contextmanager
def _datasets_errors(source: str, hub: "_HubSource | None" = None) -> Iterator[None]:
    """datasets' errors about a source, as one line that names it; with ``hub`` (a source read as a Hub dataset id),
    the Hub's errors say what to do (`moraft.models.hub_error`)."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - datasets wraps parse errors of every builder in its own classes
        raise _datasets_error(err, source, hub) from None


# datasets re-raises some of huggingface_hub's errors as DatasetNotFoundError, without its cause: told by its message
DATASET_NOT_FOUND = {"is a gated dataset": "gated", "Revision '": "no revision", "doesn't exist on the Hub": "no repo"}


def _datasets_error(err: Exception, source: str, hub: "_HubSource | None") -> Exception:
    from datasets.exceptions import DatasetNotFoundError

    from ..models import hub_error, hub_message

    if hub is not None:
        mapped = hub_error(err, "data source", source, hub.revision, "dataset", hub.local_files_only)
        if mapped is not None:
            return mapped
        if isinstance(err, DatasetNotFoundError):
            problem = next((p for text, p in DATASET_NOT_FOUND.items() if text in str(err)), "no repo")
            return hub_message(problem, "data source", source, hub.revision, "dataset", hub.local_files_only)
        if isinstance(err, (FileNotFoundError, ConnectionError)):
            return MissingPathError(f"data source {source!r} is neither a file, a directory, nor a dataset on the "
                                    f"Hugging Face Hub ({first_line(err)})")
    if isinstance(err, (FileNotFoundError, ConnectionError)):
        return UserError(f"data source {source!r}: {first_line(err)}")
    if isinstance(err, UnicodeDecodeError):
        return UserError(f"data source {source!r}: not UTF-8 text ({err.reason} at byte {err.start})")
    # no rows: the json builder finds no table to infer the columns from; a CSV header alone is a split of none
    if isinstance(err, StopIteration) or (isinstance(err, ValueError) and "corresponds to no data" in str(err)):
        return UserError(f"data source {source!r} holds no rows; expected one row or more")
    if type(err).__module__.startswith(("datasets", "pyarrow", "json")):
        return UserError(f"data source {source!r} cannot be read: {first_line(err.__cause__ or err)}")
    return err


# -- columns and formats ------------------------------------------------------------------------------------------


def _columns(data: Data) -> list[str]:
    names = data.column_names
    if names is None:  # an IterableDataset whose features are unknown until read
        names = list(next(iter(data)).keys())
    return list(names)


def detect_format(present: set[str], columns: Sequence[str], source: str, options: "DataOptions") -> str:
    """The format of a source from the standard columns it has (``present``, after mapping), or ``options.format``
    when it is not ``auto``."""
    if options.format != "auto":
        return options.format
    for fmt in ("preference", "chat", "prompt-completion", "text"):
        if set(COLUMNS[fmt]) <= present:
            return fmt
    expected = "; ".join(f"{fmt}: {', '.join(COLUMNS[fmt])}" for fmt in ("text", "chat", "prompt-completion", "preference"))
    raise UserError(
        f"data source {source!r}: cannot tell its format from its columns ({', '.join(columns)}); expected the "
        f"columns of one format ({expected}): map yours with --data.text_field, --data.messages_field, "
        "--data.prompt_field, --data.completion_field, --data.chosen_field, --data.rejected_field, or pass --data.format"
    )


def standardize(data: Data, source: str, options: "DataOptions") -> tuple[Data, str]:
    """The source with only the columns of its format, renamed to their standard names; its format."""
    columns = _columns(data)
    field = {std: getattr(options, option) for std, option in FIELD_OPTION.items()}  # standard name -> column
    for std, column in field.items():
        if column != std and column not in columns:  # a column named on purpose must be there
            raise UserError(
                f"data source {source!r} has no column {column!r} (data.{FIELD_OPTION[std]}); its columns are: "
                f"{', '.join(columns)}"
            )
    fmt = detect_format({std for std, column in field.items() if column in columns}, columns, source, options)
    for std in COLUMNS[fmt]:
        if field[std] not in columns:
            raise UserError(
                f"data source {source!r} has no column {field[std]!r} (data.{FIELD_OPTION[std]}, the {std} of "
                f"{fmt} data); its columns are: {', '.join(columns)}"
            )
    data = data.select_columns([field[std] for std in COLUMNS[fmt]])
    renames = {field[std]: std for std in COLUMNS[fmt] if field[std] != std}
    return (data.rename_columns(renames) if renames else data), fmt


# what each standard column must hold: text (str), or, for TRL's conversational formats, a list of messages
TEXT_COLUMNS = {"text": False, "messages": True, "prompt": True, "completion": True, "chosen": True, "rejected": True}


def check_values(data: Data, source: str, fmt: str) -> Data:
    """The source, with a `moraft.errors.UserError` if it has no rows, or naming its first row whose value in a column
    of ``fmt`` is missing (null) or not text (or, for conversational data, a list of messages).

    A dataset is checked here, on its Arrow columns; a stream, row by row as training reads it."""
    from datasets import Dataset

    def expected(column: str) -> str:
        return "a string or a list of messages" if TEXT_COLUMNS[column] else "a string"

    def fail(column: str, row: int, value: object) -> None:
        found = "null" if value is None else f"a {type(value).__name__}"
        raise UserError(f"data source {source!r}, row {row + 1}: {column} is {found}; expected {expected(column)} "
                        "(rows count from 1)")

    if isinstance(data, Dataset):
        import pyarrow as pa
        import pyarrow.compute as pc

        if len(data) == 0:
            raise UserError(f"data source {source!r} holds no rows; expected one row or more")

        for column in COLUMNS[fmt]:
            values = data.with_format("arrow")[column]
            kind = values.type
            text = pa.types.is_string(kind) or pa.types.is_large_string(kind)
            listed = TEXT_COLUMNS[column] and (pa.types.is_list(kind) or pa.types.is_large_list(kind))
            if not (text or listed or pa.types.is_null(kind)):
                raise UserError(f"data source {source!r}: column {column} holds {kind} values; expected "
                                f"{expected(column)} per row")
            if values.null_count:
                fail(column, pc.index(pc.is_null(values), True).as_py(), None)
        return data

    def check(example: dict, index: int) -> dict:
        for column in COLUMNS[fmt]:
            value = example[column]
            if not (isinstance(value, str) or (TEXT_COLUMNS[column] and isinstance(value, list))):
                fail(column, index, value)
        return example

    return data.map(check, with_indices=True)


def _lift_text(data: Data) -> Data:
    """Text as prompt-completion with an empty prompt: TRL then takes the loss on every token after BOS, exactly
    as on text (the first position has no label anyway), so text mixes with prompt-completion data."""
    return data.map(lambda example: {"prompt": "", "completion": example["text"]}, remove_columns=["text"])


# -- mixing ------------------------------------------------------------------------------------------------------------


def example_tokens(example: dict, fmt: str, tokenizer) -> int:
    """The tokens TRL will train on for one example (before truncation), to weigh sources by tokens."""
    if fmt == "chat":
        return len(tokenizer.apply_chat_template(example["messages"], tokenize=True, return_dict=False))
    if fmt == "text":
        return len(tokenizer(example["text"]).input_ids) + 1
    if fmt == "preference":
        return len(tokenizer(example["prompt"] + example["chosen"]).input_ids) + 1
    return len(tokenizer(example["prompt"] + example["completion"]).input_ids) + 1


def mean_tokens(data: Data, fmt: str, tokenizer, sample: int = TOKEN_SAMPLE) -> float:
    """The mean tokens per example over the first ``sample`` examples."""
    counts = [example_tokens(example, fmt, tokenizer) for example in data.take(sample)]
    return sum(counts) / max(len(counts), 1)


def mixing_probabilities(
    weights: Sequence[float], mean_lengths: Sequence[float] | None = None
) -> list[float]:
    """Sampling probabilities of the sources: the weights normalized (by examples), or, given each source's mean
    tokens per example, the probabilities that make each source's share of the *tokens* follow the weights."""
    per_example = [w / length for w, length in zip(weights, mean_lengths)] if mean_lengths else list(weights)
    total = sum(per_example)
    return [p / total for p in per_example]


def load_data(options: "DataOptions", tokenizer, *, eval: bool = False) -> tuple[Data, str]:
    """The training (or, with ``eval``, the evaluation) dataset of ``options`` and its format.

    Sources are read (`read_source`), their columns mapped to the standard names (`standardize`) and mixed: without
    ``weights`` they are concatenated; with weights they are interleaved with those sampling probabilities, per
    example or, with ``mix_by="tokens"``, so that each source's share of the tokens follows its weight (each source's
    mean length is measured on its first 1,000 examples). Text mixed with prompt-completion data becomes
    prompt-completion with an empty prompt (the same loss).
    """
    from datasets import concatenate_datasets, interleave_datasets

    if eval:
        sources = [options.eval_dataset]
        split = options.eval_split or options.split
    else:
        sources = [options.dataset] if isinstance(options.dataset, str) else list(options.dataset)
        split = options.split
    loaded = []
    for source in sources:
        data, fmt = standardize(read_source(source, options, split), source, options)
        loaded.append((source, check_values(data, source, fmt), fmt))
    formats = {fmt for _, _, fmt in loaded}
    if len(formats) > 1:
        if formats == {"text", "prompt-completion"}:
            loaded = [(s, _lift_text(d) if f == "text" else d, "prompt-completion") for s, d, f in loaded]
        else:
            found = ", ".join(f"{source!r} is {fmt}" for source, _, fmt in loaded)
            raise UserError(
                f"data.dataset mixes formats that train differently ({found}); TRL trains one format at a time. Text "
                "and prompt-completion mix; give chat or preference data on its own (or render the chat data to text)"
            )
    fmt = loaded[0][2]
    datasets = [data for _, data, _ in loaded]
    if len(datasets) == 1:
        return datasets[0], fmt
    if options.weights is None:
        return concatenate_datasets(datasets), fmt
    lengths = [mean_tokens(d, fmt, tokenizer) for d in datasets] if options.mix_by == "tokens" else None
    probabilities = mixing_probabilities(options.weights, lengths)
    mixed = interleave_datasets(
        datasets, probabilities=probabilities, seed=options.seed, stopping_strategy="all_exhausted"
    )
    return mixed, fmt


def has_tokens_to_train(prepared: Data, columns: Sequence[str], tokenizer, batch_size: int = 1024) -> bool:
    """Whether data as TRL prepared it (tokenized, loss-masked) has a token to train on: in ``columns`` (``labels``,
    where -100 marks a token outside the loss mask; DPO's ``chosen_ids`` and ``rejected_ids``), a token that is
    neither special (BOS, EOS, padding) nor whitespace. Reads until it finds one; a stream is not read (True)."""
    from datasets import Dataset

    if not isinstance(prepared, Dataset):
        return True
    import pyarrow.compute as pc

    special, seen = set(tokenizer.all_special_ids), set()
    for batch in prepared.with_format("arrow").iter(batch_size=batch_size):
        for column in columns:
            for token in set(pc.unique(pc.list_flatten(batch[column])).to_pylist()) - seen - special:
                seen.add(token)
                if token != IGNORE and tokenizer.decode([token]).strip():
                    return True
    return False


def describe_mix(options: "DataOptions") -> str:
    """How the sources are mixed, in words (for the log)."""
    sources = [options.dataset] if isinstance(options.dataset, str) else list(options.dataset)
    if len(sources) == 1:
        return sources[0]
    if options.weights is None:
        return " + ".join(sources)
    return ", ".join(f"{s} ×{w:g}" for s, w in zip(sources, options.weights)) + f" (by {options.mix_by})"

"""Training data: the built-in ``uuid-memory`` task and the three file formats, turned into token ids and labels.

| format | input | loss on |
| --- | --- | --- |
| ``uuid-memory`` | N random UUID pairs ``key:value`` made from a seed (the paper's memory task) | the whole sequence |
| ``chat`` | JSONL, ``{"messages": [{"role", "content"}, ...]}`` per line, through the chat template | assistant turns |
| ``prompt-completion`` | JSONL, one ``{"prompt": ..., "completion": ...}`` per line | the completion |
| ``text`` | text files (or a directory of ``*.txt``), concatenated, cut into ``seq_length`` blocks | every token |

Every example is a dict of ``input_ids`` and ``labels`` (``-100`` where no loss is taken); `Collator` pads a batch.
"""

from __future__ import annotations

import json
import random
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import MissingPathError, UserError

IGNORE = -100  # label of a position that takes no loss (the value PyTorch's cross entropy skips)
UUID_MEMORY = "uuid-memory"
FORMATS = ("auto", "chat", "prompt-completion", "text")

Example = dict[str, list[int]]


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


def uuid_examples(pairs: Sequence[tuple[str, str]], tokenizer) -> list[Example]:
    """``<bos>key:value<eos>`` per pair, with the loss over the whole sequence as in the paper."""
    examples = []
    for key, value in pairs:
        ids = tokenizer(uuid_prompt(key) + value).input_ids + [tokenizer.eos_token_id]
        examples.append({"input_ids": ids, "labels": list(ids)})
    return examples


# -- files ------------------------------------------------------------------------------------------------------------


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file; a bad line raises `UserError` naming the file, the line and the problem."""
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"data file {str(path)!r} does not exist")
    records = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise UserError(
                    f"{path} line {number}: not UTF-8 text ({err.reason} at byte {err.start} of the line), so not "
                    "JSONL"
                ) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path} line {number}: not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(record, dict):
                raise UserError(f"{path} line {number}: expected a JSON object, got {type(record).__name__}")
            records.append((number, record))
    if not records:
        raise UserError(f"{path}: no examples (the file is empty)")
    return records


def detect_format(path: str | Path, records: list | None = None) -> str:
    """``chat``, ``prompt-completion`` or ``text`` from a file's extension and its first record's keys."""
    path = Path(path)
    if path.is_dir() or path.suffix not in (".jsonl", ".json"):
        return "text"
    _, first = records[0]
    if "messages" in first:
        return "chat"
    if "prompt" in first and "completion" in first:
        return "prompt-completion"
    raise UserError(
        f"{path} line {records[0][0]}: cannot tell the data format from keys {sorted(first)}: expected 'messages' "
        "(chat) or 'prompt' and 'completion'; or pass --data_format"
    )


def _text_field(path: Path, number: int, record: dict, key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        got = "missing" if key not in record else f"a {type(value).__name__}"
        raise UserError(f"{path} line {number}: {key!r} must be a string, but it is {got}")
    return value


def chat_examples(records: list, tokenizer, max_length: int, path: Path) -> list[Example]:
    """Render each conversation with the chat template; train on the assistant turns only.

    The tokens of assistant turn i are those that rendering messages[:i+1] adds to rendering messages[:i] with the
    generation prompt, so the loss covers the reply and the template's end-of-turn marker but not the role header.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{path}: chat data needs a tokenizer with a chat template, and this tokenizer has none")

    def render(messages: list, generation_prompt: bool = False) -> list[int]:
        return list(
            tokenizer.apply_chat_template(
                messages, tokenize=True, add_generation_prompt=generation_prompt, return_dict=False
            )
        )

    examples = []
    for number, record in records:
        messages = record.get("messages")
        if not isinstance(messages, list) or not messages:
            raise UserError(f"{path} line {number}: 'messages' must be a non-empty list of {{role, content}} objects")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(
                message.get("content"), str
            ):
                raise UserError(f"{path} line {number}: message {i} must be an object with string 'role' and 'content'")
        if not any(m["role"] == "assistant" for m in messages):
            raise UserError(f"{path} line {number}: no 'assistant' message, so nothing to train on")
        ids = render(messages)
        labels = [IGNORE] * len(ids)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start, end = len(render(messages[:i], generation_prompt=True)), len(render(messages[: i + 1]))
            if ids[:end] != render(messages[: i + 1]):
                raise UserError(
                    f"{path} line {number}: the tokenizer's chat template is not prefix-stable (rendering the first "
                    f"{i + 1} messages is not a prefix of rendering all), so the assistant turns cannot be located"
                )
            labels[start:end] = ids[start:end]
        examples.append(_truncate({"input_ids": ids, "labels": labels}, max_length))
    return examples


def prompt_completion_examples(records: list, tokenizer, max_length: int, path: Path) -> list[Example]:
    """``<bos>prompt completion<eos>`` with the loss on the completion and the end-of-sequence token."""
    examples = []
    for number, record in records:
        prompt = tokenizer(_text_field(path, number, record, "prompt")).input_ids
        completion = tokenizer(_text_field(path, number, record, "completion"), add_special_tokens=False).input_ids
        completion = completion + [tokenizer.eos_token_id]
        example = {"input_ids": prompt + completion, "labels": [IGNORE] * len(prompt) + completion}
        examples.append(_truncate(example, max_length))
    return examples


def text_files(path: Path) -> list[Path]:
    """The file itself, or every ``*.txt`` under a directory (sorted)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise UserError(f"{path}: directory has no *.txt files")
        return files
    if not path.is_file():
        raise MissingPathError(f"data file {str(path)!r} does not exist")
    return [path]


def text_examples(path: Path, tokenizer, seq_length: int) -> list[Example]:
    """Every file tokenized (``<bos>text<eos>``), concatenated, and cut into blocks of ``seq_length`` (the
    remainder is dropped); the loss is on every token."""
    stream: list[int] = []
    for file in text_files(path):
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise UserError(f"{file}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        stream += tokenizer(text).input_ids + [tokenizer.eos_token_id]
    blocks = len(stream) // seq_length
    if blocks == 0:
        raise UserError(f"{path}: {len(stream)} tokens, fewer than one block of seq_length={seq_length}")
    chunks = [stream[i * seq_length : (i + 1) * seq_length] for i in range(blocks)]
    return [{"input_ids": chunk, "labels": list(chunk)} for chunk in chunks]


def _truncate(example: Example, max_length: int) -> Example:
    if len(example["input_ids"]) <= max_length:
        return example
    warnings.warn(f"an example of {len(example['input_ids'])} tokens was cut to seq_length={max_length}", stacklevel=3)
    return {key: value[:max_length] for key, value in example.items()}


# Data files moraft train does not read (yet), known by their extension or their first bytes
_TABULAR = {".parquet": (b"PAR1", "Parquet"), ".arrow": (b"ARROW1", "Arrow"), ".feather": (b"ARROW1", "Arrow")}


def _refuse_tabular(path: Path) -> None:
    """A Parquet or Arrow file is not text: name it and say what is read, instead of training on its bytes."""
    if not path.is_file():
        return
    with path.open("rb") as handle:
        head = handle.read(8)
    for suffix, (magic, kind) in _TABULAR.items():
        if path.suffix.lower() == suffix or head.startswith(magic):
            raise UserError(
                f"data file {str(path)!r} is a {kind} file; moraft train reads JSONL (.jsonl/.json: chat or "
                "prompt/completion records) and UTF-8 text files. Write its rows as JSONL first (e.g. with "
                "datasets: Dataset.from_parquet(PATH).to_json(OUT.jsonl))"
            )


def load_examples(
    data: str, tokenizer, *, data_format: str = "auto", seq_length: int = 512, num_pairs: int = 128, seed: int = 0
) -> list[Example]:
    """The training examples for ``data``: ``"uuid-memory"`` or a path, in ``data_format`` (``auto`` detects it)."""
    if data == UUID_MEMORY:
        return uuid_examples(uuid_pairs(num_pairs, seed), tokenizer)
    if data_format not in FORMATS:
        raise UserError(f"data_format={data_format!r} is not one of {', '.join(FORMATS)}")
    path = Path(data)
    if not path.exists():
        raise MissingPathError(f"data {data!r} is neither {UUID_MEMORY!r} nor an existing file or directory")
    _refuse_tabular(path)
    if data_format == "text" or (data_format == "auto" and (path.is_dir() or path.suffix not in (".jsonl", ".json"))):
        return text_examples(path, tokenizer, seq_length)
    records = read_jsonl(path)
    kind = detect_format(path, records) if data_format == "auto" else data_format
    if kind == "chat":
        return chat_examples(records, tokenizer, seq_length, path)
    return prompt_completion_examples(records, tokenizer, seq_length, path)


class ExampleDataset(torch.utils.data.Dataset):
    """A list of examples as a map-style dataset (what ``Trainer`` takes)."""

    def __init__(self, examples: list[Example]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]


@dataclass
class Collator:
    """Pads a batch of examples on the right: ``input_ids`` with the pad token, ``labels`` with -100."""

    pad_token_id: int

    def __call__(self, batch: list[Example]) -> dict[str, torch.Tensor]:
        width = max(len(example["input_ids"]) for example in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, example in enumerate(batch):
            n = len(example["input_ids"])
            input_ids[row, :n] = torch.tensor(example["input_ids"])
            labels[row, :n] = torch.tensor(example["labels"])
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}

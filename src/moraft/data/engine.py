"""The per-document stages of ``moraft data`` on datatrove, for corpora that outgrow one process or one machine.

Cleaning, mining and rendering are each a pure function of one document, so they scale by cutting the corpus into
shards and running one task per shard. datatrove (https://github.com/huggingface/datatrove) provides exactly that:
the same pipeline runs on this machine (``LocalPipelineExecutor``, a process pool), on a Slurm cluster
(``SlurmPipelineExecutor``, one array job per task) or on a Ray cluster (``RayPipelineExecutor``), and each finished
task leaves a file under ``logs/completions/`` so that a rerun skips it. Ray Data and Spark were the alternatives;
datatrove is pure Python (two small dependencies beyond moraft's, no JVM, no second torch), is Hugging Face's own,
and keeps one code path for the three targets (docs/data-scale.md has the comparison).

What datatrove lacks and this module adds: the corpus contract of ``moraft data`` (every row kept, empty texts
included, each row's fields carried through, the original order restored by a row index), output shards written
atomically, and one schema across shards so that ``datasets.load_dataset("parquet", ...)`` reads them back
(datatrove's ParquetWriter infers a shard's schema from its first document, so a column that is null there cannot
hold a string later, and shards disagree).

    write_shards(corpus, "corpus_shards", num_shards=64)
    run_per_document("mypackage.stages:clean_row", "corpus_shards", "cleaned", tasks=64, workers=16)
    cleaned = read_output("cleaned")          # the corpus's rows in their order, plus what clean_row returned
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import inspect
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.readers.base import BaseDiskReader

from moraft.errors import MissingPathError, UserError
from moraft.outputs import write_json

from .pipeline import EngineOptions  # the --engine.* group of moraft data, defined where no datatrove import is needed

ROW_INDEX = "row_index"
"""The column that carries each document's position in the input corpus; ``read_output`` sorts by it."""

EXECUTORS = ("local", "slurm", "ray")
_BATCH = 1000  # rows per Parquet record batch: bounds a task's memory to one batch, not one shard


class DocumentError(RuntimeError):
    """The per-document function raised on one document: names the document's id and row."""


@dataclasses.dataclass(frozen=True)
class RowFunction:
    """Adapts a function of some columns to the row function ``run_per_document`` expects.

    ``RowFunction("moraft.data.corpus:clean_text")`` calls ``clean_text(row["text"])`` and stores the result in
    ``text``; ``RowFunction("moraft.data.mine:mine_tasks", ("text", "title"), "tasks")`` calls
    ``mine_tasks(row["text"], row["title"])`` and stores the list in ``tasks``. A dotted name is imported in each
    worker, so the adapter pickles to any executor.
    """

    function: str | Callable[..., Any]
    """The function, or its dotted name ``module:function``."""
    inputs: tuple[str, ...] = ("text",)
    """The columns passed to it, positionally."""
    output: str = "text"
    """The column its return value goes to."""

    def __call__(self, row: dict) -> dict:
        return {self.output: resolve_function(self.function)(*(row.get(name) for name in self.inputs))}


def map_on_engine(function: str | Callable[[dict], dict], dataset: datasets.Dataset, work_dir: str | Path,
                  options: EngineOptions) -> datasets.Dataset:
    """``dataset.map(function)`` on datatrove: the same rows in the same order, with the function's columns.

    The dataset is written as ``options.tasks`` Parquet shards under ``work_dir/shards``, processed into
    ``work_dir/output`` and read back. A rerun on the same dataset (by its ``datasets`` fingerprint) reuses the
    shards and resumes the output; another dataset replaces both.

    Args:
        function: as for ``run_per_document``.
        dataset: the stage's input, e.g. the corpus dataset.
        work_dir: a directory for the shards, the output and datatrove's logs, kept for resuming.
        options: where to run; ``executor`` must be set, and not to ``slurm``, whose jobs outlive this call
            (use ``run_per_document`` and, once they finish, ``read_output``).

    Returns:
        The dataset's columns (plus ``row_index``) and the function's, row for row.
    """
    if options.executor is None or options.executor == "slurm":
        raise UserError(f"map_on_engine runs on the local or ray executor, not {options.executor}: without one, use "
                        "Dataset.map; on Slurm, run_per_document submits the jobs and read_output reads them back")
    work_dir = Path(work_dir)
    shards, record = work_dir / "shards", work_dir / "shards.json"
    # datasets' fingerprint follows the content (and every map/filter that made it): a new input starts over
    written = {"fingerprint": dataset._fingerprint, "rows": len(dataset), "tasks": options.tasks}
    if not record.exists() or json.loads(record.read_text()) != written:
        for stale in (shards, work_dir / "output", record):
            if stale.is_dir():
                shutil.rmtree(stale)
            elif stale.exists():
                stale.unlink()
        write_shards(dataset, shards, num_shards=options.tasks)
        record.write_text(json.dumps(written))
    output = run_per_document(function, shards, work_dir / "output", tasks=options.tasks, workers=options.workers,
                              executor=options.executor, **options.executor_options)
    return read_output(output)


def count_words(row: dict) -> dict:
    """A cheap per-document function (the benchmark's baseline and the tests' stage): words and long words.

    Args:
        row: a corpus row with a ``text`` field.

    Returns:
        ``words`` (the number of whitespace-separated words) and ``long_words`` (those of 10 characters or more,
        in order; often empty, so shards disagree on the column's type unless the engine unifies them).
    """
    words = row["text"].split()
    return {"words": len(words), "long_words": [word for word in words if len(word) >= 10]}


def resolve_function(function: str | Callable) -> Callable:
    """The callable named by ``module:function`` (or ``module.function``), or ``function`` itself.

    Args:
        function: a callable or its dotted name.

    Returns:
        The callable.

    Raises:
        UserError: the name is not ``module:function``, the module does not import or has no such attribute.
    """
    if callable(function):
        return function
    module_name, sep, attribute = function.partition(":")
    if not sep:
        module_name, _, attribute = function.rpartition(".")
    if not module_name or not attribute:
        raise UserError(f"function {function!r}: expected a dotted name 'module:function'")
    try:
        target = getattr(importlib.import_module(module_name), attribute)
    except ImportError as error:
        raise UserError(f"function {function!r}: cannot import module {module_name!r} ({error})") from None
    except AttributeError:
        raise UserError(f"function {function!r}: module {module_name!r} has no {attribute!r}") from None
    if not callable(target):
        raise UserError(f"function {function!r} is not callable")
    return target


def write_shards(dataset: datasets.Dataset, directory: str | Path, num_shards: int) -> Path:
    """Writes a corpus dataset as ``num_shards`` Parquet files, the input of ``run_per_document``.

    Shards are contiguous runs of rows, each carrying its rows' positions in ``row_index`` (kept if the dataset
    already has it, as an earlier engine stage's output does). datatrove gives each task whole files, so use at
    least as many shards as tasks.

    Args:
        dataset: the corpus (``id``, ``text``, ...); a ``save_to_disk`` directory loads with ``load_from_disk``.
        directory: where the shards go (``00000.parquet``, ...); created, and must not hold Parquet files yet.
        num_shards: how many files, at most one per row.

    Returns:
        The directory.
    """
    directory = Path(directory)
    if num_shards < 1:
        raise UserError(f"num_shards={num_shards}: expected at least 1")
    if len(dataset) == 0:
        raise UserError("the corpus has no rows: nothing to shard")
    if directory.is_dir() and any(directory.glob("*.parquet")):
        raise UserError(f"{directory} already holds Parquet files: choose an empty directory")
    if ROW_INDEX not in dataset.column_names:
        dataset = dataset.add_column(ROW_INDEX, list(range(len(dataset))))
    directory.mkdir(parents=True, exist_ok=True)
    num_shards = min(num_shards, len(dataset))
    for index in range(num_shards):
        target = directory / f"{index:05d}.parquet"
        temporary = target.with_suffix(".parquet.tmp")
        dataset.shard(num_shards, index, contiguous=True).to_parquet(str(temporary))
        os.replace(temporary, target)
    return directory


def read_output(directory: str | Path) -> datasets.Dataset:
    """The output shards of ``run_per_document`` as one dataset, in the input corpus's order.

    Args:
        directory: the ``output_path`` given to ``run_per_document``.

    Returns:
        Every input row's fields, the function's columns and ``row_index``, sorted by ``row_index``.
    """
    files = sorted(str(path) for path in Path(directory).glob("*.parquet"))
    if not files:
        raise MissingPathError(f"{directory} holds no output shards (*.parquet): run run_per_document first")
    dataset = datasets.load_dataset("parquet", data_files=files, split="train")
    return dataset.sort(ROW_INDEX)


def run_per_document(
    function: str | Callable[[dict], dict],
    input_path: str | Path,
    output_path: str | Path,
    *,
    tasks: int = 1,
    workers: int = 1,
    executor: Literal["local", "slurm", "ray"] = "local",
    text_field: str = "text",
    **executor_options: Any,
) -> Path:
    """Runs a per-document function over a sharded corpus on one of datatrove's executors.

    Each task reads its share of the input files (datatrove deals out whole files: file ``i`` goes to task
    ``i % tasks``), calls ``function(row)`` on each row and writes ``row | function(row)`` to
    ``output_path/{task:05d}_{part:03d}.parquet``. A last one-task step gives all shards one schema. Finished tasks
    are recorded under ``output_path/logs/completions``; a rerun with the same function, input and task count
    redoes only the unfinished ones.

    Args:
        function: the row function (a picklable callable, e.g. module-level or a ``RowFunction``), or its dotted
            name ``module:function``; it returns a dict of columns to add or replace.
        input_path: a directory of ``*.parquet`` (as ``write_shards`` or ``Dataset.to_parquet`` writes) or
            ``*.jsonl`` files, or one such file. Rows keep their ``row_index`` if they have one; otherwise it is
            their position across the sorted files.
        output_path: the output directory (shards plus datatrove's ``logs/``).
        tasks: how many tasks (at most the number of input files does useful work).
        workers: how many tasks run at once (local: processes; Slurm and Ray: concurrent jobs).
        executor: ``local`` (this machine), ``slurm`` (submits array jobs and returns; needs ``time`` and
            ``partition`` in ``executor_options``) or ``ray`` (a running Ray cluster, ``ray.init`` first).
        text_field: the column holding the document's text.
        **executor_options: passed to datatrove's executor (e.g. ``start_method`` for local, ``cpus_per_task``,
            ``mem_per_cpu_gb`` for Slurm and Ray).

    Returns:
        ``output_path``. Local and Ray return when the shards are complete; Slurm when the jobs are submitted.

    Raises:
        UserError: an unknown executor, one not available here, a missing option, no input files, an output
            directory written by a different run.
        DocumentError: the function raised on a document (named by id and row; the task's log has the traceback).
    """
    executor_class = _executor_class(executor)
    if tasks < 1 or workers < 1:
        raise UserError(f"tasks={tasks}, workers={workers}: expected at least 1 of each")
    input_path, output_path = Path(input_path).resolve(), Path(output_path).resolve()
    if not input_path.exists():
        raise MissingPathError(f"input {input_path} does not exist")
    folder, files, pattern = _input_files(input_path)
    resolve_function(function)  # a bad name fails here, not in every worker
    offsets = _row_offsets(folder, files, text_field)

    reader = _RowReader(str(folder), pattern, text_field, offsets)
    pipeline = [reader, _Apply(function, text_field), _ShardWriter(str(output_path), text_field)]
    options = {"tasks": tasks, "workers": workers, **executor_options}
    if executor == "local":
        # datatrove's default, forkserver, imports moraft (torch, transformers: ~6 s of CPU) again in a fresh
        # server process; forked workers start with it loaded, as datasets' map(num_proc=) workers do
        options.setdefault("start_method", "fork")
    if executor == "slurm":
        options.setdefault("job_name", f"moraft-{output_path.name}")
    main = _make_executor(executor_class, executor, pipeline, output_path / "logs", options)
    # skip_completed=False: a rerun that redid one task must unify that task's new shard with the others
    final_options = {**options, "tasks": 1, "workers": 1, "skip_completed": False, "depends": main}
    if executor == "slurm":
        final_options["job_name"] = f"{options['job_name']}-schema"
    final = _make_executor(executor_class, executor, [_UnifySchemas(str(output_path))], output_path / "logs" / "final",
                           final_options)
    _claim_output(output_path, function, files, tasks, text_field)
    try:
        final.run()  # runs `main` first (datatrove's depends=)
    except DocumentError as error:
        raise DocumentError(f"{error} (traceback in {output_path / 'logs' / 'logs'})") from None
    return output_path


def _executor_class(name: str) -> type:
    if name not in EXECUTORS:
        raise UserError(f"unknown executor {name!r}: choose one of {', '.join(EXECUTORS)}")
    if name == "ray" and importlib.util.find_spec("ray") is None:
        raise UserError("executor 'ray' needs Ray on this machine and its workers: pip install 'ray[default]', then "
                        "ray.init() (or RAY_ADDRESS) before the run")
    if name == "slurm" and shutil.which("sbatch") is None:
        raise UserError("executor 'slurm' needs Slurm's sbatch on PATH: run from the cluster's login node")
    from datatrove.executor import LocalPipelineExecutor, RayPipelineExecutor, SlurmPipelineExecutor

    return {"local": LocalPipelineExecutor, "slurm": SlurmPipelineExecutor, "ray": RayPipelineExecutor}[name]


def _make_executor(cls: type, name: str, pipeline: list, logging_dir: Path, options: dict):
    accepted = inspect.signature(cls.__init__).parameters
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        choices = ", ".join(p for p in accepted if p not in ("self", "pipeline", "logging_dir", "depends"))
        raise UserError(f"executor {name!r} has no option {', '.join(unknown)}: it accepts {choices}")
    missing = [p.name for p in accepted.values()
               if p.default is inspect.Parameter.empty and p.name not in ("self", "pipeline") and p.name not in options]
    if missing:
        raise UserError(f"executor {name!r} needs the option(s) {', '.join(missing)} (e.g. time='01:00:00', "
                        "partition='cpu' for Slurm)")
    return cls(pipeline, logging_dir=str(logging_dir), **options)


def _input_files(path: Path) -> tuple[Path, list[str], str]:
    if path.is_file():
        if not path.name.endswith((".parquet", ".jsonl")):
            raise UserError(f"input {path}: expected a .parquet or .jsonl file, or a directory of them")
        return path.parent, [path.name], path.name
    for pattern in ("*.parquet", "*.jsonl"):
        files = sorted(p.name for p in path.glob(pattern))
        if files:
            return path, files, pattern
    raise UserError(f"input {path} holds no *.parquet or *.jsonl files (write_shards writes a dataset as Parquet)")


def _rows(path: Path) -> Iterator[dict]:
    if path.suffix == ".parquet":
        for batch in pq.ParquetFile(path).iter_batches(batch_size=_BATCH):
            yield from batch.to_pylist()
    else:
        with path.open(encoding="utf-8") as lines:
            for line in lines:
                if line.strip():
                    yield json.loads(line)


def _row_offsets(folder: Path, files: list[str], text_field: str) -> dict[str, int] | None:
    """Each file's first row index, when the rows carry none (a file's row count is in Parquet's footer)."""
    first = folder / files[0]
    columns = pq.read_schema(first).names if first.suffix == ".parquet" else list(next(_rows(first), {}))
    if text_field not in columns:
        raise UserError(f"{first} has no column {text_field!r} (text_field): its columns are {', '.join(columns)}")
    if ROW_INDEX in columns:
        return None
    if first.suffix == ".parquet":
        counts = [pq.ParquetFile(folder / name).metadata.num_rows for name in files]
    else:
        counts = [sum(1 for _ in _rows(folder / name)) for name in files]
    offsets, total = {}, 0
    for name, count in zip(files, counts):
        offsets[name], total = total, total + count
    return offsets


def _function_name(function: str | Callable) -> str:
    if isinstance(function, str):
        return function
    if isinstance(function, RowFunction):
        return f"RowFunction({_function_name(function.function)}, {function.inputs}, {function.output!r})"
    if isinstance(function, functools.partial):  # its arguments' reprs may hold addresses that change every run
        return f"functools.partial({_function_name(function.func)})"
    if not hasattr(function, "__qualname__"):  # a callable object: named by its class
        function = type(function)
    return f"{function.__module__}:{function.__qualname__}"


def _claim_output(output: Path, function: str | Callable, files: list[str], tasks: int, text_field: str) -> None:
    """Refuses to resume into an output written by another run, whose completions would be wrongly skipped."""
    run = {"function": _function_name(function), "input_files": files, "tasks": tasks, "text_field": text_field}
    record = output / "run.json"
    if record.exists():
        previous = json.loads(record.read_text())
        if previous != run:
            changed = ", ".join(key for key in run if previous.get(key) != run[key])
            raise UserError(f"output {output} was written by a different run ({changed} differ): remove it or "
                            "choose another output directory")
        return
    output.mkdir(parents=True, exist_ok=True)
    write_json(record, run)


class _RowReader(BaseDiskReader):
    """Reads whole rows into Documents: the text as the text, the row (its text replaced by None, and ``row_index``)
    as metadata, so that the columns keep their order.

    datatrove's own readers drop rows with an empty text and number rows per file; the corpus contract needs every
    row and a position across files.
    """

    name = "moraft rows (Parquet / JSONL)"

    def __init__(self, folder: str, pattern: str, text_field: str, offsets: dict[str, int] | None):
        super().__init__(folder, glob_pattern=pattern, recursive=False, text_key=text_field, doc_progress=True,
                         add_file_path=False)
        self.offsets = offsets

    def read_file(self, filepath: str) -> DocumentsPipeline:
        path = Path(self.data_folder.resolve_paths(filepath))
        for position, row in enumerate(_rows(path)):
            if self.offsets is not None:
                row[ROW_INDEX] = self.offsets[filepath] + position
            if self.text_key not in row:
                raise UserError(f"{path}, row {position}: no column {self.text_key!r} (text_field)")
            # the text lives in the Document; its key stays in the row, so that the columns keep their order
            text, row[self.text_key] = row[self.text_key], None
            yield Document(text=text or "", id=str(row.get("id", row[ROW_INDEX])), metadata=row)


class _Apply(PipelineStep):
    """Calls the row function on each document and keeps what it returns."""

    name = "moraft per-document function"
    type = "🔢 - PROCESS"

    def __init__(self, function: str | Callable, text_field: str):
        super().__init__()
        self.function, self.text_field = function, text_field

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        function = resolve_function(self.function)
        for document in data:
            with self.track_time():
                row = {**document.metadata, self.text_field: document.text}
                try:
                    columns = function(row)
                except Exception as error:
                    raise DocumentError(f"{_function_name(self.function)} failed on document {document.id!r} (row "
                                        f"{row[ROW_INDEX]}): {type(error).__name__}: {error}") from error
                if not isinstance(columns, dict):
                    raise DocumentError(f"{_function_name(self.function)} returned {type(columns).__name__} for "
                                        f"document {document.id!r}: expected a dict of columns")
            if self.text_field in columns:
                document.text = columns.pop(self.text_field)
            document.metadata.update(columns)
            self.stat_update("documents")
            yield document


class _ShardWriter(PipelineStep):
    """Writes a task's rows to Parquet, batch by batch, under temporary names renamed when the task ends.

    A batch whose types do not fit the open file's schema (a column null so far, now a string; a list empty so far,
    now of structs) is cast to it when it can be and otherwise starts a new part file; ``_UnifySchemas`` reconciles
    the parts at the end.
    """

    name = "moraft Parquet shards"
    type = "💽 - WRITER"

    def __init__(self, folder: str, text_field: str):
        super().__init__()
        self.folder, self.text_field = folder, text_field

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        folder = Path(self.folder)
        for stale in folder.glob(f"{rank:05d}_*.parquet*"):  # a crashed attempt's leftovers
            stale.unlink()
        parts: list[Path] = []
        writer: pq.ParquetWriter | None = None
        batch: list[dict] = []

        def flush():
            nonlocal writer
            table = pa.Table.from_pylist(batch)
            if writer is not None:
                try:
                    table = table.select(writer.schema.names).cast(writer.schema)
                except (KeyError, ValueError, pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    writer.close()
                    writer = None
            if writer is None:
                parts.append(folder / f"{rank:05d}_{len(parts):03d}.parquet.tmp")
                writer = pq.ParquetWriter(parts[-1], table.schema)
            writer.write_table(table)
            batch.clear()

        try:
            for document in data:
                with self.track_time():
                    record = {**document.metadata, self.text_field: document.text}
                    batch.append(record if "id" in record else {"id": document.id, **record})
                    if len(batch) == _BATCH:
                        flush()
                yield document
            if batch:
                flush()
        finally:
            if writer is not None:
                writer.close()
        for part in parts:
            os.replace(part, part.with_suffix(""))  # drops ".tmp"


class _UnifySchemas(PipelineStep):
    """Gives every output shard the schema that holds them all (null columns promoted), rewriting only those that
    differ, so that ``datasets`` reads the shards as one dataset."""

    name = "moraft one schema across shards"
    type = "💽 - WRITER"

    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        files = sorted(Path(self.folder).glob("*.parquet"))
        schemas = [pq.read_schema(path) for path in files]
        if not schemas:
            return
        unified = pa.unify_schemas(schemas, promote_options="permissive")
        for path, schema in zip(files, schemas):
            if schema.equals(unified, check_metadata=False):
                continue
            table = pq.read_table(path)
            columns = [table[name] if name in table.column_names else pa.nulls(len(table), field.type)
                       for name, field in zip(unified.names, unified)]
            table = pa.Table.from_arrays(columns, names=unified.names).cast(unified)
            temporary = path.with_suffix(".parquet.tmp")
            pq.write_table(table, temporary)
            os.replace(temporary, path)
            self.stat_update("rewritten")
        yield from ()


__all__ = [
    "DocumentError", "EXECUTORS", "EngineOptions", "ROW_INDEX", "RowFunction", "count_words", "map_on_engine",
    "read_output", "resolve_function", "run_per_document", "write_shards",
]

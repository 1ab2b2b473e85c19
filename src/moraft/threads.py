"""How long the ``moraft`` command's waiting OpenMP threads spin before they sleep: briefly.

torch runs a CPU op on OpenMP threads, one per core by default. libgomp, the OpenMP of torch's Linux builds (MKL's
threads included), lets a thread that waits for the others (at the end of every parallel op) spin for 300,000
iterations before it sleeps. On a machine whose cores other processes also use, the thread it waits for is often
descheduled while it spins, so op after op waits out a scheduler time slice. `benchmarks/threads.py` measured a short
training run several times slower with that default than with ``GOMP_SPINCOUNT=1000`` (spin 1,000 iterations, then
sleep) on a busy 2-core machine, while on the idle machine 1,000 spins cost little against the default, less than
sleeping at once (``OMP_WAIT_POLICY=PASSIVE``) or one thread (the figures: the Results page). So the ``moraft``
command sets ``GOMP_SPINCOUNT=1000`` unless the user set ``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY``
(``GOMP_SPINCOUNT=300000`` is libgomp's own default); ``OMP_NUM_THREADS`` still sets the number of threads. Other
OpenMP runtimes ignore it.

OpenMP reads its variables once, when torch loads it, so this happens at the top of ``moraft/__init__.py``, before
anything imports torch, and only in a process started as the ``moraft`` command (`started_as_command`): a program
that imports moraft keeps its own environment.
"""

from __future__ import annotations

import os
import sys
from typing import Mapping

WAIT_KNOBS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
"""The variables that decide how long an OpenMP thread spins while it waits: the user setting either leaves it to
them."""

SPINCOUNT = "1000"
"""The ``GOMP_SPINCOUNT`` the ``moraft`` command sets (libgomp's default: 300,000)."""


def default_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables the ``moraft`` command adds to ``environ``: ``GOMP_SPINCOUNT=1000``, unless ``environ`` sets
    one of `WAIT_KNOBS`."""
    if any(knob in environ for knob in WAIT_KNOBS):
        return {}
    return {"GOMP_SPINCOUNT": SPINCOUNT}


def started_as_command() -> bool:
    """Whether this process was started as the ``moraft`` command: its console script (``moraft ...``, also under
    ``torchrun --no-python``) or ``python -m moraft`` (also as ``torchrun -m moraft`` and ``accelerate launch -m
    moraft`` start each process)."""
    if sys.argv and os.path.basename(sys.argv[0]) in ("moraft", "moraft.exe"):
        return True
    argv = getattr(sys, "orig_argv", [])  # sys.argv[0] is "-m" while `python -m moraft` imports the package
    return any(flag == "-m" and module == "moraft" for flag, module in zip(argv, argv[1:]))


def set_command_defaults() -> bool:
    """Add `default_environment` to ``os.environ`` in a process started as the ``moraft`` command, before torch is
    imported (after, OpenMP would not read it); whether it did."""
    if not started_as_command() or "torch" in sys.modules:
        return False
    added = default_environment(os.environ)
    os.environ.update(added)
    return bool(added)


__all__ = ["SPINCOUNT", "WAIT_KNOBS", "default_environment", "set_command_defaults", "started_as_command"]

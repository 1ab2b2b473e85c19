"""The OpenMP wait policy of the ``moraft`` command: threads that wait sleep instead of spinning.

torch runs a CPU op on OpenMP threads, one per core by default. libgomp, the OpenMP of torch's Linux builds, lets a
thread that waits for the others (at the end of every parallel op) spin for a while before it sleeps. On a machine
whose cores other processes also use, the thread it waits for is often descheduled while it spins, so every op can
wait out a scheduler time slice: `benchmarks/threads.py` measured a short training run 6-9 times slower than with
``OMP_WAIT_POLICY=PASSIVE`` (waiting threads sleep at once) on a shared 2-core machine, and no slower with it (see the
Results page). So the ``moraft`` command sets ``OMP_WAIT_POLICY=PASSIVE`` unless the user set ``OMP_WAIT_POLICY`` or
``GOMP_SPINCOUNT`` (``OMP_WAIT_POLICY=ACTIVE`` gives back the spinning); ``OMP_NUM_THREADS`` still sets the number of
threads.

OpenMP reads its variables once, when torch loads it, so this happens at the top of ``moraft/__init__.py``, before
anything imports torch, and only in a process started as the ``moraft`` command (`started_as_command`): a program
that imports moraft keeps its own environment.
"""

from __future__ import annotations

import os
import sys
from typing import Mapping

WAIT_KNOBS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
"""The variables that decide how an OpenMP thread waits; the user setting either leaves the wait policy to them."""


def default_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables the ``moraft`` command adds to ``environ``: ``OMP_WAIT_POLICY=PASSIVE``, unless ``environ``
    sets one of `WAIT_KNOBS`."""
    if any(knob in environ for knob in WAIT_KNOBS):
        return {}
    return {"OMP_WAIT_POLICY": "PASSIVE"}


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


__all__ = ["WAIT_KNOBS", "default_environment", "set_command_defaults", "started_as_command"]

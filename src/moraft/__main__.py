"""``python -m moraft``: the ``moraft`` command, also for launchers that take a module (``torchrun -m moraft``)."""

from .cli import main

main()

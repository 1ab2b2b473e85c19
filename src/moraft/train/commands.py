"""The ``moraft train`` command: `TrainOptions`' fields as flags, its docstring as ``--help``, `train` as the body."""

from __future__ import annotations

from .options import TrainOptions, command
from .runner import train

train_command = command(TrainOptions, train, "train")

"""The ``moraft`` command line: one subcommand per typed function; its docstring is its ``--help``.

Each subcommand is a plain function elsewhere in the package (the CLI is thin). Options come from flags, a YAML file
(``--config FILE``), or both, with flags winning. Errors in what the user asked for (a missing path, a bad value)
print one line and exit with status 2; set ``MORAFT_DEBUG=1`` for the traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Callable

# name -> "module:function"; imported when the CLI starts
COMMANDS: dict[str, str] = {
    "convert-peft-mora": "moraft.interop.peft_mora:convert_peft_mora",
    "export-lora": "moraft.interop.lora_export:export_lora",
    "merge": "moraft.interop.merge:merge_adapter",
    "train": "moraft.train.commands:train_command",
    "eval": "moraft.train.evaluate:eval_command",
    "demo": "moraft.train.demo:demo",
}


class UserError(ValueError):
    """A problem with what the user asked for: reported as one line, exit status 2."""


def _load(spec: str) -> Callable:
    module, _, func = spec.partition(":")
    return getattr(importlib.import_module(module), func)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``moraft`` command."""
    from jsonargparse import CLI

    argv = sys.argv[1:] if argv is None else argv
    commands = {name: _load(spec) for name, spec in COMMANDS.items()}
    if not commands:
        print("moraft: no subcommands are installed", file=sys.stderr)
        raise SystemExit(2)
    try:
        CLI(commands, args=argv, as_positional=True, fail_untyped=True, parser_mode="yaml")
    except (UserError, FileNotFoundError, NotADirectoryError, ValueError) as err:
        if os.environ.get("MORAFT_DEBUG"):
            raise
        cmd = argv[0] if argv else ""
        print(f"moraft {cmd}: error: {err}".replace("  ", " "), file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()

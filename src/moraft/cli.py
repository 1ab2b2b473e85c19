"""The ``moraft`` command line: one subcommand per typed function; its docstring is its ``--help``.

Each subcommand is a plain function elsewhere in the package (the CLI is thin). Options come from flags, a YAML file
(``--config FILE``), or both, with flags winning. Errors in what the user asked for (a missing path, a bad value:
``moraft.errors.UserError``) print one line and exit with status 2; set ``MORAFT_DEBUG=1`` for their traceback. Any
other exception is a bug, not the user's fault, and crashes with its full traceback.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Callable

from .errors import UserError

# name -> "module:function"; imported when the CLI starts
COMMANDS: dict[str, str] = {
    "convert-peft-mora": "moraft.interop.peft_mora:convert_peft_mora",
    "export-lora": "moraft.interop.lora_export:export_lora",
    "merge": "moraft.interop.merge:merge_adapter",
    "serve": "moraft.serve.server:serve",
    "train": "moraft.train.commands:train_command",
    "eval": "moraft.train.evaluate:eval_command",
    "demo": "moraft.train.demo:demo",
}


def _load(spec: str) -> Callable:
    module, _, func = spec.partition(":")
    return getattr(importlib.import_module(module), func)


def _description(func: Callable) -> str:
    """The docstring up to its ``Args:`` section: jsonargparse shows only the first line, we show all of it."""
    doc = inspect.getdoc(func) or ""
    return doc.split("\nArgs:", 1)[0].strip()


def build_parser(commands: dict[str, Callable]):
    """The ``moraft`` parser: a subcommand per function, flags from its signature, help from its docstring."""
    import argparse

    from jsonargparse import DefaultHelpFormatter, auto_parser

    class Formatter(DefaultHelpFormatter):
        def _fill_text(self, text, width, indent):  # keep the docstring's paragraphs and lists as written
            return argparse.RawDescriptionHelpFormatter._fill_text(self, text, width, indent)

    parser = auto_parser(
        commands,
        as_positional=True,
        fail_untyped=True,
        parser_mode="yaml",
        prog="moraft",
        description="moraft: MoRA fine-tuning, conversion, merging and serving. `moraft COMMAND --help` for more.",
    )
    for name, sub in parser._subcommands_action._name_parser_map.items():
        sub.description = _description(commands[name])
        sub.formatter_class = Formatter
    return parser


def normalize_flags(argv: list[str], commands: dict[str, Callable]) -> list[str]:
    """Accept ``--merge-every`` for ``--merge_every``, and a bare ``--resume`` for ``--resume true``."""
    if not argv or argv[0] not in commands:
        return argv
    params = inspect.signature(commands[argv[0]]).parameters
    booleans = {name for name, p in params.items() if p.annotation in (bool, "bool")}
    out = argv[:1]
    for i, arg in enumerate(argv[1:], start=1):
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg[2:].partition("=")
            name = name.replace("-", "_")
            arg = f"--{name}{eq}{value}"
            following = argv[i + 1] if i + 1 < len(argv) else None
            if name in booleans and not eq and (following is None or following.lower() not in BOOL_WORDS):
                out += [arg, "true"]
                continue
        out.append(arg)
    return out


BOOL_WORDS = {"true", "false", "yes", "no", "1", "0", "on", "off"}


def _end_distributed() -> None:
    """End a torchrun / accelerate run with its process group destroyed, as PyTorch asks: left to interpreter exit,
    gloo's threads have aborted a finished rank (``terminate called without an active exception``, status -6)."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``moraft`` command."""
    argv = sys.argv[1:] if argv is None else argv
    commands = {name: _load(spec) for name, spec in COMMANDS.items()}
    parser = build_parser(commands)
    argv = normalize_flags(argv, commands)
    cfg = parser.parse_args(argv)  # bad flags: argparse prints usage and exits 2
    try:
        init = parser.instantiate(cfg)
        name = init.subcommand
        kwargs = dict(init[name])
        kwargs.pop("config", None)
        commands[name](**kwargs)
        _end_distributed()
    except UserError as err:
        if os.environ.get("MORAFT_DEBUG"):
            raise
        print(f"moraft {argv[0] if argv else ''}: error: {err}".replace("  ", " "), file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()

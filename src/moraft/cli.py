"""The ``moraft`` command line: one subcommand per typed function; its docstring is its ``--help``.

Each subcommand is a plain function elsewhere in the package (the CLI is thin): its parameters are the flags, or,
for a function taking an options dataclass (``train(options: TrainOptions)``), that dataclass's fields, nested
dataclasses as groups (``--adapter.r``), each field's docstring as its help. Options come from flags, a YAML file
(``--config FILE``), or both, with flags winning. Errors in what the user asked for print one line and exit with
status 2: a flag the parser refuses (unknown, of the wrong type, a bad ``--config`` file: `option_error`, which adds
where to get help) and anything the command finds wrong (a missing path, a bad value: ``moraft.errors.UserError``);
set ``MORAFT_DEBUG=1`` for their traceback. Any other exception is a bug, not the user's fault, and crashes with its
full traceback. Only the module of the command asked for is imported (`main`); ``moraft --help`` imports them all.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import os
import re
import sys
import types
import typing
from typing import Callable, Literal, NoReturn, Optional, Union

from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter, set_parsing_settings

from .console import quiet_console
from .errors import UserError

# name -> "module:function"; `main` imports the one it runs (all of them for `moraft --help`)
COMMANDS: dict[str, str] = {
    "convert-peft-mora": "moraft.interop.peft_mora:convert_peft_mora",
    "export-lora": "moraft.interop.lora_export:export_lora",
    "merge": "moraft.interop.merge:merge_adapter",
    "serve": "moraft.serve.server:serve",
    "train": "moraft.train.runner:train",
    "eval": "moraft.train.evaluate:eval_command",
    "data": "moraft.data.pipeline:data",
    "distill-data": "moraft.data.comprehend:distill_data_command",
    "demo": "moraft.train.demo:demo",
}


def load_command(spec: str) -> Callable:
    module, _, func = spec.partition(":")
    return getattr(importlib.import_module(module), func)


def options_class(func: Callable) -> Optional[type]:
    """The dataclass a command takes as its first parameter (``train(options: TrainOptions)``), or None: its fields
    (nested dataclasses as dotted groups, ``--adapter.r``) are then the command's flags."""
    parameters = list(inspect.signature(func).parameters.values())
    if not parameters:
        return None
    hint = parameters[0].annotation
    if isinstance(hint, str):  # postponed annotations: a class name in the function's module
        hint = func.__globals__.get(hint)
    return hint if isinstance(hint, type) and dataclasses.is_dataclass(hint) else None


def description(target: Callable) -> str:
    """The docstring up to its ``Args:`` section: jsonargparse shows only the first line, we show all of it."""
    doc = inspect.getdoc(target) or ""
    return doc.split("\nArgs:", 1)[0].strip()


def shortcuts(func: Callable) -> dict[str, Optional[str]]:
    """The option groups of a command taking an options dataclass, each with the option its name alone sets
    (``{"data": "data.dataset", "optimization": None}``); empty for other commands."""
    options = options_class(func)
    if options is None:
        return {}
    hints = typing.get_type_hints(options)
    found = {}
    for f in dataclasses.fields(options):
        if not (isinstance(hints[f.name], type) and dataclasses.is_dataclass(hints[f.name])):
            continue  # an option of its own (``moraft data --output``), not a group
        shortcut = getattr(hints[f.name], "SHORTCUT", None)
        found[f.name] = f"{f.name}.{shortcut}" if shortcut else None
    return found


def option_types(func: Callable) -> dict[str, object]:
    """Every flag of a command by its name without the dashes (``adapter.r``), with its type hint."""
    options = options_class(func)
    if options is None:
        hints = typing.get_type_hints(func)
        return {name: hints.get(name) for name in inspect.signature(func).parameters}

    def walk(cls: type, prefix: str) -> dict[str, object]:
        found: dict[str, object] = {}
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            if isinstance(hint, type) and dataclasses.is_dataclass(hint):
                found.update(walk(hint, f"{prefix}{f.name}."))
            else:
                found[prefix + f.name] = hint
        return found

    return walk(options, "")


class Formatter(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help (types, defaults) with the docstring's paragraphs and lists kept as written."""


def command_parser(func: Callable):
    """The parser of one subcommand: flags from ``func``'s signature (or from the fields of the options dataclass it
    takes, a field's docstring its flag's help), its docstring as the description. The docs' generated reference
    reads the help from here, so it is what ``--help`` prints."""
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    options = options_class(func)
    sub = ArgumentParser(  # exit_on_error=False: a bad flag raises, and `main` reports it as one line
        description=description(options or func), parser_mode="yaml", formatter_class=Formatter, exit_on_error=False
    )
    sub.add_argument("--config", action=ActionConfigFile, help="A YAML file of options; flags after it win.")
    if options is None:
        sub.add_function_arguments(func, as_positional=True, fail_untyped=True)
        return sub
    sub.add_class_arguments(options, nested_key=None, as_group=False, fail_untyped=True)
    # jsonargparse gives each group a flag of its own (--data CONFIG, a file of the group's options);
    # `normalize_flags` makes it set the group's main option instead, and its help says so
    short = shortcuts(func)
    for action in sub._actions:  # argparse keeps no public list of a parser's actions
        if action.option_strings and action.option_strings[0][2:] in short:
            target = short[action.option_strings[0][2:]]
            action.metavar = target.rsplit(".", 1)[1].upper() if target else None
            action.help = f"Short for --{target}." if target else argparse.SUPPRESS
    return sub


def build_parser(commands: dict[str, Callable]):
    """The ``moraft`` parser: a subcommand per function (`command_parser`)."""
    parser = ArgumentParser(  # its formatter_class is every subcommand's too (jsonargparse passes it down)
        prog="moraft",
        parser_mode="yaml",
        formatter_class=Formatter,
        exit_on_error=False,
        description="moraft: MoRA fine-tuning, conversion, merging and serving. `moraft COMMAND --help` for more.",
    )
    subcommands = parser.add_subcommands()
    for name, func in commands.items():
        sub = command_parser(func)
        subcommands.add_subcommand(name, sub, help=sub.description.split("\n", 1)[0])
    return parser


def normalize_flags(argv: list[str], commands: dict[str, Callable]) -> list[str]:
    """Accept ``--merge-every`` for ``--merge_every``, a bare ``--output.resume`` for ``--output.resume true``, a
    group's name for its main option (``--data x.jsonl`` for ``--data.dataset x.jsonl``), and an option without its
    group when exactly one group has it (``--report_to`` for ``--output.report_to``, as TRL and axolotl spell it).

    An option that several groups have (``--seed``), or a group without a main option, raises `UserError` naming the
    grouped flags.
    """
    if not argv or argv[0] not in commands:
        return argv
    types = option_types(commands[argv[0]])
    groups = shortcuts(commands[argv[0]])
    booleans = {name for name, hint in types.items() if hint is bool}
    leaves: dict[str, list[str]] = {}
    for name in types:
        leaves.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    out = argv[:1]
    for i, arg in enumerate(argv[1:], start=1):
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg[2:].partition("=")
            name = name.replace("-", "_")
            if name in groups:
                if groups[name] is None:
                    listed = ", ".join(f"--{option}" for option in types if option.startswith(f"{name}."))
                    raise UserError(f"--{name} is a group of options; set them one by one: {listed}")
                name = groups[name]
            elif name not in types and name in leaves and "." not in name:
                if len(leaves[name]) > 1:
                    grouped = " or ".join(f"--{full}" for full in leaves[name])
                    raise UserError(f"option --{name} is in several groups; give its group: {grouped}")
                name = leaves[name][0]
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


def accepted(hint: object) -> str:
    """What a flag of type ``hint`` accepts, in words (``Optional[int]``: "an integer or null")."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(str(arg) for arg in args)
    if origin in (Union, types.UnionType):
        named = [accepted(arg) for arg in args if arg is not type(None)]
        return " or ".join(named + (["null"] if type(None) in args else []))
    if origin in (list, tuple, set) and args:
        return f"a list of {accepted(args[0]).removeprefix('a ').removeprefix('an ')}s"
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}
    if hint in words:
        return words[hint]
    return re.sub(r"<class '([\w.]+)'>", r"\1", str(hint)).replace("typing.", "")


def option_error(message: str, command: Optional[str], func: Optional[Callable], argv: list[str]) -> str:
    """One line of the parser's (multi-line) ``message`` about a flag of ``moraft COMMAND``: the flag, the value and
    what it accepts where the message names them, then where to get help."""
    key = re.match(r'Parser key "([^"]+)":', message)
    value = re.findall(r"(?:Got|Given) value: (.*)", message)
    hints = option_types(func) if func is not None else {}
    if key and value and key[1] in hints:
        message = f"{key[1]}={value[-1].strip()!r} is invalid; expected {accepted(hints[key[1]])}"
    elif message.startswith(("Problems parsing config:", "Unexpected config:")):  # not YAML, or not a mapping
        files = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--config"]
        files += [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")]
        named = f"--config {files[0]}" if len(files) == 1 else "a --config file"
        if message.startswith("Unexpected config:"):
            message = f"{named} is not a mapping of options (option: value)"
        else:
            lines = message.split(":", 1)[1].replace('in "<unicode string>", ', "").splitlines()
            message = f"{named} does not parse as YAML: " + ", ".join(line.strip() for line in lines if line.strip())
    else:
        if key:
            message = f"--{key[1]}:" + message[key.end() :]
        if command is not None:  # the parser names a positional argument with its command: eval.path
            message = message.replace(f"{command}.", "")
    message = " ".join(message.split())
    prog = f"moraft {command}" if command is not None else "moraft"
    return f"{prog}: error: {message}; see {prog} --help"


def refuse(line: str) -> NoReturn:
    """Print ``line`` on stderr and exit with status 2 (bad input)."""
    print(line, file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``moraft`` command: imports the command asked for (all of them for ``moraft --help``),
    parses its flags and runs it."""
    argv = sys.argv[1:] if argv is None else argv
    quiet_console()
    command = argv[0] if argv and argv[0] in COMMANDS else None
    if command is None and not (argv and argv[0].startswith("-")):  # no command, or a word that is not one
        said = f"{argv[0]!r} is not a command" if argv else "a command is needed"
        refuse(f"moraft: error: {said}; expected one of {', '.join(COMMANDS)}; see moraft --help")
    commands = {name: load_command(spec) for name, spec in COMMANDS.items() if command in (None, name)}
    parser = build_parser(commands)
    try:
        argv = normalize_flags(argv, commands)
        try:
            cfg = parser.parse_args(argv)
        except argparse.ArgumentError as err:
            if os.environ.get("MORAFT_DEBUG"):
                raise
            refuse(option_error(str(err), command, commands.get(command), argv))
        init = parser.instantiate(cfg)
        name = init.subcommand
        kwargs = dict(init[name])
        kwargs.pop("config", None)
        options = options_class(commands[name])
        commands[name](options(**kwargs)) if options is not None else commands[name](**kwargs)
        _end_distributed()
    except UserError as err:
        if os.environ.get("MORAFT_DEBUG"):
            raise
        refuse(f"moraft {argv[0] if argv else ''}: error: {err}".replace("  ", " "))


if __name__ == "__main__":
    main()

"""mkdocs hooks (``hooks:`` in mkdocs.yml): the site is built from the repository as it is, nothing copied into docs/.

- **The home page is README.md.** It is added as ``index.md`` at build time, so the front door is written once;
  links to README.md go there.
- **Links out of docs/ work on GitHub and on the site.** The pages link to files of the repository as GitHub shows
  them (``../benchmarks/results/memory_task.png``, ``../examples/train.yaml``; the README: ``docs/training.md``). Such a
  link is rewritten to a copy of the file placed in the site under ``repo/`` at build time; a link to a file that
  does not exist is left alone, so ``mkdocs build --strict`` reports it.
- **Generated reference.** A line ``<!-- generated: NAME -->`` is replaced by the reference ``NAME`` built from the
  code (`GENERATORS`): the ``MoraConfig`` fields from their ``metadata["help"]``, the ``moraft train`` options from
  the parser that ``--help`` prints (each field's attribute docstring), the commands from ``moraft.cli.COMMANDS``.
  An unknown name, or a field without help, stops the build.
"""

from __future__ import annotations

import dataclasses
import inspect
import posixpath
import re
import typing
from pathlib import Path

import yaml
from mkdocs.structure.files import File, Files

README = "README.md"
REPO_DIR = "repo"  # where files of the repository that pages link to are placed in the site
LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)(\))")  # [text](target) and ![alt](target)
MARKER = re.compile(r"^<!-- generated: ([\w-]+) -->$", re.MULTILINE)
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)


def _root(config) -> Path:
    return Path(config.config_file_path).resolve().parent


# -- the home page and links out of docs/ ----------------------------------------------------------------------------


def on_files(files: Files, config) -> Files:
    if files.get_file_from_path("index.md") is None:
        readme = (_root(config) / README).read_text(encoding="utf-8")
        files.append(File.generated(config, "index.md", content=readme))
    return files


def on_page_markdown(markdown: str, page, config, files: Files) -> str:
    root, docs = _root(config), Path(config.docs_dir).resolve()
    src_uri = page.file.src_uri
    # where this Markdown lives in the repository, relative to its root (README.md is the home page)
    from_readme = src_uri == "index.md" and not (docs / src_uri).exists()
    source = README if from_readme else (docs / src_uri).relative_to(root)
    source_dir = posixpath.dirname(Path(source).as_posix())
    docs_rel = docs.relative_to(root).as_posix()
    page_dir = posixpath.dirname(src_uri)

    def rewrite(match: re.Match) -> str:
        target = match.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:|^#|^/", target):  # a URL, an anchor on this page, an absolute path
            return match.group(0)
        path, hash_, fragment = target.partition("#")
        repo_path = posixpath.normpath(posixpath.join(source_dir, path))
        if repo_path == README:
            site_path = "index.md"
        elif repo_path == docs_rel or repo_path.startswith(docs_rel + "/"):
            site_path = posixpath.relpath(repo_path, docs_rel)
        elif (root / repo_path).is_file() and not repo_path.startswith(".."):
            site_path = f"{REPO_DIR}/{repo_path}"
            if files.get_file_from_path(site_path) is None:
                files.append(File.generated(config, site_path, abs_src_path=str(root / repo_path)))
        else:
            return match.group(0)  # left as written: the build reports it
        new = posixpath.relpath(site_path, page_dir or ".")
        return f"{match.group(1)}{new}{hash_}{fragment}{match.group(3)}"

    # links inside fenced code blocks are code, not links
    pieces, last = [], 0
    for fence in FENCE.finditer(markdown):
        pieces += [LINK.sub(rewrite, markdown[last : fence.start()]), fence.group(0)]
        last = fence.end()
    markdown = "".join(pieces) + LINK.sub(rewrite, markdown[last:])
    return MARKER.sub(lambda m: _generate(m.group(1)), markdown)


# -- generated reference -----------------------------------------------------------------------------------------------


def _generate(name: str) -> str:
    if name not in GENERATORS:
        raise KeyError(f"<!-- generated: {name} -->: unknown; known: {', '.join(GENERATORS)}")
    return GENERATORS[name]()


def _text(help_text: str) -> str:
    """A help string as one Markdown table cell: one line, Markdown characters escaped outside `code`."""
    parts = re.split(r"(`[^`]*`)", " ".join(help_text.split()))
    escaped = [p if p.startswith("`") else re.sub(r"([\\*_\[\]|])", r"\\\1", p) for p in parts]
    escaped = [p if p.startswith("`") else p.replace("<", "&lt;").replace(">", "&gt;") for p in escaped]
    return "".join(escaped)


def _type(hint: object) -> str:
    name = hint.__name__ if isinstance(hint, type) else str(hint)
    return re.sub(r"\btyping\.|<class '|'>", "", name).replace("NoneType", "None")


def _yaml(value: object) -> str:
    """A value as it is written on the command line or in a YAML file."""
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def _row(name: str, hint: object, default: str, help_text: str, what: str) -> str:
    if not help_text or not help_text.strip():
        raise ValueError(f"{what} has no help text: document it in the code")
    return f"| `{name}` | `{_type(hint)}` | `{default}` | {_text(help_text)} |"


HEADER = "| option | type | default | what it does |\n| --- | --- | --- | --- |"


def mora_config() -> str:
    """MoraConfig's own fields (not PeftConfig's), from each field's metadata["help"]."""
    from peft import PeftConfig

    from moraft import MoraConfig

    inherited = {f.name for f in dataclasses.fields(PeftConfig)}
    hints = typing.get_type_hints(MoraConfig)
    rows = []
    for f in dataclasses.fields(MoraConfig):
        if f.name in inherited:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        rows.append(_row(f.name, hints[f.name], repr(default), f.metadata.get("help", ""), f"MoraConfig.{f.name}"))
    return "\n".join([HEADER, *rows])


def _option_tables(func, anchor: str) -> str:
    """One table per option group of a command taking an options dataclass (``train``, ``data``), in its order; the
    options of its own (``moraft data --output``) first. The help is the parser's: exactly what ``--help`` prints."""
    from moraft.cli import command_parser, option_types, options_class

    actions = {action.dest: action for action in command_parser(func)._actions}  # argparse has no public list
    types = option_types(func)
    options = options_class(func)
    hints = typing.get_type_hints(options)
    groups = [f for f in dataclasses.fields(options) if dataclasses.is_dataclass(hints[f.name])]
    own = [f for f in dataclasses.fields(options) if f not in groups]
    out = []
    if own:
        out += [f"### Options of its own {{ #{anchor}-own }}", "", HEADER]
        out += [_row(f"--{f.name}", types[f.name], _yaml(actions[f.name].default), actions[f.name].help or "",
                     f"--{f.name}") for f in own]
        out.append("")
    for group in groups:
        cls = hints[group.name]
        out += [f"### `{group.name}`: {inspect.getdoc(cls)} {{ #{anchor}-{group.name} }}", "", HEADER]
        for f in dataclasses.fields(cls):
            dotted = f"{group.name}.{f.name}"
            action = actions[dotted]
            out.append(_row(f"--{dotted}", types[dotted], _yaml(action.default), action.help or "", f"--{dotted}"))
        out.append("")
    return "\n".join(out)


def train_options() -> str:
    """One table per option group of ``moraft train``, in the order of TrainOptions."""
    from moraft.train.runner import train

    return _option_tables(train, "train")


def data_options() -> str:
    """The options of ``moraft data``: its own, then one table per stage."""
    from moraft.data.pipeline import data

    return _option_tables(data, "data")


def train_yaml() -> str:
    """Every option of ``moraft train`` at its default, as the YAML file ``--config`` reads."""
    from moraft.train.options import TrainOptions

    body = yaml.safe_dump(TrainOptions().to_dict(), sort_keys=False, default_flow_style=False)
    return f"```yaml\n{body}```"


def commands() -> str:
    """Each subcommand of ``moraft``, the function behind it (whose docstring is its ``--help``) and its summary."""
    from moraft.cli import COMMANDS, description, load_command, options_class

    rows = ["| command | function (its docstring is the `--help`) | what it does |", "| --- | --- | --- |"]
    for name, spec in COMMANDS.items():
        func = load_command(spec)
        target = options_class(func) or func
        path = f"{target.__module__}.{target.__qualname__}"
        summary = description(target).split("\n\n", 1)[0]
        rows.append(f"| `moraft {name}` | [`{path}`][{path}] | {_text(summary)} |")
    return "\n".join(rows)


def methods() -> str:
    """The method table of ``moraft train --method`` (`moraft.train.peft_methods.METHODS`), then the PEFT methods left
    out and why (`moraft.train.peft_methods.LEFT_OUT`)."""
    from moraft.train.peft_methods import LEFT_OUT, METHODS, config_class

    def mark(ok: bool) -> str:
        return "yes" if ok else "no"

    how = {"same": "r itself", "search": "searched", "r": "r, not comparable", "none": "not comparable"}
    rows = [
        "| method | PEFT config | `--adapter.r` sets | how its size compares with LoRA's at r | main options "
        "(`adapter.method_options`) | moraft options it takes | eval | merge | serve | export-lora |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m in METHODS.values():
        config = config_class(m).__name__ if m.peft_type else "none"
        knob = f"`{m.knob}` ({how[m.budget]})" if m.knob else how[m.budget]
        fields = {"dropout": m.dropout, "init_weights": m.init, "lora_alpha": m.alpha, "rank_pattern": m.rank_pattern}
        mapped = ", ".join(f"`{name}` → `{field}`" for name, field in fields.items() if field)
        merge = mark("merge" in m.uses) + (f": {m.no_merge}" if m.no_merge else "")
        rows.append(f"| `{m.name}` | `{config}` | {knob} | {_text(m.note)} | {_text(m.options) or '—'} | "
                    f"{mapped or '—'} | {mark('eval' in m.uses)} | {_text(merge)} | {mark('serve' in m.uses)} | "
                    f"{mark('export' in m.uses)} |")
    rows += ["", "| PEFT 0.21 method left out | why |", "| --- | --- |"]
    rows += [f"| {', '.join(f'`{n.strip()}`' for n in names.split(','))} | {_text(why)} |"
             for names, why in LEFT_OUT.items()]
    return "\n".join(rows)


GENERATORS = {
    "methods": methods,
    "mora-config": mora_config,
    "train-options": train_options,
    "train-yaml": train_yaml,
    "data-options": data_options,
    "commands": commands,
}

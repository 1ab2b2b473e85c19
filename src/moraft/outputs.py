"""Output directories that moraft deletes or replaces: only what moraft wrote there, never anything else.

Before a command deletes or replaces anything (``moraft train --output.overwrite``, ``moraft merge``, ``export-lora``
and ``convert-peft-mora`` with ``--overwrite``, ``moraft data``'s stages, ``moraft demo``), `check_replaceable` asks
that every entry to delete be one that command writes; otherwise it refuses in one line that names the others. What a
command writes is known two ways:

- by name, for outputs whose every file is fixed by the command: a merged model (``config.json``, ``model*.safetensors``
  and the base's side files), a LoRA adapter (``adapter_config.json``, ``adapter_model.safetensors``), a ``datasets``
  directory. These stay plain: nothing is added to them.
- by a manifest, ``.moraft-output.json``, for moraft's own directories, whose names are too common to recognise alone
  (``runs/``, ``README.md``, ``checkpoint-*``) or depend on the run (the tokenizer's files): the command records there
  what it writes (`record`), and a directory without it, or with another command's, is not that command's to delete.

The current directory, any directory above it, the home directory and the filesystem root are never deleted or
replaced, whatever they hold.

`staged_output_dir` writes a whole output beside its final place and swaps it in at the end. Its staging directories
carry their owner's process id and host in their names, so the next run removes those whose process is gone (killed
mid-write) and leaves a live run's alone.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

from .errors import UserError

MANIFEST = ".moraft-output.json"
STAGING_KINDS = ("partial", "replaced")  # a staged output being written; an old output being swapped out
PathLike = Union[str, os.PathLike]


# ---------------------------------------------------------------------------------------------------------------------
# whole files


def write_json(path: PathLike, value: Any) -> None:
    """Write ``value`` as indented JSON to ``path`` through a temporary file beside it (named for this process), so a
    reader sees the old file or the new one, never half of one, and a failed write leaves no temporary behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        partial.write_text(json.dumps(value, indent=2, default=str) + "\n")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------------
# the manifest


def read_manifest(directory: PathLike) -> Optional[dict]:
    """The manifest of ``directory`` (``{"command": ..., "entries": [...]}``), or None if it has none (or an
    unreadable one)."""
    try:
        manifest = json.loads((Path(directory) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("entries"), list):
        return None
    return manifest


def record(directory: PathLike, command: str, entries: Iterable[str]) -> bool:
    """Record in ``directory``'s manifest that ``command`` writes ``entries`` there (names, or glob patterns such as
    ``checkpoint-*``), besides those it recorded before. Returns False, recording nothing, when the directory is
    another command's output (its entries stay that command's)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is not None and manifest.get("command") != command:
        return False
    known = manifest["entries"] if manifest is not None else []
    manifest = {"command": command, "entries": known + [e for e in entries if e not in known and e != MANIFEST]}
    write_json(directory / MANIFEST, manifest)
    return True


def _owned(name: str, patterns: Iterable[str]) -> bool:
    return name == MANIFEST or any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _listing(paths: list[Path], most: int = 5) -> str:
    """``a.txt, notes/ and 3 more``: entries as a user sees them (directories end with a slash)."""
    names = [p.name + ("/" if p.is_dir() and not p.is_symlink() else "") for p in sorted(paths)]
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


# ---------------------------------------------------------------------------------------------------------------------
# the checks


def protected(path: PathLike) -> Optional[str]:
    """What ``path`` is, in words, when moraft must never delete or replace it whatever it holds (the current
    directory or one above it, the home directory, the filesystem root); None otherwise."""
    resolved = Path(path).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if resolved == Path(resolved.anchor):
        return "the filesystem root"
    if resolved == Path.home().resolve():
        return "the home directory"
    if resolved == cwd:
        return "the current directory"
    if resolved in cwd.parents:
        return "a directory above the current one"
    return None


def check_replaceable(
    directory: PathLike,
    command: str,
    option: str,
    entries: Optional[Iterable[str]] = None,
    writes: Iterable[str] = (),
) -> None:
    """Raise `moraft.errors.UserError`, in one line, unless ``command`` may delete ``entries`` of ``directory``
    (those that exist; None: the directory and everything in it).

    It may when every entry to delete is one ``command`` writes: one that ``writes`` names (names or glob patterns),
    or that the directory's manifest names when ``command`` wrote it (a manifest of another command refuses it all);
    and, to delete the whole directory, when it is not one that `protected` names. ``option`` is how the message
    names the path (``output.dir``).
    """
    path = Path(directory)
    if not path.exists() and not path.is_symlink():
        return
    where = f"{option} {str(path)!r}"
    what = protected(path) if entries is None else None
    if what is not None:
        raise UserError(f"{where} is {what}, which moraft never deletes or replaces; choose another {option}")
    if not path.is_dir():
        raise UserError(f"{where} is a file that {command} did not write; move it away or choose another {option}")
    doomed = list(path.iterdir()) if entries is None else [path / e for e in entries if (path / e).exists()]
    if not doomed:
        return
    manifest = read_manifest(path)
    if manifest is not None and manifest.get("command") != command:
        raise UserError(f"{where} is the output of {manifest.get('command')}, not of {command}; choose another "
                        f"{option}")
    owned = [*writes, *(manifest["entries"] if manifest is not None else [])]
    foreign = [p for p in doomed if not _owned(p.name, owned)]
    if foreign:
        raise UserError(f"{where} holds entries that {command} did not write ({_listing(foreign)}); move them away "
                        f"or choose another {option}")


def clear(directory: PathLike, command: str, option: str, writes: Iterable[str] = ()) -> None:
    """Delete what ``command`` wrote in ``directory`` (every entry, after `check_replaceable`), keeping the directory
    itself."""
    check_replaceable(directory, command, option, writes=writes)
    path = Path(directory)
    if not path.is_dir():
        return
    entries = sorted(path.iterdir(), key=lambda p: p.name == MANIFEST)  # the manifest last: a crash keeps it
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


# ---------------------------------------------------------------------------------------------------------------------
# staged outputs


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _staging_pattern(out: Path) -> re.Pattern:
    """What the names of ``out``'s staging directories look like (`_make_staging`): owner pid, owner host."""
    kinds = "|".join(STAGING_KINDS)
    return re.compile(rf"\.{re.escape(out.name)}\.moraft-(\d+)@([A-Za-z0-9._]+)-[A-Za-z0-9_]+\.({kinds})")


def _make_staging(out: Path, kind: str) -> Path:
    """A new directory beside ``out`` named for its owner: ``.NAME.moraft-PID@HOST-RANDOM.KIND``."""
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.moraft-{os.getpid()}@{_host()}-", suffix=f".{kind}",
                                 dir=out.parent))


def remove_stale_staging(out_dir: PathLike) -> list[Path]:
    """Remove the staging directories of ``out_dir`` that a process on this host left when it died mid-write (those
    of live processes, or of other hosts, stay); the removed ones."""
    out = Path(os.path.abspath(out_dir))
    if not out.parent.is_dir():
        return []
    pattern, host, removed = _staging_pattern(out), _host(), []
    for entry in out.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and match[2] == host and not _alive(int(match[1])) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


@contextmanager
def staged_output_dir(
    out_dir: PathLike, overwrite: bool = False, command: str = "moraft", writes: Iterable[str] = ()
) -> Iterator[Path]:
    """Yield a fresh directory beside ``out_dir``; move it to ``out_dir`` only when the body finishes.

    ``out_dir`` is then either the complete result or untouched: on an error in the body the staging directory is
    removed, and one left by a process killed mid-write is removed by the next run to the same ``out_dir``
    (`remove_stale_staging`). An existing ``out_dir`` is replaced only with ``overwrite``, and only when all it holds
    is what ``command`` writes there (``writes``: names or glob patterns; see `check_replaceable`).
    """
    writes = list(writes)
    given, out = Path(out_dir), Path(os.path.abspath(out_dir))
    occupied = out.exists() and not (out.is_dir() and not any(out.iterdir()))
    if occupied and not overwrite:
        raise UserError(f"output {given} already exists; choose another path or pass --overwrite to replace it")
    check_replaceable(given, command, "output", writes=writes)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    staging = _make_staging(out, "partial")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; the result should look like any new directory
    try:
        yield staging
        if out.exists() and (out.is_file() or any(out.iterdir())):
            check_replaceable(given, command, "output", writes=writes)  # again: it may have changed while the body ran
            retired = _make_staging(out, "replaced")
            os.replace(out, retired / out.name)
            os.replace(staging, out)
            shutil.rmtree(retired)
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


__all__ = [
    "MANIFEST", "check_replaceable", "clear", "protected", "read_manifest", "record", "remove_stale_staging",
    "staged_output_dir", "write_json",
]

"""Writing in ``moraft data``: a full disk as one line, and no temporary file left behind.

Every write of the stages goes through `datasets` (each pass of ``Dataset.map``, ``save_to_disk``, the builders), the
sqlite reply cache, or a JSON file written whole. ``Dataset.map`` writes its result to a temporary file beside its
input's Arrow files (``tmpXXXXXXXX``, `tempfile`'s name) and renames it when complete; when the disk fills up, its own
clean-up writes the file's footer first, fails again, and leaves the file, and a killed run always leaves it. `guarded`
wraps a stage: on any error it removes the temporaries the stage left, and a full disk (``ENOSPC``, or sqlite's
"database or disk is full") becomes one line naming where and about how much space is needed. `remove_temporaries`
removes those of an earlier run that was killed.
"""

from __future__ import annotations

import errno
import shutil
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional

import regex

from ..errors import UserError

TEMPORARY = regex.compile(r"tmp[a-z0-9_]{8}")
"""The name of a temporary file of `tempfile` (``NamedTemporaryFile``), which is how datasets names a pass's output
until it is complete."""


def no_space(err: BaseException) -> Optional[BaseException]:
    """The error of a full disk in ``err`` or the errors it was raised from (an ``OSError`` with ``ENOSPC`` or
    ``EDQUOT``, sqlite's "database or disk is full"), else None. A `UserError` is already the user's one line (an
    inner `guarded` may have said it), and an error raised ``from None`` hides what it was raised in."""
    seen: set[int] = set()
    cause: Optional[BaseException] = err
    while cause is not None and id(cause) not in seen and not isinstance(cause, UserError):
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return cause
        if isinstance(cause, sqlite3.OperationalError) and (
                getattr(cause, "sqlite_errorcode", None) == getattr(sqlite3, "SQLITE_FULL", 13)
                or "disk is full" in str(cause)):
            return cause
        cause = cause.__cause__ if cause.__cause__ is not None or cause.__suppress_context__ else cause.__context__
    return None


def human(size: float) -> str:
    """A size in bytes as a short text: ``512 B``, ``3.4 MB``, ``1.2 GB`` (powers of 1000, as df -H prints)."""
    if size < 1000:
        return f"{size:.0f} B"
    for unit in ("kB", "MB", "GB"):
        size /= 1000
        if size < 1000:
            return f"{size:.1f} {unit}"
    return f"{size / 1000:.1f} TB"


def size_of(paths: Iterable[Path]) -> int:
    """The bytes of the files at ``paths`` and under the directories among them (missing ones count 0)."""
    total = 0
    for path in paths:
        path = Path(path)
        files = path.rglob("*") if path.is_dir() else [path]
        for file in files:
            try:
                if file.is_file():
                    total += file.stat().st_size
            except OSError:
                continue
    return total


def free_space(path: Path) -> int:
    """The bytes free on the file system of ``path`` (or of its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def temporaries(directories: Iterable[Path]) -> set[Path]:
    """The temporary files of datasets' passes (`TEMPORARY`) directly in ``directories``."""
    found = set()
    for directory in directories:
        directory = Path(directory)
        if directory.is_dir():
            found.update(p for p in directory.iterdir() if TEMPORARY.fullmatch(p.name) and p.is_file())
    return found


def remove_temporaries(directories: Iterable[Path], keep: Iterable[Path] = ()) -> list[Path]:
    """Remove the temporary files of datasets' passes in ``directories`` (those in ``keep`` excepted); return them."""
    removed = sorted(temporaries(directories) - set(keep))
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


@contextmanager
def guarded(what: str, where: Path, reads: Iterable[Path] = (), scratch: Iterable[Path] = (),
            growth: float = 2.0) -> Iterator[None]:
    """Run a block that writes: on any error, the temporaries it left in the ``scratch`` directories are removed (those
    there before it began are kept), and a full disk is raised as a `UserError` of one line.

    Args:
        what: what the block does, for the message (``"the mine stage"``).
        where: where it writes, named in the message when the error does not name a file.
        reads: the files (or directories) it reads: ``growth`` times their size estimates the space it needs (a
            pass's output beside its input, then the saved copy: about twice the input).
        scratch: the directories where datasets writes its passes' temporaries for this block.
        growth: see ``reads``.

    Raises:
        UserError: the disk is full: ``no space left on the device of PATH for WHAT: it needs about N free, M are
            free; free some space (or write elsewhere) and rerun``.
    """
    scratch = [Path(d) for d in scratch]
    before = temporaries(scratch)
    try:
        yield
    except BaseException as err:
        remove_temporaries(scratch, keep=before)
        full = no_space(err)
        if full is None:
            raise
        named = getattr(full, "filename", None)
        path = Path(named).parent if named else Path(where)
        needed = growth * size_of(reads)
        raise UserError(f"no space left on the device of {path} for {what}: it needs about {human(needed)} free, "
                        f"{human(free_space(path))} are free; free some space (or write elsewhere) and rerun") from None


__all__ = ["TEMPORARY", "free_space", "guarded", "human", "no_space", "remove_temporaries", "size_of", "temporaries"]

"""Atomic outputs: build in a temporary sibling, rename into place only when complete.

A reader therefore never sees a half-written directory or file, and a failed run leaves nothing behind.
``check_output`` decides whether a stage may write to a path at all: a stage replaces only a previous
output of its own kind (or any path with ``overwrite``), and never one of its own inputs.
Temporary siblings of processes that died (``kill -9``) are removed by the next run on the same path.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from pipeline.errors import UsageError

_TAGS = ("tmp", "old", "part")


def _sibling(path: Path, tag: str) -> Path:
    return path.parent / f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_siblings(path: str | Path) -> list[Path]:
    """Remove the temporary siblings of ``path`` left by processes that no longer run; return them.

    Only names this module makes (``.NAME.tmp-PID-HEX``, ``.old-``, ``.part-``) with a dead PID are
    touched; a concurrent run's temporary output (live PID) is left alone.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.({'|'.join(_TAGS)})-(\d+)-[0-9a-f]{{8}}$")
    removed = []
    for entry in path.parent.iterdir():
        match = pattern.match(entry.name)
        if match is None or _alive(int(match.group(2))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``path``; on success it replaces ``path``.

    On an exception (or an interrupt) the temporary directory is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(path)
    tmp = _sibling(path, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, path)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.filename is None and err.errno is not None:  # e.g. pyarrow's "File too large": say what was written
            raise OSError(err.errno, f"{err.strerror or err} (while building it; nothing was replaced)",
                          str(path)) from err
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(finished: str | Path, path: str | Path) -> None:
    """Rename the complete directory ``finished`` onto ``path``, replacing what was there."""
    finished, path = Path(finished), Path(path)
    old = None
    if path.exists() or path.is_symlink():
        # Move the old output aside first: rename cannot replace a non-empty directory.
        old = _sibling(path, "old")
        path.rename(old)
    try:
        finished.rename(path)
    except BaseException:
        if old is not None:
            old.rename(path)  # put the previous output back
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; on success it is renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(path)
    tmp = _sibling(path, "part")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _related(a: Path, b: Path) -> str | None:
    """How path ``a`` relates to path ``b`` (both resolved): "is", "is inside", "contains" or None."""
    if a == b:
        return "is"
    if b in a.parents:
        return "is inside"
    if a in b.parents:
        return "contains"
    return None


def check_output(
    path: str | Path,
    *,
    stage: str,
    flag: str,
    is_previous_output: Callable[[Path], bool],
    inputs: Iterable[tuple[str, str | Path]] = (),
    overwrite: bool = False,
    kind: str = "dir",
) -> Path:
    """Refuse an output path that would destroy something; return it.

    Args:
        path: where ``stage`` will write (a directory, or a file when ``kind="file"``).
        stage: the stage's name, for messages ("etl", "train", "predict").
        flag: the option that named ``path`` ("--out").
        is_previous_output: whether an existing ``path`` holds an earlier output of this stage (which
            may be replaced).
        inputs: ``(flag, path)`` of every input of the stage: ``path`` may not be one of them, nor
            contain nor sit inside one, whatever ``overwrite`` says.
        overwrite: replace an existing path that is not a previous output of the stage.
        kind: "dir" or "file".

    Raises ``UsageError`` with a one-line message naming the path and the way out.
    """
    path = Path(path)
    resolved = path.resolve()
    for input_flag, input_path in inputs:
        if input_path is None:
            continue
        relation = _related(resolved, Path(input_path).resolve())
        if relation is not None:
            raise UsageError(
                f"{flag} {path} {relation} {input_flag} {input_path}: the {stage} output would replace its own input"
            )
    if not (path.exists() or path.is_symlink()):
        return path
    if kind == "file" and path.is_dir():
        raise UsageError(f"{flag} {path} is a directory; give the path of the file to write")
    if is_previous_output(path) or overwrite:
        return path
    what = "directory" if path.is_dir() else "file"
    raise UsageError(
        f"{flag} {path} is an existing {what} that is not a previous `{stage}` output; "
        f"refusing to replace it (pass --overwrite to replace it anyway, or choose another {flag})"
    )

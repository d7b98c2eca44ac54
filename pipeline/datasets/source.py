"""Where a variant's raw files live: a folder or the original GroupLens zip.

The zips hold their files under a top folder (ml-1m.zip: ``ml-1m/ratings.dat``); a folder may hold the
files directly or that top folder (the zip extracted in place). Either way a reader asks for files by
their bare name (``ratings.dat``) and gets bytes or a binary stream, and error messages name the file
as the user would find it (``/data/ml-1m.zip:ml-1m/ratings.dat``).
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import BinaryIO

from pipeline.errors import DataError


class RawFiles:
    """The raw files of one MovieLens variant, in a folder or a zip."""

    def __init__(self, path: str | Path, variant: str, required: tuple[str, ...]):
        self.path = Path(path)
        self.variant = variant
        if not self.path.exists():
            raise DataError(f"{self.path}: no such file or directory (expected the {variant} folder or {variant}.zip)")
        self._zip: zipfile.ZipFile | None = None
        self._prefix = ""
        if self.path.is_dir():
            nested = self.path / variant
            if not (self.path / required[0]).exists() and (nested / required[0]).exists():
                self.path = nested
            names = {p.name for p in self.path.iterdir()}
        else:
            try:
                self._zip = zipfile.ZipFile(self.path)
            except zipfile.BadZipFile as err:
                raise DataError(f"{self.path}: not a folder and not a valid zip file ({err})") from None
            members = set(self._zip.namelist())
            if f"{variant}/{required[0]}" in members:
                self._prefix = f"{variant}/"
            names = {m[len(self._prefix) :] for m in members if m.startswith(self._prefix)}
        missing = [name for name in required if name not in names]
        if missing:
            raise DataError(
                f"{self.describe(missing[0])}: missing; a {variant} dataset needs {', '.join(required)} "
                f"(missing: {', '.join(missing)})"
            )
        self._names = names

    def exists(self, name: str) -> bool:
        return name in self._names

    def describe(self, name: str) -> str:
        """The file as a user finds it, for messages: a path, or ``zip:member``."""
        if self._zip is not None:
            return f"{self.path}:{self._prefix}{name}"
        return str(self.path / name)

    def size(self, name: str) -> int:
        if self._zip is not None:
            return self._zip.getinfo(self._prefix + name).file_size
        return (self.path / name).stat().st_size

    def read_bytes(self, name: str) -> bytes:
        if self._zip is not None:
            return self._zip.read(self._prefix + name)
        return (self.path / name).read_bytes()

    def arrow_input(self, name: str) -> str | BinaryIO:
        """What pyarrow reads fastest: the path of a plain file (native I/O), else a stream from the zip."""
        if self._zip is not None:
            return self.open(name)
        return str(self.path / name)

    def open(self, name: str) -> BinaryIO:
        """A binary stream of the file (streamed from the zip, not loaded whole)."""
        if self._zip is not None:
            return io.BufferedReader(self._zip.open(self._prefix + name))
        return open(self.path / name, "rb")

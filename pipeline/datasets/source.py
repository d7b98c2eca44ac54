"""Where a variant's raw files live: a folder or the original GroupLens zip.

The zips hold their files under a top folder (ml-1m.zip: ``ml-1m/ratings.dat``); a folder may hold the
files directly or that top folder (the zip extracted in place). Either way a reader asks for files by
their bare name (``ratings.dat``) and gets bytes or a binary stream, and error messages name the file
as the user would find it (``/data/ml-1m.zip:ml-1m/ratings.dat``).
"""

from __future__ import annotations

import contextlib
import io
import lzma
import zipfile
import zlib
from collections.abc import Iterator
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
            except OSError as err:
                raise DataError(f"{self.path}: cannot open the zip file ({err.strerror or err})") from None
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
            with _damaged_zip(self.describe(name)):
                return self._zip.read(self._prefix + name)
        return (self.path / name).read_bytes()

    def verify(self, name: str) -> None:
        """Read a zip member to its end, so its CRC is checked: DataError if the archive is damaged.

        For the error path: a damaged member can parse into garbage lines before zipfile sees the bad
        checksum at the end, and the user should hear about the damage, not about a garbage line.
        """
        if self._zip is not None:
            with self.open(name) as stream:
                while stream.read(_VERIFY_CHUNK):
                    pass

    def arrow_input(self, name: str) -> str | BinaryIO:
        """What pyarrow reads fastest: the path of a plain file (native I/O), else a stream from the zip.

        The zip stream is unbuffered: pyarrow asks for 16 MB blocks, which a buffer would only copy.
        """
        if self._zip is not None:
            return self._member_stream(name)
        return str(self.path / name)

    def open(self, name: str) -> BinaryIO:
        """A binary stream of the file (streamed from the zip, not loaded whole).

        A damaged zip member raises DataError naming ``zip:member`` from any read of the stream,
        including the reads pyarrow makes while it parses (it re-raises our exception as is).
        """
        if self._zip is not None:
            return io.BufferedReader(self._member_stream(name))
        return open(self.path / name, "rb")

    def _member_stream(self, name: str) -> _MemberStream:
        where = self.describe(name)
        with _damaged_zip(where):
            member = self._zip.open(self._prefix + name)
        return _MemberStream(member, where)


# What zipfile raises for a damaged member: deflate data (zlib.error), a checksum or local header that
# does not match (BadZipFile), data cut short (EOFError), bzip2 data (OSError), lzma data (LZMAError);
# at open, an unknown compression method (NotImplementedError) or encryption (RuntimeError).
_VERIFY_CHUNK = 16 << 20
_DAMAGE = (zlib.error, zipfile.BadZipFile, EOFError, OSError, lzma.LZMAError)
_DAMAGE_AT_OPEN = _DAMAGE + (NotImplementedError, RuntimeError)


@contextlib.contextmanager
def _damaged_zip(where: str, errors: tuple[type[BaseException], ...] = _DAMAGE_AT_OPEN) -> Iterator[None]:
    """Turn zipfile's errors for a damaged member into one DataError naming ``zip:member``."""
    try:
        yield
    except errors as err:
        detail = (str(err).splitlines() or [""])[0] or type(err).__name__
        if isinstance(err, EOFError) and not str(err):
            detail = "the zip file ends inside this member"  # cut short after it was opened
        raise DataError(
            f"{where}: cannot read this file from the zip, the archive is damaged ({detail}); "
            "download or copy the zip again"
        ) from None


class _MemberStream(io.RawIOBase):
    """A zip member as a raw stream whose read errors are DataErrors (see :func:`_damaged_zip`)."""

    def __init__(self, member: BinaryIO, where: str):
        self._member = member
        self._where = where

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        with _damaged_zip(self._where, _DAMAGE):
            return self._member.read(size)

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._member.close()
        super().close()

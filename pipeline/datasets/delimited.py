"""Fast, validated reading of one delimited MovieLens file.

The happy path is a single ``pyarrow.csv`` parse (multi-threaded C++; a multi-character separator such as
ml-1m's ``::`` is first turned into one unused byte with ``bytes.replace``, so pandas' python-engine regex
separator is never needed). Only when that parse fails, or a later check finds a bad row, is the file
scanned line by line in Python to name the first offending line (1-based, as an editor shows it).
"""

from __future__ import annotations

import contextlib
import csv
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from pipeline.datasets.source import RawFiles
from pipeline.errors import DataError

_ARROW_TYPES = {"int": pa.int64(), "float": pa.float64(), "str": pa.string()}
_KIND_WORDS = {"int": "an integer", "float": "a number", "str": "text"}
# Single bytes that may stand in for a multi-character separator, if absent from the file.
_STAND_INS = (b"\t", b"\x1f", b"\x1e", b"\x1d", b"\x01")


@dataclass(frozen=True)
class Column:
    """One field of a delimited file: its name and kind ("int", "float" or "str")."""

    name: str
    kind: str


@dataclass(frozen=True)
class DelimitedFile:
    """A delimited file of a raw dataset: how to parse it, and how to point at one of its lines.

    ``header`` is the exact first line when the file has one (ml-25m's csv files); ``quoted`` enables
    csv quoting (``"Title, The (1995)"`` with ``""`` for a quote); ``encoding`` is the text encoding.
    """

    files: RawFiles
    name: str
    columns: tuple[Column, ...]
    sep: str
    encoding: str = "utf-8"
    header: str | None = None
    quoted: bool = False

    @property
    def where(self) -> str:
        return self.files.describe(self.name)

    def read(self) -> pd.DataFrame:
        """Parse the whole file: DataFrame with one column per ``Column`` (int64 / float64 / object str)."""
        if self.files.size(self.name) == 0:
            raise DataError(f"{self.where}: the file is empty")
        if self.header is not None:
            self._check_header()
        if len(self.sep) == 1:
            source, delimiter = self.files.arrow_input(self.name), self.sep
        else:
            data = self.files.read_bytes(self.name)
            stand_in = next((b for b in _STAND_INS if b not in data), None)
            if stand_in is None:
                raise self._parse_error("cannot find a free byte to stand in for the separator")
            source, delimiter = io.BytesIO(data.replace(self.sep.encode(), stand_in)), stand_in.decode()
        try:
            with contextlib.nullcontext(source) if isinstance(source, str) else source:
                table = pacsv.read_csv(
                    source,
                    read_options=pacsv.ReadOptions(
                        column_names=[c.name for c in self.columns],
                        skip_rows=0 if self.header is None else 1,
                        encoding=self.encoding,
                        block_size=16 << 20,  # fewer, larger chunks: faster parse and to_pandas on 25M rows
                    ),
                    parse_options=pacsv.ParseOptions(
                        delimiter=delimiter, quote_char='"' if self.quoted else False, newlines_in_values=False
                    ),
                    convert_options=pacsv.ConvertOptions(
                        column_types={c.name: _ARROW_TYPES[c.kind] for c in self.columns},
                        strings_can_be_null=False,
                        quoted_strings_can_be_null=False,
                    ),
                )
        except (pa.ArrowInvalid, UnicodeDecodeError) as err:
            raise self._parse_error(str(err).splitlines()[0]) from None
        if table.num_rows == 0:
            raise DataError(f"{self.where}: the file has no rows")
        for column in self.columns:
            if column.kind != "str" and table.column(column.name).null_count:
                raise self._parse_error(f"empty value in {column.name}")
        return table.to_pandas()

    def error(self, row: int, message: str) -> DataError:
        """A DataError naming the line that holds data row ``row`` (0-based, as in :meth:`read`'s frame)."""
        self.files.verify(self.name)  # a damaged zip member is the error, not what its garbage says
        found = self.line(row)
        if found is None:
            return DataError(f"{self.where}: {message}")
        line_number, line = found
        return DataError(f"{self.where} line {line_number}: {message}: {_preview(line, self.encoding)}")

    def line(self, row: int) -> tuple[int, bytes] | None:
        """(1-based line number, line) of data row ``row`` (0-based, as in :meth:`read`'s frame), or None."""
        for line_number, line in self._lines():
            if row == 0:
                return line_number, line
            row -= 1
        return None

    def check(self, ok: np.ndarray, message: Callable[[int], str]) -> None:
        """Raise :meth:`error` for the first False in ``ok`` (rows,); ``message(row)`` says what is wrong."""
        bad = np.flatnonzero(~np.asarray(ok, dtype=bool))
        if bad.size:
            raise self.error(int(bad[0]), message(int(bad[0])))

    # -- error path: line-by-line scan --------------------------------------------------------------

    def _check_header(self) -> None:
        with self.files.open(self.name) as f:
            first = f.readline().decode(self.encoding, errors="replace").rstrip("\r\n")
        if first.lstrip("\ufeff") != self.header:
            self.files.verify(self.name)
            raise DataError(f"{self.where} line 1: expected the header {self.header!r}, found {first[:80]!r}")

    def _lines(self) -> Iterator[tuple[int, bytes]]:
        """(line number, line) of every data line, skipping the header and empty lines (as pyarrow does)."""
        with self.files.open(self.name) as f:
            for line_number, line in enumerate(f, start=1):
                line = line.rstrip(b"\r\n")
                if (line_number == 1 and self.header is not None) or not line:
                    continue
                yield line_number, line

    def _parse_error(self, parser_message: str) -> DataError:
        """Find the first malformed line: a DataError naming it (or quoting ``parser_message`` if none is found)."""
        names = ", ".join(c.name for c in self.columns)
        self.files.verify(self.name)
        for line_number, raw in self._lines():
            prefix = f"{self.where} line {line_number}"
            try:
                line = raw.decode(self.encoding)
            except UnicodeDecodeError as err:
                return DataError(f"{prefix}: not valid {self.encoding} text ({err.reason})")
            fields = next(csv.reader([line])) if self.quoted else line.split(self.sep)
            if len(fields) != len(self.columns):
                return DataError(
                    f"{prefix}: expected {len(self.columns)} fields ({names}) separated by {self.sep!r}, "
                    f"found {len(fields)}: {_preview(raw, self.encoding)}"
                )
            for column, value in zip(self.columns, fields):
                if column.kind != "str" and not _parses(value, column.kind):
                    return DataError(
                        f"{prefix}: {column.name} must be {_KIND_WORDS[column.kind]}, found {value[:40]!r}"
                    )
        return DataError(f"{self.where}: cannot parse ({parser_message})")


def _parses(value: str, kind: str) -> bool:
    # Mirror what pyarrow accepts: no surrounding blanks, "+"/"-" signs allowed.
    if value != value.strip() or not value:
        return False
    try:
        int(value) if kind == "int" else float(value)
    except ValueError:
        return False
    return True


def _preview(line: bytes, encoding: str) -> str:
    text = line.decode(encoding, errors="replace")
    return repr(text if len(text) <= 80 else text[:77] + "...")

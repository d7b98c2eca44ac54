"""Helpers for the dataset tests: pack a raw folder the way GroupLens zips are laid out; ml-1m files as ml-25m's."""

from __future__ import annotations

import csv
import zipfile
from pathlib import Path

import pytest


def _zip_folder(folder: Path, zip_path: Path, top: str, compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(zip_path, "w", compression=compression) as z:
        for path in sorted(folder.iterdir()):
            z.write(path, f"{top}/{path.name}")
    return zip_path


@pytest.fixture(scope="session")
def zip_folder():
    """``zip_folder(folder, zip_path, top)`` packs folder's files under ``top/`` (ml-1m.zip holds ml-1m/ratings.dat)."""
    return _zip_folder


def _ml25m_from_ml1m(ml1m: Path, folder: Path) -> Path:
    folder.mkdir()
    with open(folder / "movies.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")  # quotes a title only when it holds a comma or a quote
        writer.writerow(["movieId", "title", "genres"])
        writer.writerows(line.split("::") for line in (ml1m / "movies.dat").read_bytes().decode("latin-1").splitlines())
    ratings = (ml1m / "ratings.dat").read_text().replace("::", ",")
    (folder / "ratings.csv").write_text("userId,movieId,rating,timestamp\n" + ratings)
    return folder


@pytest.fixture(scope="session")
def ml25m_from_ml1m():
    """``ml25m_from_ml1m(ml1m_dir, folder)`` writes ml-1m's files as ml-25m's csv files (header line, utf-8)."""
    return _ml25m_from_ml1m

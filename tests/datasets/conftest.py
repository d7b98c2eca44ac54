"""Helpers for the dataset tests: pack a raw folder the way GroupLens zips are laid out."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest


def _zip_folder(folder: Path, zip_path: Path, top: str) -> Path:
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for path in sorted(folder.iterdir()):
            z.write(path, f"{top}/{path.name}")
    return zip_path


@pytest.fixture(scope="session")
def zip_folder():
    """``zip_folder(folder, zip_path, top)`` packs folder's files under ``top/`` (ml-1m.zip holds ml-1m/ratings.dat)."""
    return _zip_folder

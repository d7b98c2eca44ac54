"""Download the official GroupLens MovieLens zips, checked against their published MD5 checksums.

The readers take the zip as is, so a download is just ``<dest_dir>/<variant>.zip``. It streams with a
progress bar into a temporary sibling file and is renamed into place only once its checksum matches.
"""

from __future__ import annotations

import hashlib
import logging
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from pipeline.atomic import atomic_file
from pipeline.datasets.constants import VARIANTS
from pipeline.errors import DataError

logger = logging.getLogger(__name__)

BASE_URL = "https://files.grouplens.org/datasets/movielens"
# MD5 of each zip as published by GroupLens (<url>.md5 beside each file).
MD5 = {
    "ml-100k": "0e33842e24a9c977be4e0107933c0723",
    "ml-1m": "c4d9eecfca2ab87c1945afe126590906",
    "ml-25m": "6b51fb2759a8657d3bfcbfc42b592ada",
}
_FILES_HINT = {
    "ml-100k": "u.data, u.user, u.item, u.genre, u.occupation, ua.base, ua.test, ...",
    "ml-1m": "ratings.dat, users.dat, movies.dat",
    "ml-25m": "ratings.csv, movies.csv, ...",
}
_CHUNK = 1 << 20


def movielens_url(variant: str) -> str:
    """The official download URL of ``variant``'s zip."""
    _check_variant(variant)
    return f"{BASE_URL}/{variant}.zip"


def download_movielens(
    variant: str, dest_dir: str | Path, *, url: str | None = None, md5: str | None = None, timeout: float = 60.0
) -> Path:
    """Download ``variant``'s zip to ``dest_dir/<variant>.zip`` and return that path.

    ``url`` and ``md5`` default to the official GroupLens file and its published checksum. An existing
    zip with the right checksum is reused. No network, or a checksum mismatch, raises DataError and
    leaves nothing behind; the offline message says where to put the files by hand.
    """
    _check_variant(variant)
    url = url or movielens_url(variant)
    expected = (md5 or MD5[variant]).lower()
    dest = Path(dest_dir) / f"{variant}.zip"
    if dest.is_file() and _md5_of(dest) == expected:
        logger.info("%s already downloaded: %s", variant, dest)
        return dest

    logger.info("downloading %s from %s", variant, url)
    try:
        response = urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 (https/file URLs of our choosing)
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise DataError(
            f"cannot download {variant} from {url} ({reason}). Without network access, fetch {movielens_url(variant)} "
            f"elsewhere and put the zip at {dest}, or its files ({_FILES_HINT[variant]}) in {Path(dest_dir) / variant}/"
        ) from None
    digest = hashlib.md5()
    with response, atomic_file(dest) as tmp, open(tmp, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"{variant}.zip") as bar:
            try:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            except OSError as err:
                raise DataError(f"download of {url} broke off ({err}); nothing was written to {dest}") from None
        if digest.hexdigest() != expected:
            raise DataError(
                f"{url}: downloaded file has MD5 {digest.hexdigest()}, expected {expected}; "
                f"nothing was written to {dest}"
            )
    logger.info("downloaded %s to %s", variant, dest)
    return dest


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise DataError(f"unknown MovieLens variant {variant!r}; expected one of {', '.join(VARIANTS)}")


def _md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()

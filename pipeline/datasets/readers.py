"""``read_movielens``: one entry point over the per-variant readers."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from pipeline.datasets.constants import VARIANTS
from pipeline.datasets.raw import RawMovieLens
from pipeline.errors import DataError

logger = logging.getLogger(__name__)


def read_movielens(variant: str, path: str | Path) -> RawMovieLens:
    """Read MovieLens ``variant`` ("ml-100k", "ml-1m" or "ml-25m") from its folder or original zip.

    Returns a :class:`RawMovieLens`; raises DataError naming the file and line of any bad input.
    """
    # Imported here so that reading one variant does not import the others' readers.
    if variant == "ml-1m":
        from pipeline.datasets.ml1m import read_ml1m as reader
    elif variant == "ml-100k":
        from pipeline.datasets.ml100k import read_ml100k as reader
    elif variant == "ml-25m":
        from pipeline.datasets.ml25m import read_ml25m as reader
    else:
        raise DataError(f"unknown MovieLens variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    start = time.perf_counter()
    raw = reader(path)
    logger.info(
        "read %s from %s: %d ratings, %d movies%s in %.2f s",
        variant,
        path,
        len(raw.ratings),
        len(raw.movies),
        "" if raw.users is None else f", {len(raw.users)} users",
        time.perf_counter() - start,
    )
    return raw

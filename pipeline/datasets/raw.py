"""``RawMovieLens``, what every reader returns, and the checks every reader applies to it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.datasets.constants import GENDERS, RATING_SCALE
from pipeline.datasets.delimited import DelimitedFile


@dataclass
class RawMovieLens:
    """One MovieLens release as pandas frames, in the same shape for every variant.

    ratings: userId int64, movieId int64, rating float32, timestamp int64 (file order).
    users: userId int64, gender str ("M"/"F"), age int64, occupation int64 (ml-1m codes; ml-100k's
        occupation names as their 0-based position in u.occupation), zipcode str; None for ml-25m.
    movies: movieId int64, title str, genres (list[str] per row; [] when none listed).
    official_split: ml-100k's (ua.base, ua.test) ratings, same columns as ``ratings``; None otherwise.
    """

    variant: str
    ratings: pd.DataFrame
    users: pd.DataFrame | None
    movies: pd.DataFrame
    official_split: tuple[pd.DataFrame, pd.DataFrame] | None = None


def finish_ratings(file: DelimitedFile, ratings: pd.DataFrame, variant: str) -> pd.DataFrame:
    """Check the rating values of a parsed ratings file and return it with the contract dtypes."""
    lo, hi, step = RATING_SCALE[variant]
    values = ratings["rating"].to_numpy()
    steps = (values - lo) / step
    file.check(
        (values >= lo) & (values <= hi) & (steps == np.round(steps)),
        lambda row: f"rating {values[row]:g} is outside {lo:g}-{hi:g} in steps of {step:g}",
    )
    # The parser already gave int64 ids and timestamps; only the rating changes dtype (no whole-frame copy).
    ratings["rating"] = values.astype(np.float32)
    return ratings


def check_unique(file: DelimitedFile, frame: pd.DataFrame, column: str) -> None:
    """Every ``column`` value appears once in ``file`` (e.g. one line per movie)."""
    duplicated = frame[column].duplicated().to_numpy()
    file.check(~duplicated, lambda row: f"{column} {frame[column].iat[row]} appears a second time")


def check_known(
    file: DelimitedFile, frame: pd.DataFrame, column: str, known: pd.Series, known_in: DelimitedFile
) -> None:
    """Every ``column`` value of ``file`` is one of ``known`` (the ids listed in ``known_in``)."""
    values = frame[column]
    file.check(
        values.isin(known).to_numpy(),  # hash lookup: ~10x faster than np.isin's sort on 25M ratings
        lambda row: f"{column} {values.iat[row]} is not listed in {known_in.name}",
    )


def check_values(file: DelimitedFile, frame: pd.DataFrame, column: str, allowed) -> None:
    """Every ``column`` value is in ``allowed`` (e.g. the gender codes)."""
    values = frame[column].to_numpy()
    allowed = list(allowed)
    file.check(
        np.isin(values, np.asarray(allowed, dtype=values.dtype)),
        lambda row: f"{column} {_show(values[row])} is not one of {', '.join(map(str, allowed))}",
    )


def _show(value) -> str:
    """A value for a message: strings quoted, numpy scalars as plain numbers."""
    value = value.item() if hasattr(value, "item") else value
    return repr(value) if isinstance(value, str) else f"{value:g}" if isinstance(value, float) else str(value)


def check_gender(file: DelimitedFile, users: pd.DataFrame) -> None:
    check_values(file, users, "gender", GENDERS)


def split_genres(genres: pd.Series, empty: str = "") -> pd.Series:
    """Pipe-separated genre strings -> lists of genre names (``empty`` marks a movie with none)."""
    return genres.map(lambda g: [] if g == empty or g == "" else g.split("|"))

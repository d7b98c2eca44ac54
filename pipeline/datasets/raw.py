"""``RawMovieLens``, what every reader returns, and the checks every reader applies to it."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.datasets.constants import GENDERS, ID_RULE, RATING_SCALE
from pipeline.datasets.delimited import DelimitedFile

logger = logging.getLogger(__name__)


@dataclass
class RawMovieLens:
    """One MovieLens release as pandas frames, in the same shape for every variant.

    Args:
        variant: "ml-100k", "ml-1m" or "ml-25m".
        ratings: userId int64, movieId int64, rating float32, timestamp int64 (file order).
        users: userId int64, gender str ("M"/"F"), age int64, occupation int64 (ml-1m codes; ml-100k's
            occupation names as their 0-based position in u.occupation), zipcode str; None for ml-25m.
        movies: movieId int64, title str, genres (list[str] per row; [] when none listed).
        official_split: ml-100k's (ua.base, ua.test) ratings, same columns as ``ratings``; None otherwise.
        duplicates_dropped: ratings of a (userId, movieId) pair rated again in the ratings file, dropped
            (the latest timestamp is kept; on a tie, the later line).
        official_split_duplicates_dropped: the same, summed over ua.base and ua.test (each de-duplicated
            on its own; a pair in both files is an error).

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> folder = generate_synthetic(Path(tempfile.mkdtemp()) / "ml-1m", fmt="ml-1m", n_users=20, n_movies=30,
        ...                             n_ratings=400, seed=0)
        >>> raw = read_movielens("ml-1m", folder)
        >>> list(raw.ratings.columns), len(raw.ratings), list(raw.movies.columns)
        (['userId', 'movieId', 'rating', 'timestamp'], 400, ['movieId', 'title', 'genres'])
    """

    variant: str
    ratings: pd.DataFrame
    users: pd.DataFrame | None
    movies: pd.DataFrame
    official_split: tuple[pd.DataFrame, pd.DataFrame] | None = None
    duplicates_dropped: int = 0
    official_split_duplicates_dropped: int = 0


def finish_ratings(file: DelimitedFile, ratings: pd.DataFrame, variant: str) -> pd.DataFrame:
    """Check the ids, timestamps and rating values of a parsed ratings file; return it with the contract dtypes."""
    check_ids(file, ratings, ("userId", "movieId", "timestamp"))
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


def check_ids(file: DelimitedFile, frame: pd.DataFrame, columns: tuple[str, ...]) -> None:
    """Ids and timestamps are non-negative int64 integers (the parser already refused anything else)."""
    for column in columns:
        values = frame[column].to_numpy()
        rule = "timestamps are seconds since 1970" if column == "timestamp" else ID_RULE
        file.check(values >= 0,
                   lambda row, column=column, values=values, rule=rule: f"{column} {values[row]} is negative ({rule})")


def drop_duplicate_ratings(file: DelimitedFile, ratings: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Keep one rating per (userId, movieId) pair: the latest timestamp, on a tie the later line.

    Args:
        file: the ratings file, for the warning's line numbers.
        ratings: its parsed rows (RangeIndex = 0-based data row), ids already checked non-negative.

    Returns:
        ``(kept, dropped)``: the kept rows in file order, still indexed by data row (so a later check can
        name their line; reset the index before handing the frame out), and how many rows were dropped.
        A warning gives the count and the first line that repeats a pair.
    """
    key = _pair_keys(ratings["userId"].to_numpy(), ratings["movieId"].to_numpy())
    # A sort, not a hash table: ~0.4 s on 25M ratings (pandas' duplicated() takes ~6 s on ids that scattered).
    ordered = np.sort(key)
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    if repeated.size == 0:
        return ratings, 0
    rows = np.flatnonzero(np.isin(key, repeated))  # every row of a repeated pair, in file order
    pair, timestamp = key[rows], ratings["timestamp"].to_numpy()[rows]
    by_pair = np.lexsort((rows, timestamp, pair))  # by pair, then time, then line: each pair's last row wins
    is_last = np.r_[pair[by_pair][1:] != pair[by_pair][:-1], True]
    keep = np.ones(len(ratings), dtype=bool)
    keep[rows[by_pair[~is_last]]] = False
    dropped = int((~keep).sum())

    _, first_of_pair = np.unique(pair, return_index=True)
    repeats = np.ones(rows.size, dtype=bool)
    repeats[first_of_pair] = False
    first_repeat = int(np.flatnonzero(repeats)[0])  # the first line that rates a pair a second time
    earlier = int(rows[np.flatnonzero(pair == pair[first_repeat])[0]])
    line, earlier_line = (file.line(r) for r in (int(rows[first_repeat]), earlier))
    logger.warning(
        "%s: %d rating(s) of a (userId, movieId) pair rated more than once dropped, keeping each pair's latest "
        "(on equal timestamps the later line); the first repeat is line %s (userId %d, movieId %d, first on line %s)",
        file.where,
        dropped,
        line[0] if line else "?",
        ratings["userId"].iat[rows[first_repeat]],
        ratings["movieId"].iat[rows[first_repeat]],
        earlier_line[0] if earlier_line else "?",
    )
    return ratings[keep], dropped


def check_disjoint(test_file: DelimitedFile, test: pd.DataFrame, base_file: DelimitedFile, base: pd.DataFrame) -> None:
    """No (userId, movieId) pair is in both a split's base (train) and test file: DataError at test's first one.

    Both frames are indexed by data row of their file (as :func:`drop_duplicate_ratings` returns them).
    """
    users = np.concatenate([base["userId"].to_numpy(), test["userId"].to_numpy()])
    movies = np.concatenate([base["movieId"].to_numpy(), test["movieId"].to_numpy()])
    key = _pair_keys(users, movies)
    base_key, test_key = key[: len(base)], key[len(base) :]
    shared = np.isin(test_key, base_key)
    if not shared.any():
        return
    first = int(np.flatnonzero(shared)[0])
    base_line = base_file.line(int(base.index[np.flatnonzero(base_key == test_key[first])[0]]))
    raise test_file.error(
        int(test.index[first]),
        f"userId {test['userId'].iat[first]}, movieId {test['movieId'].iat[first]} is also rated in "
        f"{base_file.name} line {base_line[0] if base_line else '?'}; a pair cannot be in both the training "
        "and the test file",
    )


def _pair_keys(users: np.ndarray, movies: np.ndarray) -> np.ndarray:
    """One int64 per (userId, movieId) pair (rows,): equal exactly when both ids are equal. Ids are >= 0."""
    if users.size == 0:
        return np.zeros(0, dtype=np.int64)
    width = int(movies.max()) + 1
    if int(users.max()) * width + width - 1 >= 2**63:
        # Huge ids: number the distinct ones instead (at most rows**2 pairs).
        users = np.unique(users, return_inverse=True)[1].reshape(-1)
        movies = np.unique(movies, return_inverse=True)[1].reshape(-1)
        width = int(movies.max()) + 1
    return users.astype(np.int64) * width + movies


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

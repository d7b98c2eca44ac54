"""Reader for ml-100k: u.data (tab), u.user / u.item / u.genre / u.occupation (pipe; u.item is latin-1),
and the ready-made train/test splits ua, ub (10 test ratings per user) and u1-u5 (5 disjoint folds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.datasets.delimited import Column, DelimitedFile
from pipeline.datasets.raw import (
    RawMovieLens,
    check_disjoint,
    check_gender,
    check_ids,
    check_known,
    check_unique,
    drop_duplicate_ratings,
    finish_ratings,
)
from pipeline.datasets.source import RawFiles
from pipeline.errors import DataError

FILES = ("u.data", "u.user", "u.item", "u.genre", "u.occupation")
SPLITS = ("ua", "ub", "u1", "u2", "u3", "u4", "u5")
OFFICIAL_SPLIT = "ua"  # what Merlin's get_movielens uses for ml-100k
RATINGS = (Column("userId", "int"), Column("movieId", "int"), Column("rating", "float"), Column("timestamp", "int"))
USERS = (
    Column("userId", "int"),
    Column("age", "int"),
    Column("gender", "str"),
    Column("occupation", "str"),
    Column("zipcode", "str"),
)
GENRE_LIST = (Column("genre", "str"), Column("index", "int"))
OCCUPATION_LIST = (Column("occupation", "str"),)
ITEM_FIELDS = (
    Column("movieId", "int"),
    Column("title", "str"),
    Column("release_date", "str"),
    Column("video_release_date", "str"),
    Column("imdb_url", "str"),
)


class _Tables:
    """u.user and u.item of one ml-100k dir, read once and shared by the ratings and split readers."""

    def __init__(self, files: RawFiles):
        self.files = files
        self.users_file = DelimitedFile(files, "u.user", USERS, sep="|", encoding="latin-1")
        occupations_file = DelimitedFile(files, "u.occupation", OCCUPATION_LIST, sep="|", encoding="latin-1")
        genres_file = DelimitedFile(files, "u.genre", GENRE_LIST, sep="|", encoding="latin-1")

        occupations = occupations_file.read()["occupation"]
        check_unique(occupations_file, occupations.to_frame(), "occupation")
        users = self.users_file.read()
        check_ids(self.users_file, users, ("userId",))
        check_unique(self.users_file, users, "userId")
        check_gender(self.users_file, users)
        codes = pd.Index(occupations).get_indexer(users["occupation"])
        self.users_file.check(
            codes >= 0, lambda row: f"occupation {users['occupation'].iat[row]!r} is not listed in u.occupation"
        )
        self.users = users.assign(occupation=codes.astype(np.int64))[
            ["userId", "gender", "age", "occupation", "zipcode"]
        ]

        genres = genres_file.read()
        genres_file.check(
            genres["index"].to_numpy() == np.arange(len(genres)),
            lambda row: f"genre index {genres['index'].iat[row]} out of order (expected {row})",
        )
        names = genres["genre"].tolist()
        flag_columns = tuple(Column(f"genre_{i}", "int") for i in range(len(names)))
        self.movies_file = DelimitedFile(files, "u.item", ITEM_FIELDS + flag_columns, sep="|", encoding="latin-1")
        items = self.movies_file.read()
        check_ids(self.movies_file, items, ("movieId",))
        check_unique(self.movies_file, items, "movieId")
        flags = items[[c.name for c in flag_columns]].to_numpy()
        self.movies_file.check(np.isin(flags, (0, 1)).all(axis=1), lambda row: "genre flags must be 0 or 1")
        genre_lists = [[names[j] for j in np.flatnonzero(row)] for row in flags]
        self.movies = pd.DataFrame({"movieId": items["movieId"], "title": items["title"], "genres": genre_lists})

    def ratings(self, name: str) -> tuple[DelimitedFile, pd.DataFrame, int]:
        """A validated tab-separated ratings file (u.data or a split file) naming only known users and movies.

        Returns ``(file, ratings, dropped)``: ratings de-duplicated (see ``drop_duplicate_ratings``) and
        still indexed by the file's data row, and the number of repeated ratings dropped.
        """
        file = DelimitedFile(self.files, name, RATINGS, sep="\t", encoding="latin-1")
        ratings = finish_ratings(file, file.read(), "ml-100k")
        check_known(file, ratings, "userId", self.users["userId"], self.users_file)
        check_known(file, ratings, "movieId", self.movies["movieId"], self.movies_file)
        ratings, dropped = drop_duplicate_ratings(file, ratings)
        return file, ratings, dropped

    def split(self, name: str) -> tuple[pd.DataFrame, pd.DataFrame, int]:
        """Split ``name``'s (base, test) ratings, each de-duplicated, and the count dropped from both.

        A pair rated in both files is a DataError at the test file's line: it would be in train and valid.
        """
        base_file, base, base_dropped = self.ratings(f"{name}.base")
        test_file, test, test_dropped = self.ratings(f"{name}.test")
        check_disjoint(test_file, test, base_file, base)
        return base.reset_index(drop=True), test.reset_index(drop=True), base_dropped + test_dropped


def read_ml100k(path: str | Path) -> RawMovieLens:
    """Read ml-100k from its folder or ml-100k.zip; ``official_split`` is (ua.base, ua.test) when present."""
    tables = _Tables(RawFiles(path, "ml-100k", FILES))
    official, official_dropped = None, 0
    if tables.files.exists(f"{OFFICIAL_SPLIT}.base") and tables.files.exists(f"{OFFICIAL_SPLIT}.test"):
        base, test, official_dropped = tables.split(OFFICIAL_SPLIT)
        official = (base, test)
    _, ratings, dropped = tables.ratings("u.data")
    return RawMovieLens(
        variant="ml-100k",
        ratings=ratings.reset_index(drop=True),
        users=tables.users,
        movies=tables.movies,
        official_split=official,
        duplicates_dropped=dropped,
        official_split_duplicates_dropped=official_dropped,
    )


def read_ml100k_split(path: str | Path, name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """ml-100k's ready-made split ``name`` (ua, ub, u1 ... u5) as (base, test) ratings frames.

    Each file is de-duplicated like u.data; a pair in both files is a DataError naming the test file's line.
    """
    if name not in SPLITS:
        raise DataError(f"unknown ml-100k split {name!r}; expected one of {', '.join(SPLITS)}")
    tables = _Tables(RawFiles(path, "ml-100k", FILES + (f"{name}.base", f"{name}.test")))
    base, test, _ = tables.split(name)
    return base, test

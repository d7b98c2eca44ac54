"""Reader for ml-1m: ratings.dat, users.dat, movies.dat ('::'-separated; movies.dat is latin-1)."""

from __future__ import annotations

from pathlib import Path

from pipeline.datasets.constants import ML1M_AGE_CODES, ML1M_OCCUPATIONS
from pipeline.datasets.delimited import Column, DelimitedFile
from pipeline.datasets.raw import (
    RawMovieLens,
    check_gender,
    check_ids,
    check_known,
    check_unique,
    check_values,
    drop_duplicate_ratings,
    finish_ratings,
    split_genres,
)
from pipeline.datasets.source import RawFiles

FILES = ("ratings.dat", "users.dat", "movies.dat")
RATINGS = (Column("userId", "int"), Column("movieId", "int"), Column("rating", "float"), Column("timestamp", "int"))
USERS = (
    Column("userId", "int"),
    Column("gender", "str"),
    Column("age", "int"),
    Column("occupation", "int"),
    Column("zipcode", "str"),
)
MOVIES = (Column("movieId", "int"), Column("title", "str"), Column("genres", "str"))


def read_ml1m(path: str | Path) -> RawMovieLens:
    """Read ml-1m from its folder or ml-1m.zip; raises DataError naming the file and line of bad input."""
    files = RawFiles(path, "ml-1m", FILES)
    ratings_file = DelimitedFile(files, "ratings.dat", RATINGS, sep="::", encoding="latin-1")
    users_file = DelimitedFile(files, "users.dat", USERS, sep="::", encoding="latin-1")
    movies_file = DelimitedFile(files, "movies.dat", MOVIES, sep="::", encoding="latin-1")

    users = users_file.read()
    check_ids(users_file, users, ("userId",))
    check_unique(users_file, users, "userId")
    check_gender(users_file, users)
    check_values(users_file, users, "age", ML1M_AGE_CODES)
    check_values(users_file, users, "occupation", range(len(ML1M_OCCUPATIONS)))

    movies = movies_file.read()
    check_ids(movies_file, movies, ("movieId",))
    check_unique(movies_file, movies, "movieId")
    movies["genres"] = split_genres(movies["genres"])

    ratings = finish_ratings(ratings_file, ratings_file.read(), "ml-1m")
    check_known(ratings_file, ratings, "userId", users["userId"], users_file)
    check_known(ratings_file, ratings, "movieId", movies["movieId"], movies_file)
    ratings, dropped = drop_duplicate_ratings(ratings_file, ratings)
    return RawMovieLens(
        variant="ml-1m",
        ratings=ratings.reset_index(drop=True),
        users=users,
        movies=movies,
        duplicates_dropped=dropped,
    )

"""Reader for ml-25m: ratings.csv and movies.csv (utf-8 csv with a header; titles quoted when they hold
commas or quotes). ml-25m has no demographics, so ``users`` is None."""

from __future__ import annotations

from pathlib import Path

from pipeline.datasets.delimited import Column, DelimitedFile
from pipeline.datasets.raw import (
    RawMovieLens,
    check_ids,
    check_known,
    check_unique,
    drop_duplicate_ratings,
    finish_ratings,
    split_genres,
)
from pipeline.datasets.source import RawFiles

FILES = ("ratings.csv", "movies.csv")
RATINGS = (Column("userId", "int"), Column("movieId", "int"), Column("rating", "float"), Column("timestamp", "int"))
MOVIES = (Column("movieId", "int"), Column("title", "str"), Column("genres", "str"))
NO_GENRES = "(no genres listed)"


def read_ml25m(path: str | Path) -> RawMovieLens:
    """Read ml-25m from its folder or ml-25m.zip; raises DataError naming the file and line of bad input."""
    files = RawFiles(path, "ml-25m", FILES)
    movies_file = DelimitedFile(
        files, "movies.csv", MOVIES, sep=",", header="movieId,title,genres", quoted=True, encoding="utf-8"
    )
    ratings_file = DelimitedFile(
        files, "ratings.csv", RATINGS, sep=",", header="userId,movieId,rating,timestamp", encoding="utf-8"
    )
    movies = movies_file.read()
    check_ids(movies_file, movies, ("movieId",))
    check_unique(movies_file, movies, "movieId")
    movies["genres"] = split_genres(movies["genres"], empty=NO_GENRES)
    ratings = finish_ratings(ratings_file, ratings_file.read(), "ml-25m")
    check_known(ratings_file, ratings, "movieId", movies["movieId"], movies_file)
    ratings, dropped = drop_duplicate_ratings(ratings_file, ratings)
    return RawMovieLens(
        variant="ml-25m", ratings=ratings.reset_index(drop=True), users=None, movies=movies, duplicates_dropped=dropped
    )

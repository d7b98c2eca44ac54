"""A (userId, movieId) pair rated more than once: the latest rating is kept (on a tie, the later line),
with a warning that counts the dropped ratings and names the first repeat; no pair can straddle the split."""

from __future__ import annotations

import logging
import shutil

import pandas as pd
import pytest

from pipeline.datasets import generate_synthetic, read_movielens

TINY = dict(n_users=30, n_movies=40, n_ratings=900, seed=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    return {fmt: generate_synthetic(root / fmt, fmt=fmt, **TINY) for fmt in ("ml-1m", "ml-100k")}


def ratings_of(raw, name: str) -> pd.DataFrame:
    if name in ("ua.base", "ua.test"):
        return raw.official_split[name == "ua.test"]
    return raw.ratings


def dropped_of(raw, name: str) -> int:
    return raw.official_split_duplicates_dropped if name.startswith("ua.") else raw.duplicates_dropped


@pytest.mark.parametrize(
    "variant, name, sep",
    [
        ("ml-1m", "ratings.dat", "::"),
        ("ml-100k", "u.data", "\t"),
        ("ml-100k", "ua.base", "\t"),
        ("ml-100k", "ua.test", "\t"),
        ("ml-25m", "ratings.csv", ","),
    ],
)
def test_the_latest_rating_of_a_pair_is_kept_and_the_rest_counted(
    variant, name, sep, tiny, tmp_path, caplog, ml25m_from_ml1m
):
    if variant == "ml-25m":
        folder = ml25m_from_ml1m(tiny["ml-1m"], tmp_path / variant)
    else:
        folder = shutil.copytree(tiny[variant], tmp_path / variant)
    clean = ratings_of(read_movielens(variant, folder), name)
    path = folder / name
    text = path.read_text()
    header = 1 if variant == "ml-25m" else 0
    n_lines = text.count("\n")

    a, b = clean.iloc[3], clean.iloc[10]  # two pairs of the file, rated again below
    other = lambda stars: float(stars % 5 + 1)  # noqa: E731 (a star rating the pair did not have)
    extra = [
        (a.userId, a.movieId, other(a.rating), a.timestamp + 1000),  # later: replaces row 3
        (a.userId, a.movieId, other(a.rating + 1), a.timestamp - 1000),  # earlier than both: dropped
        (b.userId, b.movieId, other(b.rating), b.timestamp),  # same second as row 10: the later line wins
    ]
    appended = [sep.join((str(int(u)), str(int(m)), f"{r:g}", str(int(t)))) + "\n" for u, m, r, t in extra]
    path.write_text(text + "".join(appended))

    with caplog.at_level(logging.WARNING, logger="pipeline.datasets"):
        raw = read_movielens(variant, folder)
    ratings = ratings_of(raw, name)

    assert dropped_of(raw, name) == 3
    kept = pd.DataFrame(
        [extra[0], extra[2]], columns=["userId", "movieId", "rating", "timestamp"]
    ).astype(clean.dtypes.to_dict())
    expected = pd.concat([clean.drop(index=[3, 10]), kept], ignore_index=True)  # file order
    pd.testing.assert_frame_equal(ratings, expected)
    assert not ratings.duplicated(["userId", "movieId"]).any()

    warning = caplog.records[-1]
    assert warning.levelno == logging.WARNING
    assert warning.getMessage().startswith(f"{path}: 3 rating(s) of a (userId, movieId) pair rated more than once")
    assert (
        f"the first repeat is line {n_lines + 1} (userId {int(a.userId)}, movieId {int(a.movieId)}, "
        f"first on line {header + 4})" in warning.getMessage()
    )


def test_a_file_without_repeats_reads_unchanged_and_silently(tiny, caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.datasets"):
        raw = read_movielens("ml-100k", tiny["ml-100k"])
    assert raw.duplicates_dropped == 0 and raw.official_split_duplicates_dropped == 0
    assert len(raw.ratings) == TINY["n_ratings"] and not caplog.records


@pytest.mark.parametrize("method", ["random", "temporal"])
def test_no_pair_straddles_the_split_after_de_duplication(method, tiny, tmp_path):
    from pipeline.etl import split_ratings

    folder = shutil.copytree(tiny["ml-1m"], tmp_path / "ml-1m")
    lines = (folder / "ratings.dat").read_text().splitlines()
    # Every 5th rating again, one second later with another star: 180 repeated pairs.
    again = []
    for line in lines[::5]:
        user, movie, stars, time = line.split("::")
        again.append(f"{user}::{movie}::{int(stars) % 5 + 1}::{int(time) + 1}")
    (folder / "ratings.dat").write_text("\n".join(lines + again) + "\n")

    raw = read_movielens("ml-1m", folder)
    assert raw.duplicates_dropped == len(again) == 180
    train, valid = split_ratings(raw.ratings, method, valid_fraction=0.2, seed=0)
    pairs = lambda df: set(zip(df["userId"], df["movieId"]))  # noqa: E731
    assert len(train) + len(valid) == len(lines) and not pairs(train) & pairs(valid)

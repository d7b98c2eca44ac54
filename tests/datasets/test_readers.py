"""Every reader on every format, from a folder and from the original zip layout."""

from __future__ import annotations

import shutil
import zipfile

import numpy as np
import pandas as pd
import pytest

from pipeline.datasets import RawMovieLens, generate_synthetic, read_movielens
from pipeline.datasets.constants import ML100K_OCCUPATIONS
from pipeline.datasets.ml100k import read_ml100k_split
from pipeline.errors import DataError

ML25M_MOVIES = (
    "movieId,title,genres\n"
    "1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy\n"
    '11,"American President, The (1995)",Comedy|Drama|Romance\n'
    '29,"City of Lost Children, The (Cité des enfants perdus, La) (1995)",Adventure|Drama|Fantasy|Mystery|Sci-Fi\n'
    '4973,"Amélie (Fabuleux destin d\'Amélie Poulain, Le) (2001)",Comedy|Romance\n'
    '6003,"Confessions of a Dangerous Mind ""Chuck"" (2002)",Comedy|Crime|Drama|Thriller\n'
    "209171,Women of Devil's Island (1962),(no genres listed)\n"
)
ML25M_RATINGS = (
    "userId,movieId,rating,timestamp\n"
    "1,29,3.5,1147880044\n"
    "1,4973,5.0,1147868817\n"
    "2,11,0.5,1141415820\n"
    "2,6003,4.5,1141417080\n"
    "3,209171,2.0,1439474476\n"
    "3,1,4.0,1439474000\n"
)


def assert_same(a: RawMovieLens, b: RawMovieLens):
    pd.testing.assert_frame_equal(a.ratings, b.ratings)
    pd.testing.assert_frame_equal(a.movies, b.movies)
    if a.users is None:
        assert b.users is None
    else:
        pd.testing.assert_frame_equal(a.users, b.users)


@pytest.fixture(scope="module")
def ml100k_raw(tmp_path_factory):
    return generate_synthetic(
        tmp_path_factory.mktemp("raw") / "ml-100k", fmt="ml-100k", n_users=60, n_movies=90, n_ratings=3_000, seed=1
    )


@pytest.fixture
def ml25m_raw(tmp_path):
    folder = tmp_path / "ml-25m"
    folder.mkdir()
    (folder / "movies.csv").write_text(ML25M_MOVIES, encoding="utf-8")
    (folder / "ratings.csv").write_text(ML25M_RATINGS, encoding="utf-8")
    return folder


def test_ml1m_contract_dtypes(synthetic_raw):
    raw = read_movielens("ml-1m", synthetic_raw)
    assert raw.variant == "ml-1m" and raw.official_split is None
    assert dict(raw.ratings.dtypes.astype(str)) == {
        "userId": "int64",
        "movieId": "int64",
        "rating": "float32",
        "timestamp": "int64",
    }
    assert list(raw.users.columns) == ["userId", "gender", "age", "occupation", "zipcode"]
    assert raw.users[["userId", "age", "occupation"]].dtypes.eq("int64").all()
    assert list(raw.movies.columns) == ["movieId", "title", "genres"]
    assert all(isinstance(g, list) for g in raw.movies["genres"])
    # Ratings come back in file order, exactly as written.
    first = (synthetic_raw / "ratings.dat").read_text().splitlines()[0].split("::")
    assert raw.ratings.iloc[0].tolist() == [int(first[0]), int(first[1]), float(first[2]), int(first[3])]


def test_ml1m_from_zip_and_from_extracted_zip(synthetic_raw, tmp_path, zip_folder):
    folder = read_movielens("ml-1m", synthetic_raw)
    archive = zip_folder(synthetic_raw, tmp_path / "ml-1m.zip", "ml-1m")
    assert_same(folder, read_movielens("ml-1m", archive))
    extracted = tmp_path / "raw"
    shutil.copytree(synthetic_raw, extracted / "ml-1m")  # data/raw/ with the zip unpacked inside
    assert_same(folder, read_movielens("ml-1m", extracted))


def test_zip_without_top_folder(synthetic_raw, tmp_path):
    archive = tmp_path / "flat.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for name in ("ratings.dat", "users.dat", "movies.dat"):
            z.write(synthetic_raw / name, name)
    assert_same(read_movielens("ml-1m", synthetic_raw), read_movielens("ml-1m", archive))


def test_ml100k_users_movies_and_occupation_codes(ml100k_raw):
    raw = read_movielens("ml-100k", ml100k_raw)
    assert len(raw.ratings) == 3_000 and len(raw.users) == 60 and len(raw.movies) == 90
    first_user = (ml100k_raw / "u.user").read_text().splitlines()[0].split("|")
    user = raw.users.iloc[0]
    assert user["userId"] == int(first_user[0]) and user["age"] == int(first_user[1])
    assert ML100K_OCCUPATIONS[user["occupation"]] == first_user[3]  # code = position in u.occupation
    assert raw.users["occupation"].between(0, 20).all()
    assert "Misérables, Les (1995)" in set(raw.movies["title"])
    item = (ml100k_raw / "u.item").read_bytes().decode("latin-1").splitlines()[0].split("|")
    genre_names = [line.split("|")[0] for line in (ml100k_raw / "u.genre").read_text().splitlines() if line]
    expected = [name for name, flag in zip(genre_names, item[5:]) if flag == "1"]
    assert raw.movies["genres"].iloc[0] == expected and expected


def test_ml100k_split_files(ml100k_raw):
    raw = read_movielens("ml-100k", ml100k_raw)
    base, test = raw.official_split
    assert test.groupby("userId").size().eq(10).all() and test["userId"].nunique() == 60
    pairs = lambda df: set(zip(df["userId"], df["movieId"]))  # noqa: E731
    assert pairs(base) | pairs(test) == pairs(raw.ratings) and not pairs(base) & pairs(test)
    ub_base, ub_test = read_ml100k_split(ml100k_raw, "ub")
    assert ub_test.groupby("userId").size().eq(10).all() and not pairs(ub_test) & pairs(test)
    folds = [read_ml100k_split(ml100k_raw, f"u{k}") for k in range(1, 6)]
    test_sets = [pairs(t) for _, t in folds]
    assert set().union(*test_sets) == pairs(raw.ratings) and sum(map(len, test_sets)) == 3_000
    for base_k, test_k in folds:
        assert len(base_k) + len(test_k) == 3_000
    with pytest.raises(DataError, match="unknown ml-100k split 'u9'"):
        read_ml100k_split(ml100k_raw, "u9")


def test_ml100k_from_zip(ml100k_raw, tmp_path, zip_folder):
    archive = zip_folder(ml100k_raw, tmp_path / "ml-100k.zip", "ml-100k")
    a, b = read_movielens("ml-100k", ml100k_raw), read_movielens("ml-100k", archive)
    assert_same(a, b)
    pd.testing.assert_frame_equal(a.official_split[1], b.official_split[1])


def test_ml25m_quoted_titles_half_stars_and_no_genres(ml25m_raw):
    raw = read_movielens("ml-25m", ml25m_raw)
    assert raw.users is None and raw.official_split is None
    titles = dict(zip(raw.movies["movieId"], raw.movies["title"]))
    assert titles[11] == "American President, The (1995)"
    assert titles[29] == "City of Lost Children, The (Cité des enfants perdus, La) (1995)"
    assert titles[4973] == "Amélie (Fabuleux destin d'Amélie Poulain, Le) (2001)"
    assert titles[6003] == 'Confessions of a Dangerous Mind "Chuck" (2002)'
    genres = dict(zip(raw.movies["movieId"], raw.movies["genres"]))
    assert genres[209171] == [] and genres[11] == ["Comedy", "Drama", "Romance"]
    np.testing.assert_array_equal(raw.ratings["rating"], np.float32([3.5, 5.0, 0.5, 4.5, 2.0, 4.0]))
    assert raw.ratings["timestamp"].iloc[0] == 1147880044


def test_ml25m_from_zip(ml25m_raw, tmp_path, zip_folder):
    archive = zip_folder(ml25m_raw, tmp_path / "ml-25m.zip", "ml-25m")
    assert_same(read_movielens("ml-25m", ml25m_raw), read_movielens("ml-25m", archive))


def test_unknown_variant():
    with pytest.raises(DataError, match="unknown MovieLens variant 'ml-10m'"):
        read_movielens("ml-10m", ".")

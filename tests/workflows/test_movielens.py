"""The MovieLens workflow on small hand-made frames (the RawMovieLens shapes). Our operators alone: tests/ops/."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import pipeline  # noqa: F401  (dask config before nvtabular)

# isort: split
import nvtabular as nvt  # noqa: E402
from merlin.schema import Tags  # noqa: E402

from pipeline.ops import out_of_fold  # noqa: E402
from workflows.movielens import movielens_workflow  # noqa: E402


def side_tables(n_users=60, n_movies=40, seed=0):
    rng = np.random.default_rng(seed)
    users = pd.DataFrame(
        {
            "userId": np.arange(1, n_users + 1, dtype="int64"),
            "gender": rng.choice(["M", "F"], n_users),
            "age": rng.choice([1, 18, 25, 35, 45, 50, 56], n_users).astype("int64"),
            "occupation": rng.integers(0, 21, n_users).astype("int64"),
            "zipcode": [f"{z:05d}" for z in rng.integers(0, 30, n_users)],
        }
    )
    genre_names = ["Action", "Comedy", "Drama", "Film-Noir", "Sci-Fi"]
    movies = pd.DataFrame(
        {
            "movieId": np.arange(1, n_movies + 1, dtype="int64"),
            "title": [f"Misérables, Les {i} (1995)" for i in range(n_movies)],
            "genres": [list(rng.choice(genre_names, rng.integers(1, 4), replace=False)) for _ in range(n_movies)],
        }
    )
    return users, movies


def ratings_for(users, movies, n=1500, seed=0):
    rng = np.random.default_rng(seed)
    pairs = rng.choice(len(users) * len(movies), n, replace=False)
    return pd.DataFrame(
        {
            "userId": users["userId"].to_numpy()[pairs // len(movies)],
            "movieId": movies["movieId"].to_numpy()[pairs % len(movies)],
            "rating": rng.integers(1, 6, n).astype("float32"),
            "timestamp": np.arange(n, dtype="int64"),
        }
    )


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A fitted ml-1m-shaped workflow and its training ratings."""
    users, movies = side_tables()
    train = ratings_for(users, movies)
    workflow = movielens_workflow("ml-1m", movies, users, out_path=tmp_path_factory.mktemp("cats"), seed=3)
    with out_of_fold(workflow):
        workflow.fit(nvt.Dataset(train))
    return workflow, train, users, movies


def test_output_columns_dtypes_and_tags(fitted):
    workflow, train, _, _ = fitted
    schema = workflow.output_schema
    assert schema.column_names == [
        "userId", "movieId", "title", "genres", "gender", "age", "occupation", "zipcode",
        "TE_userId_rating", "TE_movieId_rating", "TE_gender_rating", "TE_age_rating",
        "TE_occupation_rating", "TE_zipcode_rating", "rating_binary", "rating",
    ]  # fmt: skip
    assert schema.select_by_tag(Tags.USER_ID).column_names == ["userId"]
    assert schema.select_by_tag(Tags.ITEM_ID).column_names == ["movieId"]
    assert set(schema.select_by_tag(Tags.CATEGORICAL).column_names) == {
        "userId", "movieId", "title", "genres", "gender", "age", "occupation", "zipcode"
    }  # fmt: skip
    assert set(schema.select_by_tag(Tags.CONTINUOUS).column_names) == {
        c for c in schema.column_names if c.startswith("TE_")
    }
    assert schema.select_by_tag(Tags.BINARY_CLASSIFICATION).column_names == ["rating_binary"]
    assert schema.select_by_tag(Tags.REGRESSION).column_names == ["rating"]
    assert Tags.ITEM in schema["TE_movieId_rating"].tags and Tags.USER in schema["TE_zipcode_rating"].tags
    assert Tags.ITEM in schema["genres"].tags and Tags.USER in schema["occupation"].tags

    out = workflow.transform(nvt.Dataset(train)).to_ddf().compute()
    for name in ["userId", "movieId", "title", "gender", "age", "occupation", "zipcode", "rating_binary"]:
        assert out[name].dtype == np.int32, name
    assert all(np.asarray(v).dtype == np.int32 for v in out["genres"])
    assert out["rating"].dtype == np.float32 and out["TE_userId_rating"].dtype == np.float32
    np.testing.assert_array_equal(out["rating_binary"], (train["rating"] > 3).astype("int32"))

    genres = schema["genres"]
    assert genres.is_list
    lengths = fitted[3]["genres"].map(len)
    assert genres.properties["value_count"] == {"min": int(lengths.min()), "max": int(lengths.max())}
    # Categorify: 0 padding, 1 null, 2 out-of-vocabulary, then the values seen in training.
    assert schema["gender"].properties["embedding_sizes"]["cardinality"] == 3 + 2
    assert schema["userId"].properties["embedding_sizes"]["cardinality"] == 3 + train["userId"].nunique()


def test_variant_and_user_table_must_agree():
    users, movies = side_tables()
    with pytest.raises(ValueError, match="no user table"):
        movielens_workflow("ml-25m", movies, users, out_path="x")
    with pytest.raises(ValueError, match="unknown MovieLens variant"):
        movielens_workflow("ml-10m", movies, users, out_path="x")
    with pytest.raises(ValueError, match="needs its user table"):
        movielens_workflow("ml-1m", movies, None, out_path="x")


def test_ml25m_has_no_user_features(tmp_path):
    users, movies = side_tables()
    train = ratings_for(users, movies, n=300)
    workflow = movielens_workflow("ml-25m", movies, None, out_path=tmp_path)
    workflow.fit(nvt.Dataset(train))
    assert workflow.output_schema.column_names == [
        "userId", "movieId", "title", "genres", "TE_userId_rating", "TE_movieId_rating", "rating_binary", "rating"
    ]  # fmt: skip


def test_unseen_user_and_movie_land_on_out_of_vocabulary_rows(fitted):
    workflow, train, users, movies = fitted
    known_user, known_movie = int(train["userId"].iloc[0]), int(train["movieId"].iloc[0])
    requests = pd.DataFrame(
        {
            "userId": np.array([known_user, 10_000, 10_001], dtype="int64"),
            "movieId": np.array([99_999, known_movie, 99_998], dtype="int64"),
            "rating": np.array([5.0, 1.0, 3.0], dtype="float32"),
        }
    )
    out = workflow.transform(nvt.Dataset(requests)).to_ddf().compute()
    oov = 2
    assert out["movieId"].iloc[0] == oov and out["title"].iloc[0] == oov and list(out["genres"].iloc[0]) == [oov]
    for name in ["userId", "gender", "age", "occupation", "zipcode"]:
        assert out[name].iloc[1] == oov, name
    assert out.iloc[2][["userId", "movieId", "title", "gender", "zipcode"]].tolist() == [oov] * 5
    # Unseen categories get the training mean, i.e. the same value for both unseen users.
    assert out["TE_userId_rating"].iloc[1] == out["TE_userId_rating"].iloc[2]
    assert out["TE_movieId_rating"].iloc[0] == out["TE_movieId_rating"].iloc[2]
    assert np.isfinite(out.filter(like="TE_").to_numpy()).all()


def test_movies_without_genres_give_empty_lists(tmp_path):
    users, movies = side_tables()
    movies.at[0, "genres"] = []  # also the row merlin samples to infer the joined column's dtype
    train = ratings_for(users, movies, n=400)
    workflow = movielens_workflow("ml-1m", movies, users, out_path=tmp_path)
    workflow.fit(nvt.Dataset(train))
    out = workflow.transform(nvt.Dataset(train)).to_ddf().compute()
    assert workflow.output_schema["genres"].properties["value_count"]["min"] == 0
    no_genres = out["genres"][(train["movieId"] == movies["movieId"].iloc[0]).to_numpy()]
    assert len(no_genres) and all(len(v) == 0 for v in no_genres)


def test_side_features_are_encoded_over_the_whole_side_table(tmp_path):
    # A movie (user) in the side table but never rated in training keeps its own title code and its real
    # genres (demographics): the side tables are encoded on themselves, not on the training rows.
    users, movies = side_tables()
    train = ratings_for(users, movies, n=800)
    never_rated = {"movieId": 1_000, "title": "Never Rated (2001)", "genres": ["Film-Noir", "Sci-Fi"]}
    movies = pd.concat([movies, pd.DataFrame([never_rated])], ignore_index=True)
    workflow = movielens_workflow("ml-1m", movies, users, out_path=tmp_path / "cats")
    workflow.fit(nvt.Dataset(train))
    schema = workflow.output_schema
    assert schema["title"].properties["embedding_sizes"]["cardinality"] == movies["title"].nunique() + 3
    assert schema["zipcode"].properties["embedding_sizes"]["cardinality"] == users["zipcode"].nunique() + 3

    request = pd.DataFrame({"userId": np.array([1], dtype="int64"), "movieId": np.array([never_rated["movieId"]]),
                            "rating": np.array([4.0], dtype="float32")})
    out = workflow.transform(nvt.Dataset(request)).to_ddf().compute()
    assert out["movieId"].iloc[0] == 2, "the id itself was never rated: out-of-vocabulary"
    assert out["title"].iloc[0] >= 3 and out["title"].dtype == np.int32
    vocabulary = pd.read_parquet(schema["genres"].properties["cat_path"])["genres"]  # indexed by code
    assert sorted(vocabulary.loc[list(out["genres"].iloc[0])]) == sorted(never_rated["genres"])


def test_saved_workflow_carries_the_side_vocabularies(tmp_path):
    users, movies = side_tables()
    workflow = movielens_workflow("ml-1m", movies, users, out_path=tmp_path / "fit")
    workflow.fit(nvt.Dataset(ratings_for(users, movies, n=400)))
    workflow.save(str(tmp_path / "saved"))
    loaded = nvt.Workflow.load(str(tmp_path / "saved"))
    from merlin.dag import Graph

    from pipeline.ops import EncodedColumns

    (node,) = Graph.get_nodes_by_op_type([loaded.output_node], EncodedColumns)
    for column in node.op.schema:
        path = column.properties["cat_path"]
        assert path.startswith(str(tmp_path / "saved")) and pd.read_parquet(path).shape[0] > 0, column.name

"""A tiny processed dataset built by a real NVTabular workflow, with the ETL's columns and tags.

It lets the block-library tests run without the full ETL: Categorify'd ids (with a list column),
continuous features, and the two targets (rating_binary: binary classification, rating: regression),
written to parquet + schema.pbtxt like ``pipeline.etl`` writes them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import pipeline  # noqa: F401  (dask settings before nvtabular)

GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi"]


def make_interactions(n_rows: int, seed: int) -> pd.DataFrame:
    """Raw interactions with a planted signal: users like movies whose genre matches their taste."""
    rng = np.random.default_rng(seed)
    n_users, n_movies = 60, 40
    user_taste = rng.integers(0, len(GENRES), n_users + 1)
    movie_genre = rng.integers(0, len(GENRES), n_movies + 1)
    movie_quality = rng.normal(0, 1, n_movies + 1)
    users = rng.integers(1, n_users + 1, n_rows)
    movies = rng.integers(1, n_movies + 1, n_rows)
    logit = 2.0 * (user_taste[users] == movie_genre[movies]) + movie_quality[movies] - 0.7
    liked = rng.random(n_rows) < 1 / (1 + np.exp(-logit))
    rating = np.where(liked, rng.integers(4, 6, n_rows), rng.integers(1, 4, n_rows)).astype("float32")
    genres = [[GENRES[movie_genre[m]], GENRES[(movie_genre[m] + m) % len(GENRES)]][: 1 + m % 2] for m in movies]
    return pd.DataFrame(
        {
            "userId": users,
            "movieId": movies,
            "genres": genres,
            "gender": np.where(users % 2 == 0, "M", "F"),
            "user_activity": np.log1p(users).astype("float32"),
            "rating": rating,
        }
    )


def build_processed(out: Path, n_rows: int = 3000, seed: int = 0) -> Path:
    """Fit a small NVTabular workflow and write out/{train,valid}/ (parquet + schema.pbtxt)."""
    import nvtabular as nvt
    from merlin.schema import Tags
    from nvtabular import ops

    frame = make_interactions(n_rows, seed)
    cut = int(n_rows * 0.8)
    # NVTabular's list Categorify needs a 0-based RangeIndex per frame.
    train_df, valid_df = frame.iloc[:cut].reset_index(drop=True), frame.iloc[cut:].reset_index(drop=True)
    cats_path = str(out / "workflow_stats")
    users = ["userId"] >> ops.Categorify(out_path=cats_path) >> ops.TagAsUserID()
    items = ["movieId"] >> ops.Categorify(out_path=cats_path) >> ops.TagAsItemID()
    gender = ["gender"] >> ops.Categorify(out_path=cats_path) >> ops.TagAsUserFeatures()
    genres = ["genres"] >> ops.Categorify(out_path=cats_path) >> ops.TagAsItemFeatures()
    continuous = ["user_activity"] >> ops.Normalize() >> ops.AddTags([Tags.CONTINUOUS])
    binary = (
        ["rating"]
        >> ops.LambdaOp(lambda col: (col > 3).astype("int32"))
        >> ops.AddTags([Tags.BINARY_CLASSIFICATION, Tags.TARGET])
        >> ops.Rename(name="rating_binary")
    )
    rating = ["rating"] >> ops.AddTags([Tags.REGRESSION, Tags.TARGET])
    workflow = nvt.Workflow(users + items + gender + genres + continuous + binary + rating)
    workflow.fit(nvt.Dataset(train_df))
    for name, part in (("train", train_df), ("valid", valid_df)):
        # Two raw parquet files -> two partitions, each with its own 0-based index.
        raw_dir = out / "raw" / name
        raw_dir.mkdir(parents=True)
        half = len(part) // 2
        part.iloc[:half].to_parquet(raw_dir / "part_0.parquet")
        part.iloc[half:].reset_index(drop=True).to_parquet(raw_dir / "part_1.parquet")
        raw = nvt.Dataset(sorted(map(str, raw_dir.glob("*.parquet"))), engine="parquet")
        workflow.transform(raw).to_parquet(str(out / name))
    return out


@pytest.fixture(scope="session")
def processed_dir(tmp_path_factory) -> Path:
    """``train/`` and ``valid/`` parquet + schema.pbtxt of a tiny synthetic interaction set."""
    return build_processed(tmp_path_factory.mktemp("processed") / "out")

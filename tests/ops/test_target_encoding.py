"""pipeline/ops/target_encoding.py: KFoldTargetEncoding's smoothing (NVTabular's formula), its out-of-fold
values, and fold ids that do not depend on how rows are batched; on small hand-made ratings."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import pipeline  # noqa: F401  (dask config before nvtabular)

# isort: split
import nvtabular as nvt  # noqa: E402

from pipeline.ops import KFoldTargetEncoding  # noqa: E402
from pipeline.ops.target_encoding import fold_ids  # noqa: E402

P_SMOOTH = 20


def ratings_for(n_users=60, n_movies=40, n=1500, seed=0):
    """``n`` distinct (user, movie) pairs of ids 1..n_users x 1..n_movies, random stars 1-5, increasing times."""
    rng = np.random.default_rng(seed)
    pairs = rng.choice(n_users * n_movies, n, replace=False)
    return pd.DataFrame(
        {
            "userId": np.arange(1, n_users + 1, dtype="int64")[pairs // n_movies],
            "movieId": np.arange(1, n_movies + 1, dtype="int64")[pairs % n_movies],
            "rating": rng.integers(1, 6, n).astype("float32"),
            "timestamp": np.arange(n, dtype="int64"),
        }
    )


def encode(op: KFoldTargetEncoding, frame: pd.DataFrame, column: str) -> np.ndarray:
    from merlin.dag import ColumnSelector

    return op.transform(ColumnSelector([column]), frame)[f"TE_{column}_rating"].to_numpy()


def test_kfold_target_encoding_matches_nvtabular_smoothing_and_is_out_of_fold():
    train = ratings_for(n=1200, seed=1)
    workflow = nvt.Workflow(["userId", "movieId"] >> KFoldTargetEncoding("rating", kfold=5, p_smooth=P_SMOOTH, seed=7))
    workflow.fit(nvt.Dataset(train))
    op = workflow.output_node.op
    mean = train["rating"].mean()

    # Full-train statistics: NVTabular's formula, no rating column needed.
    stats = train.groupby("userId")["rating"].agg(["sum", "count"])
    expected = ((stats["sum"] + P_SMOOTH * mean) / (stats["count"] + P_SMOOTH)).reindex(train["userId"]).to_numpy()
    np.testing.assert_allclose(encode(op, train[["userId", "movieId"]], "userId"), expected, rtol=1e-5)

    # Out-of-fold: each row's encoding uses only rows of the other folds.
    op.out_of_fold = True
    folds = fold_ids(train, ["userId", "movieId"], 5, 7)
    assert set(np.unique(folds)) == set(range(5))
    got = encode(op, train, "userId")
    op.out_of_fold = False
    for row in range(0, len(train), 97):
        others = train[(folds != folds[row]) & (train["userId"] == train["userId"].iloc[row])]["rating"]
        want = (others.sum() + P_SMOOTH * mean) / (len(others) + P_SMOOTH)
        assert got[row] == pytest.approx(want, rel=1e-5)
    assert not np.allclose(got, expected)


def test_fold_of_a_row_does_not_depend_on_batch_composition():
    frame = ratings_for(n=500)
    folds = fold_ids(frame, ["userId", "movieId"], 5, 0)
    shuffled = frame.sample(frac=1.0, random_state=1)
    np.testing.assert_array_equal(fold_ids(shuffled, ["userId", "movieId"], 5, 0), folds[shuffled.index.to_numpy()])
    np.testing.assert_array_equal(fold_ids(frame.iloc[100:130], ["userId", "movieId"], 5, 0), folds[100:130])
    assert (fold_ids(frame, ["userId", "movieId"], 5, 1) != folds).any()  # the seed matters

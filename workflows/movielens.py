"""The MovieLens NVTabular workflow: the columns and tags of Merlin's ``get_movielens``, with sound target encoding.

Input rows: ``userId``, ``movieId`` (int64) and, for fitting and for the training/validation splits,
``rating`` (float). The side tables (``movies``: movieId, title, genres; ``users``: userId, gender, age,
occupation, zipcode) are joined inside the workflow (``JoinExternal``) and saved with it, so the saved
workflow turns a raw request of (userId, movieId) into model features by itself.

Output columns (ml-100k, ml-1m and the synthetic set; ml-25m has no user table, hence no gender, age,
occupation, zipcode and their encodings):

========================================  ================  =============================================
column                                    dtype             tags
========================================  ================  =============================================
userId                                    int32             categorical, user_id, user
movieId                                   int32             categorical, item_id, item
title                                     int32             categorical, item
genres                                    list of int32     categorical, item (value_count min/max)
gender, age, occupation, zipcode          int32             categorical, user
TE_<col>_rating for userId, gender, age,  float32           continuous, user (movieId: item)
occupation, zipcode, movieId
rating_binary (rating > 3)                int32             binary_classification, target
rating                                    float32           regression, target
========================================  ================  =============================================

Categorify reserves index 0 (padding), 1 (null) and 2 (out-of-vocabulary); the schema's cardinality
counts them. An unseen user or movie maps to index 2 in its own column and, through ``FillUnknown``,
in every joined column; its target encodings are the training mean (normalised).

Target encoding (``pipeline.ops.KFoldTargetEncoding``, kfold=5, p_smooth=20, then ``Normalize``) is
out-of-fold only inside ``pipeline.ops.out_of_fold(workflow)``, which the ETL uses for the training split;
valid and inference rows get the full-train statistics and need no ``rating``. For serving, drop the
targets with ``workflow.remove_inputs(["rating"])`` (see ``TARGET``).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

import pipeline  # noqa: F401  (configures dask before nvtabular is imported)

# isort: split
import nvtabular as nvt  # noqa: E402
from merlin.schema import Tags  # noqa: E402
from nvtabular import ops  # noqa: E402

from pipeline.ops import ColumnTags, FillUnknown, KFoldTargetEncoding, ListValueCount  # noqa: E402
from pipeline.registry import VARIANTS  # noqa: E402

TARGET = "rating"
USER_FEATURES = ("gender", "age", "occupation", "zipcode")
ITEM_FEATURES = ("title", "genres")
KFOLD = 5
P_SMOOTH = 20


def rating_to_binary(rating):
    """1 if the rating is above 3 (a "liked" movie), else 0; int32."""
    return (rating > 3).astype("int32")


def rating_to_float32(rating):
    return rating.astype("float32")


def movielens_workflow(
    variant: str,
    movies: pd.DataFrame,
    users: pd.DataFrame | None,
    *,
    out_path: str | Path,
    seed: int = 0,
    kfold: int = KFOLD,
    p_smooth: float = P_SMOOTH,
) -> nvt.Workflow:
    """The (unfitted) workflow for ``variant``.

    Args:
        variant: ``ml-100k``, ``ml-1m`` (also the synthetic set) or ``ml-25m``.
        movies: movieId (int64), title (str), genres (list[str]).
        users: userId (int64), gender, age, occupation, zipcode; ``None`` for ml-25m.
        out_path: where Categorify writes its vocabularies while fitting; point it inside the output
            being built (``Workflow.save`` copies them into the saved workflow).
        seed: seed of the target encoding's fold assignment.

    Returns:
        ``nvt.Workflow`` whose output columns are listed in the module docstring.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown MovieLens variant {variant!r}; expected one of {VARIANTS}")
    if variant == "ml-25m" and users is not None:
        raise ValueError("ml-25m has no user table; pass users=None")
    if variant != "ml-25m" and users is None:
        raise ValueError(f"{variant} needs its user table")

    # The graph is two chains (categorical features, target encodings) rather than one branch per tag
    # set: merlin's executor re-runs a branch's whole upstream for every branch, so every extra branch
    # off Categorify or JoinExternal costs a full pass over the data.
    user_features = list(USER_FEATURES) if users is not None else []
    movies = movies[["movieId", *ITEM_FEATURES]]
    joined = ["userId", "movieId"] >> ops.JoinExternal(movies, on=["movieId"])
    if users is not None:
        users = users[["userId", *user_features]]
        joined = joined >> ops.JoinExternal(users, on=["userId"])
    tags = {
        "userId": [Tags.USER_ID, Tags.USER],
        "movieId": [Tags.ITEM_ID, Tags.ITEM],
        **{name: [Tags.ITEM] for name in ITEM_FEATURES},
        **{name: [Tags.USER] for name in user_features},
    }
    categorical = (
        joined
        >> FillUnknown()
        # list lengths are the same before and after Categorify (which keeps the property); fitting
        # them here shares the fit phase with Categorify instead of re-running it in a second phase
        >> ListValueCount()
        >> ops.Categorify(dtype="int32", out_path=str(out_path))
        >> ColumnTags(tags)
    )

    # Target encodings need only the user side (the movie side table carries the heavy list column).
    te_source = ["userId", "movieId"]
    if users is not None:
        te_source = te_source >> ops.JoinExternal(users, on=["userId"]) >> FillUnknown()
    encoded = (
        te_source
        # float64 into Normalize: its mean/std are then the same whatever the partitioning
        >> KFoldTargetEncoding(TARGET, kfold=kfold, p_smooth=p_smooth, seed=seed, out_dtype="float64")
        >> ops.Normalize(out_dtype="float32")
        >> ColumnTags(
            {f"TE_{name}_{TARGET}": [Tags.ITEM if name == "movieId" else Tags.USER]
             for name in ["userId", "movieId", *user_features]}
        )
    )
    features = categorical + encoded

    rating_binary = (
        [TARGET]
        >> ops.LambdaOp(rating_to_binary, dtype="int32")
        >> ops.AddMetadata(tags=[Tags.BINARY_CLASSIFICATION, Tags.TARGET])
        >> ops.Rename(name="rating_binary")
    )
    rating = (
        [TARGET]
        >> ops.LambdaOp(rating_to_float32, dtype="float32")
        >> ops.AddMetadata(tags=[Tags.REGRESSION, Tags.TARGET])
    )
    return nvt.Workflow(features + rating_binary + rating)

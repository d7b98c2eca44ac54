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
counts them. userId and movieId are encoded over the training ratings. The side features are encoded
once over their side table (``encode_side_table``: every movie's title and genres, every user's
demographics, rated or not) and joined to the rating rows as integer codes, which keeps the per-row work
to integer joins at ML-25M size. An unseen user or movie maps to index 2 in its own column and, through
``EncodedColumns``, in every joined column; its target encodings are the training mean (normalised).

Target encoding (``pipeline.ops.KFoldTargetEncoding``, kfold=5, p_smooth=20, then ``Normalize``) is
out-of-fold only inside ``pipeline.ops.out_of_fold(workflow)``, which the ETL uses for the training split;
valid and inference rows get the full-train statistics and need no ``rating``. For serving, drop the
targets with ``workflow.remove_inputs(["rating"])`` (see ``TARGET``).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa

import pipeline  # noqa: F401  (configures dask before nvtabular is imported)

# isort: split
import nvtabular as nvt  # noqa: E402
from merlin.schema import Schema, Tags  # noqa: E402
from nvtabular import ops  # noqa: E402

from pipeline.ops import ColumnTags, EncodedColumns, FillUnknown, KFoldTargetEncoding, ListValueCount  # noqa: E402
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


def encode_side_table(
    table: pd.DataFrame, key: str, columns: list[str], out_path: str | Path
) -> tuple[pd.DataFrame, Schema]:
    """``table`` (one row per ``key``) with ``columns`` encoded by NVTabular's ``Categorify`` on the table itself.

    Args:
        table: ``key`` (int64) and ``columns`` (str, int or lists of str).
        columns: the categorical columns to encode; list columns get their ``value_count`` too.
        out_path: where Categorify writes the vocabularies (``categories/unique.<column>.parquet``).

    Returns:
        ``(encoded, schema)``: ``key`` and ``columns`` as int32 codes (list columns as arrow-backed
        ``list<int32>``), in ``table``'s row order, and the Categorify output schema of ``columns``.
    """
    encode = columns >> ListValueCount() >> ops.Categorify(dtype="int32", out_path=str(out_path))
    workflow = nvt.Workflow(encode + [key])
    data = nvt.Dataset(table[[key, *columns]].reset_index(drop=True), cpu=True)
    encoded = workflow.fit_transform(data).to_ddf().compute(scheduler="sync")[[key, *columns]].reset_index(drop=True)
    schema = workflow.output_schema.select_by_name(columns)
    for column in schema:
        if column.is_list:
            # Arrow-backed: the table travels inside every Dask task of the workflow, and a column of
            # one numpy array per row pickles ~80x slower (2M ratings on 2 workers: fit 394 s vs 63 s).
            # EncodedColumns turns the joined rows back into Categorify's object column of int32 arrays.
            values = pa.array(list(encoded[column.name]), type=pa.list_(pa.int32()))
            encoded[column.name] = pd.Series(values, dtype=pd.ArrowDtype(values.type))
    return encoded, schema


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

    # The side tables' columns are encoded once on the side tables (one row per movie / user) and the
    # rating rows join integer codes: encoding joined strings and genre lists per rating row was most
    # of the ETL's time at ML-25M size. The graph is separate chains from the input columns (ids,
    # side features, target encodings): merlin's executor re-runs a branch's whole upstream for every
    # branch, so no node feeds two branches.
    user_features = list(USER_FEATURES) if users is not None else []
    encoded_movies, side_schema = encode_side_table(movies, "movieId", list(ITEM_FEATURES), out_path)
    joined = ["userId", "movieId"] >> ops.JoinExternal(encoded_movies, on=["movieId"])
    if users is not None:
        encoded_users, user_schema = encode_side_table(users, "userId", user_features, out_path)
        side_schema = side_schema + user_schema
        joined = joined >> ops.JoinExternal(encoded_users, on=["userId"])
    tags = {
        "userId": [Tags.USER_ID, Tags.USER],
        "movieId": [Tags.ITEM_ID, Tags.ITEM],
        **{name: [Tags.ITEM] for name in ITEM_FEATURES},
        **{name: [Tags.USER] for name in user_features},
    }
    ids = ["userId", "movieId"] >> ops.Categorify(dtype="int32", out_path=str(out_path))
    side = joined[[*ITEM_FEATURES, *user_features]] >> EncodedColumns(side_schema, out_path=str(out_path))
    categorical = (ids + side) >> ColumnTags(tags)

    # Target encodings need only the user side (the movie side table carries the heavy list column).
    te_source = ["userId", "movieId"]
    if users is not None:
        te_source = te_source >> ops.JoinExternal(encoded_users, on=["userId"]) >> FillUnknown()
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

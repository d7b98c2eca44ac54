"""Wide&Deep (Cheng et al. 2016) built entirely from a merlin Schema."""

from __future__ import annotations

from typing import Mapping, Sequence

import keras
from merlin.schema import Schema, Tags

from pipeline.models.core import ParallelBlock
from pipeline.models.features import InputBlock
from pipeline.models.mlp import MLPBlock
from pipeline.models.model import Model
from pipeline.models.outputs import OutputBlock, heads_from
from pipeline.models.wide import WideBlock


def default_crosses(schema: Schema) -> list[tuple[str, str]]:
    """Each scalar user-side categorical column (tag USER, not the id itself) crossed with the item id:
    a weight per (age group, movie), (occupation, movie), ... -- what the wide part can memorise and a
    user id cannot (every valid pair is new to the model, but not every (age, movie))."""
    inputs = schema.excluding_by_tag(Tags.TARGET).select_by_tag(Tags.CATEGORICAL)
    items = inputs.select_by_tag(Tags.ITEM_ID).column_names
    if not items:
        return []
    user_ids = set(inputs.select_by_tag(Tags.USER_ID).column_names)
    return [(col.name, items[0]) for col in inputs.select_by_tag(Tags.USER)
            if not col.is_list and col.name not in user_ids]


def WideAndDeepModel(
    schema: Schema,
    deep_block: keras.layers.Layer | None = None,
    prediction_tasks: OutputBlock | Sequence[OutputBlock] | None = None,
    *,
    crosses: Sequence[Sequence[str]] | None = None,
    cross_buckets: int = 100_000,
    embedding_dim: int | None = 64,
    embedding_dims: Mapping[str, int] | None = None,
    combiner: str = "mean",
    embeddings_l2: float = 0.0,
) -> Model:
    """Wide&Deep on every input of ``schema``.

    The wide part (``WideBlock``) is linear in the raw categorical ids, the continuous values and the
    hashed ``crosses`` (default: ``default_crosses(schema)``; ``[]`` for none) -> ``(batch, 1)``. The deep
    part concatenates embeddings and continuous features into ``deep_block`` (default
    ``MLPBlock([128, 64, 32])``). Both are concatenated and each head's dense layer combines them (the
    wide logit gets one weight, the deep features theirs), one head per target.

    Returns a compile-ready ``Model``.

    Args:
        schema: the merlin Schema; every non-target input column is used.
        deep_block: the deep MLP.
        prediction_tasks: the heads (default: one per TARGET column).
        crosses: the wide part's crosses of scalar categorical columns (default: ``default_crosses``).
        cross_buckets: hashed rows of each cross.
        embedding_dim: one width for every table (None: each column's suggested width).
        embedding_dims: per-column widths.
        combiner: how list columns are reduced.
        embeddings_l2: L2 penalty on the embeddings used in each batch.

    Example:
        >>> model = WideAndDeepModel(schema, MLPBlock([16, 8]), crosses=[("age", "movieId")], cross_buckets=100,
        ...                          embedding_dim=8)
        >>> model.compile(optimizer="adam")
        >>> {k: tuple(v.shape) for k, v in model(batch).items()}
        {'rating_binary': (5, 1), 'rating': (5, 1)}
    """
    deep_block = deep_block if deep_block is not None else MLPBlock([128, 64, 32])
    inputs = schema.excluding_by_tag(Tags.TARGET)
    wide = WideBlock.from_schema(inputs, crosses=default_crosses(schema) if crosses is None else crosses,
                                 cross_buckets=cross_buckets, name="wide")
    deep = InputBlock(inputs, embedding_dim, embedding_dims=embedding_dims, combiner=combiner, aggregation="concat",
                      embeddings_l2=embeddings_l2, name="deep_inputs").connect(deep_block, name="deep")
    body = ParallelBlock({"wide": wide, "deep": deep}, aggregation="concat", name="wide_and_deep")
    return Model(body, *heads_from(schema, prediction_tasks), name="wide_and_deep")

"""The plain deep baseline: embeddings + continuous features -> MLP, built from a merlin Schema."""

from __future__ import annotations

from typing import Mapping, Sequence

import keras
from merlin.schema import Schema, Tags

from pipeline.models.features import InputBlock
from pipeline.models.mlp import MLPBlock
from pipeline.models.model import Model
from pipeline.models.outputs import OutputBlock, heads_from


def MLPModel(
    schema: Schema,
    block: keras.layers.Layer | None = None,
    prediction_tasks: OutputBlock | Sequence[OutputBlock] | None = None,
    *,
    embedding_dim: int | None = 64,
    embedding_dims: Mapping[str, int] | None = None,
    combiner: str = "mean",
    embeddings_l2: float = 0.0,
) -> Model:
    """Every input of ``schema`` concatenated (embeddings ``(batch, dim)`` per categorical column, continuous
    columns as they are) -> ``block`` (default ``MLPBlock([128, 64, 32])``) -> one head per target.

    Returns a compile-ready ``Model``.

    Args:
        schema: the merlin Schema; every non-target input column is used.
        block: the MLP over the concatenated inputs.
        prediction_tasks: the heads (default: one per TARGET column).
        embedding_dim: one width for every table (None: each column's suggested width).
        embedding_dims: per-column widths.
        combiner: how list columns are reduced.
        embeddings_l2: L2 penalty on the embeddings used in each batch.

    Example:
        >>> model = MLPModel(schema, MLPBlock([16, 8]), BinaryOutput("rating_binary"), embedding_dim=8)
        >>> model.compile(optimizer="adam")
        >>> tuple(model(batch).shape)  # one head: a tensor, not a dict
        (5, 1)
    """
    block = block if block is not None else MLPBlock([128, 64, 32])
    features = InputBlock(schema.excluding_by_tag(Tags.TARGET), embedding_dim, embedding_dims=embedding_dims,
                          combiner=combiner, aggregation="concat", embeddings_l2=embeddings_l2, name="mlp_inputs")
    return Model(features.connect(block), *heads_from(schema, prediction_tasks), name="mlp")

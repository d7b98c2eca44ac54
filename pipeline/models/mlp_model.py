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

    Example:
        >>> model = MLPModel(train.schema, MLPBlock([64, 32]), BinaryOutput("rating_binary"))
        >>> model.compile(optimizer="adam")
        >>> model.fit(train, batch_size=1024)

    Returns a compile-ready ``Model``.
    """
    block = block if block is not None else MLPBlock([128, 64, 32])
    features = InputBlock(schema.excluding_by_tag(Tags.TARGET), embedding_dim, embedding_dims=embedding_dims,
                          combiner=combiner, aggregation="concat", embeddings_l2=embeddings_l2, name="mlp_inputs")
    return Model(features.connect(block), *heads_from(schema, prediction_tasks), name="mlp")

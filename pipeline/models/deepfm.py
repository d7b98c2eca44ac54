"""DeepFM (Guo et al. 2017) built entirely from a merlin Schema."""

from __future__ import annotations

from typing import Sequence

import keras
from merlin.schema import Schema, Tags

from pipeline.models.core import Filter, ParallelBlock
from pipeline.models.features import ContinuousFeatures, EmbeddingFeatures
from pipeline.models.interaction import FMBlock
from pipeline.models.mlp import MLPBlock
from pipeline.models.model import Model
from pipeline.models.outputs import OutputBlock, heads_from
from pipeline.models.wide import WideBlock


def DeepFMModel(
    schema: Schema,
    embedding_dim: int = 64,
    deep_block: keras.layers.Layer | None = None,
    prediction_tasks: OutputBlock | Sequence[OutputBlock] | None = None,
    *,
    combiner: str = "mean",
    embeddings_l2: float = 0.0,
) -> Model:
    """DeepFM on every input of ``schema``: first order + FM second order + deep part, sharing embeddings.

    - first order: ``WideBlock`` (a weight per categorical id and per continuous value) -> ``(batch, 1)``;
    - second order: ``FMBlock`` over the embeddings of the categorical columns (one width,
      ``embedding_dim``) -> ``(batch, 1)``;
    - deep: the same embeddings and the continuous columns concatenated -> ``deep_block`` (default
      ``MLPBlock([128, 64, 32])``).
    The three are concatenated and each head's dense layer combines them, one head per target.

    Returns a compile-ready ``Model``.

    Args:
        schema: the merlin Schema; every non-target input column is used.
        embedding_dim: the width shared by the FM part and the deep part.
        deep_block: the deep MLP.
        prediction_tasks: the heads (default: one per TARGET column).
        combiner: how list columns are reduced.
        embeddings_l2: L2 penalty on the embeddings used in each batch.

    Example:
        >>> model = DeepFMModel(schema, embedding_dim=8, deep_block=MLPBlock([16, 8]))
        >>> model.compile(optimizer="adam")
        >>> {k: tuple(v.shape) for k, v in model(batch).items()}
        {'rating_binary': (5, 1), 'rating': (5, 1)}
    """
    deep_block = deep_block if deep_block is not None else MLPBlock([128, 64, 32])
    inputs = schema.excluding_by_tag(Tags.TARGET)
    embeddings = EmbeddingFeatures.from_schema(inputs, embedding_dim, combiner=combiner,
                                             l2_regularization=embeddings_l2)
    features = {"embeddings": embeddings}
    if inputs.select_by_tag(Tags.CONTINUOUS).column_names:
        features["continuous"] = ContinuousFeatures.from_schema(inputs)
    second_order = Filter(embeddings.feature_names, name="fm_inputs").connect(FMBlock(), name="fm")
    interactions = ParallelBlock(features, name="deepfm_inputs").connect_branch(second_order, deep_block)
    body = ParallelBlock({"first_order": WideBlock.from_schema(inputs, name="first_order"),
                          "interactions": interactions}, aggregation="concat", name="deepfm")
    return Model(body, *heads_from(schema, prediction_tasks), name="deepfm")

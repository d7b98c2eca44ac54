"""DLRM (Naumov et al. 2019) built entirely from a merlin Schema."""

from __future__ import annotations

from typing import Mapping, Sequence

import keras
from merlin.schema import Schema, Tags

from pipeline.errors import DataError
from pipeline.models.core import Filter, ParallelBlock
from pipeline.models.features import ContinuousFeatures, EmbeddingFeatures
from pipeline.models.interaction import DotProductInteractionBlock
from pipeline.models.mlp import MLPBlock
from pipeline.models.model import Model
from pipeline.models.outputs import OutputBlock, heads_from


def DLRMModel(
    schema: Schema,
    embedding_dim: int = 64,
    bottom_block: keras.layers.Layer | None = None,
    top_block: keras.layers.Layer | None = None,
    prediction_tasks: OutputBlock | Sequence[OutputBlock] | None = None,
    *,
    embedding_dims: Mapping[str, int] | None = None,
    combiner: str = "mean",
    embeddings_l2: float = 0.0,
) -> Model:
    """DLRM on every input of ``schema``.

    Categorical columns (list columns combined by ``combiner``) -> embeddings ``(batch, embedding_dim)``;
    continuous columns -> ``bottom_block`` (its last width must be ``embedding_dim``); pairwise dot
    products of all those vectors, concatenated with the bottom output -> ``top_block`` -> one head
    per target (``prediction_tasks``, default: a head for every TARGET column of the schema).
    ``embeddings_l2`` penalizes the squared norm of the embeddings used in each batch.

    Returns a compiled-ready ``Model``.

    Args:
        schema: the merlin Schema; every non-target input column is used.
        embedding_dim: the one width of every embedding (DLRM's dot products need one).
        bottom_block: the MLP of the continuous features; its last width must be ``embedding_dim``.
        top_block: the MLP over the interactions.
        prediction_tasks: the heads (default: one per TARGET column).
        embedding_dims: per-column widths (must all equal ``embedding_dim``).
        combiner: how list columns are reduced ("mean" or "sum").
        embeddings_l2: L2 penalty on the embeddings used in each batch.

    Example:
        >>> model = DLRMModel(schema, embedding_dim=8, bottom_block=MLPBlock([16, 8]), top_block=MLPBlock([16]))
        >>> model.compile(optimizer="adam")
        >>> {k: tuple(v.shape) for k, v in model(batch).items()}
        {'rating_binary': (5, 1), 'rating': (5, 1)}
    """
    bottom_block = bottom_block if bottom_block is not None else MLPBlock([128, embedding_dim])
    top_block = top_block if top_block is not None else MLPBlock([128, 64, 32])
    heads = heads_from(schema, prediction_tasks)

    inputs = schema.excluding_by_tag(Tags.TARGET)
    embeddings = EmbeddingFeatures.from_schema(inputs, embedding_dim, embedding_dims=embedding_dims, combiner=combiner,
                                             l2_regularization=embeddings_l2)
    dims = {spec["dim"] for spec in embeddings.tables_config.values()}
    if len(dims) != 1:
        raise ValueError(f"DLRM's dot products need one embedding width, got {sorted(dims)}")
    branches = {"embeddings": embeddings}
    has_continuous = bool(inputs.select_by_tag(Tags.CONTINUOUS).column_names)
    if has_continuous:
        bottom_width = getattr(bottom_block, "dimensions", [embedding_dim])[-1]
        if bottom_width != embedding_dim:
            raise ValueError(f"the bottom block must end at the embedding width {embedding_dim}, got {bottom_width}")
        branches["continuous"] = ContinuousFeatures.from_schema(inputs).connect(bottom_block)
    if len(embeddings.feature_names) + has_continuous < 2:
        raise DataError(f"DLRM needs at least two input features (schema columns: {schema.column_names})")

    interaction = ParallelBlock(branches, name="dlrm_inputs").connect_with_shortcut(
        DotProductInteractionBlock(),
        shortcut_filter=Filter("continuous") if has_continuous else Filter([]),
        aggregation="concat",
    )
    return Model(interaction.connect(top_block), *heads, name="dlrm")

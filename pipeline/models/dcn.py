"""DCN-v2 (Wang et al. 2021) built entirely from a merlin Schema."""

from __future__ import annotations

from typing import Mapping, Sequence

import keras
from merlin.schema import Schema, Tags

from pipeline.models.features import InputBlock
from pipeline.models.interaction import CrossBlock
from pipeline.models.mlp import MLPBlock
from pipeline.models.model import Model
from pipeline.models.outputs import OutputBlock, heads_from

STRUCTURES = ("stacked", "parallel")


def DCNModel(
    schema: Schema,
    depth: int = 3,
    deep_block: keras.layers.Layer | None = None,
    prediction_tasks: OutputBlock | Sequence[OutputBlock] | None = None,
    *,
    structure: str = "stacked",
    low_rank_dim: int | None = None,
    embedding_dim: int | None = 64,
    embedding_dims: Mapping[str, int] | None = None,
    combiner: str = "mean",
    embeddings_l2: float = 0.0,
) -> Model:
    """DCN-v2 on every input of ``schema``.

    Embeddings of the categorical columns and the continuous columns are concatenated into ``x0``
    ``(batch, d)``; ``depth`` cross layers (``keras_rs.layers.FeatureCross``: ``x_{l+1} = x0 * (W x_l + b)
    + x_l``, ``W`` of rank ``low_rank_dim`` when given) model explicit feature crosses. ``structure``
    "stacked" feeds the cross network's output to ``deep_block``; "parallel" runs both on ``x0`` and
    concatenates them. Then one head per target (``prediction_tasks``, default: every TARGET column).

    Returns a compile-ready ``Model``.

    Args:
        schema: the merlin Schema; every non-target input column is used.
        depth: number of cross layers.
        deep_block: the deep MLP (stacked after, or parallel to, the cross network).
        prediction_tasks: the heads (default: one per TARGET column).
        structure: "stacked" or "parallel".
        low_rank_dim: rank of the cross layers' weights (None: full).
        embedding_dim: one width for every table (None: each column's suggested width).
        embedding_dims: per-column widths.
        combiner: how list columns are reduced.
        embeddings_l2: L2 penalty on the embeddings used in each batch.

    Example:
        >>> model = DCNModel(schema, depth=2, deep_block=MLPBlock([16, 8]), structure="parallel", embedding_dim=8)
        >>> model.compile(optimizer="adam")
        >>> {k: tuple(v.shape) for k, v in model(batch).items()}
        {'rating_binary': (5, 1), 'rating': (5, 1)}
    """
    if structure not in STRUCTURES:
        raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")
    deep_block = deep_block if deep_block is not None else MLPBlock([128, 64])
    heads = heads_from(schema, prediction_tasks)
    features = InputBlock(schema.excluding_by_tag(Tags.TARGET), embedding_dim, embedding_dims=embedding_dims,
                          combiner=combiner, aggregation="concat", embeddings_l2=embeddings_l2, name="dcn_inputs")
    cross = CrossBlock(depth=depth, projection_dim=low_rank_dim, name="cross")
    if structure == "stacked":
        body = features.connect(cross, deep_block)
    else:
        body = features.connect_branch(cross, deep_block, aggregation="concat")
    return Model(body, *heads, name="dcn")

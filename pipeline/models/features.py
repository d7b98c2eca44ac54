"""Input blocks built from a merlin ``Schema``: embeddings for categorical columns, continuous columns.

Everything is found by tags (CATEGORICAL, CONTINUOUS; TARGET columns are never inputs). Embedding
tables have the schema's cardinality rows, which include Categorify's reserved rows (0 = padding,
then null / out-of-vocabulary), so unseen ids at inference still have a row.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import keras
from keras import ops
from merlin.schema import Schema, Tags

from pipeline.errors import DataError
from pipeline.models.core import Block, ParallelBlock, register
from pipeline.models.embedding import Embedding

COMBINERS = ("mean", "sum")
EMBEDDING_INIT_STDDEV = 0.05  # of every embedding table (read when a table is built)


def cardinality(column) -> int:
    """Rows of the embedding table for a categorical column: the schema's cardinality (reserved rows included)."""
    sizes = column.properties.get("embedding_sizes") or {}
    if sizes.get("cardinality"):
        return int(sizes["cardinality"])
    domain = column.int_domain
    if domain is not None and domain.max is not None:
        return int(domain.max) + 1
    raise DataError(
        f"schema column {column.name!r} is categorical but has no cardinality "
        "(embedding_sizes.cardinality or int_domain.max); was it written by Categorify?"
    )


def default_dimension(column) -> int:
    """The schema's suggested embedding width (NVTabular's embedding_sizes.dimension), else 64."""
    sizes = column.properties.get("embedding_sizes") or {}
    return int(sizes.get("dimension") or 64)


def _input_columns(schema: Schema, tags) -> Schema:
    return schema.select_by_tag(tags).excluding_by_tag(Tags.TARGET)


def table_spec(col, embedding_dim: int | None, embedding_dims: Mapping[str, int] | None) -> dict:
    """``{"cardinality", "dim"}`` of ``col``'s table: a per-feature width, else the shared one, else the schema's."""
    dim = (embedding_dims or {}).get(col.name) or embedding_dim or default_dimension(col)
    return {"cardinality": cardinality(col), "dim": int(dim)}


def embedding_tables(tables: Mapping[str, Mapping]) -> dict:
    """One ``Embedding`` (a ``keras.layers.Embedding``) per ``{name: {"cardinality", "dim"}}``, initialised N(0, EMBEDDING_INIT_STDDEV)
    truncated at two standard deviations."""
    return {
        name: Embedding(  # keras.layers.Embedding with an in-place row gather
            int(spec["cardinality"]),
            int(spec["dim"]),
            embeddings_initializer=keras.initializers.TruncatedNormal(stddev=EMBEDDING_INIT_STDDEV),
            name=f"embedding_{name}",
        )
        for name, spec in tables.items()
    }


@register
class EmbeddingFeatures(Block):
    """Embedding lookups for categorical features: ``{name: ids}`` -> ``{name: (batch, dim)}``.

    Scalar features arrive as ``(batch, 1)`` ids; list features (e.g. genres) as ``(batch, max_len)``
    ids padded with 0, combined over their non-padding entries with ``combiner`` ("mean" or "sum").

    Args:
        tables: feature name -> ``{"cardinality": int, "dim": int, "is_list": bool}``.
        combiner: how list features are reduced to one vector.
        l2_regularization: weight of an L2 penalty on the embeddings looked up in each batch
            (the rows actually used, so frequent ids are regularized more: the usual recsys choice,
            and cheaper than penalizing whole tables every step).

    Example:
        >>> block = EmbeddingFeatures.from_schema(schema, embedding_dim=8)
        >>> tuple(block(batch)["genres"].shape), block.embeddings["userId"].input_dim
        ((5, 8), 41)
    """

    def __init__(self, tables: Mapping[str, Mapping], combiner: str = "mean", l2_regularization: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        if combiner not in COMBINERS:
            raise ValueError(f"combiner must be one of {COMBINERS}, got {combiner!r}")
        self.tables_config = {name: dict(spec) for name, spec in tables.items()}
        self.combiner = combiner
        self.l2_regularization = float(l2_regularization)
        self.feature_names = list(self.tables_config)
        self.embeddings = embedding_tables(self.tables_config)

    @classmethod
    def from_schema(
        cls,
        schema: Schema,
        embedding_dim: int | None = 64,
        *,
        embedding_dims: Mapping[str, int] | None = None,
        tags=Tags.CATEGORICAL,
        combiner: str = "mean",
        include_lists: bool = True,
        l2_regularization: float = 0.0,
        **kwargs,
    ) -> "EmbeddingFeatures":
        """One table per categorical (non-target) column of ``schema``.

        ``embedding_dim``: one width for all tables (DLRM needs equal widths); ``None`` takes each
        column's ``embedding_sizes.dimension`` from the schema. ``embedding_dims`` overrides per feature.
        """
        columns = _input_columns(schema, tags)
        tables = {}
        for col in columns:
            if col.is_list and not include_lists:
                continue
            tables[col.name] = {**table_spec(col, embedding_dim, embedding_dims), "is_list": bool(col.is_list)}
        if not tables:
            raise DataError(f"the schema has no categorical input columns (columns: {schema.column_names})")
        return cls(tables, combiner=combiner, l2_regularization=l2_regularization, **kwargs)

    def lookup(self, name: str, ids):
        """Embeddings of ``ids`` for feature ``name``: ``(batch, 1)`` -> ``(batch, dim)``; lists combined."""
        ids = ops.cast(ids, "int32")
        if not self.tables_config[name].get("is_list") or ids.shape[-1] == 1:
            # one id per row (also a list column the loader padded to width 1): a plain lookup
            return self.embeddings[name](ops.reshape(ids, (-1,)))
        vectors = self.embeddings[name](ids)  # (batch, max_len, dim)
        mask = ops.cast(ops.not_equal(ids, 0), vectors.dtype)[..., None]
        summed = ops.sum(vectors * mask, axis=1)
        if self.combiner == "sum":
            return summed
        return summed / ops.maximum(ops.sum(mask, axis=1), 1.0)

    def call(self, inputs, training=None):
        out = {name: self.lookup(name, inputs[name]) for name in self.feature_names}
        if training and self.l2_regularization:
            penalty = sum(ops.mean(ops.sum(ops.square(v), axis=-1)) for v in out.values())
            self.add_loss(self.l2_regularization * penalty)
        return out

    def get_config(self) -> dict:
        return {**super().get_config(), "tables": self.tables_config, "combiner": self.combiner,
                "l2_regularization": self.l2_regularization}


@register
class SequenceEmbeddingFeatures(Block):
    """Embeddings of list features (e.g. genres): ``{name: (batch, max_len)}`` ids padded with 0.

    With ``combiner=None`` each output is the sequence ``(batch, max_len, dim)`` (padding rows are
    zero vectors); with "mean" / "sum" it is reduced over the non-padding entries to ``(batch, dim)``.

    Args:
        tables: list feature name -> ``{"cardinality": int, "dim": int}``.
        combiner: None (keep the sequence), "mean" or "sum".

    Example:
        >>> block = SequenceEmbeddingFeatures.from_schema(schema.select_by_name(["genres"]), 8)
        >>> tuple(block(batch)["genres"].shape)  # 3: the padded list length
        (5, 3, 8)
    """

    def __init__(self, tables: Mapping[str, Mapping], combiner: str | None = None, **kwargs):
        super().__init__(**kwargs)
        if combiner is not None and combiner not in COMBINERS:
            raise ValueError(f"combiner must be None or one of {COMBINERS}, got {combiner!r}")
        self.tables_config = {name: {**dict(spec), "is_list": True} for name, spec in tables.items()}
        self.combiner = combiner
        self.feature_names = list(self.tables_config)
        self.embeddings = embedding_tables(self.tables_config)

    @classmethod
    def from_schema(
        cls,
        schema: Schema,
        embedding_dim: int | None = 64,
        *,
        embedding_dims: Mapping[str, int] | None = None,
        tags=Tags.CATEGORICAL,
        combiner: str | None = None,
        **kwargs,
    ) -> "SequenceEmbeddingFeatures":
        """One table per list-valued categorical (non-target) column of ``schema``."""
        tables = {}
        for col in _input_columns(schema, tags):
            if col.is_list:
                tables[col.name] = table_spec(col, embedding_dim, embedding_dims)
        if not tables:
            raise DataError(f"the schema has no list-valued categorical columns (columns: {schema.column_names})")
        return cls(tables, combiner=combiner, **kwargs)

    def call(self, inputs):
        out = {}
        for name in self.feature_names:
            ids = ops.cast(inputs[name], "int32")
            mask = ops.cast(ops.not_equal(ids, 0), "float32")[..., None]
            vectors = self.embeddings[name](ids) * mask
            if self.combiner is None:
                out[name] = vectors
            elif self.combiner == "sum":
                out[name] = ops.sum(vectors, axis=1)
            else:
                out[name] = ops.sum(vectors, axis=1) / ops.maximum(ops.sum(mask, axis=1), 1.0)
        return out

    def get_config(self) -> dict:
        return {**super().get_config(), "tables": self.tables_config, "combiner": self.combiner}


@register
class ContinuousFeatures(Block):
    """Continuous features as float32 ``{name: (batch, 1)}``.

    Args:
        features: the names of the continuous columns (``from_schema`` finds them by tag).

    Example:
        >>> block = ContinuousFeatures.from_schema(schema.select_by_name(["TE_userId_rating", "TE_age_rating"]))
        >>> {k: tuple(v.shape) for k, v in block(batch).items()}
        {'TE_userId_rating': (5, 1), 'TE_age_rating': (5, 1)}
    """

    def __init__(self, features: Iterable[str], **kwargs):
        super().__init__(**kwargs)
        self.feature_names = list(features)

    @classmethod
    def from_schema(cls, schema: Schema, tags=Tags.CONTINUOUS, **kwargs) -> "ContinuousFeatures":
        """The (non-target) columns of ``schema`` carrying ``tags``."""
        names = _input_columns(schema, tags).column_names
        if not names:
            raise DataError(f"the schema has no continuous input columns (columns: {schema.column_names})")
        return cls(names, **kwargs)

    def call(self, inputs):
        return {name: ops.reshape(ops.cast(inputs[name], "float32"), (-1, 1)) for name in self.feature_names}

    def get_config(self) -> dict:
        return {**super().get_config(), "features": self.feature_names}


def InputBlock(
    schema: Schema,
    embedding_dim: int | None = 64,
    *,
    embedding_dims: Mapping[str, int] | None = None,
    combiner: str = "mean",
    continuous_block: keras.layers.Layer | None = None,
    aggregation=None,
    embeddings_l2: float = 0.0,
    **kwargs,
) -> ParallelBlock:
    """Every input of ``schema``: embeddings of categorical columns plus continuous columns.

    Returns a ``ParallelBlock`` whose output is ``{feature: tensor}`` (embeddings ``(batch, dim)``,
    continuous ``(batch, 1)``), or, if ``continuous_block`` is given (e.g. ``MLPBlock([64])``), the
    continuous features passed through it under the key ``"continuous"``. ``aggregation`` (e.g.
    "concat") turns the dict into one tensor. ``embeddings_l2``: ``EmbeddingFeatures``' per-batch L2 penalty.

    Args:
        schema: the merlin Schema; its CATEGORICAL and CONTINUOUS non-target columns are the inputs.
        embedding_dim: one width for every table (None: each column's suggested width).
        embedding_dims: per-column widths, overriding ``embedding_dim``.
        combiner: how list columns are reduced ("mean" or "sum").
        continuous_block: a layer the continuous features go through (output key ``"continuous"``).
        aggregation: e.g. "concat", to return one tensor instead of the dict.
        embeddings_l2: the per-batch L2 penalty of ``EmbeddingFeatures``.

    Example:
        >>> tuple(InputBlock(schema, 8, aggregation="concat")(batch).shape)  # 8 tables x 8 + 6 continuous
        (5, 70)
    """
    branches: dict[str, keras.layers.Layer] = {}
    if _input_columns(schema, Tags.CATEGORICAL):
        branches["categorical"] = EmbeddingFeatures.from_schema(
            schema, embedding_dim, embedding_dims=embedding_dims, combiner=combiner, l2_regularization=embeddings_l2
        )
    if _input_columns(schema, Tags.CONTINUOUS):
        continuous = ContinuousFeatures.from_schema(schema)
        branches["continuous"] = continuous.connect(continuous_block) if continuous_block is not None else continuous
    if not branches:
        raise DataError(f"the schema has no input features (columns: {schema.column_names})")
    return ParallelBlock(branches, aggregation=aggregation, **kwargs)

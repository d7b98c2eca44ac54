"""The wide (linear, first-order) part of Wide&Deep and DeepFM, on raw categorical ids."""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import keras
from keras import ops
from merlin.schema import Schema, Tags

from pipeline.errors import DataError
from pipeline.models.core import Block, register
from pipeline.models.features import cardinality


@register
class WideBlock(Block):
    """A learned weight per categorical id, per hashed cross of ids and per continuous value, summed.

    Raw inputs ``{name: ids (batch, 1) or (batch, max_len)}`` -> logit ``(batch, 1)``. A list feature
    (e.g. genres) adds the weights of its non-padding ids. A cross ``("age", "movieId")`` gives every
    (age, movie) combination a weight of its own, hashed into ``cross_buckets`` rows: what lets the
    wide part memorise "this group of users likes this movie".

    Args:
        tables: categorical feature -> ``{"cardinality": int, "is_list": bool}``.
        crosses: tuples of scalar categorical features (each must be in ``tables``).
        cross_buckets: rows of each cross's hashed table.
        continuous: continuous features, each with a weight (a linear layer).

    Example:
        >>> wide = WideBlock.from_schema(schema, crosses=[("age", "movieId")], cross_buckets=100)
        >>> tuple(wide(batch).shape)
        (5, 1)
    """

    def __init__(self, tables: Mapping[str, Mapping], crosses: Sequence[Sequence[str]] = (),
                 cross_buckets: int = 100_000, continuous: Iterable[str] = (), **kwargs):
        super().__init__(**kwargs)
        self.tables_config = {name: dict(spec) for name, spec in tables.items()}
        self.crosses = [list(cross) for cross in crosses]
        self.cross_buckets = int(cross_buckets)
        self.continuous = list(continuous)
        for cross in self.crosses:
            if len(cross) < 2:
                raise ValueError(f"a cross needs at least two features, got {cross}")
            for name in cross:
                if name not in self.tables_config:
                    raise ValueError(f"cross {cross}: {name!r} is not a categorical feature of the wide part")
                if self.tables_config[name].get("is_list"):
                    raise ValueError(f"cross {cross}: {name!r} is a list feature; crosses take scalar ids")
        self.feature_names = [*self.tables_config, *self.continuous]
        zeros = keras.initializers.Zeros()
        self.id_weights = {name: keras.layers.Embedding(int(spec["cardinality"]), 1, embeddings_initializer=zeros,
                                                        name=f"wide_{name}")
                           for name, spec in self.tables_config.items()}
        self.cross_weights = [keras.layers.Embedding(self.cross_buckets, 1, embeddings_initializer=zeros,
                                                     name="wide_cross_" + "_".join(cross)) for cross in self.crosses]
        self.linear = keras.layers.Dense(1, use_bias=False, kernel_initializer=zeros) if self.continuous else None

    @classmethod
    def from_schema(cls, schema: Schema, *, crosses: Sequence[Sequence[str]] = (), cross_buckets: int = 100_000,
                    continuous: bool = True, **kwargs) -> "WideBlock":
        """Every categorical (and, with ``continuous``, every continuous) non-target column of ``schema``."""
        inputs = schema.excluding_by_tag(Tags.TARGET)
        tables = {col.name: {"cardinality": cardinality(col), "is_list": bool(col.is_list)}
                  for col in inputs.select_by_tag(Tags.CATEGORICAL)}
        if not tables:
            raise DataError(f"the schema has no categorical input columns (columns: {schema.column_names})")
        names = inputs.select_by_tag(Tags.CONTINUOUS).column_names if continuous else []
        return cls(tables, crosses=crosses, cross_buckets=cross_buckets, continuous=names, **kwargs)

    def _weights_of(self, name: str, ids):
        ids = ops.cast(ids, "int32")
        if not self.tables_config[name].get("is_list") or ids.shape[-1] == 1:
            return self.id_weights[name](ops.reshape(ids, (-1,)))  # (batch, 1)
        weights = self.id_weights[name](ids)[..., 0]  # (batch, max_len)
        return ops.sum(weights * ops.cast(ops.not_equal(ids, 0), weights.dtype), axis=1, keepdims=True)

    def _cross_ids(self, cross: list[str], inputs):
        # Mixed-radix index of the combination, reduced mod the table size at every step so it stays in int64.
        key = None
        for name in cross:
            ids = ops.reshape(ops.cast(inputs[name], "int64"), (-1,))
            key = ids if key is None else ops.mod(key * int(self.tables_config[name]["cardinality"]) + ids,
                                                  self.cross_buckets)
        return ops.mod(key, self.cross_buckets)

    def call(self, inputs):
        total = None
        for name in self.tables_config:
            part = self._weights_of(name, inputs[name])
            total = part if total is None else total + part
        for cross, table in zip(self.crosses, self.cross_weights):
            total = total + table(self._cross_ids(cross, inputs))
        if self.linear is not None:
            values = ops.concatenate([ops.reshape(ops.cast(inputs[n], "float32"), (-1, 1)) for n in self.continuous],
                                     -1)
            total = total + self.linear(values)
        return total

    def get_config(self) -> dict:
        return {**super().get_config(), "tables": self.tables_config, "crosses": self.crosses,
                "cross_buckets": self.cross_buckets, "continuous": self.continuous}

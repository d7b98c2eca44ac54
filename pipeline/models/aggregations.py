"""Aggregations: turn a dict of tensors (one per feature) into one tensor.

Keys are taken in sorted order, so the layout does not depend on dict insertion order (which
may differ after saving and loading).
"""

from __future__ import annotations

from typing import Mapping

import keras
from keras import ops

from pipeline.models.core import Block, register


def _values(inputs) -> list:
    if isinstance(inputs, Mapping):
        return [inputs[k] for k in sorted(inputs)]
    return list(inputs)


@register
class ConcatFeatures(Block):
    """Concatenates ``{name: (batch, d_i)}`` along ``axis`` -> ``(batch, sum d_i)``.

    Args:
        axis: the axis concatenated along.

    Example:
        >>> ConcatFeatures()({"b": np.ones((2, 1)), "a": np.zeros((2, 3))}).numpy().tolist()  # sorted keys: a, b
        [[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]]
    """

    def __init__(self, axis: int = -1, **kwargs):
        super().__init__(**kwargs)
        self.axis = axis

    def call(self, inputs):
        return ops.concatenate([ops.cast(v, "float32") for v in _values(inputs)], axis=self.axis)

    def get_config(self) -> dict:
        return {**super().get_config(), "axis": self.axis}


@register
class StackFeatures(Block):
    """Stacks ``{name: (batch, d)}`` along ``axis`` (default 1) -> ``(batch, n_features, d)``.

    Args:
        axis: the new axis the features are stacked along.

    Example:
        >>> tuple(StackFeatures()({"a": np.ones((2, 4)), "b": np.ones((2, 4))}).shape)
        (2, 2, 4)
    """

    def __init__(self, axis: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.axis = axis

    def call(self, inputs):
        return ops.stack(_values(inputs), axis=self.axis)

    def get_config(self) -> dict:
        return {**super().get_config(), "axis": self.axis}


@register
class ElementwiseSum(Block):
    """Sums ``{name: (batch, d)}`` element-wise -> ``(batch, d)``.

    Args:
        None beyond a Keras layer's (``name``, ``dtype``).

    Example:
        >>> ElementwiseSum()({"a": np.array([[1.0, 2.0]]), "b": np.array([[3.0, 4.0]])}).numpy().tolist()
        [[4.0, 6.0]]
    """

    def call(self, inputs):
        values = _values(inputs)
        out = values[0]
        for v in values[1:]:
            out = out + v
        return out


@register
class CosineSimilarity(Block):
    """Cosine similarity of two tensors ``(batch, d)`` (a dict of two, or a pair) -> ``(batch, 1)``.

    Args:
        None beyond a Keras layer's (``name``, ``dtype``).

    Example:
        >>> similarity = CosineSimilarity()({"a": np.array([[3.0, 4.0]]), "b": np.array([[1.0, 0.0]])})
        >>> tuple(similarity.shape), round(float(similarity[0, 0]), 4)
        ((1, 1), 0.6)
    """

    def call(self, inputs):
        a, b = _values(inputs)
        a = a / ops.maximum(ops.norm(a, axis=-1, keepdims=True), 1e-12)
        b = b / ops.maximum(ops.norm(b, axis=-1, keepdims=True), 1e-12)
        return ops.sum(a * b, axis=-1, keepdims=True)


AGGREGATIONS = {"concat": ConcatFeatures, "stack": StackFeatures, "sum": ElementwiseSum,
                "element-wise-sum": ElementwiseSum, "cosine": CosineSimilarity}


def aggregation_from(aggregation) -> keras.layers.Layer | None:
    """``None``, a layer, or one of the names in ``AGGREGATIONS`` -> an aggregation layer (or None)."""
    if aggregation is None or isinstance(aggregation, keras.layers.Layer):
        return aggregation
    if isinstance(aggregation, dict):  # a serialized layer
        return keras.saving.deserialize_keras_object(aggregation)
    try:
        return AGGREGATIONS[aggregation]()
    except KeyError:
        raise ValueError(f"unknown aggregation {aggregation!r}; use one of {sorted(AGGREGATIONS)} or a layer") from None

"""Feature-interaction blocks, on the Keras team's own recsys layers (keras_rs)."""

from __future__ import annotations

from typing import Mapping

import keras_rs
from keras import ops

from pipeline.models.aggregations import ConcatFeatures
from pipeline.models.core import Block, register


@register
class DotProductInteractionBlock(Block):
    """DLRM's pairwise dot products: ``{name: (batch, d)}`` (n features) -> ``(batch, n*(n-1)/2)``.

    Features are taken in sorted key order; all must have the same width ``d``. A stacked tensor
    ``(batch, n, d)`` is accepted too.

    Args:
        self_interaction: also each feature's dot product with itself (n*(n+1)/2 outputs).

    Example:
        >>> tuple(DotProductInteractionBlock()({k: np.ones((2, 4)) for k in "abcd"}).shape)  # 4 features: 6 pairs
        (2, 6)
    """

    def __init__(self, self_interaction: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.self_interaction = self_interaction
        self.interaction = keras_rs.layers.DotInteraction(self_interaction=self_interaction)

    def call(self, inputs):
        if isinstance(inputs, Mapping):
            features = [ops.cast(inputs[k], "float32") for k in sorted(inputs)]
        else:
            features = [inputs[:, i, :] for i in range(inputs.shape[1])]
        return self.interaction(features)

    def get_config(self) -> dict:
        return {**super().get_config(), "self_interaction": self.self_interaction}


@register
class CrossBlock(Block):
    """DCN-v2's cross network: ``depth`` FeatureCross layers over the concatenated input.

    ``(batch, d)`` (or a dict, concatenated) -> ``(batch, d)``; ``x_{l+1} = x0 * W x_l + b + x_l``.
    ``projection_dim`` makes ``W`` low-rank.

    Args:
        depth: number of cross layers.
        projection_dim: rank of each layer's ``W`` (None: full rank).

    Example:
        >>> tuple(CrossBlock(depth=2)({"a": np.ones((3, 8)), "b": np.ones((3, 8))}).shape)
        (3, 16)
    """

    def __init__(self, depth: int = 3, projection_dim: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.depth = int(depth)
        self.projection_dim = projection_dim
        self.concat = ConcatFeatures()
        self.crosses = [keras_rs.layers.FeatureCross(projection_dim=projection_dim) for _ in range(self.depth)]

    def call(self, inputs):
        x0 = self.concat(inputs) if isinstance(inputs, Mapping) else inputs
        x = x0
        for cross in self.crosses:
            x = cross(x0, x)
        return x

    def get_config(self) -> dict:
        return {**super().get_config(), "depth": self.depth, "projection_dim": self.projection_dim}


@register
class FMBlock(Block):
    """A factorization machine's second-order term: the sum of every pairwise dot product.

    ``{name: (batch, d)}`` (n features, one width ``d``) or a stacked ``(batch, n, d)`` ->
    ``(batch, 1)``, computed as ``0.5 * sum_d((sum_i v_i)^2 - sum_i v_i^2)`` (linear in n).

    Example:
        >>> fm = FMBlock()
        >>> tuple(fm({"a": ops.ones((2, 4)), "b": ops.ones((2, 4))}).shape)  # <a, b> = 4
        (2, 1)

    Args:
        None beyond a Keras layer's (``name``, ``dtype``).
    """

    def call(self, inputs):
        if isinstance(inputs, Mapping):
            stacked = ops.stack([ops.cast(inputs[k], "float32") for k in sorted(inputs)], axis=1)
        else:
            stacked = ops.cast(inputs, "float32")
        summed = ops.sum(stacked, axis=1)
        squares = ops.sum(ops.square(stacked), axis=1)
        return 0.5 * ops.sum(ops.square(summed) - squares, axis=-1, keepdims=True)

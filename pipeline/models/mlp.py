"""The multi-layer perceptron block."""

from __future__ import annotations

from typing import Mapping, Sequence

import keras

from pipeline.models.aggregations import ConcatFeatures
from pipeline.models.core import Block, register


@register
class MLPBlock(Block):
    """Dense layers of widths ``dimensions``: ``(batch, d_in)`` -> ``(batch, dimensions[-1])``.

    A dict input is first concatenated (keys sorted). Each layer: Dense -> (batch norm) ->
    activation -> (dropout).

    Args:
        dimensions: widths of the dense layers.
        activation: activation of every layer (of all but the last if ``no_activation_last_layer``).
        use_bias: dense layers with bias.
        dropout: dropout rate after each layer (None or 0: none).
        normalization: ``"batch_norm"`` to add batch normalization, or None.
        kernel_regularizer: a Keras regularizer (or its name / config) for every kernel.
        no_activation_last_layer: leave the last layer linear.

    Example:
        >>> tuple(MLPBlock([8, 4], dropout=0.1)(np.ones((5, 3))).shape)
        (5, 4)
    """

    def __init__(
        self,
        dimensions: Sequence[int],
        activation: str = "relu",
        use_bias: bool = True,
        dropout: float | None = None,
        normalization: str | None = None,
        kernel_regularizer=None,
        no_activation_last_layer: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not dimensions:
            raise ValueError("MLPBlock needs at least one layer width")
        if normalization not in (None, "batch_norm"):
            raise ValueError(f"normalization must be None or 'batch_norm', got {normalization!r}")
        self.dimensions = [int(d) for d in dimensions]
        self.activation = activation
        self.use_bias = use_bias
        self.dropout = dropout
        self.normalization = normalization
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.no_activation_last_layer = no_activation_last_layer
        self.concat = ConcatFeatures()
        self.dense_layers = []
        self.norm_layers = []
        self.dropout_layers = []
        for i, dim in enumerate(self.dimensions):
            last = i == len(self.dimensions) - 1
            act = None if (last and no_activation_last_layer) else activation
            self.dense_layers.append(
                keras.layers.Dense(dim, activation=None if normalization else act, use_bias=use_bias,
                                   kernel_regularizer=self.kernel_regularizer)
            )
            self.norm_layers.append(keras.layers.BatchNormalization() if normalization else None)
            self.dropout_layers.append(keras.layers.Dropout(dropout) if dropout else None)
        self._activations = [
            None if (i == len(self.dimensions) - 1 and no_activation_last_layer) else keras.activations.get(activation)
            for i in range(len(self.dimensions))
        ]

    def build(self, input_shape):
        # Build the sublayers here so a reloaded model has its weights before the first call
        # (Keras restores weights right after build()).
        if isinstance(input_shape, Mapping):
            shape = (None, sum(int(s[-1]) for s in input_shape.values()))
        else:
            shape = tuple(input_shape)
        for dense, norm in zip(self.dense_layers, self.norm_layers):
            dense.build(shape)
            shape = (*shape[:-1], dense.units)
            if norm is not None:
                norm.build(shape)
        super().build(input_shape)

    def call(self, inputs, training=None):
        x = self.concat(inputs) if isinstance(inputs, Mapping) else inputs
        for dense, norm, drop, act in zip(self.dense_layers, self.norm_layers, self.dropout_layers, self._activations):
            x = dense(x)
            if norm is not None:
                x = norm(x, training=training)
                if act is not None:
                    x = act(x)
            if drop is not None:
                x = drop(x, training=training)
        return x

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "dimensions": self.dimensions,
            "activation": self.activation,
            "use_bias": self.use_bias,
            "dropout": self.dropout,
            "normalization": self.normalization,
            "kernel_regularizer": (keras.regularizers.serialize(self.kernel_regularizer)
                                   if self.kernel_regularizer else None),
            "no_activation_last_layer": self.no_activation_last_layer,
        }

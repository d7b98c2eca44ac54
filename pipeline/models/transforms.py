"""Transformations applied to a tensor or to every tensor of a dict."""

from __future__ import annotations

from typing import Mapping

from keras import ops

from pipeline.models.core import Block, register


def _map(fn, inputs):
    if isinstance(inputs, Mapping):
        return {k: fn(v) for k, v in inputs.items()}
    return fn(inputs)


@register
class ToDense(Block):
    """Makes every input dense and at least 2-D: ``(batch,)`` -> ``(batch, 1)``.

    The ``Loader`` already delivers dense tensors (list columns padded to a fixed width), so this
    only fixes ranks of tensors coming from elsewhere (e.g. a hand-made batch).

    Args:
        None beyond a Keras layer's (``name``, ``dtype``).

    Example:
        >>> {k: tuple(v.shape) for k, v in ToDense()({"x": np.ones(4)}).items()}
        {'x': (4, 1)}
    """

    def call(self, inputs):
        return _map(lambda x: ops.expand_dims(x, -1) if len(x.shape) == 1 else x, inputs)


AsDenseFeatures = ToDense


@register
class L2Norm(Block):
    """L2-normalizes along ``axis`` (a tensor, or each tensor of a dict); same shape out.

    Args:
        axis: the axis normalized.
        epsilon: floor of the squared norm (no division by zero).

    Example:
        >>> L2Norm()(np.array([[3.0, 4.0]])).numpy().tolist()
        [[0.6000000238418579, 0.800000011920929]]
    """

    def __init__(self, axis: int = -1, epsilon: float = 1e-12, **kwargs):
        super().__init__(**kwargs)
        self.axis = axis
        self.epsilon = epsilon

    def call(self, inputs):
        def norm(x):
            return x / ops.maximum(ops.norm(x, axis=self.axis, keepdims=True), self.epsilon)

        return _map(norm, inputs)

    def get_config(self) -> dict:
        return {**super().get_config(), "axis": self.axis, "epsilon": self.epsilon}


@register
class LogitsTemperatureScaler(Block):
    """Divides logits by ``temperature`` (> 1 makes predictions less confident); same shape out.

    Args:
        temperature: the divisor, > 0.

    Example:
        >>> LogitsTemperatureScaler(2.0)(np.array([[3.0, 4.0]])).numpy().tolist()
        [[1.5, 2.0]]
    """

    def __init__(self, temperature: float, **kwargs):
        super().__init__(**kwargs)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def call(self, inputs):
        return _map(lambda x: x / self.temperature, inputs)

    def get_config(self) -> dict:
        return {**super().get_config(), "temperature": self.temperature}

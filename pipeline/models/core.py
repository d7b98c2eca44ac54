"""The block abstraction: a Keras layer that can be connected to other blocks.

A ``Block`` passes either a tensor or a dict of named tensors (one per feature) to the next block.
The connect methods build the graph the way Merlin Models' tutorial does:

- ``a.connect(b, c)``: ``SequentialBlock([a, b, c])``, the output of the last block;
- ``a.connect_branch(b, c)``: ``b`` and ``c`` both applied to ``a``'s output, merged into one dict;
- ``a.connect_with_shortcut(b, shortcut_filter=Filter("x"), aggregation="concat")``: ``b``'s output
  next to (a filtered part of) ``a``'s output, optionally aggregated;
- ``a.connect_with_residual(b)``: ``a``'s output plus ``b`` applied to it.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import keras

PACKAGE = "pipeline"


def register(cls):
    """Register a layer for Keras saving under the ``pipeline`` package (no custom_objects needed)."""
    return keras.saving.register_keras_serializable(package=PACKAGE)(cls)


def serialize(layer: keras.layers.Layer | None) -> dict | None:
    return None if layer is None else keras.saving.serialize_keras_object(layer)


def deserialize(config: dict | None) -> keras.layers.Layer | None:
    return None if config is None else keras.saving.deserialize_keras_object(config)


@register
class Block(keras.layers.Layer):
    """Base class of every block: a Keras layer with the tutorial's connect methods.

    Args:
        Those of a Keras layer (``name``, ``dtype``, ``trainable``).

    Example:
        >>> body = ContinuousFeatures(["TE_userId_rating", "TE_movieId_rating"]).connect(MLPBlock([4]))
        >>> tuple(body(batch).shape)
        (5, 4)
    """

    def connect(self, *blocks: keras.layers.Layer, **kwargs) -> "SequentialBlock":
        """This block followed by ``blocks``; returns the sequence (its output is the last block's)."""
        return SequentialBlock([self, *blocks], **kwargs)

    def connect_branch(self, *branches: keras.layers.Layer, aggregation=None, **kwargs) -> "SequentialBlock":
        """This block, then every branch applied to its output; the branch outputs merged into one dict
        (or aggregated, e.g. ``aggregation="concat"``)."""
        return SequentialBlock([self, ParallelBlock(list(branches), aggregation=aggregation)], **kwargs)

    def connect_with_shortcut(
        self,
        block: keras.layers.Layer,
        shortcut_filter: "Filter | None" = None,
        aggregation=None,
        block_outputs_name: str | None = None,
        **kwargs,
    ) -> "SequentialBlock":
        """This block, then ``block`` applied to its output, next to a skip connection of the output
        (all of it, or the part ``shortcut_filter`` keeps); merged as a dict or aggregated."""
        shortcut = shortcut_filter if shortcut_filter is not None else Identity()
        name = block_outputs_name or block.name
        return SequentialBlock(
            [self, ParallelBlock({"shortcut": shortcut, name: block}, aggregation=aggregation)], **kwargs
        )

    def connect_with_residual(self, block: keras.layers.Layer, **kwargs) -> "SequentialBlock":
        """This block, then ``output + block(output)`` (shapes must match)."""
        return SequentialBlock([self, ResidualBlock(block)], **kwargs)

    def build_from_config(self, config: dict) -> None:
        # Blocks create their weights when first called; on loading, ``Model.build_from_config``
        # runs a dummy batch through the whole model, which builds every block in order.
        return None

    def input_feature_names(self) -> list[str]:
        """Raw input features this block (and every block inside it) reads, in first-seen order."""
        return input_feature_names(self)


@register
class Identity(Block):
    """Returns its input unchanged.

    Args:
        None beyond a Keras layer's (``name``, ``dtype``).

    Example:
        >>> tuple(Identity()(np.ones((2, 3))).shape)
        (2, 3)
    """

    def call(self, inputs):
        return inputs


@register
class SequentialBlock(Block):
    """Applies ``layers`` one after the other. Output: the last layer's output.

    Args:
        layers: the layers, applied in order.

    Example:
        >>> block = SequentialBlock([ContinuousFeatures(["TE_userId_rating"]), MLPBlock([8, 4])])
        >>> tuple(block(batch).shape)
        (5, 4)
    """

    def __init__(self, layers: Iterable[keras.layers.Layer], **kwargs):
        super().__init__(**kwargs)
        self.layers = list(layers)

    def call(self, inputs, training=None):
        x = inputs
        for layer in self.layers:
            x = _call(layer, x, training)
        return x

    def get_config(self) -> dict:
        return {**super().get_config(), "layers": [serialize(layer) for layer in self.layers]}

    @classmethod
    def from_config(cls, config: dict):
        config = dict(config)
        config["layers"] = [deserialize(c) for c in config["layers"]]
        return cls(**config)


@register
class ParallelBlock(Block):
    """Applies every branch to the same input and merges the outputs into one dict.

    A branch that returns a dict contributes its entries (e.g. one embedding per feature); a branch
    that returns a tensor is stored under the branch's name. ``aggregation`` ("concat", "stack",
    "sum", or a block) then turns the dict into one tensor.

    Args:
        branches: a dict name -> layer, or a list (named by each layer's ``name``).
        aggregation: optional aggregation applied to the merged dict.

    Example:
        >>> block = ParallelBlock({"embeddings": EmbeddingFeatures.from_schema(schema.select_by_name(["userId"]), 8),
        ...                        "deep": ContinuousFeatures(["TE_userId_rating"]).connect(MLPBlock([4]))})
        >>> {k: tuple(v.shape) for k, v in block(batch).items()}
        {'userId': (5, 8), 'deep': (5, 4)}
    """

    def __init__(self, branches: Mapping[str, keras.layers.Layer] | Iterable[keras.layers.Layer], aggregation=None,
                 **kwargs):
        super().__init__(**kwargs)
        if not isinstance(branches, Mapping):
            branches = {layer.name: layer for layer in branches}
        self.branch_names = list(branches)
        self.branches = [branches[name] for name in self.branch_names]
        from pipeline.models.aggregations import aggregation_from

        self.aggregation = aggregation_from(aggregation)

    def call(self, inputs, training=None):
        merged: dict[str, Any] = {}
        for name, branch in zip(self.branch_names, self.branches):
            out = _call(branch, inputs, training)
            entries = out.items() if isinstance(out, Mapping) else [(name, out)]
            for key, value in entries:
                if key in merged:
                    raise ValueError(f"ParallelBlock: two branches both output {key!r}")
                merged[key] = value
        if self.aggregation is not None:
            return self.aggregation(merged)
        return merged

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "branches": {n: serialize(b) for n, b in zip(self.branch_names, self.branches)},
            "aggregation": serialize(self.aggregation),
        }

    @classmethod
    def from_config(cls, config: dict):
        config = dict(config)
        config["branches"] = {n: deserialize(c) for n, c in config["branches"].items()}
        config["aggregation"] = deserialize(config["aggregation"])
        return cls(**config)


@register
class Filter(Block):
    """Keeps the named entries of a dict of tensors. ``Filter("x")`` or ``Filter(["a", "b"])``.

    Returns a dict with only those keys (those present in the input).

    Args:
        names: the key, or keys, kept.

    Example:
        >>> sorted(Filter(["a"])({"a": np.ones((2, 1)), "b": np.ones((2, 1))}))
        ['a']
    """

    def __init__(self, names: str | Iterable[str], **kwargs):
        super().__init__(**kwargs)
        self.names = [names] if isinstance(names, str) else list(names)

    @classmethod
    def from_schema(cls, schema, **kwargs) -> "Filter":
        """Keep the columns of a merlin ``Schema``."""
        return cls(schema.column_names, **kwargs)

    def call(self, inputs):
        return {name: inputs[name] for name in self.names if name in inputs}

    def get_config(self) -> dict:
        return {**super().get_config(), "names": self.names}


@register
class ResidualBlock(Block):
    """``inputs + layer(inputs)``.

    Args:
        layer: the layer whose output is added to its input (same shape).

    Example:
        >>> ResidualBlock(Identity())(np.ones((1, 2))).numpy().tolist()
        [[2.0, 2.0]]
    """

    def __init__(self, layer: keras.layers.Layer, **kwargs):
        super().__init__(**kwargs)
        self.layer = layer

    def call(self, inputs, training=None):
        out = _call(self.layer, inputs, training)
        if isinstance(inputs, Mapping):
            return {k: inputs[k] + out[k] for k in inputs}
        return inputs + out

    def get_config(self) -> dict:
        return {**super().get_config(), "layer": serialize(self.layer)}

    @classmethod
    def from_config(cls, config: dict):
        config = dict(config)
        config["layer"] = deserialize(config["layer"])
        return cls(**config)


def _call(layer: keras.layers.Layer, inputs, training):
    # Keras 3 hands `training` down to nested layers through its call context; pass it explicitly
    # only to layers that declare it.
    if getattr(layer, "_call_has_training_arg", False):
        return layer(inputs, training=training)
    return layer(inputs)


def input_feature_names(layer: keras.layers.Layer) -> list[str]:
    """Raw input features read by ``layer`` and every layer inside it (their ``feature_names``), first-seen order."""
    names: list[str] = []
    for sub in layer._flatten_layers(include_self=True, recursive=True):
        for name in getattr(sub, "feature_names", ()):
            if name not in names:
                names.append(name)
    return names

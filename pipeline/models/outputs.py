"""Prediction heads. Several heads on one model = multi-task (one output per target)."""

from __future__ import annotations

import keras
from merlin.schema import Schema, Tags

from pipeline.errors import DataError
from pipeline.models.core import Block, deserialize, register, serialize


@register
class OutputBlock(Block):
    """Base head: ``(batch, d)`` -> ``(batch, units)`` predictions for column ``target``.

    ``pre`` (e.g. ``LogitsTemperatureScaler(2)``) is applied to the logits before the activation.

    Args:
        target: the target column the head predicts (the name of its output).
        pre: a layer applied to the logits before the activation.
        units: output width (subclasses set it).

    Example:
        >>> head = RegressionOutput("rating")  # OutputBlock is the base of the heads
        >>> tuple(head(np.ones((5, 8))).shape)
        (5, 1)
    """

    units = 1
    activation = None

    def __init__(self, target: str, pre: keras.layers.Layer | None = None, *, units: int | None = None, **kwargs):
        kwargs.setdefault("name", f"{target}_output")
        super().__init__(**kwargs)
        self.target = target
        self.pre = pre
        self.dense = keras.layers.Dense(units or self.units, name=f"{target}_logits")

    def call(self, inputs):
        logits = self.dense(inputs)
        if self.pre is not None:
            logits = self.pre(logits)
        return keras.activations.get(self.activation)(logits) if self.activation else logits

    def default_loss(self):
        raise NotImplementedError

    def default_metrics(self) -> list:
        return []

    def get_config(self) -> dict:
        return {**super().get_config(), "target": self.target, "pre": serialize(self.pre)}

    @classmethod
    def from_config(cls, config: dict):
        config = dict(config)
        config["pre"] = deserialize(config.get("pre"))
        return cls(**config)


@register
class BinaryOutput(OutputBlock):
    """P(target = 1): ``(batch, d)`` -> ``(batch, 1)`` in [0, 1]. Loss: binary cross-entropy.

    Args:
        target: the binary target column (0/1).
        pre: a layer applied to the logits before the sigmoid, e.g. ``LogitsTemperatureScaler(2)``.

    Example:
        >>> head = BinaryOutput("rating_binary", pre=LogitsTemperatureScaler(2.0))
        >>> p = head(np.ones((5, 8)))
        >>> tuple(p.shape), bool(ops.all((p > 0) & (p < 1)))
        ((5, 1), True)
    """

    activation = "sigmoid"

    def default_loss(self):
        return keras.losses.BinaryCrossentropy()

    def default_metrics(self) -> list:
        return [
            keras.metrics.AUC(name="auc"),
            keras.metrics.BinaryCrossentropy(name="logloss"),
            keras.metrics.BinaryAccuracy(name="accuracy"),
        ]


@register
class RegressionOutput(OutputBlock):
    """A real value: ``(batch, d)`` -> ``(batch, 1)``. Loss: mean squared error.

    Args:
        target: the real-valued target column.
        pre: a layer applied to the prediction (e.g. a scaler).

    Example:
        >>> tuple(RegressionOutput("rating")(np.ones((5, 8))).shape)
        (5, 1)
    """

    def default_loss(self):
        return keras.losses.MeanSquaredError()

    def default_metrics(self) -> list:
        return [keras.metrics.RootMeanSquaredError(name="rmse")]


@register
class CategoricalOutput(OutputBlock):
    """Class probabilities: ``(batch, d)`` -> ``(batch, num_classes)`` (softmax).

    Targets are class ids. Loss: sparse categorical cross-entropy.

    Args:
        target: the target column of class ids.
        num_classes: number of classes (``from_schema`` reads the column's cardinality).
        pre: a layer applied to the logits before the softmax.

    Example:
        >>> p = CategoricalOutput("genre", num_classes=7)(np.ones((5, 8)))
        >>> tuple(p.shape), np.allclose(ops.sum(p, axis=1), 1.0)
        ((5, 7), True)
    """

    activation = "softmax"

    def __init__(self, target: str, num_classes: int, pre=None, **kwargs):
        super().__init__(target, pre=pre, units=int(num_classes), **kwargs)
        self.num_classes = int(num_classes)

    @classmethod
    def from_schema(cls, schema: Schema, target: str, **kwargs) -> "CategoricalOutput":
        from pipeline.models.features import cardinality

        return cls(target, num_classes=cardinality(schema[target]), **kwargs)

    def default_loss(self):
        return keras.losses.SparseCategoricalCrossentropy()

    def default_metrics(self) -> list:
        return [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]

    def get_config(self) -> dict:
        config = {**super().get_config(), "num_classes": self.num_classes}
        return config


def outputs_from_schema(schema: Schema, targets: list[str] | None = None) -> list[OutputBlock]:
    """One head per target column (tag TARGET, or the ``targets`` named): BINARY_CLASSIFICATION ->
    BinaryOutput, REGRESSION -> RegressionOutput, MULTI_CLASS_CLASSIFICATION -> CategoricalOutput."""
    target_schema = schema.select_by_tag(Tags.TARGET)
    names = target_schema.column_names if targets is None else list(targets)
    if not names:
        raise DataError(f"the schema has no target column (no column tagged 'target'; columns: {schema.column_names})")
    heads = []
    for name in names:
        if name not in schema.column_names:
            raise DataError(f"target {name!r} is not in the schema (columns: {schema.column_names})")
        tags = schema[name].tags
        if Tags.BINARY_CLASSIFICATION in tags:
            heads.append(BinaryOutput(name))
        elif Tags.REGRESSION in tags:
            heads.append(RegressionOutput(name))
        elif Tags.MULTI_CLASS_CLASSIFICATION in tags:
            heads.append(CategoricalOutput.from_schema(schema, name))
        else:
            raise DataError(
                f"target {name!r} has no task tag (binary_classification, regression or multi_class_classification)"
            )
    return heads


def heads_from(schema: Schema, prediction_tasks: "OutputBlock | list[OutputBlock] | None") -> list[OutputBlock]:
    """The heads of a prebuilt model: ``prediction_tasks`` as a list, by default one per target of ``schema``."""
    if prediction_tasks is None:
        return outputs_from_schema(schema)
    if isinstance(prediction_tasks, OutputBlock):
        return [prediction_tasks]
    return list(prediction_tasks)

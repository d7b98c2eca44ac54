"""``Model(block, *outputs)``: a Keras model whose fit / evaluate / predict take a merlin Dataset.

As in Merlin Models, ``model.fit(train, batch_size=1024)`` streams ``train`` (a
``merlin.io.Dataset`` over parquet) through ``pipeline.loader.Loader``; a ``Loader`` or any input
Keras accepts works too. One output returns ``(batch, units)``; several (multi-task) return
``{target: (batch, units)}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import keras
import numpy as np
from merlin.io import Dataset
from merlin.schema import Schema

from pipeline.errors import DataError, UsageError
from pipeline.loader import Loader
from pipeline.models.core import deserialize, input_feature_names, register, serialize
from pipeline.models.features import ContinuousFeatures, EmbeddingFeatures, SequenceEmbeddingFeatures
from pipeline.models.outputs import OutputBlock

SAVED_MODEL_FILE = "model.keras"  # inside a directory written by Model.save(path_without_extension)
# Training steps per tf.function call (Keras' steps_per_execution) unless compile() is given one: Keras runs
# them in one graph loop, saving the per-step Python and callback dispatch. Measured on synthetic ML-1M,
# batch 1024, 2 cores (benchmarks/results/train.md): epoch 2-3 samples/s ~1.3x of 1 step per call, the
# same batches and weights (valid AUC equal to 4 decimals); 32 is no better than 8. predict() keeps 1 step
# per call: Keras gathers a predict execution's batches in Python and re-traces for the last, shorter group.
STEPS_PER_EXECUTION = 8


@register
class Model(keras.Model):
    """``block`` (inputs -> hidden ``(batch, d)``) followed by one head per target.

    Args:
        block: the body, e.g. an ``InputBlock`` connected to an ``MLPBlock``.
        *outputs: ``BinaryOutput``, ``RegressionOutput``, ``CategoricalOutput`` heads.

    Example:
        >>> model = Model(InputBlock(schema, 8).connect(MLPBlock([16])), BinaryOutput("rating_binary"))
        >>> model.compile(optimizer="adam")
        >>> tuple(model(batch).shape)  # one head: a tensor, not a dict
        (5, 1)
    """

    def __init__(self, block: keras.layers.Layer, *outputs: OutputBlock, **kwargs):
        super().__init__(**kwargs)
        if not outputs:
            raise ValueError("Model needs at least one output head, e.g. BinaryOutput('rating_binary')")
        targets = [o.target for o in outputs]
        if len(set(targets)) != len(targets):
            raise ValueError(f"two output heads predict the same target: {targets}")
        self.block = block
        self.heads = list(outputs)
        self._input_spec_record: dict[str, tuple[list, str]] | None = None

    # ----------------------------------------------------------------- structure
    @property
    def target_names(self) -> list[str]:
        return [head.target for head in self.heads]

    def input_feature_names(self) -> list[str]:
        """The raw feature columns the model reads (from its embedding and continuous blocks)."""
        return input_feature_names(self.block)

    def call(self, inputs, training=None):
        if self._input_spec_record is None and isinstance(inputs, Mapping):
            self._input_spec_record = {
                name: ([None, *[int(d) for d in tensor.shape[1:]]], keras.backend.standardize_dtype(tensor.dtype))
                for name, tensor in inputs.items()
            }
        hidden = self.block(inputs, training=training)
        predictions = {head.target: head(hidden) for head in self.heads}
        if len(self.heads) == 1:
            return predictions[self.heads[0].target]
        return predictions

    def input_signature(self):
        """``{name: tf.TensorSpec}`` of the batches the model was built on (for ``model.export``)."""
        import tensorflow as tf

        if not self._input_spec_record:
            raise ValueError("the model has not been called on data yet")
        return {
            name: tf.TensorSpec(shape, dtype=dtype, name=name)
            for name, (shape, dtype) in self._input_spec_record.items()
            if name in self.input_feature_names()
        }

    def get_build_config(self) -> dict:
        return {"input_spec": self._input_spec_record}

    def build_from_config(self, config: dict) -> None:
        # Layers inside blocks create their weights when first called: run a one-row dummy batch.
        spec = config.get("input_spec")
        if not spec:
            return
        dummy = {
            name: np.zeros([1 if d is None else d for d in shape], dtype=dtype) for name, (shape, dtype) in spec.items()
        }
        self(dummy)

    def get_config(self) -> dict:
        return {
            "name": self.name,
            "block": serialize(self.block),
            "outputs": [serialize(head) for head in self.heads],
        }

    @classmethod
    def from_config(cls, config: dict):
        config = dict(config)
        block = deserialize(config.pop("block"))
        outputs = [deserialize(c) for c in config.pop("outputs")]
        return cls(block, *outputs, **config)

    # ----------------------------------------------------------------- saving
    def save(self, filepath, overwrite: bool = True, **kwargs) -> None:
        """Keras ``save`` to a ``.keras`` file, or, for a path without that extension (as Merlin's
        tutorials write ``model.save(os.path.join(DATA_FOLDER, "custom_dlrm"))``), a directory holding
        ``model.keras`` and ``saved_model/`` (``model.export``, for TF Serving / Triton), built beside it
        and renamed into place. ``load_model`` reads either. An existing directory is replaced only if it
        is such a saved model (and ``overwrite``)."""
        path = Path(filepath)
        if path.suffix in (".keras", ".h5"):
            return super().save(filepath, overwrite=overwrite, **kwargs)
        from pipeline.atomic import atomic_dir

        if path.exists() and not (overwrite and (path / SAVED_MODEL_FILE).is_file()):
            raise UsageError(f"{path} exists and is not a model directory written by Model.save"
                             f"{'' if overwrite else ' (and overwrite=False)'}: refusing to replace it")
        with atomic_dir(path) as tmp:
            super().save(tmp / SAVED_MODEL_FILE, **kwargs)
            self.export(str(tmp / "saved_model"), format="tf_saved_model", input_signature=[self.input_signature()],
                        verbose=False)

    def export(self, filepath, format="tf_saved_model", verbose=None, input_signature=None, **kwargs):
        """Keras ``export``; a ``tf_saved_model`` is written by ``tf.saved_model.save`` of one ``serve`` function
        (also the ``serving_default`` signature, the names Keras' export gives them), traced once, with the
        model's variables.

        Keras' ``ExportArchive`` traces the model's call more than once and walks every layer for lookup tables;
        measured on real ML-100K's DLRM: 1.1-1.5 s vs 1.5-1.8 s, the same scores and signatures. A model whose
        function captures anything else (a lookup table) goes to Keras' export, as any other format or option.
        """
        if format != "tf_saved_model" or kwargs or input_signature is None:
            return super().export(filepath, format=format, verbose=verbose, input_signature=input_signature, **kwargs)
        import tensorflow as tf

        (spec,) = input_signature
        root = tf.__internal__.tracking.AutoTrackable()  # what Keras' archive saves: the variables and `serve`
        root.variables = list(self.variables)
        root.trainable_variables = list(self.trainable_variables)
        root.non_trainable_variables = list(self.non_trainable_variables)

        @tf.function(input_signature=[spec], autograph=False)
        def serve(inputs):
            return self(inputs, training=False)

        root.serve = serve
        concrete = serve.get_concrete_function()
        tracked = {id(v.value.handle) for v in root.variables}
        if any(id(t) not in tracked for t in concrete.captured_inputs if t.dtype == tf.resource):
            return super().export(filepath, format=format, verbose=verbose, input_signature=input_signature)
        tf.saved_model.save(root, str(filepath), signatures={"serve": concrete, "serving_default": concrete})

    # ----------------------------------------------------------------- training
    def compile(self, optimizer="adam", loss=None, metrics=None, **kwargs):
        """Keras ``compile`` with each head's loss (and metrics: AUC, logloss, accuracy for binary
        heads, RMSE for regression) as defaults."""
        single = len(self.heads) == 1
        if loss is None:
            loss = self.heads[0].default_loss() if single else {h.target: h.default_loss() for h in self.heads}
        if metrics is None:
            metrics = self.heads[0].default_metrics() if single else {h.target: h.default_metrics() for h in self.heads}
        elif not single and isinstance(metrics, (list, tuple)):
            # Keras wants per-output metrics for dict outputs: the list goes (as copies) to the heads of
            # the first head's kind (e.g. AUC to binary heads); the other heads keep their defaults.
            kind = type(self.heads[0])
            metrics = {
                h.target: [keras.metrics.deserialize(keras.metrics.serialize(m)) if not isinstance(m, str) else m
                           for m in metrics] if type(h) is kind else h.default_metrics()
                for h in self.heads
            }
        kwargs.setdefault("steps_per_execution", STEPS_PER_EXECUTION)
        return super().compile(optimizer=optimizer, loss=loss, metrics=metrics, **kwargs)

    def compile_from_config(self, config: dict) -> None:
        # Keras skips compile() on load when compile is overridden; ours only fills defaults, so replay it.
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def check_schema(self, schema: Schema) -> None:
        """Raise ``DataError`` if ``schema`` lacks a feature or target the model reads, or has the wrong kind."""
        missing = [n for n in [*self.input_feature_names(), *self.target_names] if n not in schema.column_names]
        if missing:
            raise DataError(f"the data has no column(s) {missing} that the model reads (it has {schema.column_names})")
        for layer in self._flatten_layers(include_self=False, recursive=True):
            if isinstance(layer, (EmbeddingFeatures, SequenceEmbeddingFeatures)):
                for name in layer.feature_names:
                    col = schema[name]
                    if col.dtype.element_type.value != "int":
                        raise DataError(f"column {name!r} feeds an embedding table but has dtype {col.dtype.name}, "
                                        "not an integer id")
            elif isinstance(layer, ContinuousFeatures):
                for name in layer.feature_names:
                    col = schema[name]
                    if col.dtype.element_type.value not in ("float", "int"):
                        raise DataError(f"column {name!r} is continuous for the model but has dtype {col.dtype.name}")
        for name in self.target_names:
            if schema[name].dtype.element_type.value not in ("float", "int"):
                raise DataError(f"target {name!r} has dtype {schema[name].dtype.name}, not numeric")

    def make_loader(self, dataset: Dataset, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                    include_targets: bool = True, **kwargs) -> Loader:
        """A ``Loader`` over ``dataset`` that yields exactly the columns this model reads."""
        if batch_size is None:
            raise ValueError("batch_size is required when passing a merlin Dataset")
        self.check_schema(dataset.schema if include_targets else _with_targets(dataset.schema, self.target_names))
        return Loader(
            dataset,
            batch_size,
            shuffle=shuffle,
            seed=seed,
            features=self.input_feature_names() or None,
            targets=self.target_names if include_targets else [],
            include_targets=include_targets,
            **kwargs,
        )

    def fit(self, x=None, y=None, batch_size=None, epochs=1, *, shuffle=True, seed: int = 0,
            validation_data=None, validation_batch_size=None, callbacks=None, initial_epoch=0, **kwargs):
        """Keras ``fit``; ``x`` may be a ``merlin.io.Dataset`` (streamed in ``batch_size`` batches,
        reshuffled every epoch from ``seed``) and so may ``validation_data``. An in-memory ``Loader``
        (or streamed chunk by chunk: ``loader.has_tf_dataset``) is fed as its ``tf_dataset``: the same batches,
        epoch for epoch."""
        if isinstance(x, Dataset):
            x = self.make_loader(x, batch_size, shuffle=shuffle, seed=seed)
        if isinstance(validation_data, Dataset):
            validation_data = self.make_loader(validation_data, validation_batch_size or batch_size or 1024)
        callbacks = list(callbacks or [])
        if isinstance(x, Loader) and x.has_tf_dataset:
            pass_epochs = _LoaderEpochs(x, initial_epoch)
            x = x.tf_dataset(pass_epochs.epoch)
            callbacks.insert(0, pass_epochs)  # first: it sets the epoch before the epoch's iterator starts
        validation_data = _as_keras_input(validation_data)
        if isinstance(x, (keras.utils.PyDataset, _tf_dataset_type())):
            # The loader shuffles itself (Keras would shuffle batch indices, which a streaming loader
            # cannot serve) and fixes the batch size.
            batch_size, shuffle = None, False
            self.build_training_state(x)
        return super().fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=shuffle,
                           validation_data=validation_data, callbacks=callbacks, initial_epoch=initial_epoch, **kwargs)

    def build_training_state(self, data) -> None:
        """Create the optimizer's slots and the loss and metric trackers now, from one batch of ``data`` (a
        ``tf.data.Dataset`` or a ``Loader``), unless they exist.

        Without a distribution strategy Keras creates them while tracing the first train (or test) step, and
        a ``tf.function`` whose first trace creates variables is traced a second time: measured on real
        ML-100K, the train step's first trace 7.2-7.9 s then a second one 2.4-3.4 s, all in epoch 1. Built
        here (all zeros, no random draw), the step is traced once; the trained weights are the same.
        """
        if not getattr(self, "compiled", False):
            return  # Keras' fit / evaluate say what is missing
        if type(self).train_step is not keras.Model.train_step or type(self).test_step is not keras.Model.test_step:
            # a model with its own steps (TwoTower: the towers, never the model's call) builds as it always did:
            # a symbolic call here could build its layers in another order, i.e. draw other initial weights
            return
        optimizer = getattr(self, "optimizer", None)
        pending = [getattr(self, "_compile_loss", None), getattr(self, "_compile_metrics", None)]
        if not any(p is not None and not p.built for p in pending) and (optimizer is None or optimizer.built):
            return
        spec = getattr(data, "element_spec", None)
        if spec is None:  # a Loader: its first batch (kept, and replayed to Keras)
            if not isinstance(data, keras.utils.PyDataset) or not len(data):
                return
            spec = data[0]
        self._symbolic_build(data_batch=spec)

    def evaluate(self, x=None, y=None, batch_size=None, **kwargs):
        """Keras ``evaluate``; ``x`` may be a ``merlin.io.Dataset``."""
        if isinstance(x, Dataset):
            x = self.make_loader(x, batch_size)
        x = _as_keras_input(x)
        if isinstance(x, (keras.utils.PyDataset, _tf_dataset_type())):
            batch_size = None
            self.build_training_state(x)
        return super().evaluate(x, y, batch_size=batch_size, **kwargs)

    def predict(self, x, batch_size=None, **kwargs):
        """Keras ``predict``; ``x`` may be a ``merlin.io.Dataset`` (targets not needed). Rows come back
        in dataset order."""
        if isinstance(x, Dataset):
            x = self.make_loader(x, batch_size, include_targets=False)
        x = _as_keras_input(x)
        if isinstance(x, (keras.utils.PyDataset, _tf_dataset_type())):
            batch_size = None
        steps = getattr(self, "steps_per_execution", 1) or 1
        if steps == 1:
            return super().predict(x, batch_size=batch_size, **kwargs)
        # one step per call (see STEPS_PER_EXECUTION), with its own traced function kept for the next call
        multi_step = self.predict_function
        self.steps_per_execution, self.predict_function = 1, getattr(self, "_single_step_predict", None)
        try:
            return super().predict(x, batch_size=batch_size, **kwargs)
        finally:
            self._single_step_predict = self.predict_function
            self.steps_per_execution, self.predict_function = steps, multi_step


def _tf_dataset_type():
    import tensorflow as tf

    return tf.data.Dataset


def _as_keras_input(x):
    """An in-memory ``Loader`` as its ``tf.data`` pipeline (each iterator reads the loader's next pass);
    anything else unchanged."""
    if isinstance(x, Loader) and x.has_tf_dataset:
        return x.tf_dataset()
    return x


class _LoaderEpochs(keras.callbacks.Callback):
    """Keeps an in-memory Loader's epoch count while Keras reads its ``tf_dataset``: Keras starts a new
    iterator for every epoch (after ``on_epoch_begin``), and the iterator reads the epoch set here, so
    the shuffles follow the epochs as with ``loader[i]`` (and a run resumed at ``initial_epoch`` with
    ``first_epoch=initial_epoch`` reads what the uninterrupted run read)."""

    def __init__(self, loader: Loader, initial_epoch: int):
        super().__init__()
        self.loader = loader
        self.base = loader.next_epoch() - int(initial_epoch)
        self.current = loader.next_epoch()  # also what Keras' model-building peek at the first batch reads

    def epoch(self) -> int:
        return self.current

    def on_epoch_begin(self, epoch, logs=None):
        self.current = self.base + int(epoch)

    def on_epoch_end(self, epoch, logs=None):
        self.loader._passes_done(self.base + int(epoch))


def _with_targets(schema: Schema, targets: list[str]) -> Schema:
    # For predict, targets may be absent from the data: check features only.
    from merlin.schema import ColumnSchema

    present = set(schema.column_names)
    extra = [ColumnSchema(t, dtype="float32") for t in targets if t not in present]
    return schema + Schema(extra) if extra else schema


def sample_batch(dataset: Dataset, batch_size: int, shuffle: bool = False, include_targets: bool = True, seed: int = 0):
    """The first batch of ``dataset``: ``(features, targets)`` (or ``features`` without targets),
    features as ``{name: (batch_size, 1)}`` / ``(batch_size, max_len)`` for list columns."""
    # one batch: streaming reads one chunk, where the in-memory path would read the whole split first
    loader = Loader(dataset, batch_size, shuffle=shuffle, seed=seed, include_targets=include_targets, mode="stream")
    try:
        return loader[0]
    finally:
        loader.stop()

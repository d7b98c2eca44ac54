"""Block-library fixtures: the shared layer round-trip check (Keras' ``run_layer_test``) that every layer test
uses, on the tiny in-memory schema and batch of tests/conftest.py (``tiny_schema``, ``tiny_batch``). No ETL."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import pipeline  # noqa: F401  (dask settings before merlin)


@keras.saving.register_keras_serializable(package="tests")
class LayerModel(keras.Model):
    """A one-layer model, so a lone layer can go through a ``.keras`` file."""

    def __init__(self, layer, **kwargs):
        super().__init__(**kwargs)
        self.layer = layer

    def call(self, inputs, training=False):
        self._recorded_inputs = _spec(inputs)
        return self.layer(inputs, training=training)

    def get_build_config(self):
        return {"input_spec": self._recorded_inputs}

    def build_from_config(self, config):
        # blocks create their weights when first called: one batch of zeros shaped as the saved inputs
        self(_zeros(config["input_spec"]))

    def get_config(self):
        return {**super().get_config(), "layer": keras.saving.serialize_keras_object(self.layer)}

    @classmethod
    def from_config(cls, config):
        return cls(keras.saving.deserialize_keras_object(config.pop("layer")), **config)


def _spec(inputs):
    """``[shape, dtype]`` of every array in ``inputs`` (a dict, list or one array), kept for reloading."""
    if isinstance(inputs, dict):
        return {name: _spec(value) for name, value in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return [_spec(value) for value in inputs]
    return [[int(d) for d in inputs.shape], keras.backend.standardize_dtype(inputs.dtype)]


def _zeros(spec):
    """Zeros shaped as ``LayerModel``'s recorded inputs: ``[shape, dtype]`` leaves in a dict, list or alone."""
    if isinstance(spec, dict):
        return {name: _zeros(value) for name, value in spec.items()}
    if isinstance(spec, list) and len(spec) == 2 and isinstance(spec[1], str):
        return np.zeros(spec[0], dtype=spec[1])
    return [_zeros(value) for value in spec]


def _numpy(outputs):
    return keras.tree.map_structure(lambda x: np.asarray(keras.ops.convert_to_numpy(x)), outputs)


def _assert_same(actual, expected):
    keras.tree.assert_same_structure(actual, expected)
    for a, e in zip(keras.tree.flatten(actual), keras.tree.flatten(expected)):
        np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-6)


def _round_trip(layer, inputs, tmp_dir) -> dict:
    """Keras' ``run_layer_test`` for our layers: call ``layer`` on ``inputs``; rebuild it from its
    ``get_config`` (same class, same config again, same outputs with the same weights); save it in a
    ``.keras`` file and load it back (same outputs). Returns the layer's outputs as numpy."""
    config = keras.saving.serialize_keras_object(layer)  # before the first call, as a user's config is
    clone = keras.saving.deserialize_keras_object(config)
    assert type(clone) is type(layer)
    assert keras.saving.serialize_keras_object(clone)["config"] == config["config"]
    expected = _numpy(layer(inputs))
    clone(inputs)
    clone.set_weights(layer.get_weights())
    _assert_same(_numpy(clone(inputs)), expected)

    path = tmp_dir / f"{type(layer).__name__}.keras"
    wrapped = LayerModel(layer)
    wrapped(inputs)
    wrapped.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded.layer) is type(layer)
    _assert_same(_numpy(loaded(inputs)), expected)
    return expected


@pytest.fixture()
def round_trip(tmp_path):
    """``round_trip(layer, inputs)``: the shared layer check (config, save/load, same outputs); returns the
    outputs."""
    return lambda layer, inputs: _round_trip(layer, inputs, tmp_path)


@pytest.fixture
def ranking_model_check(tiny_batch, tmp_path):
    """``check(model)`` for a ranking model built from ``tiny_schema``: one ``(5, 1)`` output per target
    (``rating_binary`` first, a probability), and the same scores after a ``.keras`` save and reload."""
    import pipeline.models as mm

    def check(model) -> None:
        scores = {k: np.asarray(v) for k, v in model(tiny_batch).items()}
        assert model.target_names == ["rating_binary", "rating"]
        assert {k: v.shape for k, v in scores.items()} == {"rating_binary": (5, 1), "rating": (5, 1)}
        assert ((scores["rating_binary"] > 0) & (scores["rating_binary"] < 1)).all()
        model.save(tmp_path / "model.keras")
        reloaded = mm.load_model(tmp_path / "model.keras")
        for target, values in reloaded(tiny_batch).items():
            np.testing.assert_allclose(np.asarray(values), scores[target], rtol=1e-6, atol=1e-6)

    return check

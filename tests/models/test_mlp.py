"""pipeline/models/mlp.py: MLPBlock's options build the layers they name; it round-trips."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import pipeline  # noqa: F401
import pipeline.models as mm


def test_mlp_options_build_the_layers_they_name():
    mlp = mm.MLPBlock([8, 4], dropout=0.5, normalization="batch_norm", kernel_regularizer="l2")
    x = np.ones((6, 3), dtype="float32")
    out = mlp(x, training=True)
    assert out.shape == (6, 4)
    assert len(mlp.losses) == 2  # one L2 penalty per kernel
    assert sum(isinstance(layer, keras.layers.BatchNormalization) for layer in mlp._flatten_layers()) == 2
    # dropout is active in training only
    np.testing.assert_array_equal(mlp(x, training=False).numpy(), mlp(x, training=False).numpy())


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="at least one layer width"):
        mm.MLPBlock([])
    with pytest.raises(ValueError, match="normalization must be None or 'batch_norm'"):
        mm.MLPBlock([4], normalization="layer")


def test_mlp_round_trips(round_trip):
    round_trip(mm.MLPBlock([8, 4], dropout=0.1, normalization="batch_norm", kernel_regularizer="l2",
                           no_activation_last_layer=True), np.ones((6, 3), dtype="float32"))

"""pipeline/models/transforms.py: L2Norm, LogitsTemperatureScaler, ToDense; every one round-trips."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import pipeline  # noqa: F401
import pipeline.models as mm

A = np.array([[3.0, 4.0]], dtype="float32")


def test_transformations():
    a = keras.ops.convert_to_tensor(A)
    np.testing.assert_allclose(mm.L2Norm()(a).numpy(), [[0.6, 0.8]], rtol=1e-6)
    np.testing.assert_allclose(mm.LogitsTemperatureScaler(2.0)(a).numpy(), [[1.5, 2.0]])
    assert mm.AsDenseFeatures is mm.ToDense
    assert mm.ToDense()({"x": keras.ops.ones((4,))})["x"].shape == (4, 1)


def test_a_temperature_must_be_positive():
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        mm.LogitsTemperatureScaler(0)


@pytest.mark.parametrize("layer", [mm.L2Norm(axis=1), mm.LogitsTemperatureScaler(3.0)],
                         ids=lambda layer: type(layer).__name__)
def test_every_transform_round_trips(layer, round_trip):
    round_trip(layer, A)


def test_to_dense_round_trips(round_trip):
    round_trip(mm.ToDense(), {"x": np.ones((4,), dtype="float32"), "y": np.ones((4, 1), dtype="float32")})

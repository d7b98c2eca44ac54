"""pipeline/models/aggregations.py: concat / stack / sum / cosine of a dict of tensors; every one round-trips."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import pipeline  # noqa: F401
import pipeline.models as mm
from pipeline.models.aggregations import aggregation_from

A = np.array([[3.0, 4.0]], dtype="float32")
B = np.array([[1.0, 0.0]], dtype="float32")


def test_aggregations():
    a, b = keras.ops.convert_to_tensor(A), keras.ops.convert_to_tensor(B)
    # concatenation follows sorted keys, so insertion order does not matter
    np.testing.assert_array_equal(mm.ConcatFeatures()({"b": b, "a": a}).numpy(), [[3, 4, 1, 0]])
    assert mm.StackFeatures()({"a": a, "b": b}).shape == (1, 2, 2)
    np.testing.assert_allclose(mm.CosineSimilarity()({"a": a, "b": b}).numpy(), [[0.6]], rtol=1e-6)
    np.testing.assert_array_equal(mm.ElementwiseSum()({"a": a, "b": b}).numpy(), [[4, 4]])


def test_an_unknown_aggregation_name_is_refused():
    assert isinstance(aggregation_from("concat"), mm.ConcatFeatures)
    with pytest.raises(ValueError, match="unknown aggregation 'median'"):
        aggregation_from("median")


@pytest.mark.parametrize("layer", [mm.ConcatFeatures(), mm.StackFeatures(axis=2), mm.ElementwiseSum(),
                                   mm.CosineSimilarity()], ids=lambda layer: type(layer).__name__)
def test_every_aggregation_round_trips(layer, round_trip):
    round_trip(layer, {"a": A, "b": B})

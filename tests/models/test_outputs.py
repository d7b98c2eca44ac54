"""pipeline/models/outputs.py: heads from the schema's targets, clear errors; every head round-trips."""

from __future__ import annotations

import numpy as np
import pytest
from merlin.schema import Tags

import pipeline  # noqa: F401
import pipeline.models as mm
from pipeline.errors import DataError

X = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")


def test_one_head_per_target_of_the_schema(tiny_schema):
    heads = mm.outputs_from_schema(tiny_schema)
    assert [(type(h), h.target) for h in heads] == [(mm.BinaryOutput, "rating_binary"), (mm.RegressionOutput, "rating")]
    assert [h.target for h in mm.outputs_from_schema(tiny_schema, ["rating"])] == ["rating"]
    given = mm.BinaryOutput("rating_binary")
    assert mm.heads_from(tiny_schema, given) == [given]
    probabilities = np.asarray(heads[0](X))
    assert probabilities.shape == (5, 1) and ((probabilities > 0) & (probabilities < 1)).all()
    assert np.asarray(mm.CategoricalOutput("c", num_classes=7)(X)).sum(axis=1) == pytest.approx(np.ones(5), rel=1e-5)


def test_schema_without_a_target_is_a_clear_error(tiny_schema):
    with pytest.raises(DataError, match="no target"):
        mm.outputs_from_schema(tiny_schema.excluding_by_tag(Tags.TARGET))
    with pytest.raises(DataError, match="target 'stars' is not in the schema"):
        mm.outputs_from_schema(tiny_schema, ["stars"])


@pytest.mark.parametrize(
    "layer",
    [mm.BinaryOutput("y", pre=mm.LogitsTemperatureScaler(2.0)), mm.RegressionOutput("r"),
     mm.CategoricalOutput("c", num_classes=7)],
    ids=lambda layer: type(layer).__name__,
)
def test_every_head_round_trips(layer, round_trip):
    round_trip(layer, X)

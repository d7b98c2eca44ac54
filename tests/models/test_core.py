"""pipeline/models/core.py on the tiny in-memory batch: the tutorial's connect methods, ParallelBlock,
SequentialBlock, ResidualBlock, Filter, Identity; every block round-trips."""

from __future__ import annotations

import numpy as np
import pytest

import pipeline  # noqa: F401
import pipeline.models as mm


def test_connect_methods(tiny_batch):
    continuous = mm.ContinuousFeatures(["TE_userId_rating", "TE_movieId_rating"])
    branches = continuous.connect_branch(mm.MLPBlock([3], name="a"), mm.MLPBlock([4], name="b"))
    assert {k: tuple(v.shape) for k, v in branches(tiny_batch).items()} == {"a": (5, 3), "b": (5, 4)}

    shortcut = continuous.connect_with_shortcut(mm.MLPBlock([4], name="deep"), aggregation="concat")
    assert shortcut(tiny_batch).shape == (5, 2 + 4)  # the two raw features next to the MLP output

    projected = continuous.connect(mm.MLPBlock([6]))
    residual_layer = mm.MLPBlock([6], activation="linear")
    residual = projected.connect_with_residual(residual_layer)
    x = projected(tiny_batch)
    np.testing.assert_allclose(np.asarray(residual(tiny_batch)), np.asarray(x + residual_layer(x)), rtol=1e-5,
                               atol=1e-6)

    assert mm.Filter(["TE_userId_rating"])(continuous(tiny_batch)).keys() == {"TE_userId_rating"}


def test_parallel_branches_may_not_output_the_same_key(tiny_batch):
    both = mm.ParallelBlock([mm.ContinuousFeatures(["TE_userId_rating"]), mm.ContinuousFeatures(["TE_userId_rating"])])
    with pytest.raises(ValueError, match="two branches both output 'TE_userId_rating'"):
        both(tiny_batch)


@pytest.mark.parametrize(
    "layer",
    [
        mm.Filter(["TE_userId_rating"]),
        mm.Identity(),
        mm.ParallelBlock({"p": mm.ContinuousFeatures(["TE_userId_rating"]), "q": mm.Filter(["TE_age_rating"])},
                         aggregation="concat"),
        mm.SequentialBlock([mm.ContinuousFeatures(["TE_userId_rating"]), mm.MLPBlock([2])]),
        mm.ContinuousFeatures(["TE_userId_rating"]).connect(mm.ConcatFeatures()).connect_with_residual(
            mm.MLPBlock([1])),
    ],
    ids=lambda layer: type(layer).__name__,
)
def test_every_block_round_trips(layer, round_trip, tiny_batch):
    round_trip(layer, {k: tiny_batch[k] for k in ("TE_userId_rating", "TE_age_rating")})


def test_a_residual_block_round_trips(round_trip):
    round_trip(mm.ResidualBlock(mm.MLPBlock([2], activation="linear")), np.ones((3, 2), dtype="float32"))

"""pipeline/models/interaction.py: DLRM's dot products, DCN's cross layers, FM's pairwise term; every
block round-trips."""

from __future__ import annotations

import numpy as np
import pytest
from keras import ops

import pipeline  # noqa: F401
import pipeline.models as mm

RNG = np.random.default_rng(0)
FEATS = {name: RNG.normal(size=(3, 8)).astype("float32") for name in "abcd"}


def test_dot_product_interaction_counts_feature_pairs_and_matches_numpy():
    feats = FEATS
    out = mm.DotProductInteractionBlock()(feats).numpy()
    assert out.shape == (3, 4 * 3 // 2)
    stacked = np.stack([feats[k] for k in sorted(feats)], axis=1)
    gram = np.einsum("bik,bjk->bij", stacked, stacked)
    lower = [gram[:, i, j] for i in range(4) for j in range(i)]
    np.testing.assert_allclose(np.sort(out, axis=1), np.sort(np.stack(lower, axis=1), axis=1), rtol=1e-5)

    cross = mm.CrossBlock(depth=2)({"a": feats["a"], "b": feats["b"]})
    assert cross.shape == (3, 16)


def test_fm_block_is_the_sum_of_pairwise_dot_products():
    a, b, c = np.array([[1.0, 2.0]]), np.array([[3.0, -1.0]]), np.array([[0.5, 0.5]])
    pairs = a @ b.T + a @ c.T + b @ c.T
    np.testing.assert_allclose(ops.convert_to_numpy(mm.FMBlock()({"a": a, "b": b, "c": c})), pairs, rtol=1e-6)


@pytest.mark.parametrize(
    "layer",
    [mm.DotProductInteractionBlock(self_interaction=True), mm.CrossBlock(depth=2, projection_dim=4), mm.FMBlock()],
    ids=lambda layer: type(layer).__name__,
)
def test_every_interaction_round_trips(layer, round_trip):
    round_trip(layer, FEATS)

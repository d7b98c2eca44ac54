"""pipeline/models/deepfm.py: DeepFMModel built from the tiny schema alone, one output per target, saved and
reloaded."""

from __future__ import annotations

import keras
import numpy as np

import pipeline  # noqa: F401
import pipeline.models as mm


def test_deepfm_builds_from_the_schema_and_reloads_with_the_same_scores(tiny_schema, tiny_batch, tmp_path):
    keras.utils.set_random_seed(0)
    model = mm.DeepFMModel(tiny_schema, embedding_dim=8, deep_block=mm.MLPBlock([8]))
    scores = {k: np.asarray(v) for k, v in model(tiny_batch).items()}
    assert model.target_names == ["rating_binary", "rating"]
    assert {k: v.shape for k, v in scores.items()} == {"rating_binary": (5, 1), "rating": (5, 1)}
    assert ((scores["rating_binary"] > 0) & (scores["rating_binary"] < 1)).all()
    model.save(tmp_path / "model.keras")
    reloaded = mm.load_model(tmp_path / "model.keras")
    for target, values in reloaded(tiny_batch).items():
        np.testing.assert_allclose(np.asarray(values), scores[target], rtol=1e-6, atol=1e-6)

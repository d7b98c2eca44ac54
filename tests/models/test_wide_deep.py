"""pipeline/models/wide_deep.py: WideAndDeepModel built from the tiny schema alone, one output per target, saved
and reloaded."""

from __future__ import annotations

import keras

import pipeline  # noqa: F401
import pipeline.models as mm


def test_wide_deep_builds_from_the_schema_and_reloads_with_the_same_scores(tiny_schema, ranking_model_check):
    keras.utils.set_random_seed(0)
    ranking_model_check(mm.WideAndDeepModel(tiny_schema, deep_block=mm.MLPBlock([8]), embedding_dim=8))

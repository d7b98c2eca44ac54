"""pipeline/models/wide.py: WideBlock sums a weight per id, per hashed cross and per continuous value."""

from __future__ import annotations

import numpy as np
import pytest
from keras import ops

import pipeline  # noqa: F401
import pipeline.models as mm

BATCH = {"user": np.array([[1], [2]]), "genres": np.array([[1, 3, 0], [0, 0, 0]]), "te": np.array([[0.5], [2.0]])}


def _wide():
    return mm.WideBlock({"user": {"cardinality": 5}, "genres": {"cardinality": 4, "is_list": True}},
                        crosses=[("user", "user")], cross_buckets=7, continuous=["te"])


def test_the_wide_block_does_what_its_docstring_says():
    wide = _wide()
    batch = BATCH
    assert ops.convert_to_numpy(wide(batch)).tolist() == [[0.0], [0.0]]  # zero-initialised: no prior
    wide.id_weights["user"].embeddings.assign(np.arange(5, dtype="float32")[:, None])
    wide.id_weights["genres"].embeddings.assign(np.array([[9.0], [1.0], [10.0], [100.0]], dtype="float32"))
    wide.cross_weights[0].embeddings.assign(np.arange(7, dtype="float32")[:, None] * 1000)
    wide.linear.kernel.assign([[10.0]])
    # user weight + genre weights of the non-padding ids + cross (u * 5 + u) % 7 * 1000 + 10 * te
    assert ops.convert_to_numpy(wide(batch)).tolist() == [[1 + 101 + 6000 + 5], [2 + 0 + 5000 + 20]]


def test_bad_crosses_are_refused():
    tables = {"user": {"cardinality": 5}, "genres": {"cardinality": 4, "is_list": True}}
    with pytest.raises(ValueError, match="at least two features"):
        mm.WideBlock(tables, crosses=[("user",)])
    with pytest.raises(ValueError, match="'movie' is not a categorical feature"):
        mm.WideBlock(tables, crosses=[("user", "movie")])
    with pytest.raises(ValueError, match="'genres' is a list feature"):
        mm.WideBlock(tables, crosses=[("user", "genres")])


def test_the_wide_block_from_the_schema_reads_every_categorical_column(tiny_schema, tiny_batch):
    wide = mm.WideBlock.from_schema(tiny_schema, crosses=[("age", "movieId")])
    assert set(wide.input_feature_names()) >= {"userId", "movieId", "genres", "age"}
    assert wide(tiny_batch).shape == (5, 1)


def test_the_wide_block_round_trips(round_trip):
    round_trip(_wide(), BATCH)

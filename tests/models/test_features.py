"""pipeline/models/features.py on the tiny in-memory schema: embedding tables sized by the schema, list
combiners, sequence embeddings, continuous features, the tutorial's input block; every layer round-trips."""

from __future__ import annotations

import numpy as np
import pytest
from merlin.schema import Tags

import pipeline  # noqa: F401
import pipeline.models as mm
from pipeline.errors import DataError


def test_embedding_tables_are_sized_by_the_schema_cardinality(tiny_schema, tiny_batch):
    schema = tiny_schema
    block = mm.EmbeddingFeatures.from_schema(schema)  # one shared width, 64 by default
    categorical = schema.select_by_tag(Tags.CATEGORICAL).excluding_by_tag(Tags.TARGET).column_names
    assert block.feature_names == categorical
    outputs = block(tiny_batch)
    for name in categorical:
        assert outputs[name].shape == (5, 64)
        cardinality = schema[name].properties["embedding_sizes"]["cardinality"]
        assert block.embeddings[name].input_dim == cardinality  # includes the reserved pad/null/OOV rows

    per_feature = mm.EmbeddingFeatures.from_schema(schema, embedding_dim=None)
    for name in categorical:
        assert per_feature(tiny_batch)[name].shape == (5, int(schema[name].properties["embedding_sizes"]["dimension"]))


def test_list_feature_is_the_mean_of_its_non_padding_embeddings(tiny_schema, tiny_batch):
    block = mm.EmbeddingFeatures.from_schema(tiny_schema.select_by_name(["genres"]), 8, combiner="mean")
    summed = mm.EmbeddingFeatures.from_schema(tiny_schema.select_by_name(["genres"]), 8, combiner="sum")
    out = np.asarray(block(tiny_batch)["genres"])
    table = block.embeddings["genres"].embeddings.numpy()
    for row, ids in zip(out, tiny_batch["genres"]):
        real = ids[ids != 0]
        if len(real):
            np.testing.assert_allclose(row, table[real].mean(axis=0), rtol=1e-5, atol=1e-6)
        else:  # a movie without genres
            np.testing.assert_array_equal(row, 0)
    summed(tiny_batch)
    summed.set_weights(block.get_weights())
    counts = (tiny_batch["genres"] != 0).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(summed(tiny_batch)["genres"]), out * counts, rtol=1e-5, atol=1e-6)


def test_sequence_embeddings_keep_the_sequence_and_zero_the_padding(tiny_schema, tiny_batch):
    block = mm.SequenceEmbeddingFeatures.from_schema(tiny_schema.select_by_name(["genres"]), 8)
    assert block.feature_names == ["genres"]
    seq = np.asarray(block(tiny_batch)["genres"])
    ids = tiny_batch["genres"]
    assert seq.shape == (5, ids.shape[1], 8)
    assert np.all(seq[ids == 0] == 0) and np.all(np.abs(seq[ids != 0]).sum(axis=-1) > 0)


def test_continuous_features_and_the_tutorial_input_block(tiny_schema, tiny_batch):
    sub_schema = tiny_schema.select_by_name(["userId", "movieId", "TE_zipcode_rating", "TE_movieId_rating",
                                             "rating_binary"])
    continuous = mm.ContinuousFeatures.from_schema(sub_schema, tags=Tags.CONTINUOUS)
    assert {k: tuple(v.shape) for k, v in continuous(tiny_batch).items()} == {
        "TE_zipcode_rating": (5, 1), "TE_movieId_rating": (5, 1)}
    deep = continuous.connect(mm.MLPBlock([64]))
    inputs = mm.ParallelBlock({"embeddings": mm.EmbeddingFeatures.from_schema(sub_schema), "deep_continuous": deep})
    shapes = {k: tuple(v.shape) for k, v in inputs(tiny_batch).items()}
    assert shapes == {"userId": (5, 64), "movieId": (5, 64), "deep_continuous": (5, 64)}

    # InputBlock: every input of the schema, found by tags, concatenated.
    block = mm.InputBlock(tiny_schema, 16, aggregation="concat")
    n_cat = len(tiny_schema.select_by_tag(Tags.CATEGORICAL).excluding_by_tag(Tags.TARGET))
    n_cont = len(tiny_schema.select_by_tag(Tags.CONTINUOUS).excluding_by_tag(Tags.TARGET))
    assert block(tiny_batch).shape == (5, 16 * n_cat + n_cont)


def test_a_schema_without_the_features_a_block_needs_is_a_clear_error(tiny_schema):
    with pytest.raises(DataError, match="no continuous"):
        mm.ContinuousFeatures.from_schema(tiny_schema.select_by_tag(Tags.CATEGORICAL))
    with pytest.raises(DataError, match="no categorical"):
        mm.EmbeddingFeatures.from_schema(tiny_schema.select_by_tag(Tags.CONTINUOUS))


@pytest.mark.parametrize(
    "layer",
    [
        mm.EmbeddingFeatures({"genres": {"cardinality": 7, "dim": 3, "is_list": True}}, combiner="sum",
                             l2_regularization=0.1),
        mm.SequenceEmbeddingFeatures({"genres": {"cardinality": 7, "dim": 3}}),
        mm.ContinuousFeatures(["TE_userId_rating", "TE_movieId_rating"]),
    ],
    ids=lambda layer: type(layer).__name__,
)
def test_every_layer_round_trips(layer, round_trip, tiny_batch):
    round_trip(layer, tiny_batch)


def test_the_input_block_round_trips(tiny_schema, tiny_batch, round_trip):
    round_trip(mm.InputBlock(tiny_schema, 4, aggregation="concat"), tiny_batch)

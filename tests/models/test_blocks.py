"""The block library on real batches of the ETL output: shapes, schema-driven sizes, combinators, configs."""

from __future__ import annotations

import keras
import numpy as np
import pandas as pd
import pytest
from merlin.schema import Tags

import pipeline  # noqa: F401
import pipeline.models as mm


@pytest.fixture(scope="module")
def train(etl_dir):
    from merlin.io import Dataset

    return Dataset(str(etl_dir / "train"), engine="parquet")


@pytest.fixture(scope="module")
def batch(train):
    features, targets = mm.sample_batch(train, batch_size=5, shuffle=False)
    return features


def test_sample_batch_has_one_column_per_feature_and_targets_apart(train, batch, etl_dir):
    first = pd.read_parquet(next((etl_dir / "train").glob("*.parquet"))).iloc[:5]
    assert batch["userId"].shape == (5, 1)
    np.testing.assert_array_equal(batch["userId"].numpy()[:, 0], first["userId"].to_numpy())
    assert "rating_binary" not in batch
    features, targets = mm.sample_batch(train, batch_size=5)
    np.testing.assert_array_equal(targets["rating_binary"].numpy()[:, 0], first["rating_binary"].to_numpy())


def test_embedding_tables_are_sized_by_the_schema_cardinality(train, batch):
    schema = train.schema
    block = mm.EmbeddingFeatures.from_schema(schema)  # one shared width, 64 by default
    categorical = schema.select_by_tag(Tags.CATEGORICAL).excluding_by_tag(Tags.TARGET).column_names
    assert block.feature_names == categorical
    outputs = block(batch)
    for name in categorical:
        assert outputs[name].shape == (5, 64)
        cardinality = schema[name].properties["embedding_sizes"]["cardinality"]
        assert block.embeddings[name].input_dim == cardinality  # includes the reserved pad/null/OOV rows

    per_feature = mm.EmbeddingFeatures.from_schema(schema, embedding_dim=None)
    for name in categorical:
        assert per_feature(batch)[name].shape == (5, int(schema[name].properties["embedding_sizes"]["dimension"]))


def test_list_feature_is_the_mean_of_its_non_padding_embeddings(train, batch):
    block = mm.EmbeddingFeatures.from_schema(train.schema.select_by_name(["genres"]), 8, combiner="mean")
    summed = mm.EmbeddingFeatures.from_schema(train.schema.select_by_name(["genres"]), 8, combiner="sum")
    out = block(batch)["genres"].numpy()
    table = block.embeddings["genres"].embeddings.numpy()
    for row, ids in zip(out, batch["genres"].numpy()):
        real = ids[ids != 0]
        np.testing.assert_allclose(row, table[real].mean(axis=0), rtol=1e-5, atol=1e-6)
    summed(batch)
    summed.set_weights(block.get_weights())
    counts = (batch["genres"].numpy() != 0).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(summed(batch)["genres"].numpy(), out * counts, rtol=1e-5, atol=1e-6)


def test_sequence_embeddings_keep_the_sequence_and_zero_the_padding(train, batch):
    block = mm.SequenceEmbeddingFeatures.from_schema(train.schema.select_by_name(["genres"]), 8)
    assert block.feature_names == ["genres"]
    seq = block(batch)["genres"].numpy()
    ids = batch["genres"].numpy()
    assert seq.shape == (5, ids.shape[1], 8)
    assert np.all(seq[ids == 0] == 0) and np.all(np.abs(seq[ids != 0]).sum(axis=-1) > 0)


def test_continuous_features_and_the_tutorial_input_block(train, batch):
    sub_schema = train.schema.select_by_name(["userId", "movieId", "TE_zipcode_rating", "TE_movieId_rating", "rating_binary"])
    continuous = mm.ContinuousFeatures.from_schema(sub_schema, tags=Tags.CONTINUOUS)
    assert {k: tuple(v.shape) for k, v in continuous(batch).items()} == {"TE_zipcode_rating": (5, 1), "TE_movieId_rating": (5, 1)}
    deep = continuous.connect(mm.MLPBlock([64]))
    inputs = mm.ParallelBlock({"embeddings": mm.EmbeddingFeatures.from_schema(sub_schema), "deep_continuous": deep})
    shapes = {k: tuple(v.shape) for k, v in inputs(batch).items()}
    assert shapes == {"userId": (5, 64), "movieId": (5, 64), "deep_continuous": (5, 64)}

    # InputBlock: every input of the schema, found by tags, concatenated.
    block = mm.InputBlock(train.schema, 16, aggregation="concat")
    n_cat = len(train.schema.select_by_tag(Tags.CATEGORICAL).excluding_by_tag(Tags.TARGET))
    n_cont = len(train.schema.select_by_tag(Tags.CONTINUOUS).excluding_by_tag(Tags.TARGET))
    assert block(batch).shape == (5, 16 * n_cat + n_cont)


def test_connect_methods(batch):
    continuous = mm.ContinuousFeatures(["TE_userId_rating", "TE_movieId_rating"])
    branches = continuous.connect_branch(mm.MLPBlock([3], name="a"), mm.MLPBlock([4], name="b"))
    assert {k: tuple(v.shape) for k, v in branches(batch).items()} == {"a": (5, 3), "b": (5, 4)}

    shortcut = continuous.connect_with_shortcut(mm.MLPBlock([4], name="deep"), aggregation="concat")
    assert shortcut(batch).shape == (5, 2 + 4)  # the two raw features next to the MLP output

    projected = continuous.connect(mm.MLPBlock([6]))
    residual_layer = mm.MLPBlock([6], activation="linear")
    residual = projected.connect_with_residual(residual_layer)
    x = projected(batch)
    np.testing.assert_allclose(residual(batch).numpy(), (x + residual_layer(x)).numpy(), rtol=1e-5, atol=1e-6)

    assert mm.Filter(["TE_userId_rating"])(continuous(batch)).keys() == {"TE_userId_rating"}


def test_aggregations_and_transformations():
    a = keras.ops.convert_to_tensor(np.array([[3.0, 4.0]], dtype="float32"))
    b = keras.ops.convert_to_tensor(np.array([[1.0, 0.0]], dtype="float32"))
    # concatenation follows sorted keys, so insertion order does not matter
    np.testing.assert_array_equal(mm.ConcatFeatures()({"b": b, "a": a}).numpy(), [[3, 4, 1, 0]])
    assert mm.StackFeatures()({"a": a, "b": b}).shape == (1, 2, 2)
    np.testing.assert_allclose(mm.CosineSimilarity()({"a": a, "b": b}).numpy(), [[0.6]], rtol=1e-6)
    np.testing.assert_allclose(mm.L2Norm()(a).numpy(), [[0.6, 0.8]], rtol=1e-6)
    np.testing.assert_allclose(mm.LogitsTemperatureScaler(2.0)(a).numpy(), [[1.5, 2.0]])
    assert mm.AsDenseFeatures is mm.ToDense
    assert mm.ToDense()({"x": keras.ops.ones((4,))})["x"].shape == (4, 1)


def test_dot_product_interaction_counts_feature_pairs_and_matches_numpy():
    rng = np.random.default_rng(0)
    feats = {name: rng.normal(size=(3, 8)).astype("float32") for name in "abcd"}
    out = mm.DotProductInteractionBlock()(feats).numpy()
    assert out.shape == (3, 4 * 3 // 2)
    stacked = np.stack([feats[k] for k in sorted(feats)], axis=1)
    gram = np.einsum("bik,bjk->bij", stacked, stacked)
    lower = [gram[:, i, j] for i in range(4) for j in range(i)]
    np.testing.assert_allclose(np.sort(out, axis=1), np.sort(np.stack(lower, axis=1), axis=1), rtol=1e-5)

    cross = mm.CrossBlock(depth=2)({"a": feats["a"], "b": feats["b"]})
    assert cross.shape == (3, 16)


def test_mlp_options_build_the_layers_they_name():
    mlp = mm.MLPBlock([8, 4], dropout=0.5, normalization="batch_norm", kernel_regularizer="l2")
    x = np.ones((6, 3), dtype="float32")
    out = mlp(x, training=True)
    assert out.shape == (6, 4)
    assert len(mlp.losses) == 2  # one L2 penalty per kernel
    assert sum(isinstance(l, keras.layers.BatchNormalization) for l in mlp._flatten_layers()) == 2
    # dropout is active in training only
    np.testing.assert_array_equal(mlp(x, training=False).numpy(), mlp(x, training=False).numpy())


@pytest.mark.parametrize(
    "layer",
    [
        mm.MLPBlock([8, 4], dropout=0.1, normalization="batch_norm", kernel_regularizer="l2", no_activation_last_layer=True),
        mm.EmbeddingFeatures({"a": {"cardinality": 5, "dim": 3, "is_list": True}}, combiner="sum", l2_regularization=0.1),
        mm.SequenceEmbeddingFeatures({"g": {"cardinality": 5, "dim": 3}}),
        mm.ContinuousFeatures(["x", "y"]),
        mm.Filter(["x"]),
        mm.ParallelBlock({"p": mm.ContinuousFeatures(["x"]), "q": mm.MLPBlock([2])}, aggregation="concat"),
        mm.SequentialBlock([mm.ContinuousFeatures(["x"]), mm.MLPBlock([2])]),
        mm.ContinuousFeatures(["x"]).connect_with_residual(mm.MLPBlock([1])),
        mm.DotProductInteractionBlock(self_interaction=True),
        mm.CrossBlock(depth=2, projection_dim=4),
        mm.L2Norm(axis=1),
        mm.LogitsTemperatureScaler(3.0),
        mm.StackFeatures(axis=2),
        mm.BinaryOutput("y", pre=mm.LogitsTemperatureScaler(2.0)),
        mm.RegressionOutput("r"),
        mm.CategoricalOutput("c", num_classes=7),
    ],
    ids=lambda layer: type(layer).__name__,
)
def test_every_layer_round_trips_through_its_config(layer):
    config = keras.saving.serialize_keras_object(layer)
    clone = keras.saving.deserialize_keras_object(config)
    assert type(clone) is type(layer)
    assert keras.saving.serialize_keras_object(clone)["config"] == config["config"]


def test_schema_without_a_target_or_features_is_a_clear_error(train):
    from pipeline.errors import DataError

    with pytest.raises(DataError, match="no target"):
        mm.outputs_from_schema(train.schema.excluding_by_tag(Tags.TARGET))
    with pytest.raises(DataError, match="no continuous"):
        mm.ContinuousFeatures.from_schema(train.schema.select_by_tag(Tags.CATEGORICAL))

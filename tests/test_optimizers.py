"""pipeline/optimizers.py (RowSparseAdamW, RowSync) and pipeline/models/embedding.py (Embedding) on tiny
real Keras models: dense AdamW's exact result where every row moves or none does, lazy rows against a numpy
reference, saving and resuming, determinism."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import pipeline  # noqa: F401
from pipeline.models.embedding import Embedding
from pipeline.optimizers import RowSparseAdamW, RowSync

LR, WD, MU = 0.05, 0.5, 0.9


def _model(seed: int = 1):
    keras.utils.set_random_seed(seed)
    ids = keras.Input((4,), dtype="int32")
    table = Embedding(6, 3, name="table")
    model = keras.Model(ids, keras.layers.Dense(1)(keras.ops.sum(table(ids), axis=1)))
    return model, table


def _fit(optimizer, batches, seed: int = 1, epochs: int = 1):
    model, table = _model(seed)
    model.compile(optimizer=optimizer, loss="mse", steps_per_execution=1)
    x = np.array(batches, dtype="int32")
    y = np.arange(len(x), dtype="float32").reshape(-1, 1)
    model.fit(x, y, batch_size=1, epochs=epochs, shuffle=False, verbose=0, callbacks=[RowSync()])
    return model, table


def test_in_place_embedding_matches_keras_lookup_and_gives_row_gradients():
    layer = Embedding(10, 4)
    ids = tf.constant([[1, 3], [3, 9]])
    plain = keras.layers.Embedding(10, 4)
    plain.build((None, 2))
    layer.build((None, 2))
    plain.embeddings.assign(layer.embeddings)
    np.testing.assert_array_equal(layer(ids).numpy(), plain(ids).numpy())
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(ids))
    grad = tape.gradient(loss, layer.trainable_variables)[0]
    assert isinstance(grad, tf.IndexedSlices)  # only the gathered rows
    again = keras.layers.deserialize(keras.layers.serialize(layer))
    assert isinstance(again, Embedding) and again.get_config() == layer.get_config()


class _Tables(keras.Model):
    """Two embedding tables in a dict, as EmbeddingFeatures holds them."""

    def __init__(self, table_class):
        super().__init__()
        self.tables = {"userId": table_class(7, 3), "movieId": table_class(5, 3)}

    def call(self, ids):
        return self.tables["userId"](ids) + self.tables["movieId"](ids)


def test_weights_saved_with_keras_embedding_tables_load_into_ours(tmp_path):
    # every model saved before pipeline.models.Embedding has keras.layers.Embedding tables
    ids = tf.constant([[0, 4]])
    old = _Tables(keras.layers.Embedding)
    old(ids)
    old.save_weights(tmp_path / "old.weights.h5")
    new = _Tables(Embedding)
    new(ids)
    new.load_weights(tmp_path / "old.weights.h5")
    for name in ("userId", "movieId"):
        np.testing.assert_array_equal(new.tables[name].embeddings.numpy(), old.tables[name].embeddings.numpy())


def test_every_row_every_step_or_never_is_exactly_dense_adamw_with_average():
    # rows 0-3 are in every batch, rows 4-5 in none: lazy and dense steps are the same thing
    batches = [[0, 1, 2, 3]] * 6
    kwargs = dict(learning_rate=LR, weight_decay=WD, use_ema=True, ema_momentum=MU)
    dense_opt = keras.optimizers.AdamW(**kwargs)
    dense, dense_table = _fit(dense_opt, batches)
    sparse_opt = RowSparseAdamW(**kwargs)
    sparse, sparse_table = _fit(sparse_opt, batches)
    np.testing.assert_allclose(sparse_table.embeddings.numpy(), dense_table.embeddings.numpy(), atol=1e-6)
    for a, b in zip(sparse.get_weights(), dense.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(sparse_opt._model_variables_moving_average[0].numpy(),
                               dense_opt._model_variables_moving_average[0].numpy(), atol=1e-6)


def test_rows_between_their_batches_decay_and_average_as_if_stepped():
    rows, dim, b1, b2, eps = 7, 2, 0.9, 0.999, 1e-7
    rng = np.random.default_rng(0)
    start = rng.normal(size=(rows, dim)).astype("float32")
    var = keras.Variable(start.copy())
    opt = RowSparseAdamW(learning_rate=LR, weight_decay=WD, use_ema=True, ema_momentum=MU)
    opt.build([var])
    w, m, v, e = start.astype("float64"), np.zeros((rows, dim)), np.zeros((rows, dim)), np.zeros((rows, dim))
    for t in range(1, 13):
        ids = rng.choice(rows, size=3) if t > 1 else np.arange(rows)  # repeated ids are summed
        values = rng.normal(size=(len(ids), dim)).astype("float32")
        opt.apply([tf.IndexedSlices(tf.constant(values), tf.constant(ids, tf.int64), tf.constant([rows, dim], tf.int64))],
                  [var])
        # reference: Adam on the gathered rows only; decay and average on every row, every step
        g = np.zeros((rows, dim))
        np.add.at(g, ids, values)
        hit = np.isin(np.arange(rows), ids)
        w *= 1 - LR * WD
        m[hit] = b1 * m[hit] + (1 - b1) * g[hit]
        v[hit] = b2 * v[hit] + (1 - b2) * g[hit] ** 2
        w[hit] -= LR * np.sqrt(1 - b2**t) / (1 - b1**t) * m[hit] / (np.sqrt(v[hit]) + eps)
        momentum = 0.0 if t == 1 else MU
        e = momentum * e + (1 - momentum) * w
    assert not np.allclose(var.numpy(), w, atol=1e-3)  # some rows are behind until synced
    opt.sync_rows()
    np.testing.assert_allclose(var.numpy(), w, atol=1e-5)
    np.testing.assert_allclose(opt._model_variables_moving_average[0].numpy(), e, atol=1e-5)


def test_same_seed_same_model_and_resume_equals_straight_run(tmp_path):
    batches = [[0, 1, 2, 3], [4, 5, 0, 0], [1, 2, 2, 5], [3, 3, 4, 1]]
    kwargs = dict(learning_rate=LR, weight_decay=WD)
    straight, _ = _fit(RowSparseAdamW(**kwargs), batches, epochs=2)
    again, _ = _fit(RowSparseAdamW(**kwargs), batches, epochs=2)
    for a, b in zip(straight.get_weights(), again.get_weights()):
        np.testing.assert_array_equal(a, b)

    first, _ = _fit(RowSparseAdamW(**kwargs), batches, epochs=1)
    first.save(tmp_path / "m.keras")
    resumed = keras.models.load_model(tmp_path / "m.keras")
    assert isinstance(resumed.optimizer, RowSparseAdamW)
    x = np.array(batches, dtype="int32")
    y = np.arange(len(x), dtype="float32").reshape(-1, 1)
    resumed.fit(x, y, batch_size=1, epochs=2, initial_epoch=1, shuffle=False, verbose=0, callbacks=[RowSync()])
    for a, b in zip(resumed.get_weights(), straight.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_gradient_accumulation_is_refused():
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        RowSparseAdamW(weight_decay=0.1, gradient_accumulation_steps=2)

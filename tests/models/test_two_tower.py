"""TwoTowerModel on a tiny in-memory schema and batch: towers from tags, unit vectors, the in-batch softmax's
temperature / logQ / accidental-hit terms, learning a planted signal, config and save/reload."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from merlin.schema import ColumnSchema, Schema, Tags

import pipeline  # noqa: F401
import pipeline.models as mm

N_USERS, N_MOVIES, N_GENRES = 40, 30, 6


def _categorical(name, cardinality, *tags, is_list=False):
    return ColumnSchema(name, tags=[Tags.CATEGORICAL, *tags], dtype="int32", is_list=is_list, is_ragged=False,
                        properties={"embedding_sizes": {"cardinality": cardinality, "dimension": 8}})


@pytest.fixture(scope="module")
def schema():
    return Schema([
        _categorical("userId", N_USERS, Tags.USER, Tags.ID),
        _categorical("age", 5, Tags.USER),
        ColumnSchema("TE_userId_rating", tags=[Tags.CONTINUOUS, Tags.USER], dtype="float32"),
        _categorical("movieId", N_MOVIES, Tags.ITEM, Tags.ID),
        _categorical("genres", N_GENRES, Tags.ITEM, is_list=True),
        ColumnSchema("TE_movieId_rating", tags=[Tags.CONTINUOUS, Tags.ITEM], dtype="float32"),
        ColumnSchema("rating_binary", tags=[Tags.TARGET, Tags.BINARY_CLASSIFICATION], dtype="int32"),
    ])


def _batch(users, movies, seed=0):
    rng = np.random.default_rng(seed)
    n = len(users)
    genres = np.zeros((n, 3), dtype=np.int32)
    genres[:, 0] = 1 + np.asarray(movies) % (N_GENRES - 1)
    genres[::2, 1] = 1 + (np.asarray(movies[::2]) + 1) % (N_GENRES - 1)  # some movies have two genres
    return {
        "userId": np.asarray(users, dtype=np.int32).reshape(-1, 1),
        "age": (np.asarray(users, dtype=np.int32) % 5).reshape(-1, 1),
        "TE_userId_rating": rng.normal(size=(n, 1)).astype("float32"),
        "movieId": np.asarray(movies, dtype=np.int32).reshape(-1, 1),
        "genres": genres,
        "TE_movieId_rating": rng.normal(size=(n, 1)).astype("float32"),
    }


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    return _batch(rng.integers(1, N_USERS, 16), rng.integers(1, N_MOVIES, 16))


def test_towers_read_the_user_and_item_columns_and_return_unit_vectors(schema, batch):
    model = mm.TwoTowerModel(schema, embedding_dim=8, tower_dims=[16, 4])
    assert sorted(model.query_feature_names()) == ["TE_userId_rating", "age", "userId"]
    assert sorted(model.candidate_feature_names()) == ["TE_movieId_rating", "genres", "movieId"]
    assert model.item_id == "movieId" and model.item_cardinality == N_MOVIES
    query, candidate = model.query_embeddings(batch), model.candidate_embeddings(batch)
    assert query.shape == (16, 4) and candidate.shape == (16, 4)
    np.testing.assert_allclose(np.linalg.norm(query, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(candidate, axis=1), 1.0, atol=1e-5)
    # a pair's score is the cosine of its two vectors
    np.testing.assert_allclose(np.ravel(model(batch)), np.sum(np.asarray(query) * np.asarray(candidate), 1), atol=1e-6)
    # the genres list feeds the item tower: another genre changes the movie's vector, never the user's
    other = {**batch, "genres": np.roll(batch["genres"], 1, axis=0)}
    assert not np.allclose(model.candidate_embeddings(other), candidate)
    np.testing.assert_array_equal(model.query_embeddings(other), query)


def test_a_schema_without_user_or_item_columns_is_refused(schema):
    from pipeline.errors import DataError

    with pytest.raises(DataError, match="USER- and ITEM-tagged"):
        mm.TwoTowerModel(schema.excluding_by_tag(Tags.USER))
    with pytest.raises(DataError, match="ITEM_ID"):
        mm.TwoTowerModel(schema.remove_col("movieId"))


def test_in_batch_logits_scale_by_temperature_subtract_log_q_and_mask_accidental_hits(schema):
    movies = np.array([3, 5, 3, 7, 9, 5])  # movie 3 at rows 0 and 2, movie 5 at rows 1 and 5
    x = _batch(np.arange(1, 7), movies)
    plain = mm.TwoTowerModel(schema, embedding_dim=8, tower_dims=[4], temperature=0.1, logq_correction=False,
                             remove_accidental_hits=False)
    cosine = np.asarray(plain.query_embeddings(x)) @ np.asarray(plain.candidate_embeddings(x)).T
    np.testing.assert_allclose(plain.in_batch_logits(x), cosine / 0.1, rtol=1e-5, atol=1e-5)

    full = mm.TwoTower.from_config({**plain.get_config(), "logq_correction": True, "remove_accidental_hits": True})
    full.in_batch_logits(x)  # builds the towers
    full.set_weights(plain.get_weights())
    counts = np.bincount([3, 3, 3, 5, 7, 9, 9, 9, 9, 9], minlength=N_MOVIES)
    probability = full.set_sampling_probabilities(np.repeat(np.arange(N_MOVIES), counts))
    np.testing.assert_allclose(probability, counts / counts.sum(), rtol=1e-6)
    logits = np.asarray(full.in_batch_logits(x))
    expected = cosine / 0.1 - np.log(probability[movies])[None, :]
    hits = (movies[:, None] == movies[None, :]) & ~np.eye(6, dtype=bool)
    assert hits.sum() == 4
    np.testing.assert_allclose(logits[~hits], expected[~hits], rtol=1e-5, atol=1e-4)
    assert (logits[hits] <= -1e8).all()  # the same movie elsewhere in the batch is no negative
    softmax = keras.ops.convert_to_numpy(keras.ops.softmax(logits, axis=1))
    assert (softmax[hits] == 0).all() and np.isfinite(np.asarray(full.in_batch_loss(x)))


def test_keras_rs_remove_accidental_hits_0_4_0_leaves_the_logits_unchanged_which_is_why_we_mask():
    import keras_rs

    logits = np.array([[1.0, 2.0, 3.0]], dtype="float32")
    labels = np.array([[1.0, 0.0, 0.0]], dtype="float32")
    ids = np.array([7, 7, 8])
    theirs = keras.ops.convert_to_numpy(keras_rs.layers.RemoveAccidentalHits()(logits, labels, ids))
    ours = keras.ops.convert_to_numpy(mm.InBatchAccidentalHits()(np.concatenate([logits, logits, logits]), ids))
    np.testing.assert_array_equal(theirs, logits)  # keras-team/keras-rs#206: a no-op in 0.4.0
    assert ours[0, 1] <= -1e8 and ours[1, 0] <= -1e8 and ours[0, 0] == 1.0 and ours[0, 2] == 3.0


def test_training_on_positives_learns_a_planted_user_movie_match(schema):
    # each user likes the movies of one "taste" (user % 3 == movie % 3): after training, a user's liked movies
    # score above the others
    rng = np.random.default_rng(1)
    users = rng.integers(1, N_USERS, 3000)
    movies = np.array([rng.choice(np.flatnonzero(np.arange(1, N_MOVIES) % 3 == u % 3)) + 1 for u in users])
    x = _batch(users, movies)
    keras.utils.set_random_seed(0)
    model = mm.TwoTowerModel(schema, embedding_dim=8, tower_dims=[16, 8], temperature=0.1)
    model.set_sampling_probabilities(movies)
    model.compile(optimizer=keras.optimizers.Adam(0.01))
    history = model.fit(x, batch_size=128, epochs=6, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < losses[0] - 0.3, losses
    grid_users, grid_movies = np.repeat(np.arange(1, N_USERS), N_MOVIES - 1), np.tile(np.arange(1, N_MOVIES), N_USERS - 1)
    scores = np.ravel(model.predict(_batch(grid_users, grid_movies), batch_size=4096, verbose=0))
    liked = grid_users % 3 == grid_movies % 3
    assert scores[liked].mean() > scores[~liked].mean() + 0.3


def test_config_round_trip_and_a_saved_model_reloads_with_the_same_outputs(schema, batch, tmp_path):
    keras.utils.set_random_seed(0)
    model = mm.TwoTowerModel(schema, embedding_dim=8, tower_dims=[16, 4], temperature=0.07)
    model.set_sampling_probabilities(np.ravel(batch["movieId"]))
    model.compile(optimizer="adam")
    model.fit(batch, batch_size=8, epochs=1, verbose=0)
    assert model.built
    config = model.get_config()
    again = mm.TwoTower.from_config(config)
    scalars = ("item_id", "item_cardinality", "temperature", "logq_correction", "remove_accidental_hits")
    assert {k: again.get_config()[k] for k in scalars} == {k: config[k] for k in scalars}
    assert again.temperature == 0.07 and again.query_feature_names() == model.query_feature_names()

    model.save(tmp_path / "two_tower.keras")
    loaded = mm.load_model(tmp_path / "two_tower.keras")
    assert isinstance(loaded, mm.TwoTower)
    np.testing.assert_array_equal(loaded.predict_on_batch(batch), model.predict_on_batch(batch))
    np.testing.assert_array_equal(loaded.query_embeddings(batch), model.query_embeddings(batch))
    np.testing.assert_array_equal(loaded.sampling_probability.numpy(), model.sampling_probability.numpy())
    np.testing.assert_allclose(loaded.in_batch_loss(batch), model.in_batch_loss(batch), rtol=1e-6)


def test_item_bias_and_popularity_prior_fold_into_one_more_index_dimension_and_reload(schema, batch, tmp_path):
    movies = np.ravel(batch["movieId"])
    keras.utils.set_random_seed(0)
    model = mm.TwoTowerModel(schema, embedding_dim=8, tower_dims=[4], temperature=0.1, item_bias=True,
                             logq_correction=False, remove_accidental_hits=False)
    probability = model.set_sampling_probabilities(np.repeat(movies, np.arange(1, len(movies) + 1)))
    model.compile(optimizer=keras.optimizers.Adam(0.05))
    model.fit(batch, batch_size=len(movies), epochs=3, verbose=0)
    bias = model.bias.numpy()
    assert np.abs(bias[movies]).max() > 0  # trained with the towers
    cosine = np.asarray(model.query_embeddings(batch)) @ np.asarray(model.candidate_embeddings(batch)).T
    # in training the bias is the candidate column's: the same for every row
    np.testing.assert_allclose(model.in_batch_logits(batch), cosine / 0.1 + bias[movies][None, :], rtol=1e-4, atol=1e-4)

    model.prior_weight = 0.5
    query, candidate = np.asarray(model.index_query_vectors(batch)), np.asarray(model.index_candidate_vectors(batch))
    assert query.shape[1] == candidate.shape[1] == 5  # 4 tower dims + the movie term
    expected = np.diag(cosine) / 0.1 + bias[movies] + 0.5 * np.log(probability[movies])
    np.testing.assert_allclose(np.sum(query * candidate, axis=1), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.ravel(model.predict_on_batch(batch)), expected, rtol=1e-4, atol=1e-4)

    model.save(tmp_path / "biased.keras")
    loaded = mm.load_model(tmp_path / "biased.keras")
    assert loaded.item_bias and loaded.prior_weight == 0.5
    np.testing.assert_allclose(loaded.predict_on_batch(batch), model.predict_on_batch(batch), rtol=1e-6)
    plain = mm.TwoTowerModel(schema, embedding_dim=8, tower_dims=[4])  # neither: the cosine, dim-wide vectors
    assert not plain.extended and np.asarray(plain.index_query_vectors(batch)).shape[1] == 4

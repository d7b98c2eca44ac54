"""Retrieval over the saved workflow's catalog: the brute-force index, the two-tower Retriever (through a real
ETL output and a real trained two-tower model), two-stage ranking with the DLRM, the model dir's metrics."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import pipeline  # noqa: F401

UNSEEN_USER = 10_000_000


def test_brute_force_index_is_exact_with_exclusions_ties_and_a_short_catalog():
    from pipeline.retrieval import BruteForceIndex

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(50, 4)).astype("float32")
    vectors[7] = vectors[3]  # a tie: the lower row comes first
    queries = rng.normal(size=(3, 4)).astype("float32")
    queries[0] = vectors[3] * 10
    index = BruteForceIndex(np.arange(100, 150), vectors)
    ids, scores = index.search(queries, 5)
    full = queries @ vectors.T
    for q in range(3):
        np.testing.assert_allclose(scores[q], np.sort(full[q])[::-1][:5], rtol=1e-6)
    assert list(ids[0][:2]) == [103, 107]

    ids, _ = index.search(queries, 5, exclude=[np.array([3, 7]), np.array([], dtype=int), np.arange(48)])
    assert 103 not in ids[0] and 107 not in ids[0]
    assert list(ids[2][:2]) == sorted([148, 149], key=lambda i: -full[2, i - 100]) and list(ids[2][2:]) == [-1] * 3
    ids, scores = index.search(queries[:1], 500)
    assert ids.shape == (1, 50) and sorted(ids[0]) == list(range(100, 150))
    with pytest.raises(ValueError, match="dims"):
        index.search(np.zeros((1, 3)), 5)


@pytest.fixture(scope="module")
def retriever(etl_dir, two_tower_dir):
    from pipeline.retrieval import Retriever

    return Retriever.load(etl_dir, two_tower_dir)


@pytest.fixture(scope="module")
def ranker(etl_dir, model_dir):
    from pipeline.inference import Predictor

    return Predictor.load(etl_dir, model_dir)


def test_the_index_holds_every_movie_of_the_workflow_and_retrieves_the_best_pair_scores(retriever):
    predictor = retriever.predictor
    assert sorted(retriever.index.ids) == sorted(predictor.candidate_items)
    top = retriever.retrieve(7, k=10)
    assert len(top) == 10
    # the two-tower's own pair score through the saved workflow (Predictor.predict): cosine(user, movie)
    movies = predictor.candidate_items
    every = predictor.predict(pd.DataFrame({"userId": np.full(len(movies), 7), "movieId": movies}))
    np.testing.assert_allclose([s for _, s in top], np.sort(every)[::-1][:10], atol=1e-5)
    best = dict(zip(movies.tolist(), every.tolist()))
    np.testing.assert_allclose([best[m] for m, _ in top], [s for _, s in top], atol=1e-5)


def test_exclude_rated_drops_exactly_the_training_movies_and_unseen_users_get_an_answer(retriever, etl_dir):
    n = len(retriever.index)
    everything = {m for m, _ in retriever.retrieve(7, k=n)}
    fresh = {m for m, _ in retriever.retrieve(7, k=n, exclude_rated=True)}
    train = pd.concat(pd.read_parquet(p, columns=["userId", "movieId"]) for p in (etl_dir / "train").glob("*.parquet"))
    _, codes = retriever.queries(np.array([7]))
    rated_codes = set(train.loc[train["userId"] == codes[0], "movieId"])
    rated = {int(m) for m, c in zip(retriever.index.ids, retriever.item_codes) if c in rated_codes}
    assert rated and everything - fresh == rated and everything == set(retriever.index.ids.tolist())

    unseen = retriever.retrieve(UNSEEN_USER, k=5)
    assert len(unseen) == 5 and all(np.isfinite(s) for _, s in unseen)


def test_two_stage_ranks_the_retrieved_candidates_with_the_dlrm(retriever, ranker):
    from pipeline.retrieval import two_stage_recommend

    top = two_stage_recommend(retriever, ranker, 7, k=10, candidates=40, exclude_rated=True)
    candidates = {m for m, _ in retriever.retrieve(7, k=40, exclude_rated=True)}
    assert len(top) == 10 and {m for m, _ in top} <= candidates
    scores = ranker.predict(pd.DataFrame({"userId": 7, "movieId": sorted(candidates)}))
    np.testing.assert_allclose([s for _, s in top], np.sort(scores)[::-1][:10], atol=1e-6)
    # with every movie as a candidate, two-stage is the DLRM over everything
    everything = two_stage_recommend(retriever, ranker, 7, k=10, candidates=len(retriever.index))
    assert [m for m, _ in everything] == [m for m, _ in ranker.recommend(7, k=10)]


def test_a_ranking_model_dir_is_not_a_retriever(etl_dir, model_dir):
    from pipeline.errors import ArtifactError
    from pipeline.retrieval import Retriever

    with pytest.raises(ArtifactError, match="not a two-tower model"):
        Retriever.load(etl_dir, model_dir)


def test_the_model_dir_records_its_ranking_metrics_next_to_popularity(two_tower_dir):
    metrics = json.loads((two_tower_dir / "metrics.json").read_text())
    config = json.loads((two_tower_dir / "config.json").read_text())
    assert config["model"] == "two-tower" and "genres" in config["candidate_features"]
    assert set(metrics["valid"]) == {"recall@10", "recall@50", "ndcg@10", "map@10"}
    for name in ("two-tower", "popularity"):
        ranking = metrics["ranking"][name]
        assert 0 < ranking["recall@10"] <= ranking["recall@50"] <= 1 and ranking["users"] > 100
    epochs = metrics["epochs"]
    assert 2 <= len(epochs) <= 4 and epochs[-1]["train"]["loss"] < epochs[0]["train"]["loss"]


def test_model_selection_on_held_out_training_positives_restores_the_best_epoch_and_prior_weight(two_tower_dir,
                                                                                                 etl_dir):
    from pipeline.models import load_model

    metrics = json.loads((two_tower_dir / "metrics.json").read_text())
    selection, epochs = metrics["model_selection"], metrics["epochs"]
    # the held-out rows are training rows (the ranking train stage's seeded hash), never the valid split
    assert selection["select_rows"] > 0 and selection["fit_rows"] + selection["select_rows"] == sum(
        len(pd.read_parquet(p, columns=["userId"])) for p in (etl_dir / "train").glob("*.parquet"))
    assert metrics["scored"]["read_by_model_selection"] is False
    best = max(range(len(epochs)), key=lambda i: (epochs[i]["select"]["recall@50"], -i)) + 1
    assert metrics["best_epoch"] == selection["epoch"] == best
    weight = epochs[best - 1]["select"]["prior_weight"]
    assert weight in selection["prior_weights"] and metrics["prior_weight"] == weight
    by_weight = epochs[best - 1]["select"]["by_prior_weight"]
    assert by_weight[str(weight)] == max(by_weight.values())
    model = load_model(two_tower_dir / "model.keras")
    assert model.prior_weight == weight and model.item_bias  # the published model scores with them


def test_train_two_tower_takes_the_train_stages_settings_that_differ_from_its_defaults(etl_dir, tmp_path):
    from pipeline.retrieval import Retriever, train_two_tower
    from pipeline.train import TrainConfig

    metrics = train_two_tower(etl_dir, tmp_path / "tt", TrainConfig(epochs=2, batch_size=512, early_stopping=False),
                              verbose=0)
    config = json.loads((tmp_path / "tt" / "config.json").read_text())
    # epochs and batch size as given; the embedding width the stage's default (16) leaves to the two-tower's (64)
    assert (config["epochs"], config["batch_size"], config["embedding_dim"]) == (2, 512, 64)
    assert not config["early_stopping"] and len(metrics["epochs"]) == 2 and metrics["best_epoch"] in (1, 2)
    assert len(Retriever.load(etl_dir, tmp_path / "tt").retrieve(7, k=5)) == 5


def test_two_tower_config_refuses_settings_that_cannot_train():
    from pipeline.errors import UsageError
    from pipeline.retrieval import TwoTowerConfig

    for bad in (dict(batch_size=1), dict(temperature=0.0), dict(select_fraction=0.0), dict(prior_weights=()),
                dict(monitor="auc"), dict(embeddings_l2=-0.1), dict(embeddings_l2=float("inf"))):
        with pytest.raises(UsageError):
            TwoTowerConfig(**bad).check()
    TwoTowerConfig(select_fraction=0.0, early_stopping=False).check()


def test_the_compiled_two_stage_path_answers_as_the_reference_path(retriever, ranker):
    from pipeline.retrieval import TwoStageRecommender, two_stage_recommend

    recommender = TwoStageRecommender(retriever, ranker, candidates=40)
    assert recommender.compiled
    for user in (7, 11, 42, UNSEEN_USER):
        for exclude in (False, True):
            got = recommender.recommend(user, k=10, exclude_rated=exclude)
            expected = two_stage_recommend(retriever, ranker, user, 10, candidates=40, exclude_rated=exclude)
            assert [m for m, _ in got] == [m for m, _ in expected]
            np.testing.assert_allclose([s for _, s in got], [s for _, s in expected], atol=1e-6)
    assert len(recommender.recommend(7, k=60)) == 60  # more than the candidates: the reference path


def test_two_stage_with_a_popularity_weight_ranks_by_log_score_plus_weighted_log_training_ratings(retriever, ranker,
                                                                                               etl_dir):
    import pyarrow.parquet as pq

    from pipeline.retrieval import TwoStageRecommender, two_stage_recommend

    weight = 0.75
    recommender = TwoStageRecommender(retriever, ranker, candidates=40, popularity_weight=weight)
    plain = TwoStageRecommender(retriever, ranker, candidates=40)
    assert recommender.compiled
    train = pd.concat([pq.read_table(p, columns=["movieId"]).to_pandas() for p in sorted((etl_dir / "train").glob("*.parquet"))])
    ratings = train["movieId"].value_counts()
    for user in (7, 11, UNSEEN_USER):
        got = recommender.recommend(user, k=10, exclude_rated=True)
        expected = two_stage_recommend(retriever, ranker, user, 10, candidates=40, exclude_rated=True,
                                       popularity_weight=weight)
        assert [m for m, _ in got] == [m for m, _ in expected]
        np.testing.assert_allclose([s for _, s in got], [s for _, s in expected], atol=1e-5)
        # the same 40 candidates as without the weight, re-ranked by log p + w log(1 + the movie's training ratings)
        candidates = dict(plain.recommend(user, k=40, exclude_rated=True))
        movies = np.array([m for m, _ in got])
        codes = np.ravel(ranker.features(pd.DataFrame({"userId": np.full(len(movies), 7), "movieId": movies}))["movieId"])
        counts = np.array([ratings.get(int(c), 0) for c in codes])
        want = np.log([candidates[m] for m in movies]) + weight * np.log1p(counts)
        np.testing.assert_allclose([s for _, s in got], want, atol=1e-5)
        assert set(movies) <= set(candidates)
    with pytest.raises(ValueError, match="finite"):
        TwoStageRecommender(retriever, ranker, candidates=40, popularity_weight=float("nan"))


def test_the_two_stage_weights_are_picked_on_the_training_rows_neither_model_fitted(retriever, ranker, model_dir):
    from pipeline.retrieval import TwoStageRecommender, pick_two_stage_weights
    from pipeline.retrieval.popularity import POPULARITY_WEIGHTS, RETRIEVAL_WEIGHTS, set_two_stage_weights

    recommender = TwoStageRecommender(retriever, ranker, candidates=100)  # more than 50: the order matters
    picked = pick_two_stage_weights(recommender, max_users=50)
    fraction = json.loads((model_dir / "metrics.json").read_text())["model_selection"]["fraction"]
    assert picked["holdout"] == {"seed": 0, "fraction": fraction}
    assert 0 < picked["users"] <= 50 and len(picked["by_weights"]) == len(POPULARITY_WEIGHTS) * len(RETRIEVAL_WEIGHTS)
    best = max(m["recall@50"] for m in picked["by_weights"].values())
    w, v = picked["popularity_weight"], picked["retrieval_weight"]
    assert w in POPULARITY_WEIGHTS and v in RETRIEVAL_WEIGHTS and picked["by_weights"][f"{w:g},{v:g}"]["recall@50"] == best
    assert all(0 <= m["recall@50"] <= 1 for m in picked["by_weights"].values())
    # one weight given, the other auto: only the auto one is searched
    set_two_stage_weights(recommender, 0.5, "auto")
    assert recommender.popularity_weight == 0.5 and recommender.retrieval_weight in RETRIEVAL_WEIGHTS


def test_two_stage_with_a_retrieval_weight_adds_the_two_tower_score(retriever, ranker):
    from pipeline.retrieval import TwoStageRecommender, two_stage_recommend

    recommender = TwoStageRecommender(retriever, ranker, candidates=40, popularity_weight=0.5, retrieval_weight=0.25)
    for user in (7, UNSEEN_USER):
        got = recommender.recommend(user, k=10, exclude_rated=True)
        expected = two_stage_recommend(retriever, ranker, user, 10, candidates=40, exclude_rated=True,
                                       popularity_weight=0.5, retrieval_weight=0.25)
        assert [m for m, _ in got] == [m for m, _ in expected]
        np.testing.assert_allclose([s for _, s in got], [s for _, s in expected], atol=1e-5)
    # with only the retrieval term at a large weight the order is the two-tower's own
    alone = TwoStageRecommender(retriever, ranker, candidates=40, retrieval_weight=1e6)
    assert [m for m, _ in alone.recommend(7, k=10, exclude_rated=True)] == [
        m for m, _ in retriever.retrieve(7, k=10, exclude_rated=True)]

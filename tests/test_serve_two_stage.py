"""Two-stage /recommend (serve --retrieval): a real uvicorn server on 127.0.0.1 with the conftest DLRM as the
ranker and the conftest two-tower as the retrieval model; the single-stage path stays."""

from __future__ import annotations

import httpx
import numpy as np
import pandas as pd
import pytest

import pipeline  # noqa: F401

UNSEEN_USER = 10_000_000
CANDIDATES = 50


@pytest.fixture(scope="module")
def predictor(etl_dir, model_dir):
    from pipeline.inference import Predictor

    return Predictor.load(etl_dir, model_dir)


@pytest.fixture(scope="module")
def retriever(etl_dir, two_tower_dir):
    from pipeline.retrieval import Retriever

    return Retriever.load(etl_dir, two_tower_dir)


@pytest.fixture(scope="module")
def client(predictor, retriever):
    from pipeline.serve import serve_in_background

    with serve_in_background(predictor, host="127.0.0.1", retriever=retriever, candidates=CANDIDATES) as running:
        with httpx.Client(base_url=running.url, timeout=60) as c:
            yield c


def test_recommend_is_two_stage_by_default_and_rank_all_on_request(client, predictor, retriever):
    from pipeline.retrieval import two_stage_recommend

    body = client.get("/recommend", params={"userId": 7, "k": 10}).json()
    assert body["path"] == "two-stage" and body["candidates"] == CANDIDATES
    expected = two_stage_recommend(retriever, predictor, 7, 10, candidates=CANDIDATES)
    assert [i["movieId"] for i in body["items"]] == [m for m, _ in expected]
    np.testing.assert_allclose([i["score"] for i in body["items"]], [s for _, s in expected], atol=1e-6)
    retrieved = {m for m, _ in retriever.retrieve(7, k=CANDIDATES)}
    assert {i["movieId"] for i in body["items"]} <= retrieved

    single = client.get("/recommend", params={"userId": 7, "k": 10, "path": "rank-all"}).json()
    assert single["path"] == "rank-all" and "candidates" not in single
    assert [i["movieId"] for i in single["items"]] == [m for m, _ in predictor.recommend(7, k=10)]


def test_two_stage_excludes_rated_movies_and_answers_unseen_users(client, predictor, retriever):
    fresh = client.get("/recommend", params={"userId": 7, "k": 20, "exclude_rated": "true"}).json()
    _, codes = retriever.queries(np.array([7]))
    rated_codes = set(predictor.rated_codes(int(codes[0])).tolist())
    movies = [i["movieId"] for i in fresh["items"]]
    codes_of = np.ravel(predictor.features(pd.DataFrame({"userId": 7, "movieId": movies}))["movieId"])
    assert len(movies) == 20 and rated_codes and not set(codes_of.tolist()) & rated_codes

    unseen = client.get("/recommend", params={"userId": UNSEEN_USER, "k": 5})
    assert unseen.status_code == 200 and len(unseen.json()["items"]) == 5
    bad = client.get("/recommend", params={"userId": 7, "path": "sideways"})
    assert bad.status_code == 422 and "path" in bad.json()["error"]
    meta = client.get("/metadata").json()["retrieval"]
    assert meta["candidates"] == CANDIDATES and meta["movies"] == len(predictor.candidate_items)


def test_without_retrieval_the_service_stays_single_stage(predictor):
    from pipeline.serve import serve_in_background

    with serve_in_background(predictor, host="127.0.0.1") as running, httpx.Client(base_url=running.url, timeout=60) as c:
        body = c.get("/recommend", params={"userId": 7, "k": 5}).json()
        assert body["path"] == "rank-all" and [i["movieId"] for i in body["items"]] == [
            m for m, _ in predictor.recommend(7, k=5)]
        refused = c.get("/recommend", params={"userId": 7, "path": "two-stage"})
        assert refused.status_code == 422 and "--retrieval" in refused.json()["error"]
        assert c.get("/metadata").json()["retrieval"] is None

"""``python -m pipeline serve --retrieval`` as a user runs it: its own process on 127.0.0.1, /recommend on both
paths (the conftest DLRM ranks, the conftest two-tower retrieves), answers equal to the in-process ones."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

import pipeline  # noqa: F401  (dask settings before nvtabular)

CANDIDATES = 30
POPULARITY_WEIGHT = 0.5  # two-stage ranks by log(DLRM score) + 0.5 log(1 + training ratings) + 0.25 x two-tower
RETRIEVAL_WEIGHT = 0.25


@pytest.fixture(scope="module")
def server(etl_dir, model_dir, two_tower_dir):
    """The URL of a running ``serve --retrieval`` process."""
    from pipeline.serve import serve_in_subprocess

    with serve_in_subprocess("--data", str(etl_dir), "--model-dir", str(model_dir), "--retrieval", str(two_tower_dir),
                             "--candidates", str(CANDIDATES), "--popularity-weight", str(POPULARITY_WEIGHT),
                             "--retrieval-weight", str(RETRIEVAL_WEIGHT),
                             "--no-access-log") as (_, url):
        yield url


def test_the_serve_retrieval_command_answers_both_paths(server, etl_dir, model_dir, two_tower_dir):
    from pipeline.inference import Predictor
    from pipeline.retrieval import Retriever, two_stage_recommend

    ranker, retriever = Predictor.load(etl_dir, model_dir), Retriever.load(etl_dir, two_tower_dir)
    with httpx.Client(base_url=server, timeout=60) as client:
        for user in (7, 31):
            two = client.get("/recommend", params={"userId": user, "k": 10, "exclude_rated": "true"}).json()
            assert two["path"] == "two-stage" and two["candidates"] == CANDIDATES
            expected = two_stage_recommend(retriever, ranker, user, 10, candidates=CANDIDATES, exclude_rated=True,
                                           popularity_weight=POPULARITY_WEIGHT, retrieval_weight=RETRIEVAL_WEIGHT)
            assert [i["movieId"] for i in two["items"]] == [m for m, _ in expected]
            np.testing.assert_allclose([i["score"] for i in two["items"]], [s for _, s in expected], atol=1e-5)

            one = client.get("/recommend", params={"userId": user, "k": 10, "exclude_rated": "true",
                                                   "path": "rank-all"}).json()
            assert one["path"] == "rank-all" and "candidates" not in one
            assert [i["movieId"] for i in one["items"]] == [m for m, _ in ranker.recommend(user, 10, True)]
        meta = client.get("/metadata").json()["retrieval"]
        assert meta["movies"] == len(retriever.index) and meta["dims"] == retriever.index.dim
        assert (meta["popularity_weight"], meta["retrieval_weight"]) == (POPULARITY_WEIGHT, RETRIEVAL_WEIGHT)

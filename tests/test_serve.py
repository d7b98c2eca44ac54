"""The HTTP service, tested through a real uvicorn server on 127.0.0.1 with a real HTTP client.

Faults, timeouts and connections: test_serve_faults.py; the mixed load: test_serve_load.py;
the `serve` command in its own process (SIGTERM, memory, port checks): test_serve_process.py.
"""

from __future__ import annotations

import threading

import httpx
import numpy as np
import pandas as pd
import pytest

import pipeline  # noqa: F401  (dask settings before nvtabular)

UNSEEN_USER = 10_000_000


@pytest.fixture(scope="module")
def server(predictor):
    from pipeline.serve import serve_in_background

    with serve_in_background(predictor, host="127.0.0.1") as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def pairs(predictor):
    rng = np.random.default_rng(0)
    users = rng.choice(np.arange(1, 450), size=300)  # includes a few ids beyond the 400 known users
    movies = rng.choice(predictor.candidate_items, size=300)
    return pd.DataFrame({"userId": users, "movieId": movies})


def test_predict_returns_the_predictors_scores_in_request_order(client, predictor, pairs):
    body = {"pairs": pairs.iloc[:50].to_dict(orient="records")}
    response = client.post("/predict", json=body)

    assert response.status_code == 200
    scores = response.json()["scores"]
    np.testing.assert_allclose(scores, predictor.predict(pairs.iloc[:50]), atol=1e-6)


def test_an_unseen_user_gets_a_score(client, predictor, pairs):
    movie = int(pairs["movieId"].iloc[0])
    response = client.post("/predict", json={"pairs": [{"userId": UNSEEN_USER, "movieId": movie}]})

    assert response.status_code == 200
    (score,) = response.json()["scores"]
    assert 0.0 < score < 1.0
    expected = predictor.predict(pd.DataFrame({"userId": [UNSEEN_USER], "movieId": [movie]}))[0]
    assert score == pytest.approx(expected, abs=1e-6)


def test_recommend_returns_the_top_k_over_all_movies(client, predictor):
    response = client.get("/recommend", params={"userId": 7, "k": 10})
    assert response.status_code == 200
    body = response.json()
    assert body["userId"] == 7
    expected = predictor.recommend(7, k=10)
    assert [item["movieId"] for item in body["items"]] == [m for m, _ in expected]
    np.testing.assert_allclose([item["score"] for item in body["items"]], [s for _, s in expected], atol=1e-6)

    fresh = client.get("/recommend", params={"userId": 7, "k": 10, "exclude_rated": "true"}).json()
    expected = [m for m, _ in predictor.recommend(7, k=10, exclude_rated=True)]
    assert [item["movieId"] for item in fresh["items"]] == expected


@pytest.mark.parametrize(
    "body, field",
    [
        ({"pairs": [{"userId": 1}]}, "pairs[0].movieId: Field required"),
        ({"pairs": [{"userId": 1, "movieId": 2}, {"userId": "3", "movieId": 4}]}, "pairs[1].userId"),
        ({"pairs": [{"userId": 1, "movieId": 2.5}]}, "pairs[0].movieId"),
        ({"pairs": [{"userId": 1, "movieId": 2, "rating": 5}]}, "pairs[0].rating: unexpected field"),
        ({"pairs": [{"userId": -1, "movieId": 2}]}, "pairs[0].userId"),
        ({"pairs": []}, "pairs:"),
        ({"pair": [{"userId": 1, "movieId": 2}]}, "pairs: Field required"),
    ],
)
def test_bad_bodies_get_a_4xx_naming_the_field(client, body, field):
    response = client.post("/predict", json=body)
    assert response.status_code == 422
    assert field in response.json()["error"]


def test_malformed_json_and_bad_query_parameters_are_rejected(client):
    response = client.post("/predict", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert "JSON" in response.json()["error"]

    response = client.get("/recommend", params={"userId": "abc"})
    assert response.status_code == 422 and "userId" in response.json()["error"]
    response = client.get("/recommend", params={"userId": 1, "k": 0})
    assert response.status_code == 422 and "k" in response.json()["error"]


def test_health_and_metadata(client, predictor):
    assert client.get("/healthz").json() == {"status": "ok"}
    meta = client.get("/metadata").json()
    assert meta["target"] == predictor.target
    assert set(meta["schema"]) == {i.name for i in predictor.inputs}
    assert meta["versions"]["nvtabular"] == "23.8.0" and "model" in meta and "workflow" in meta


def test_concurrent_clients_get_their_own_answers(server, predictor, pairs):
    """20 clients x 100 one-pair requests at once: no error, nothing lost, nothing mixed up."""
    clients, per_client = 20, 100
    expected = predictor.predict(pairs)
    answers: dict[tuple[int, int], float] = {}
    errors: list[str] = []
    lock = threading.Lock()

    def run(client_id: int) -> None:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            for i in range(per_client):
                row = (client_id * per_client + i) % len(pairs)
                pair = {"userId": int(pairs["userId"].iloc[row]), "movieId": int(pairs["movieId"].iloc[row])}
                try:
                    response = http.post("/predict", json={"pairs": [pair]})
                    response.raise_for_status()
                    (score,) = response.json()["scores"]
                except Exception as err:  # collected and reported below
                    with lock:
                        errors.append(f"client {client_id} request {i}: {err!r}")
                    continue
                with lock:
                    answers[(client_id, i)] = score

    threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert not errors, errors[:5]
    assert len(answers) == clients * per_client
    for (client_id, i), score in answers.items():
        row = (client_id * per_client + i) % len(pairs)
        assert score == pytest.approx(expected[row], abs=1e-5), (client_id, i)
    batcher = server.app.state.batcher
    assert batcher.batches < batcher.requests  # concurrent requests were merged


def test_the_micro_batcher_merges_requests_and_isolates_a_bad_one(predictor, pairs):
    from pipeline.errors import DataError
    from pipeline.serve import MicroBatcher

    batcher = MicroBatcher(predictor, max_delay=0.2).start()
    try:
        good = [batcher.submit(pairs.iloc[i : i + 3].reset_index(drop=True)) for i in (0, 3)]
        bad = batcher.submit(pd.DataFrame({"userId": [1]}))  # no movieId
        np.testing.assert_allclose(good[0].result(60), predictor.predict(pairs.iloc[0:3]), atol=1e-6)
        np.testing.assert_allclose(good[1].result(60), predictor.predict(pairs.iloc[3:6]), atol=1e-6)
        with pytest.raises(DataError, match="movieId"):
            bad.result(60)
    finally:
        batcher.stop()
    assert batcher.requests == 3 and batcher.batches == 1  # one merged batch, then the fallback


def test_every_error_has_the_same_body_shape(client):
    """404, 405, 422: always ``{"error": ...}``; a 405 still names the allowed method."""
    missing = client.get("/no-such-route")
    assert missing.status_code == 404 and missing.json() == {"error": "Not Found"}
    wrong_method = client.get("/predict")
    assert wrong_method.status_code == 405 and wrong_method.json() == {"error": "Method Not Allowed"}
    assert wrong_method.headers["allow"] == "POST"
    bad = client.post("/predict", json={"pairs": [{"userId": -1, "movieId": 2}]})
    assert bad.status_code == 422 and "pairs[0].userId" in bad.json()["error"]


def test_liveness_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}


def test_a_body_over_the_limit_is_refused_before_it_is_parsed(predictor):
    """Content-Length over the limit: 413 without reading the body; a chunked body: 413 once the
    streamed bytes pass the limit. The connection is closed (the client may still be sending)."""
    from pipeline.serve import serve_in_background

    limit = 4096
    with serve_in_background(predictor, max_body_bytes=limit) as running, \
            httpx.Client(base_url=running.url, timeout=30) as http:
        small = {"pairs": [{"userId": 1, "movieId": 1}]}
        assert http.post("/predict", json=small).status_code == 200

        big = {"pairs": [{"userId": 1, "movieId": 1}] * 400}  # ~12 kB
        response = http.post("/predict", json=big)
        assert response.status_code == 413
        assert response.json() == {"error": f"request body larger than {limit} bytes"}
        assert response.headers["connection"] == "close"

        def chunks():  # no Content-Length: the server has to count
            for _ in range(100):
                yield b" " * 1000

        response = http.post("/predict", content=chunks(), headers={"content-type": "application/json"})
        assert response.status_code == 413 and "error" in response.json()

        assert http.post("/predict", json=small).status_code == 200  # and it goes on serving
        counts = _metric_samples(http.get("/metrics").text, "movielens_http_requests_total")
        assert counts[("/predict", "POST", "413")] == 2


def _samples(text: str, name: str) -> list:
    """The samples of one metric in Prometheus text format (parsed by prometheus-client's own parser)."""
    from prometheus_client.parser import text_string_to_metric_families

    return [s for family in text_string_to_metric_families(text) for s in family.samples if s.name == name]


def _metric_samples(text: str, name: str) -> dict[tuple, float]:
    """``{label values: value}`` of one metric in Prometheus text format."""
    return {tuple(s.labels.values()): s.value for s in _samples(text, name)}


def test_metrics_in_prometheus_format(client, predictor):
    from pipeline.serve import manifest_fingerprint

    client.post("/predict", json={"pairs": [{"userId": 1, "movieId": 1}]})
    client.get("/nope")
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text

    requests = _metric_samples(text, "movielens_http_requests_total")
    assert requests[("/predict", "POST", "200")] >= 1
    assert requests[("other", "GET", "404")] >= 1  # unknown paths share one label value
    assert _metric_samples(text, "movielens_http_request_duration_seconds_count")[("/predict",)] >= 1
    assert _metric_samples(text, "movielens_batch_rows_count")[()] >= 1
    assert _metric_samples(text, "movielens_queue_depth")[()] == 0
    assert _metric_samples(text, "movielens_batcher_alive")[()] == 1
    (info,) = _samples(text, "movielens_model_info")
    assert info.labels["model_manifest_sha256"] == manifest_fingerprint(predictor.model_dir)
    assert info.labels["workflow_manifest_sha256"] == manifest_fingerprint(predictor.etl_dir / "workflow")
    assert len(info.labels["model_manifest_sha256"]) == 64


def test_every_request_is_one_json_access_log_line(client, caplog):
    import json
    import logging
    import time

    def lines():
        return [json.loads(r.getMessage()) for r in caplog.records if r.name == "pipeline.serve.access"]

    with caplog.at_level(logging.INFO, logger="pipeline.serve.access"):
        client.post("/predict", json={"pairs": [{"userId": 1, "movieId": 1}]})
        client.get("/recommend", params={"userId": "x"})
        deadline = time.monotonic() + 5  # a line is written just after its response is sent
        while len(lines()) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    lines = lines()
    assert [(line["method"], line["path"], line["status"]) for line in lines] == [
        ("POST", "/predict", 200), ("GET", "/recommend", 422)]
    assert lines[0]["bytes_in"] > 0 and lines[0]["ms"] > 0 and lines[1]["query"] == "userId=x"

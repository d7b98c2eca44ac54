"""The service cannot wedge: cancelled requests, scoring faults, non-finite scores, timeouts and
connections that never finish their request. Real predictor, real uvicorn server on 127.0.0.1;
faults are injected by wrapping the real predictor's ``validate``, the first step of every scoring
path (``Predictor.predict`` and the server's raw-request graph)."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import numpy as np
import pandas as pd
import pytest

import pipeline  # noqa: F401  (dask settings before nvtabular)


def one_pair(user: int, movie: int) -> pd.DataFrame:
    return pd.DataFrame({"userId": [user], "movieId": [movie]})


class Gate:
    """Wraps ``predictor.validate`` so that calls block until ``open()``: requests pile up in the queue."""

    def __init__(self, predictor):
        self.real = predictor.validate
        self.entered = threading.Event()
        self.released = threading.Event()

    def __call__(self, frame):
        self.entered.set()
        self.released.wait(30)
        return self.real(frame)

    def open(self) -> None:
        self.released.set()


def test_cancelled_requests_are_skipped_and_later_ones_answered(predictor, monkeypatch):
    """Cancelling queued futures used to kill the batcher thread (InvalidStateError) for good."""
    from pipeline.serve import MicroBatcher

    gate = Gate(predictor)
    expected = predictor.predict(pd.DataFrame({"userId": [1, 3, 5, 7, 9], "movieId": [1] * 5}))
    monkeypatch.setattr(predictor, "validate", gate)
    batcher = MicroBatcher(predictor).start()
    try:
        first = batcher.submit(one_pair(1, 1))
        assert gate.entered.wait(30)  # the thread is busy scoring `first`
        queued = [batcher.submit(one_pair(u, 1)) for u in range(2, 8)]
        assert all(f.cancel() for f in queued[::2])  # their callers gave up
        gate.open()

        assert first.result(30)[0] == pytest.approx(expected[0], abs=1e-6)
        for future, want in zip(queued[1::2], expected[1:4]):
            assert future.result(30)[0] == pytest.approx(want, abs=1e-6)
        later = batcher.submit(one_pair(9, 1))
        assert later.result(30)[0] == pytest.approx(expected[4], abs=1e-6)
        assert batcher.alive and batcher.cancelled == 3
    finally:
        gate.open()
        batcher.stop()


def test_a_request_that_waits_too_long_gets_a_504_and_is_dropped(predictor, monkeypatch):
    from pipeline.serve import serve_in_background

    gate = Gate(predictor)
    with serve_in_background(predictor, request_timeout=0.5) as running, \
            httpx.Client(base_url=running.url, timeout=30) as http:
        monkeypatch.setattr(predictor, "validate", gate)
        blocked = threading.Thread(target=http.post, args=("/predict",),
                                   kwargs={"json": {"pairs": [{"userId": 1, "movieId": 1}]}})
        blocked.start()
        assert gate.entered.wait(30)
        with httpx.Client(base_url=running.url, timeout=30) as other:
            start = time.monotonic()
            response = other.post("/predict", json={"pairs": [{"userId": 2, "movieId": 1}]})
            assert response.status_code == 504 and "within 0.5 s" in response.json()["error"]
            assert time.monotonic() - start < 5
        gate.open()
        blocked.join(30)
        monkeypatch.undo()
        response = http.post("/predict", json={"pairs": [{"userId": 3, "movieId": 1}]})
        assert response.status_code == 200
        assert response.json()["scores"][0] == pytest.approx(predictor.predict(one_pair(3, 1))[0], abs=1e-6)
        deadline = time.monotonic() + 5
        while running.app.state.batcher.cancelled < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert running.app.state.batcher.cancelled == 1  # the timed-out request was never scored


def test_a_failing_model_call_fails_its_requests_and_the_service_recovers(predictor, monkeypatch):
    from pipeline.serve import serve_in_background

    real = predictor.validate
    failures = {"left": 3}
    expected = predictor.predict(one_pair(4, 1))[0]

    def flaky(frame):
        if failures["left"] > 0:
            failures["left"] -= 1
            raise RuntimeError("injected scoring fault")
        return real(frame)

    with serve_in_background(predictor) as running, httpx.Client(base_url=running.url, timeout=30) as http:
        monkeypatch.setattr(predictor, "validate", flaky)
        body = {"pairs": [{"userId": 4, "movieId": 1}]}
        for _ in range(3):
            response = http.post("/predict", json=body)
            assert response.status_code == 500 and "injected scoring fault" in response.json()["error"]
        response = http.post("/predict", json=body)
        assert response.status_code == 200
        assert response.json()["scores"][0] == pytest.approx(expected, abs=1e-6)
        assert http.get("/healthz").json() == {"status": "ok"}


class Fatal(BaseException):
    """Not an Exception: nothing in the batcher may catch it, so its thread dies."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_scoring_thread_makes_the_service_unhealthy_not_hung(predictor, monkeypatch):
    from pipeline.serve import serve_in_background

    def fatal(frame):
        raise Fatal("injected: the scoring thread dies")

    with serve_in_background(predictor, request_timeout=5) as running, \
            httpx.Client(base_url=running.url, timeout=30) as http:
        monkeypatch.setattr(predictor, "validate", fatal)
        body = {"pairs": [{"userId": 4, "movieId": 1}]}
        start = time.monotonic()
        response = http.post("/predict", json=body)  # its batch was in flight when the thread died
        assert response.status_code == 503 and "error" in response.json()
        assert time.monotonic() - start < 4  # answered at once, not after the request timeout
        health = http.get("/healthz")
        assert health.status_code == 503 and "not running" in health.json()["error"]
        assert http.get("/readyz").status_code == 503
        assert http.post("/predict", json=body).status_code == 503
        assert "movielens_batcher_alive 0.0" in http.get("/metrics").text


def test_non_finite_scores_are_an_error_and_make_the_service_unhealthy(predictor):
    """A model whose weights went NaN (as a diverged one's do): 500 for its answers, /healthz 503."""
    from pipeline.serve import serve_in_background

    bias = next(v for v in predictor.model.variables if predictor.target in v.path and v.path.endswith("bias"))
    saved = bias.numpy()
    with serve_in_background(predictor) as running, httpx.Client(base_url=running.url, timeout=30) as http:
        body = {"pairs": [{"userId": 12, "movieId": 1}, {"userId": 13, "movieId": 1}]}
        assert http.post("/predict", json=body).status_code == 200
        bias.assign(np.full_like(saved, np.nan))
        try:
            response = http.post("/predict", json=body)
        finally:
            bias.assign(saved)
        assert response.status_code == 500
        assert "non-finite" in response.json()["error"] and "pairs[0]" in response.json()["error"]
        health = http.get("/healthz")
        assert health.status_code == 503 and "non-finite" in health.json()["error"]


@pytest.mark.parametrize("sent", [b"", b"POST /predict HTTP/1.1\r\nHost: x\r\n",
                                  b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"pairs\""])
def test_a_connection_that_never_finishes_its_request_is_closed(predictor, sent):
    """Nothing sent, half a head, half a body: closed after the read timeout (uvicorn alone never did)."""
    from pipeline.serve import serve_in_background

    with serve_in_background(predictor, read_timeout=1.0) as running:
        with socket.create_connection((running.host, running.port), timeout=10) as sock:
            sock.sendall(sent)
            start = time.monotonic()
            assert sock.recv(65536) == b""  # closed by the server, with no answer
            waited = time.monotonic() - start
        assert 0.8 < waited < 5
        assert httpx.get(running.url + "/healthz").status_code == 200


def test_an_idle_kept_alive_connection_is_closed(predictor):
    from pipeline.serve import serve_in_background

    with serve_in_background(predictor, keep_alive=0.5) as running:
        with socket.create_connection((running.host, running.port), timeout=10) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while not answer.endswith(b'{"status":"ok"}'):
                answer += sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 200")
            start = time.monotonic()
            assert sock.recv(65536) == b""
            assert time.monotonic() - start < 3

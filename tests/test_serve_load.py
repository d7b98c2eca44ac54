"""A bounded mixed load against a real server: valid pairs, invalid bodies, oversize bodies, clients
that disconnect before their answer and connections that never finish their request, all at once.
Every valid answer must be the single-request score of its own pairs, to a few float32 ulps (the
model's kernels round differently for other batch sizes; a mixed-up answer is off by far more)."""

from __future__ import annotations

import numpy as np
import pandas as pd

import pipeline  # noqa: F401  (dask settings before nvtabular)


def test_mixed_load_loses_nothing_mixes_nothing_and_leaves_the_server_healthy(predictor):
    from pipeline.serve import mixed_load, serve_in_background

    rng = np.random.default_rng(1)
    known_users = predictor.cache.keys["userId"]
    pairs = pd.DataFrame({  # known and unseen users and movies
        "userId": np.concatenate([rng.choice(known_users, 60), [10_000_001, 10_000_002]]),
        "movieId": np.concatenate([rng.choice(predictor.candidate_items, 60), [99_999_999, 3]]),
    })
    with serve_in_background(predictor, read_timeout=1.0, max_body_bytes=16_384) as running:
        report = mixed_load(running.url, pairs, clients=8, requests_per_client=40, silent_clients=3, timeout=30)
        batcher = running.app.state.batcher

    summary = report.summary()
    scores = np.unique(predictor.predict(pairs))
    assert np.diff(scores).min() > 8 * np.spacing(scores.max())  # so a mixed-up answer cannot pass
    assert not report.lost, report.lost[:5]
    assert not report.wrong, report.wrong[:5]
    assert report.outcomes["valid"] == {"200": report.sent["valid"]}
    assert report.outcomes["invalid"] == {"422": report.sent["invalid"]}
    assert report.outcomes["oversize"] == {"413": report.sent["oversize"]}
    assert report.outcomes["silent"] == {"closed by server": 3}
    assert max(report.silent_closed_after) < 5
    assert report.healthy_after, summary
    assert summary["metrics_after"]["movielens_queue_depth"] == 0
    assert summary["metrics_after"]["movielens_batcher_alive"] == 1
    assert batcher.batches < batcher.requests  # concurrent requests were merged

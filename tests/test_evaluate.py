"""`python -m pipeline evaluate`: ranking metrics of a two-tower and a DLRM (and two-stage, popularity) on the
conftest ETL output, through the real CLI in its own process."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

import pipeline  # noqa: F401


def test_evaluate_reports_every_ranker_on_the_same_users(etl_dir, model_dir, two_tower_dir, tmp_path):
    out = tmp_path / "ranking.json"
    done = subprocess.run([sys.executable, "-m", "pipeline", "evaluate", "--data", str(etl_dir), "--model-dir",
                           str(two_tower_dir), "--model-dir", str(model_dir), "--out", str(out), "--candidates", "60",
                           "--max-users", "120", "--popularity-weight", "auto", "--retrieval-weight", "auto"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["metrics"]) == {"popularity", "dlrm", "two-tower", "two-stage"}
    assert report["users"] == 120 and report["candidates"] == 60
    # two-stage's weights picked on held-out training positives, never on valid
    picked = report["two_stage"]["picked_on_held_out_training_positives"]
    assert picked["users"] > 0
    for name in ("popularity_weight", "retrieval_weight"):
        assert report["two_stage"][name] == picked[name]
    for name, m in report["metrics"].items():
        assert m["users"] == 120
        assert 0 < m["recall@10"] <= m["recall@50"] <= 1, name
        assert 0 < m["ndcg@10"] <= 1 and 0 < m["map@10"] <= m["ndcg@10"], name


def test_ranking_metrics_match_hand_computed_values():
    from pipeline.retrieval import ranking_metrics

    ranked = np.full((2, 50), -1)
    ranked[0, :3] = [5, 9, 7]  # hits at ranks 1 and 3 of 4 positives
    ranked[1, 10] = 4  # a hit at rank 11: outside the top 10
    m = ranking_metrics(ranked, [np.array([5, 7, 8, 6]), np.array([4])])
    assert m["recall@10"] == (2 / 4 + 0) / 2 and m["recall@50"] == (2 / 4 + 1) / 2
    ndcg0 = (1 + 1 / np.log2(4)) / sum(1 / np.log2(r + 1) for r in range(1, 5))
    assert np.isclose(m["ndcg@10"], ndcg0 / 2)
    assert np.isclose(m["map@10"], ((1 + 2 / 3) / 4) / 2)

"""The train stage's batch scaling (issue 10): above 100 steps per epoch the batch grows with sqrt(steps / 100)
rounded to a power of 2, and the weight decay and the weight average follow the steps the run really takes."""

from __future__ import annotations

import json
import math

import pytest

from pipeline.train import TrainConfig, ema_momentum, scaled_batch_size, scaled_weight_decay


@pytest.mark.parametrize(("rows", "expected"), [
    (81_000, 1024),  # ML-100K: 80 steps, as given
    (102_400, 1024),  # 100 steps
    (203_776, 1024),  # 199 steps
    (204_800, 2048),  # 200 steps: sqrt(2) rounds up to 2
    (720_127, 2048),  # synthetic ML-1M's fit rows: 704 steps
    (1_900_000, 4096),
    (22_500_000, 16384),  # ML-25M size
])
def test_scaled_batch_size(rows, expected):
    assert scaled_batch_size(1024, rows) == expected


def _train(etl_dir, out, **settings) -> dict:
    from pipeline.train import train_model

    train_model(etl_dir, out, seed=0, epochs=1, **settings)
    return json.loads((out / "metrics.json").read_text())


def test_train_scales_the_batch_and_what_follows_it(etl_dir, tmp_path):
    """--batch-size 64 on the small set's ~28.8k fit rows is ~450 steps: the run takes batches of 128, and its
    decay and average are those of ceil(fit_rows / 128) steps; --no-batch-scaling keeps 64."""
    scaled = _train(etl_dir, tmp_path / "scaled", batch_size=64)
    fit_rows = scaled["fit_rows"]
    assert 200 <= math.ceil(fit_rows / 64) < 800
    assert scaled["effective_batch_size"] == 128
    steps = math.ceil(fit_rows / 128)
    assert scaled["effective_weight_decay"] == pytest.approx(scaled_weight_decay(TrainConfig().weight_decay, steps))
    assert scaled["ema_momentum"] == pytest.approx(ema_momentum(TrainConfig().ema_epochs, steps))
    config = json.loads((tmp_path / "scaled" / "config.json").read_text())
    assert config["batch_size"] == 64 and config["batch_scaling"] is True

    exact = _train(etl_dir, tmp_path / "exact", batch_size=64, batch_scaling=False)
    assert exact["effective_batch_size"] == 64
    assert exact["ema_momentum"] == pytest.approx(ema_momentum(TrainConfig().ema_epochs, math.ceil(fit_rows / 64)))

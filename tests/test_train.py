"""The train stage on the small synthetic ETL output: outputs, quality, determinism, resume, bad input, CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import pipeline  # noqa: F401
from pipeline.errors import DataError
from pipeline.metrics import roc_auc as auc


def read_split(etl_dir: Path, split: str) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in sorted((etl_dir / split).glob("*.parquet"))], ignore_index=True)


def predict_valid(model_dir: Path, etl_dir: Path) -> np.ndarray:
    import keras
    from merlin.io import Dataset

    import pipeline.models  # noqa: F401  (registers the layers)

    model = keras.saving.load_model(model_dir / "model.keras")
    scores = model.predict(Dataset(str(etl_dir / "valid"), engine="parquet"), batch_size=4096, verbose=0)
    # A multi-task model answers {target: (rows, 1)}; its first target is the one scored.
    return np.asarray(scores[model.target_names[0]] if isinstance(scores, dict) else scores)[:, 0]


def test_model_dir_holds_model_export_metrics_schema_and_config(model_dir, etl_dir):
    from merlin.io import Dataset

    from pipeline.train import schema_fingerprint

    assert {"model.keras", "saved_model", "metrics.json", "schema.pbtxt", "config.json", "checkpoints"} <= {
        p.name for p in model_dir.iterdir()
    }
    assert not model_dir.with_name(model_dir.name + ".partial").exists()
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert set(metrics["valid"]) >= {"auc", "logloss", "accuracy"}
    assert 0.5 < metrics["valid"]["auc"] <= 1.0
    # Default: every target of the schema; the binary one comes first and is reported unprefixed too.
    assert metrics["targets"] == ["rating_binary", "rating"]
    assert metrics["valid"]["auc"] == metrics["valid"]["rating_binary_auc"] and metrics["valid"]["rating_rmse"] > 0
    epoch = metrics["epochs"][-1]
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2, 3]
    assert epoch["seconds"] > 0 and epoch["samples_per_second"] == pytest.approx(metrics["train_rows"] / epoch["seconds"], rel=0.01)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model"] == "dlrm" and config["batch_size"] == 1024 and config["targets"] == ["rating_binary", "rating"]
    assert config["schema_fingerprint"] == schema_fingerprint(Dataset(str(etl_dir / "train"), engine="parquet").schema)
    assert (model_dir / "schema.pbtxt").read_text() == (etl_dir / "train" / "schema.pbtxt").read_text()


def test_saved_model_export_scores_like_the_keras_model(model_dir, etl_dir):
    import keras
    import tensorflow as tf
    from merlin.io import Dataset

    import pipeline.models as mm

    model = keras.saving.load_model(model_dir / "model.keras")
    features = mm.sample_batch(Dataset(str(etl_dir / "valid"), engine="parquet"), 64, include_targets=False)
    exported = tf.saved_model.load(str(model_dir / "saved_model"))
    served = exported.serve({k: v for k, v in features.items() if k in model.input_feature_names()})
    expected = model.predict(features, verbose=0)
    assert set(served) == set(expected) == {"rating_binary", "rating"}  # one output per head
    for target in expected:
        np.testing.assert_allclose(np.asarray(served[target]), expected[target], rtol=1e-5, atol=1e-6)


def test_dlrm_beats_a_popularity_baseline_by_a_clear_margin(model_dir, etl_dir):
    train, valid = read_split(etl_dir, "train"), read_split(etl_dir, "valid")
    # popularity: how often each movie is rated > 3 in train (smoothed towards the global rate)
    global_rate = train["rating_binary"].mean()
    stats = train.groupby("movieId")["rating_binary"].agg(["sum", "count"])
    rate = (stats["sum"] + 10 * global_rate) / (stats["count"] + 10)
    popularity = valid["movieId"].map(rate).fillna(global_rate).to_numpy()
    labels = valid["rating_binary"].to_numpy()

    dlrm_auc = auc(labels, predict_valid(model_dir, etl_dir))
    popularity_auc = auc(labels, popularity)
    assert dlrm_auc > popularity_auc + 0.03, (dlrm_auc, popularity_auc)


def test_resume_extends_a_finished_run(etl_dir, tmp_path):
    from pipeline.train import train_model

    small = dict(seed=3, embedding_dim=16, batch_size=2048, verbose=0)
    first = train_model(etl_dir, tmp_path / "model", epochs=1, **small)
    # --resume on a finished model trains the extra epoch into a fresh copy, then swaps it in
    extended = train_model(etl_dir, tmp_path / "model", epochs=2, resume=True, **small)
    assert [e["epoch"] for e in extended["epochs"]] == [1, 2]
    assert extended["epochs"][0] == first["epochs"][0]
    assert json.loads((tmp_path / "model" / "metrics.json").read_text())["valid"] == extended["valid"]
    assert not (tmp_path / "model.partial").exists()


def _train_cli(etl_dir: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "train", "--data", str(etl_dir), "--out", str(out), "--epochs", "3",
            "--batch-size", "2048", "--seed", "5", *extra]


def test_same_seed_same_model_and_a_killed_run_resumes_where_it_stopped(etl_dir, tmp_path):
    """kill -9 after the first epoch's checkpoint, then --resume: the same model as an uninterrupted run
    with the same seed (weights, cosine schedule, optimizer state and shuffles continue). Each run is its
    own process, as in use: within one process a second run does not reproduce the first exactly."""
    import signal
    import time

    killed = tmp_path / "killed"
    run = subprocess.Popen(_train_cli(etl_dir, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = killed.with_name("killed.partial") / "checkpoints" / "epoch_001.keras"
    deadline = time.monotonic() + 300
    while not first.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert first.exists() and not killed.exists()  # stopped mid-run, nothing in place

    resumed = subprocess.run(_train_cli(etl_dir, killed, "--resume"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = subprocess.run(_train_cli(etl_dir, tmp_path / "straight"), capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]

    resumed_metrics = json.loads((killed / "metrics.json").read_text())
    straight_metrics = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert [e["epoch"] for e in resumed_metrics["epochs"]] == [1, 2, 3]
    assert resumed_metrics["valid"] == straight_metrics["valid"]
    np.testing.assert_array_equal(predict_valid(killed, etl_dir), predict_valid(tmp_path / "straight", etl_dir))
    assert resumed_metrics["epochs"][0]["valid"] == straight_metrics["epochs"][0]["valid"]  # epoch 1 ran before the kill


@pytest.fixture()
def etl_copy(etl_dir, tmp_path) -> Path:
    copy = tmp_path / "etl"
    shutil.copytree(etl_dir / "train", copy / "train")
    shutil.copytree(etl_dir / "valid", copy / "valid")
    return copy


def rewrite_split(etl: Path, split: str, frame: pd.DataFrame, schema=None) -> None:
    """Replace a split's parquet with ``frame`` (and its schema.pbtxt with ``schema``, if given)."""
    from merlin.schema.io.tensorflow_metadata import TensorflowMetadata

    for old in (etl / split).glob("*.parquet"):
        old.unlink()
    for extra in ("_metadata", "_metadata.json", "_file_list.txt"):
        (etl / split / extra).unlink(missing_ok=True)
    shutil.rmtree(etl / split / ".merlin", ignore_errors=True)  # merlin prefers .merlin/schema.json
    frame.to_parquet(etl / split / "part_0.parquet")
    if schema is not None:
        TensorflowMetadata.from_merlin_schema(schema).to_proto_text_file(str(etl / split), "schema.pbtxt")


def load_schema(split_dir: Path):
    from merlin.schema.io.tensorflow_metadata import TensorflowMetadata

    return TensorflowMetadata.from_proto_text_file(str(split_dir)).to_merlin_schema()


def test_bad_input_is_a_clear_error(etl_copy, tmp_path):
    from merlin.schema import Tags

    from pipeline.train import train_model

    out = tmp_path / "model"
    with pytest.raises(DataError, match="no parquet files"):
        train_model(tmp_path / "nowhere", out)
    with pytest.raises(DataError, match="larger than the .* training rows"):
        train_model(etl_copy, out, batch_size=10_000_000)

    from merlin.schema import Schema
    from merlin.schema.tags import TagSet

    schema = load_schema(etl_copy / "train")
    # untag the targets (merlin re-adds TARGET to columns that keep a task tag such as regression)
    no_target = Schema([c._replace(tags=TagSet([])) if Tags.TARGET in c.tags else c for c in schema])
    for split in ("train", "valid"):
        rewrite_split(etl_copy, split, read_split(etl_copy, split), no_target)
    with pytest.raises(DataError, match="no target"):
        train_model(etl_copy, out)
    assert not out.exists() and not out.with_name("model.partial").exists()


def test_missing_feature_and_dtype_mismatch_are_named(etl_copy, model_dir):
    import keras
    from merlin.io import Dataset

    import pipeline.models  # noqa: F401

    model = keras.saving.load_model(model_dir / "model.keras")
    valid = read_split(etl_copy, "valid")
    schema = load_schema(etl_copy / "valid")

    rewrite_split(etl_copy, "valid", valid.drop(columns=["zipcode"]), schema.excluding_by_name(["zipcode"]))
    with pytest.raises(DataError, match="zipcode"):
        model.evaluate(Dataset(str(etl_copy / "valid"), engine="parquet"), batch_size=256)

    as_float = valid.assign(userId=valid["userId"].astype("float32"))
    from merlin.schema import Schema

    float_ids = Schema([c.with_dtype("float32") if c.name == "userId" else c for c in schema])
    rewrite_split(etl_copy, "valid", as_float, float_ids)
    with pytest.raises(DataError, match="userId.*float32"):
        model.evaluate(Dataset(str(etl_copy / "valid"), engine="parquet"), batch_size=256)

    rewrite_split(etl_copy, "valid", valid.iloc[:0], schema)
    from pipeline.train import train_model

    with pytest.raises(DataError, match="empty"):
        train_model(etl_copy, etl_copy.parent / "m")


def test_cli_trains_a_model(etl_dir, tmp_path):
    out = tmp_path / "cli_model"
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", "--data", str(etl_dir), "--out", str(out), "--epochs", "1",
         "--batch-size", "2048", "--embedding-dim", "16", "--seed", "1"],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    assert summary["valid"]["auc"] > 0.5
    assert json.loads((out / "config.json").read_text())["embedding_dim"] == 16


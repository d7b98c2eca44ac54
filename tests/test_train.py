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
    n_epochs = len(metrics["epochs"])
    assert [e["epoch"] for e in metrics["epochs"]] == list(range(1, n_epochs + 1))
    assert epoch["seconds"] > 0
    assert epoch["samples_per_second"] == pytest.approx(metrics["fit_rows"] / epoch["seconds"], rel=0.01)
    # Model selection: the epoch with the best AUC on the held-out training rows, never the valid split.
    selection = metrics["model_selection"]
    assert selection["select_rows"] + selection["fit_rows"] == metrics["train_rows"] and selection["select_rows"] > 0
    assert selection["fit_rows"] == metrics["fit_rows"] and selection["monitor"] == "select auc"
    best = metrics["best_epoch"]
    assert selection["epoch"] == best and metrics["epochs"][best - 1]["select"]["auc"] == max(
        e["select"]["auc"] for e in metrics["epochs"])
    # early stopping: the run ends at the first epoch the rule says so (should_stop), or at the cap
    from pipeline.train import should_stop

    cfg = json.loads((model_dir / "config.json").read_text())
    stop = [should_stop(metrics["epochs"][:n], "auc", cfg["patience"], cfg["plateau_tolerance"])
            for n in range(1, n_epochs + 1)]
    assert (stop[-1] or n_epochs == cfg["epochs"]) and not any(stop[:-1])
    assert selection["patience"] == cfg["patience"] and selection["plateau_tolerance"] == cfg["plateau_tolerance"]
    assert metrics["scored"] == {"split": "valid", "path": str((etl_dir / "valid").resolve()),
                                 "rows": metrics["valid_rows"],
                                 "read_by_model_selection": False}
    assert not (model_dir / "holdout").exists()  # the fit / select copies are not published
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model"] == "dlrm" and config["batch_size"] == 1024
    assert config["targets"] == ["rating_binary", "rating"]
    assert config["schema_fingerprint"] == schema_fingerprint(Dataset(str(etl_dir / "train"), engine="parquet").schema)
    assert (model_dir / "schema.pbtxt").read_text() == (etl_dir / "train" / "schema.pbtxt").read_text()


def _history(values: list[float], monitor: str = "auc") -> list[dict]:
    return [{"epoch": i, "select": {monitor: v}} for i, v in enumerate(values, 1)]


def test_early_stopping_goes_on_along_a_plateau_and_stops_on_a_decline():
    """``patience`` epochs without a new best stop a run whose AUC has fallen more than ``tolerance`` below its
    best; one still within ``tolerance`` (a plateau) goes on, up to PATIENCE_CAP x patience epochs."""
    from pipeline.train import PATIENCE_CAP, should_stop

    declining = _history([0.70, 0.75, 0.76, 0.755, 0.752, 0.750, 0.748, 0.745])  # best at 3, 5 epochs after: 8
    assert not should_stop(declining[:7], "auc", 5, 0.001) and should_stop(declining, "auc", 5, 0.001)
    plateau = [0.70, 0.75, 0.76] + [0.7595] * (5 * PATIENCE_CAP - 1)
    assert should_stop(_history(plateau), "auc", 5, 0.0)  # no tolerance: patience alone
    assert not should_stop(_history(plateau), "auc", 5, 0.001)
    assert should_stop(_history(plateau + [0.7595]), "auc", 5, 0.001)  # the cap
    # a plateau that rises again: the new best restarts the count
    assert not should_stop(_history(plateau + [0.7601, 0.7600]), "auc", 5, 0.0)
    losses = _history([0.60, 0.50, 0.52, 0.53, 0.54, 0.55, 0.56], "loss")  # a loss: the lowest is best
    assert should_stop(losses, "loss", 5, 0.001) and not should_stop(losses[:-1], "loss", 5, 0.001)


def test_published_model_is_the_best_epoch_refitted_on_every_training_row(model_dir):
    """By default the selection rows pick the epoch count, then the model is trained again from the start on
    every training row for that many epochs: the published model is that refit, not the picked checkpoint."""
    metrics = json.loads((model_dir / "metrics.json").read_text())
    refit = metrics["refit"]
    assert len(refit["epochs"]) == metrics["best_epoch"] == metrics["model_selection"]["epoch"]
    assert refit["rows"] == metrics["train_rows"] > metrics["fit_rows"]
    assert metrics["model_selection"]["refit"] is True
    assert refit["valid_of_the_selection_run"]["auc"] != metrics["valid"]["auc"]
    assert not (model_dir / "refit").exists()  # the refit's own dir is not part of the model


def test_without_refit_the_published_model_is_the_best_epoch_on_the_selection_rows(etl_dir, tmp_path):
    """--no-refit: model.keras predicts what the best epoch's checkpoint predicts (restored after early stopping)."""
    import keras
    from merlin.io import Dataset

    import pipeline.models as mm
    from pipeline.train import train_model

    metrics = train_model(etl_dir, tmp_path / "model", seed=0, epochs=3, refit=False, verbose=0)
    assert "refit" not in metrics and metrics["model_selection"]["refit"] is False
    best = tmp_path / "model" / "checkpoints" / f"epoch_{metrics['best_epoch']:03d}.keras"
    features = mm.sample_batch(Dataset(str(etl_dir / "valid"), engine="parquet"), 256, include_targets=False)
    published, checkpoint = keras.saving.load_model(tmp_path / "model" / "model.keras"), keras.saving.load_model(best)
    np.testing.assert_array_equal(published.predict(features, verbose=0)["rating_binary"],
                                  checkpoint.predict(features, verbose=0)["rating_binary"])


def test_selection_rows_are_a_seeded_slice_of_train_and_the_valid_split_cannot_change_the_model(
        straight_run, etl_splits, tmp_path):
    """The selection slice depends on the seed only; corrupting every valid label changes the reported AUC
    and nothing else: the same epochs, the same selection AUCs, the same weights."""
    from pipeline.train import selection_mask

    users, movies = np.arange(100_000) % 977, np.arange(100_000) // 977
    mask = selection_mask(users, movies, 7, 0.1)
    np.testing.assert_array_equal(mask, selection_mask(users, movies, 7, 0.1))
    assert abs(mask.mean() - 0.1) < 0.005 and (mask != selection_mask(users, movies, 8, 0.1)).any()

    # each run in its own process: within one process a second run does not reproduce the first exactly.
    # The honest run is the module's uninterrupted CLI run (same settings, same train and valid files).
    honest_dir, _ = straight_run
    honest = json.loads((honest_dir / "metrics.json").read_text())
    etl_copy = tmp_path / "etl"
    shutil.copytree(etl_splits, etl_copy)
    valid = read_split(etl_copy, "valid")
    flipped = valid.assign(rating_binary=1 - valid["rating_binary"], rating=6.0 - valid["rating"])
    rewrite_split(etl_copy, "valid", flipped, load_schema(etl_copy / "valid"))
    done = subprocess.run(_train_cli(etl_copy, tmp_path / "cheated"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    cheated = json.loads((tmp_path / "cheated" / "metrics.json").read_text())
    assert [e["select"] for e in cheated["epochs"]] == [e["select"] for e in honest["epochs"]]
    assert cheated["best_epoch"] == honest["best_epoch"]
    assert cheated["valid"]["auc"] == pytest.approx(1.0 - honest["valid"]["auc"], abs=0.01)
    np.testing.assert_array_equal(predict_valid(tmp_path / "cheated", etl_copy),
                                  predict_valid(honest_dir, etl_copy))


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
            "--batch-size", "2048", "--embedding-dim", "8", "--seed", "5", *extra]


@pytest.fixture(scope="module")
def etl_splits(etl_dir, tmp_path_factory) -> Path:
    """train/ and valid/ of the session's ETL output, copied once for this module's CLI runs; never modified."""
    copy = tmp_path_factory.mktemp("etl_splits") / "etl"
    shutil.copytree(etl_dir / "train", copy / "train")
    shutil.copytree(etl_dir / "valid", copy / "valid")
    return copy


@pytest.fixture(scope="module")
def straight_run(etl_splits, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """``(model dir, finished process)`` of one uninterrupted ``python -m pipeline train`` (``_train_cli``) on
    ``etl_splits``, in its own process: the reference run of the resume and model-selection tests and the
    CLI test's run (each training run costs a fresh process, so they share this one)."""
    out = tmp_path_factory.mktemp("straight") / "straight"
    done = subprocess.run(_train_cli(etl_splits, out), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


@pytest.mark.parametrize("phase", ["selection", "refit"])
def test_same_seed_same_model_and_a_killed_run_resumes_where_it_stopped(straight_run, etl_splits, tmp_path, phase):
    """kill -9 after the first epoch's checkpoint of the selection run or of the refit, then --resume: the
    same model as an uninterrupted run with the same seed (weights, schedule, optimizer state and shuffles
    continue). Each run is its own process, as in use."""
    import signal
    import time

    killed = tmp_path / "killed"
    run = subprocess.Popen(_train_cli(etl_splits, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = killed.with_name("killed.partial") / ("refit.partial" if phase == "refit" else "") / "checkpoints" / "epoch_001.keras"
    deadline = time.monotonic() + 300
    while not first.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert first.exists() and not killed.exists()  # stopped mid-run, nothing in place

    resumed = subprocess.run(_train_cli(etl_splits, killed, "--resume"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight, _ = straight_run

    resumed_metrics = json.loads((killed / "metrics.json").read_text())
    straight_metrics = json.loads((straight / "metrics.json").read_text())
    assert [e["epoch"] for e in resumed_metrics["epochs"]] == [1, 2, 3]
    assert resumed_metrics["valid"] == straight_metrics["valid"]
    np.testing.assert_array_equal(predict_valid(killed, etl_splits), predict_valid(straight, etl_splits))
    # epoch 1 ran before the kill
    assert resumed_metrics["epochs"][0]["select"] == straight_metrics["epochs"][0]["select"]
    assert resumed_metrics["best_epoch"] == straight_metrics["best_epoch"]
    assert [e["epoch"] for e in resumed_metrics["refit"]["epochs"]] == list(range(1, resumed_metrics["best_epoch"] + 1))


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


def test_cli_trains_a_model(straight_run):
    """``python -m pipeline train`` prints its summary (JSON) and honours its flags (the module's CLI run)."""
    out, done = straight_run
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    assert summary["valid"]["auc"] > 0.5
    assert json.loads((out / "config.json").read_text())["embedding_dim"] == 8  # --embedding-dim, not the default 16


def biased_mf_auc(train: pd.DataFrame, valid: pd.DataFrame, select: np.ndarray, rank: int = 8) -> float:
    """Valid AUC of biased matrix factorization of the stars (ALS), its ridge penalty picked on the
    ``select`` rows of ``train`` and then refitted on all of ``train``: the classical baseline."""

    def fit(rows: pd.DataFrame, lam: float):
        users, movies = rows["userId"].to_numpy(), rows["movieId"].to_numpy()
        n_users, n_movies = int(max(train["userId"].max(), valid["userId"].max())) + 1, int(
            max(train["movieId"].max(), valid["movieId"].max())) + 1
        stars = rows["rating"].to_numpy(float)
        mean = stars.mean()
        rng = np.random.default_rng(0)
        p = np.zeros((n_users, rank + 1))
        q = np.hstack([np.zeros((n_movies, 1)), 0.1 * rng.standard_normal((n_movies, rank))])

        def solve(keys, n, other, offset):  # per key: ridge of (stars - mean - offset) on [1, other factors]
            out = np.zeros((n, rank + 1))
            x = np.hstack([np.ones((len(keys), 1)), other])
            for k in np.unique(keys):
                idx = keys == k
                out[k] = np.linalg.solve(x[idx].T @ x[idx] + lam * np.eye(rank + 1),
                                         x[idx].T @ (stars[idx] - mean - offset[idx]))
            return out

        for _ in range(6):
            p = solve(users, n_users, q[movies, 1:], q[movies, 0])
            q = solve(movies, n_movies, p[users, 1:], p[users, 0])
        return lambda f: mean + p[f["userId"], 0] + q[f["movieId"], 0] + np.einsum(
            "nk,nk->n", p[f["userId"], 1:], q[f["movieId"], 1:])

    held = train[select]
    picked = max((3.0, 10.0, 30.0), key=lambda lam: auc(held["rating_binary"], fit(train[~select], lam)(held)))
    return auc(valid["rating_binary"], fit(train, picked)(valid))


# The quality regression guard (issue 10), on synthetic data at ML-100K's format and size (943 users, 1,682 movies,
# 100k ratings; generator seed 2, which no benchmark or tuning run uses): the smallest size the defaults are tuned
# for (on the suite's 40k-rating set the DLRM is 0.011-0.021 below biased MF at seeds 0-3). Measured here with the
# defaults of 2026-12-02 (fresh processes, load 4-5): DLRM minus this test's biased MF at train seeds 0-4
# +0.0036, +0.0069, -0.0039, -0.0013, +0.0111 (mean +0.0033; MF 0.7759). The seed spread (+-0.006) is larger than
# the lead over MF, so a positive margin at one seed would be luck; QUALITY_MARGIN catches what a regression looks
# like: a default whose user x movie interaction does not set in stops at the user + movie bias level, ~0.02 below MF.
QUALITY_MARGIN = -0.005


@pytest.fixture(scope="module")
def ml100k_size_etl(tmp_path_factory) -> Path:
    """ETL output (random 80/20, seed 0) of synthetic data in ML-100K's format and size, generator seed 2."""
    from pipeline.datasets import generate_synthetic
    from pipeline.etl import run_etl

    root = tmp_path_factory.mktemp("ml100k_size")
    run_etl("ml-100k", root / "etl", raw=generate_synthetic(root / "raw", fmt="ml-100k", seed=2), seed=0,
            split="random")
    return root / "etl"


def test_default_train_keeps_up_with_biased_matrix_factorization(ml100k_size_etl, tmp_path):
    """``python -m pipeline train --data ETL --out DIR --seed 0``, no other flag, in its own process, against
    biased MF of the stars fitted on the same training rows with its penalty picked on the same selection rows:
    valid AUC at least MF's + QUALITY_MARGIN."""
    from pipeline.train import selection_mask

    out = tmp_path / "dlrm"
    done = subprocess.run([sys.executable, "-m", "pipeline", "train", "--data", str(ml100k_size_etl), "--out",
                           str(out), "--seed", "0"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    train, valid = read_split(ml100k_size_etl, "train"), read_split(ml100k_size_etl, "valid")
    select = selection_mask(train["userId"].to_numpy(), train["movieId"].to_numpy(), 0,
                            json.loads((out / "metrics.json").read_text())["model_selection"]["fraction"])
    mf = biased_mf_auc(train, valid, select)
    dlrm = auc(valid["rating_binary"].to_numpy(), predict_valid(out, ml100k_size_etl))
    assert dlrm >= mf + QUALITY_MARGIN, f"default train {dlrm:.4f} vs biased MF {mf:.4f} ({QUALITY_MARGIN:+} allowed)"

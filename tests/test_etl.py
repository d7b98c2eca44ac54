"""The ETL stage end to end on the small synthetic ml-1m set (session fixtures ``synthetic_raw``, ``etl_dir``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import pipeline  # noqa: F401  (dask config before nvtabular)
from pipeline.datasets import read_movielens
from pipeline.device import gpu_available
from pipeline.errors import DataError, DeviceError
from pipeline.etl import run_etl, split_ratings

REPO = Path(__file__).resolve().parents[1]
P_SMOOTH, KFOLD = 20, 5
CATEGORICAL = ["userId", "movieId", "title", "genres", "gender", "age", "occupation", "zipcode"]
TE_COLUMNS = [f"TE_{c}_rating" for c in ["userId", "movieId", "gender", "age", "occupation", "zipcode"]]


def read_parts(directory: Path) -> pd.DataFrame:
    """All part_<i>.parquet files of an ETL output folder, in part order."""
    parts = sorted(directory.glob("part_*.parquet"), key=lambda p: int(p.stem.split("_")[1]))
    assert parts, f"no parquet parts in {directory}"
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)


def raw_split(raw_dir: Path, seed: int = 0):
    """The raw (train, valid) ratings the ETL used, rebuilt with the same split function."""
    raw = read_movielens("ml-1m", raw_dir)
    return raw, *split_ratings(raw.ratings, "random", 0.2, seed)


def serving_copy(etl_dir: Path):
    """The saved workflow, loaded fresh, with the target inputs removed (raw requests have no rating)."""
    import nvtabular as nvt

    workflow = nvt.Workflow.load(str(etl_dir / "workflow"))
    return workflow.remove_inputs(["rating"])


def normalize_stats(workflow, column: str) -> tuple[float, float]:
    from merlin.dag import Graph
    from nvtabular.ops import Normalize

    (node,) = Graph.get_nodes_by_op_type([workflow.output_node], Normalize)
    return node.op.means[column], node.op.stds[column]


def test_output_files_schema_and_summary(etl_dir, synthetic_raw):
    from merlin.io import Dataset
    from merlin.schema import Tags

    for split in ("train", "valid"):
        assert (etl_dir / split / "schema.pbtxt").is_file()
    assert (etl_dir / "workflow" / "workflow.pkl").is_file()
    assert not list(etl_dir.parent.glob(".out.*")), "temporary build dirs left behind"

    schema = Dataset(str(etl_dir / "train"), engine="parquet").schema
    assert schema.select_by_tag(Tags.USER_ID).column_names == ["userId"]
    assert schema.select_by_tag(Tags.ITEM_ID).column_names == ["movieId"]
    assert set(schema.select_by_tag(Tags.CATEGORICAL).column_names) == set(CATEGORICAL)
    assert set(schema.select_by_tag(Tags.CONTINUOUS).column_names) == set(TE_COLUMNS)
    assert schema.select_by_tag(Tags.TARGET).column_names == ["rating_binary", "rating"]
    assert schema["genres"].is_list and schema["genres"].properties["value_count"]["min"] >= 1
    scalars = [name for name in schema.column_names if name != "genres"]
    assert [name for name in scalars if schema[name].is_list] == [], "only genres is a list column"

    raw, train_raw, _ = raw_split(synthetic_raw)
    train = read_parts(etl_dir / "train")
    assert len(train) == len(train_raw)
    np.testing.assert_array_equal(train["rating"], train_raw["rating"])  # rows keep the split's order
    summary = json.loads((etl_dir / "etl.json").read_text())
    assert summary["rows"] == {"train": len(train_raw), "valid": len(raw.ratings) - len(train_raw)}
    joined = train_raw.merge(raw.users, on="userId").merge(raw.movies[["movieId", "title"]], on="movieId")
    for column in ["userId", "movieId", "title", "gender", "age", "occupation", "zipcode"]:
        # 3 reserved rows (padding, null, out-of-vocabulary) + every value seen in training
        cardinality = schema[column].properties["embedding_sizes"]["cardinality"]
        assert cardinality == joined[column].nunique() + 3, column
        assert summary["cardinalities"][column] == cardinality
        assert train[column].dtype == np.int32 and 3 <= train[column].min() and train[column].max() < cardinality
        assert schema[column].properties["embedding_sizes"]["dimension"] > 0
    n_genres = len({g for genres in raw.movies["genres"] for g in genres})
    assert schema["genres"].properties["embedding_sizes"]["cardinality"] == n_genres + 3
    assert set(summary["seconds"]) >= {"read", "split", "fit", "transform_train", "transform_valid", "total"}


def test_valid_encodings_come_from_train_ratings_only(etl_dir, synthetic_raw):
    _, train_raw, valid_raw = raw_split(synthetic_raw)
    valid = read_parts(etl_dir / "valid")
    workflow = serving_copy(etl_dir)

    # Exact value: NVTabular's smoothing over the *training* ratings, then Normalize.
    mean = train_raw["rating"].astype("float64").mean()
    stats = train_raw.groupby("userId")["rating"].agg(["sum", "count"])
    te = ((stats["sum"] + P_SMOOTH * mean) / (stats["count"] + P_SMOOTH)).reindex(valid_raw["userId"])
    te = te.fillna(mean).to_numpy()
    mu, sigma = normalize_stats(workflow, "TE_userId_rating")
    np.testing.assert_allclose(valid["TE_userId_rating"], (te - mu) / sigma, rtol=1e-4, atol=1e-5)

    # Changing the valid rows' own ratings changes nothing: the encoding never reads them.
    flipped = valid_raw.assign(rating=(6 - valid_raw["rating"]).astype("float32"))
    import nvtabular as nvt

    again = workflow.transform(nvt.Dataset(flipped[["userId", "movieId"]])).to_ddf().compute()
    pd.testing.assert_frame_equal(again[TE_COLUMNS].reset_index(drop=True), valid[TE_COLUMNS])


def test_train_rows_get_out_of_fold_encodings(etl_dir, synthetic_raw):
    from pipeline.ops.target_encoding import fold_ids

    _, train_raw, _ = raw_split(synthetic_raw)
    train = read_parts(etl_dir / "train")
    workflow = serving_copy(etl_dir)
    mean = train_raw["rating"].astype("float64").mean()
    folds = fold_ids(train_raw, ["userId", "movieId"], KFOLD, 0)
    frame = train_raw.assign(fold=folds, rating=train_raw["rating"].astype("float64"))
    for column in ["userId", "movieId"]:
        total = frame.groupby(column)["rating"].agg(["sum", "count"])
        per_fold = frame.groupby([column, "fold"])["rating"].agg(["sum", "count"])
        keys = pd.MultiIndex.from_arrays([frame[column], frame["fold"]])
        rest_sum = total["sum"].reindex(frame[column]).to_numpy() - per_fold["sum"].reindex(keys).to_numpy()
        rest_count = total["count"].reindex(frame[column]).to_numpy() - per_fold["count"].reindex(keys).to_numpy()
        oof = (rest_sum + P_SMOOTH * mean) / (rest_count + P_SMOOTH)
        mu, sigma = normalize_stats(workflow, f"TE_{column}_rating")
        np.testing.assert_allclose(train[f"TE_{column}_rating"], (oof - mu) / sigma, rtol=1e-4, atol=1e-5)


def test_saved_workflow_encodes_raw_requests_deterministically(etl_dir, synthetic_raw):
    import nvtabular as nvt

    raw, _, valid_raw = raw_split(synthetic_raw)
    valid = read_parts(etl_dir / "valid")
    workflow = serving_copy(etl_dir)
    unseen_user, unseen_movie = int(raw.users["userId"].max()) + 1000, int(raw.movies["movieId"].max()) + 1000
    requests = pd.concat(
        [
            valid_raw[["userId", "movieId"]].head(50),
            pd.DataFrame({"userId": [unseen_user, int(valid_raw["userId"].iloc[0])],
                          "movieId": [int(valid_raw["movieId"].iloc[0]), unseen_movie]}),
        ],
        ignore_index=True,
    ).astype("int64")
    first = workflow.transform(nvt.Dataset(requests)).to_ddf().compute().reset_index(drop=True)
    assert "rating" not in first and "rating_binary" not in first

    # Same rows, other batch composition and order -> identical features.
    order = np.random.default_rng(0).permutation(len(requests))
    shuffled = workflow.transform(nvt.Dataset(requests.iloc[order].reset_index(drop=True))).to_ddf().compute()
    pd.testing.assert_frame_equal(shuffled.reset_index(drop=True), first.iloc[order].reset_index(drop=True))
    single = workflow.transform(nvt.Dataset(requests.iloc[[3]].reset_index(drop=True))).to_ddf().compute()
    pd.testing.assert_frame_equal(single.reset_index(drop=True), first.iloc[[3]].reset_index(drop=True))

    # Known rows get the valid split's (full-train) encodings.
    pd.testing.assert_frame_equal(first[TE_COLUMNS].head(50), valid[TE_COLUMNS].head(50))

    # Unseen user / movie: out-of-vocabulary row (2) in every id and joined column, finite encodings.
    user_row, movie_row = first.iloc[50], first.iloc[51]
    assert [user_row[c] for c in ["userId", "gender", "age", "occupation", "zipcode"]] == [2] * 5
    assert [movie_row[c] for c in ["movieId", "title"]] == [2, 2] and list(movie_row["genres"]) == [2]
    assert np.isfinite(first[TE_COLUMNS].to_numpy()).all()


def test_same_seed_same_output_other_seed_other_split(etl_dir, synthetic_raw, tmp_path):
    run_etl("ml-1m", tmp_path / "again", raw=synthetic_raw, seed=0, part_size="100KB")
    for split in ("train", "valid"):
        assert len(list((tmp_path / "again" / split).glob("part_*.parquet"))) > 1  # --part-size took effect
        pd.testing.assert_frame_equal(read_parts(tmp_path / "again" / split), read_parts(etl_dir / split))

    ratings = read_movielens("ml-1m", synthetic_raw).ratings
    _, valid0 = split_ratings(ratings, "random", 0.2, seed=0)
    _, valid1 = split_ratings(ratings, "random", 0.2, seed=1)
    pairs = lambda frame: set(zip(frame["userId"], frame["movieId"]))  # noqa: E731
    assert pairs(valid0) != pairs(valid1) and len(valid0) == len(valid1)


def test_split_methods():
    ratings = pd.DataFrame(
        {
            "userId": np.repeat([1, 2, 3], [10, 5, 1]).astype("int64"),
            "movieId": np.arange(16, dtype="int64"),
            "rating": np.ones(16, dtype="float32"),
            "timestamp": np.array([9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 50, 40, 30, 20, 10, 5], dtype="int64"),
        }
    )
    train, valid = split_ratings(ratings, "temporal", 0.2, seed=0)
    # per user, the latest floor(n * 0.2) ratings: user 1 -> 2, user 2 -> 1, user 3 -> 0
    assert sorted(valid["movieId"]) == [0, 1, 10]
    assert len(train) + len(valid) == 16 and set(train["movieId"]).isdisjoint(valid["movieId"])
    train_a, valid_a = split_ratings(ratings, "random", 0.25, seed=5)
    train_b, valid_b = split_ratings(ratings, "random", 0.25, seed=5)
    pd.testing.assert_frame_equal(train_a, train_b)
    pd.testing.assert_frame_equal(valid_a, valid_b)
    assert len(valid_a) == 4
    with pytest.raises(DataError, match="valid-fraction"):
        split_ratings(ratings, "random", 1.5, seed=0)
    with pytest.raises(DataError, match="official"):
        split_ratings(ratings, "official", 0.2, seed=0)


def test_failed_run_leaves_previous_output_and_no_temporary_dir(synthetic_raw, tmp_path):
    out = tmp_path / "etl"
    out.mkdir()
    (out / "marker").write_text("previous run")
    # `out` is not an ETL output: only --overwrite lets a run replace it, and these runs fail first.
    # Fails after the temporary output dir exists (the Dask cluster cannot start with 0 workers).
    with pytest.raises(DeviceError, match="workers"):
        run_etl("ml-1m", out, raw=synthetic_raw, workers=0, overwrite=True)
    # Fails at the split (ml-1m has no official split).
    with pytest.raises(DataError, match="official"):
        run_etl("ml-1m", out, raw=synthetic_raw, split="official", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["etl"]
    assert [p.name for p in out.iterdir()] == ["marker"]


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_interrupt_during_fit_leaves_no_output(tmp_path, signal_name):
    """Ctrl-C or SIGTERM half-way (after the split, while the workflow is being fitted): no DIR, no temporary dir."""
    import signal

    from pipeline.datasets import generate_synthetic

    # big enough that the fit outlasts the signal's delivery on a fast, idle machine (~3 s of fit)
    raw = generate_synthetic(tmp_path / "raw", fmt="ml-1m", seed=1, n_users=3000, n_movies=1800, n_ratings=400_000)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "pipeline", "etl", "--dataset", "ml-1m", "--raw", str(raw), "--out", "out"]
    # A job started in the background inherits SIGINT ignored, and Python then never raises
    # KeyboardInterrupt: give the child the default disposition, as in a terminal.
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in process.stderr:
        if "etl split" in line:
            break
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.tmp-*")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)  # the run is past the split and imports: it now builds in the temporary dir
    assert list(tmp_path.glob(".out.tmp-*")), "expected the temporary output dir"
    process.send_signal(getattr(signal, signal_name))
    _, stderr = process.communicate(timeout=120)
    if signal_name == "SIGINT":
        assert process.returncode != 0 and "KeyboardInterrupt" in stderr
    else:  # unwound like Ctrl-C, exit status 128 + 15 as a shell reports a terminated job
        assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_two_worker_local_cluster_gives_the_same_output(etl_dir, synthetic_raw, tmp_path):
    run_etl("ml-1m", tmp_path / "dist", raw=synthetic_raw, seed=0, workers=2)
    for split in ("train", "valid"):
        pd.testing.assert_frame_equal(read_parts(tmp_path / "dist" / split), read_parts(etl_dir / split))


def test_existing_dask_scheduler_gives_the_same_output_and_stays_up(etl_dir, synthetic_raw, tmp_path):
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        run_etl("ml-1m", tmp_path / "remote", raw=synthetic_raw, seed=0, dask_scheduler=cluster.scheduler_address)
        with Client(cluster.scheduler_address) as client:  # the user's cluster is still there
            assert len(client.scheduler_info()["workers"]) == 1
    pd.testing.assert_frame_equal(read_parts(tmp_path / "remote" / "valid"), read_parts(etl_dir / "valid"))


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "etl", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_cli_end_to_end(synthetic_raw, tmp_path):
    import nvtabular as nvt

    done = run_cli("--dataset", "synthetic", "--raw", str(synthetic_raw), "--out", str(tmp_path / "out"),
                   "--seed", "3", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "train 32,000 rows, valid 8,000 rows" in done.stdout
    summary = json.loads((tmp_path / "out" / "etl.json").read_text())
    assert summary["seed"] == 3 and summary["dataset"] == "synthetic"
    workflow = nvt.Workflow.load(str(tmp_path / "out" / "workflow"))
    assert "TE_userId_rating" in workflow.output_schema.column_names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no ./categories, no temporary dirs

    if gpu_available():
        return
    failed = run_cli("--dataset", "ml-1m", "--raw", str(synthetic_raw), "--out", str(tmp_path / "gpu"),
                     "--device", "gpu", cwd=tmp_path)
    assert failed.returncode == 2 and "--device gpu" in failed.stderr and "Traceback" not in failed.stderr
    assert not (tmp_path / "gpu").exists()


def test_ml100k_official_split_uses_ua_files(tmp_path):
    from pipeline.datasets import generate_synthetic

    raw_dir = generate_synthetic(tmp_path / "ml-100k", fmt="ml-100k", seed=0, n_users=120, n_movies=90, n_ratings=6000)
    raw = read_movielens("ml-100k", raw_dir)
    summary = run_etl("ml-100k", tmp_path / "out", raw=raw_dir, split="official")
    base, test = raw.official_split
    assert summary["rows"] == {"train": len(base), "valid": len(test)}
    valid = read_parts(tmp_path / "out" / "valid")
    np.testing.assert_array_equal(valid["rating"], test["rating"])
    assert set(summary["columns"]) >= {"gender", "age", "occupation", "zipcode", "TE_zipcode_rating"}

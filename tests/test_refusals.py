"""What the pipeline refuses: nothing a user types destroys data or publishes a wrong model.

Every case runs the real stage (the CLI in a subprocess, or the stage function) on copies of the
session's raw data, ETL output and model, and checks the exit status or error, the message, and that
every file that existed before is byte-identical afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import pipeline  # noqa: F401  (dask config before nvtabular)
from pipeline.errors import ArtifactError, DataError, TrainingDiverged, UsageError

REPO = Path(__file__).resolve().parents[1]


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (hidden ones too), by relative path."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def cli(*argv: str, limit_file_size: int | None = None) -> subprocess.CompletedProcess:
    """``python -m pipeline ARGV`` in a fresh process; ``limit_file_size`` makes writes past that many
    bytes fail with EFBIG (a full disk, as the process sees it)."""

    def limits():
        if limit_file_size is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing the process
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_size, limit_file_size))

    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "pipeline", *argv], capture_output=True, text=True,
                          timeout=600, env=env, preexec_fn=limits)


def error_line(done: subprocess.CompletedProcess) -> str:
    """The CLI's one-line error (the last line of stderr), asserting there is no traceback."""
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert lines, done.stderr[-3000:]
    return lines[-1]


@pytest.fixture()
def workspace(synthetic_raw, etl_dir, model_dir, tmp_path) -> Path:
    """tmp_path with copies of the raw data, the ETL output and a model, a user's folder and file, requests."""
    shutil.copytree(synthetic_raw, tmp_path / "raw")
    shutil.copytree(etl_dir, tmp_path / "etl")
    shutil.copytree(model_dir, tmp_path / "model")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("three years of work")
    (tmp_path / "notes.txt").write_text("do not delete")
    (tmp_path / "requests.csv").write_text("userId,movieId\n1,1\n2,3\n")
    return tmp_path


REFUSED = {
    "etl into a user's directory": (
        ["etl", "--dataset", "ml-1m", "--raw", "{ws}/raw", "--out", "{ws}/mine"],
        "--out {ws}/mine is an existing directory that is not a previous `etl` output"),
    "etl onto its raw data": (
        ["etl", "--dataset", "ml-1m", "--raw", "{ws}/raw", "--out", "{ws}/raw"], "--out {ws}/raw is --raw {ws}/raw"),
    "etl onto its raw data, with --overwrite": (
        ["etl", "--dataset", "ml-1m", "--raw", "{ws}/raw", "--out", "{ws}/raw", "--overwrite"], "is --raw"),
    "etl into a folder holding its raw data": (
        ["etl", "--dataset", "ml-1m", "--raw", "{ws}/raw", "--out", "{ws}", "--overwrite"],
        "--out {ws} contains --raw"),
    "etl onto a file": (
        ["etl", "--dataset", "ml-1m", "--raw", "{ws}/raw", "--out", "{ws}/notes.txt"],
        "is an existing file that is not a previous `etl` output"),
    "etl with a 1-byte partition": (
        ["etl", "--dataset", "ml-1m", "--raw", "{ws}/raw", "--out", "{ws}/new", "--part-size", "1B"],
        "--part-size '1B' is below the minimum of 64.00 kiB"),
    "train onto its ETL output": (["train", "--data", "{ws}/etl", "--out", "{ws}/etl"], "--out {ws}/etl is --data"),
    "train into its ETL output": (
        ["train", "--data", "{ws}/etl", "--out", "{ws}/etl/models/m", "--overwrite"], "is inside --data"),
    "train into a user's directory": (
        ["train", "--data", "{ws}/etl", "--out", "{ws}/mine"],
        "is an existing directory that is not a previous `train`"),
    "train with a NaN learning rate": (
        ["train", "--data", "{ws}/etl", "--out", "{ws}/model", "--learning-rate", "nan"],
        "--learning-rate must be a positive finite number, got nan"),
    "train with no embedding width": (
        ["train", "--data", "{ws}/etl", "--out", "{ws}/model", "--embedding-dim", "0"],
        "--embedding-dim must be at least 1, got 0"),
    "train with a negative weight decay": (
        ["train", "--data", "{ws}/etl", "--out", "{ws}/model", "--weight-decay", "-1"], "--weight-decay must be"),
    "train with no patience": (
        ["train", "--data", "{ws}/etl", "--out", "{ws}/model", "--patience", "0"], "--patience must be at least 1, got 0"),
    "train with a negative plateau tolerance": (
        ["train", "--data", "{ws}/etl", "--out", "{ws}/model", "--plateau-tolerance", "-0.1"],
        "--plateau-tolerance must be a finite number >= 0, got -0.1"),
    "train with a NaN embedding penalty": (
        ["train", "--data", "{ws}/etl", "--out", "{ws}/model", "--embeddings-l2", "nan"],
        "--embeddings-l2 must be a finite number >= 0, got nan"),
    "train with a negative weight-average window": (
        ["train", "--data", "{ws}/etl", "--out", "{ws}/model", "--ema-epochs", "-1"],
        "--ema-epochs must be a finite number >= 0, got -1.0"),
    "predict onto its input": (
        ["predict", "--data", "{ws}/etl", "--model", "{ws}/model", "--input", "{ws}/requests.csv",
         "--output", "{ws}/requests.csv"], "--output {ws}/requests.csv is --input"),
    "predict onto a directory": (
        ["predict", "--data", "{ws}/etl", "--model", "{ws}/model", "--input", "{ws}/requests.csv",
         "--output", "{ws}/mine"], "--output {ws}/mine is a directory"),
    "predict onto a user's file": (
        ["predict", "--data", "{ws}/etl", "--model", "{ws}/model", "--input", "{ws}/requests.csv",
         "--output", "{ws}/notes.txt"], "is an existing file that is not a previous `predict` output"),
    "predict into the model dir": (
        ["predict", "--data", "{ws}/etl", "--model", "{ws}/model", "--input", "{ws}/requests.csv",
         "--output", "{ws}/model/scores.parquet"], "is inside --model"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_the_cli_refuses_and_leaves_every_file_as_it_was(workspace, case):
    argv, message = REFUSED[case]
    before = snapshot(workspace)
    done = cli(*(a.format(ws=workspace) for a in argv))
    assert done.returncode == 2, done.stderr[-3000:]
    assert message.format(ws=workspace) in error_line(done)
    assert snapshot(workspace) == before


def test_overwrite_replaces_a_user_directory_but_a_previous_output_needs_no_flag(workspace):
    from pipeline.etl import run_etl

    with pytest.raises(UsageError, match="not a previous `etl` output"):
        run_etl("ml-1m", workspace / "mine", raw=workspace / "raw")
    run_etl("ml-1m", workspace / "mine", raw=workspace / "raw", overwrite=True)
    assert (workspace / "mine" / "etl.json").is_file() and not (workspace / "mine" / "thesis.tex").exists()
    run_etl("ml-1m", workspace / "mine", raw=workspace / "raw", seed=1)  # now it is an ETL output
    assert json.loads((workspace / "mine" / "etl.json").read_text())["seed"] == 1
    # merlin's file list names the final files, not the temporary build dir they were written in
    listed = (workspace / "mine" / "train" / "_file_list.txt").read_text().split()[1:]
    assert listed and all(Path(p).parent == (workspace / "mine" / "train").resolve() for p in listed)


def test_stale_temporary_dirs_of_dead_runs_are_removed_and_live_ones_kept(workspace):
    from pipeline.etl import run_etl

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = workspace / f".out.tmp-{dead.pid}-0123abcd"
    (stale / "train").mkdir(parents=True)
    (stale / "train" / "part_0.parquet").write_bytes(b"x" * 1000)  # what kill -9 leaves behind
    live = workspace / f".out.tmp-{os.getpid()}-89abcdef"  # a run still going on (this process)
    live.mkdir()
    run_etl("ml-1m", workspace / "out", raw=workspace / "raw")
    assert not stale.exists() and live.exists()
    assert not [p for p in workspace.iterdir() if p.name.startswith(".out.") and p != live]


def test_a_diverged_run_is_not_published(workspace):
    from pipeline.train import train_model

    before = snapshot(workspace / "model")
    with pytest.raises(TrainingDiverged, match="diverged in epoch 1 .*loss nan.*nothing was published"):
        train_model(workspace / "etl", workspace / "model", epochs=2, batch_size=2048, learning_rate=1e30,
                    weight_decay=0.0, verbose=0)
    assert snapshot(workspace / "model") == before
    assert not (workspace / "model.partial").exists()


def test_a_full_disk_leaves_the_previous_output_and_no_partial_run(workspace):
    before = snapshot(workspace)
    # train: the first checkpoint (about 0.6 MB) no longer fits
    done = cli("train", "--data", str(workspace / "etl"), "--out", str(workspace / "model"), "--epochs", "1",
               "--batch-size", "4096", limit_file_size=200_000)
    assert done.returncode == 2
    assert error_line(done).startswith(f"error: {workspace / 'model.partial'}: File too large while writing the model")
    # etl: the training split's parquet no longer fits
    done = cli("etl", "--dataset", "ml-1m", "--raw", str(workspace / "raw"), "--out", str(workspace / "etl"),
               limit_file_size=100_000)
    assert done.returncode == 2
    assert error_line(done).startswith(
        f"error: {workspace / 'etl'}: File too large (while building it; nothing was replaced)")
    assert snapshot(workspace) == before
    assert sorted(p.name for p in workspace.iterdir()) == sorted(
        ["raw", "etl", "model", "mine", "notes.txt", "requests.csv"])


def test_training_reads_one_schema(workspace):
    """merlin reads .merlin/schema.json; a schema.pbtxt edited to disagree with it is refused, not ignored."""
    from merlin.schema import Schema, Tags
    from merlin.schema.io.tensorflow_metadata import TensorflowMetadata
    from merlin.schema.tags import TagSet

    from pipeline.train import train_model

    split = workspace / "etl" / "train"
    schema = TensorflowMetadata.from_proto_text_file(str(split)).to_merlin_schema()
    untagged = Schema([c._replace(tags=TagSet([])) if c.name == "rating_binary" else c for c in schema])
    assert Tags.TARGET not in untagged["rating_binary"].tags
    TensorflowMetadata.from_merlin_schema(untagged).to_proto_text_file(str(split), "schema.pbtxt")
    with pytest.raises(DataError, match=r"schema.pbtxt and .*\.merlin/schema.json disagree on column 'rating_binary'"):
        train_model(workspace / "etl", workspace / "fresh")
    assert not (workspace / "fresh").exists() and not (workspace / "fresh.partial").exists()


def test_a_checkpoint_is_never_without_its_history(workspace):
    """Killed between an epoch's history and its model file: --resume continues from the last complete
    checkpoint and trains exactly the epochs still missing."""
    from pipeline.train import train_model

    small = dict(seed=2, batch_size=4096, verbose=0)
    train_model(workspace / "etl", workspace / "m", epochs=1, **small)
    checkpoints = workspace / "m" / "checkpoints"
    history = json.loads((checkpoints / "history_001.json").read_text())
    (checkpoints / "history_002.json").write_text(json.dumps(history + [{**history[0], "epoch": 2}]))
    (checkpoints / ".epoch_002.keras").write_bytes(b"half a zip")  # the save that was cut short
    resumed = train_model(workspace / "etl", workspace / "m", epochs=2, resume=True, **small)
    assert [e["epoch"] for e in resumed["epochs"]] == [1, 2]
    assert resumed["epochs"][1]["train"] != history[0]["train"]  # epoch 2 really ran
    # the newest checkpoint, and the best epoch's (restored at the end) if that is epoch 1
    best = {"epoch_001.keras", "history_001.json"} if resumed["best_epoch"] == 1 else set()
    assert sorted(p.name for p in (workspace / "m" / "checkpoints").iterdir()) == sorted(
        {"config.json", "epoch_002.keras", "history_002.json"} | best)


# ---------------------------------------------------------------------------------- predict / serve


def test_a_model_is_only_served_with_the_etl_run_it_was_trained_on(workspace):
    from pipeline.etl import run_etl
    from pipeline.inference import Predictor

    run_etl("ml-1m", workspace / "etl_seed1", raw=workspace / "raw", seed=1)  # same raw data, other split
    with pytest.raises(ArtifactError) as err:
        Predictor.load(workspace / "etl_seed1", workspace / "model", feature_cache=False)
    trained_on = json.loads((workspace / "model" / "config.json").read_text())["etl_run_id"]
    other = json.loads((workspace / "etl_seed1" / "etl.json").read_text())["run_id"]
    assert trained_on != other
    assert f"trained on ETL run {trained_on[:12]}" in str(err.value) and f"is ETL run {other[:12]}" in str(err.value)
    # the same seed again is the same run: the model belongs with it
    run_etl("ml-1m", workspace / "etl_again", raw=workspace / "raw", seed=0)
    assert Predictor.load(workspace / "etl_again", workspace / "model", feature_cache=False).predict(
        pd.DataFrame({"userId": [1], "movieId": [1]})).shape == (1,)


def test_a_model_with_non_finite_metrics_is_refused(workspace):
    from pipeline.inference import Predictor
    from pipeline.manifest import read_manifest, write_manifest

    metrics = json.loads((workspace / "model" / "metrics.json").read_text())
    metrics["valid"]["auc"] = float("nan")
    (workspace / "model" / "metrics.json").write_text(json.dumps(metrics))
    manifest = read_manifest(workspace / "model")
    write_manifest(workspace / "model", **{k: v for k, v in manifest.items() if k not in ("files", "algorithm")})
    with pytest.raises(ArtifactError, match="non-finite valid metrics \\(auc\\)"):
        Predictor.load(workspace / "etl", workspace / "model", feature_cache=False)


def test_predict_names_the_row_of_a_missing_id_and_replaces_only_its_own_output(workspace):
    from pipeline.inference import Predictor, predict_file

    predictor = Predictor.load(workspace / "etl", workspace / "model", feature_cache=False)
    (workspace / "holes.csv").write_text("userId,movieId\n1,2\n3,4\n,5\n6,7\n")
    with pytest.raises(DataError, match="holes.csv, rows 0-3: field 'userId' has a missing value at row 2"):
        predict_file(predictor, workspace / "holes.csv", workspace / "scores.parquet", progress=False)
    (workspace / "negative.csv").write_text("userId,movieId\n1,2\n3,-4\n")
    with pytest.raises(DataError, match="field 'movieId': id -4 at row 1 is negative"):
        predict_file(predictor, workspace / "negative.csv", workspace / "scores.parquet", progress=False)
    assert not [p.name for p in workspace.iterdir() if "scores" in p.name]  # no output, no .part file

    first = predict_file(predictor, workspace / "requests.csv", workspace / "scores.parquet", progress=False)
    again = predict_file(predictor, workspace / "requests.csv", workspace / "scores.parquet", progress=False)
    assert first["rows"] == again["rows"] == 2
    np.testing.assert_array_equal(pd.read_parquet(workspace / "scores.parquet")["score"],
                                  predictor.predict(pd.DataFrame({"userId": [1, 2], "movieId": [1, 3]})))


def test_a_rating_given_twice_is_kept_once_and_never_straddles_the_split(workspace):
    from pipeline.etl import run_etl

    ratings = workspace / "raw" / "ratings.dat"
    lines = ratings.read_bytes().splitlines()
    again = []
    for line in lines[:300]:  # the same pairs rated again, later
        user, movie, stars, when = line.split(b"::")
        again.append(b"::".join([user, movie, b"5" if stars != b"5" else b"1", str(int(when) + 60).encode()]))
    ratings.write_bytes(b"\n".join(lines + again) + b"\n")
    summary = run_etl("ml-1m", workspace / "out", raw=workspace / "raw")
    assert summary["duplicates_dropped"] == 300
    assert summary["rows"]["train"] + summary["rows"]["valid"] == len(lines)
    pairs = {split: set(map(tuple, pd.concat([pd.read_parquet(p, columns=["userId", "movieId"]) for p in
                                             (workspace / "out" / split).glob("*.parquet")]).to_numpy()))
             for split in ("train", "valid")}
    assert not pairs["train"] & pairs["valid"]

"""The ETL on a real Dask cluster: a scheduler and two workers, each its own process, on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import pipeline  # noqa: F401
from pipeline.cluster import external_cluster

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with external_cluster(2, memory_limit="2GB", local_directory=tmp_path_factory.mktemp("dask")) as running:
        yield running


def etl_command(raw: Path, out: Path, scheduler: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "etl", "--dataset", "ml-1m", "--raw", str(raw), "--out", str(out),
            "--dask-scheduler", scheduler]


def read_parts(directory: Path) -> pd.DataFrame:
    parts = sorted(directory.glob("part_*.parquet"), key=lambda p: int(p.stem.split("_")[1]))
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)


def test_the_cli_etl_on_the_cluster_gives_the_in_process_output(cluster, synthetic_raw, etl_dir, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(etl_command(synthetic_raw, tmp_path / "out", cluster.address), capture_output=True,
                          text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    for split in ("train", "valid"):  # every row and every encoding
        pd.testing.assert_frame_equal(read_parts(tmp_path / "out" / split), read_parts(etl_dir / split))
    assert len(cluster.worker_pids()) == 2  # the user's cluster is left running


def test_a_worker_killed_mid_etl_leaves_no_output_and_a_clear_error(cluster, synthetic_raw, etl_dir, tmp_path):
    """Either Dask's own retry finishes the job (then the output is exactly the in-process one), or the
    run stops with one line naming the cluster and the previous output stays as it was (seen here: the
    scheduler's broadcast to the dead worker fails while the workflow is fitted)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "etl.json").write_text("{}")  # a previous ETL output, to be left as it was
    (tmp_path / "out" / "workflow").mkdir()
    (tmp_path / "out" / "workflow" / "manifest.json").write_text("{}")
    run = subprocess.Popen(etl_command(synthetic_raw, tmp_path / "out", cluster.address), stderr=subprocess.PIPE,
                           text=True, env=env)
    for line in run.stderr:
        if "etl split" in line:  # past the split: the workflow is being fitted on the cluster
            break
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.tmp-*")) and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)
    os.kill(cluster.worker_pids()[0], signal.SIGKILL)
    stderr = run.stderr.read()
    run.wait(timeout=600)
    if run.returncode == 0:
        for split in ("train", "valid"):
            pd.testing.assert_frame_equal(read_parts(tmp_path / "out" / split), read_parts(etl_dir / split))
        return
    assert run.returncode == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    error = [line for line in stderr.splitlines() if line.startswith("error: ")][-1]
    assert f"error: the Dask cluster ({cluster.address}) lost a worker" in error
    assert f"{tmp_path / 'out'} was left as it was" in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["etl.json", "workflow"]


def test_cluster_dataset_puts_the_same_partitions_on_the_workers(cluster):
    """The ETL's in-memory split reaches the workers once, as futures: same partitions as merlin's own
    Dataset(frame, npartitions), and graphs built on it no longer carry the data."""
    import merlin.io
    import numpy as np
    from distributed import Client

    from pipeline.cluster import cluster_dataset

    frame = pd.DataFrame({"userId": np.arange(50_000) % 977, "rating": np.arange(50_000) % 5 + 1.0})
    with Client(cluster.address) as client:
        placed = cluster_dataset(frame, 7)
        plain = merlin.io.Dataset(frame, npartitions=7)
        assert placed.npartitions == plain.npartitions == 7
        for a, b in zip(placed.to_ddf().to_delayed(), plain.to_ddf().to_delayed()):
            pd.testing.assert_frame_equal(client.compute(a).result(), b.compute(scheduler="sync"))
        def frames_in(graph):  # the data a graph carries to the scheduler with every compute
            return sum(isinstance(value, pd.DataFrame) for value in dict(graph).values())

        assert frames_in(plain.to_ddf().dask) == 7 and frames_in(placed.to_ddf().dask) == 0
    assert cluster_dataset(frame, 7).to_ddf().compute().equals(frame)  # no client: merlin's in-process Dataset

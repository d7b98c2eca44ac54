"""Dask clusters for the ETL: in-memory data placed on the workers, and a real cluster on this machine.

``cluster_dataset`` is how the ETL hands its in-memory split to a Dask cluster: the partitions are
sent to the workers once, so that every pass of the workflow reads them there.

``external_cluster`` is what a user runs on a cluster, in miniature, for tests and benchmarks: the
scheduler and each worker are their own OS processes (as on separate hosts), talking TCP on
127.0.0.1, with a memory limit per worker. ``python -m pipeline etl --dask-scheduler ADDRESS`` then
runs on it unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import merlin.io
    import pandas as pd

logger = logging.getLogger(__name__)


def cluster_dataset(frame: "pd.DataFrame", npartitions: int, *, cpu: bool = True) -> "merlin.io.Dataset":
    """``merlin.io.Dataset(frame, npartitions=npartitions, cpu=cpu)``, its partitions already held by the
    workers when a Dask cluster (``distributed`` client) is active; the same partitions either way.

    Why: a Dataset of an in-memory frame embeds the frame's partitions in every task graph made from
    it, so each pass of the workflow (every statistics level of ``fit``, each ``transform``) sends the
    whole frame from the client through the scheduler again (1M ratings on 2 workers: 146 s, against
    ~16 s in-process). Here the client scatters each partition straight to a worker once. On a GPU
    (``cpu=False``) merlin's own conversion to cudf is kept.
    """
    import dask
    import dask.dataframe as dd
    import merlin.io

    try:
        from distributed import get_client

        client = get_client()
    except (ImportError, ValueError):  # no cluster: merlin computes in-process
        client = None
    if client is None or not cpu:
        return merlin.io.Dataset(frame, npartitions=npartitions, cpu=cpu)
    local = dd.from_pandas(frame, sort=False, npartitions=npartitions)  # what merlin.io.Dataset does
    with warnings.catch_warnings():  # dask warns about a local compute while a client is active: intended
        warnings.filterwarnings("ignore", "Running on a single-machine scheduler", UserWarning)
        parts = dask.compute(*local.to_delayed(), scheduler="sync")  # cut here, not on the cluster
    futures = client.scatter(list(parts), direct=True)
    del parts
    on_workers = dd.from_delayed(futures, meta=local._meta, divisions=local.divisions, verify_meta=False)
    logger.info("%d partitions (%s rows) scattered to %d Dask workers", npartitions, f"{len(frame):,}",
                len(client.scheduler_info()["workers"]))
    return merlin.io.Dataset(on_workers, cpu=True)


@dataclass
class ExternalCluster:
    """A running scheduler + workers started by ``external_cluster``.

    ``address`` is the scheduler's ``tcp://127.0.0.1:PORT``; ``worker_pids()`` the worker processes'
    PIDs (not their nannies'), e.g. to kill one.
    """

    address: str
    processes: list[subprocess.Popen] = field(default_factory=list)

    def worker_pids(self) -> list[int]:
        from distributed import Client

        with Client(self.address, timeout=30) as client:
            return sorted(int(pid) for pid in client.run(os.getpid).values())


@contextlib.contextmanager
def external_cluster(n_workers: int = 2, *, memory_limit: str = "4GB", nthreads: int = 1,
                     local_directory: str | Path | None = None, log_directory: str | Path | None = None,
                     timeout: float = 120) -> Iterator[ExternalCluster]:
    """Start ``dask scheduler`` and ``dask worker --nworkers N --memory-limit M`` on 127.0.0.1; stop them after.

    Workers preload ``pipeline.device`` (the dask settings merlin needs; no TensorFlow import in ETL
    workers), spill to ``local_directory`` (default: the system's temp dir) past their memory limit,
    and are restarted by their nannies if they die. Their output goes to ``log_directory``/scheduler.log
    and workers.log when given (else nowhere). Yields an ``ExternalCluster`` once every worker
    has joined; raises ``RuntimeError`` if that takes longer than ``timeout`` seconds.
    """
    from distributed import Client

    from pipeline.serve import free_port

    dask = str(Path(sys.executable).with_name("dask"))
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")]))
    # On a machine at load 10 the scheduler's event loop stalls for 10-20 s while it unpacks a large
    # graph; with the default 30 s TCP timeout a worker's connection was then dropped and the worker
    # removed, losing the partitions scattered to it (25M ratings, 2026-12-02). Be patient instead.
    env.setdefault("DASK_DISTRIBUTED__COMM__TIMEOUTS__TCP", "300s")
    env.setdefault("DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT", "120s")
    def output(name: str):
        if log_directory is None:
            return dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        Path(log_directory).mkdir(parents=True, exist_ok=True)
        log = open(Path(log_directory) / f"{name}.log", "w")  # the child keeps its own copy of the descriptor
        logs.append(log)
        return dict(stdout=log, stderr=subprocess.STDOUT)

    logs: list = []
    options = dict(env=env, start_new_session=True)
    cluster = ExternalCluster(address)
    cluster.processes.append(subprocess.Popen(
        [dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"], **options,
        **output("scheduler")))
    worker = [dask, "worker", address, "--nworkers", str(n_workers), "--nthreads", str(nthreads),
              "--memory-limit", memory_limit, "--no-dashboard", "--preload", "pipeline.device"]
    if local_directory is not None:
        worker += ["--local-directory", str(local_directory)]
    try:
        deadline = time.monotonic() + timeout
        while True:  # the scheduler takes a moment to listen
            try:
                client = Client(address, timeout=5)
                break
            except (OSError, TimeoutError):
                if time.monotonic() > deadline or cluster.processes[0].poll() is not None:
                    raise RuntimeError(f"the Dask scheduler did not start on {address}") from None
                time.sleep(0.2)
        cluster.processes.append(subprocess.Popen(worker, **options, **output("workers")))
        with client:
            client.wait_for_workers(n_workers, timeout=max(1.0, deadline - time.monotonic()))
        logger.info("Dask cluster at %s with %d workers of %s", address, n_workers, memory_limit)
        yield cluster
    finally:
        for process in reversed(cluster.processes):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)  # the worker group: nannies and their workers
        for process in reversed(cluster.processes):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for log in logs:
            log.close()

"""A real Dask cluster on this machine: ``dask scheduler`` and ``dask worker`` as separate processes.

What a user runs on a cluster, in miniature, for tests and benchmarks: the scheduler and each worker
are their own OS processes (as on separate hosts), talking TCP on 127.0.0.1, with a memory limit per
worker. ``python -m pipeline etl --dask-scheduler ADDRESS`` then runs on it unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)


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


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def external_cluster(n_workers: int = 2, *, memory_limit: str = "4GB", nthreads: int = 1,
                     local_directory: str | Path | None = None, timeout: float = 120) -> Iterator[ExternalCluster]:
    """Start ``dask scheduler`` and ``dask worker --nworkers N --memory-limit M`` on 127.0.0.1; stop them after.

    Workers preload ``pipeline.device`` (the dask settings merlin needs; no TensorFlow import in ETL
    workers), spill to ``local_directory`` (default: the system's temp dir) past their memory limit,
    and are restarted by their nannies if they die. Yields an ``ExternalCluster`` once every worker
    has joined; raises ``RuntimeError`` if that takes longer than ``timeout`` seconds.
    """
    from distributed import Client

    dask = str(Path(sys.executable).with_name("dask"))
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")]))
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    cluster = ExternalCluster(address)
    cluster.processes.append(subprocess.Popen(
        [dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"], **quiet))
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
        cluster.processes.append(subprocess.Popen(worker, **quiet))
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

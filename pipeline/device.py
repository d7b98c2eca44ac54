"""Where the ETL runs: the dataframe device (``--device``) and the Dask cluster (``--workers`` / ``--dask-scheduler``).

There is one implementation: merlin-core dispatches every dataframe operation to cudf / dask-cudf when a
GPU is used and to pandas / dask otherwise, so choosing a device only decides ``cpu=`` for
``merlin.io.Dataset`` and the kind of local cluster.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

from pipeline.errors import DeviceError
from pipeline.registry import DEVICES

logger = logging.getLogger(__name__)


def gpu_available() -> bool:
    """True when a CUDA GPU and cudf are both usable (merlin-core's own detection)."""
    from merlin.core.compat import HAS_GPU, cudf

    return bool(HAS_GPU and cudf is not None)


def resolve_device(device: str) -> str:
    """``"cpu"`` or ``"gpu"`` for a requested ``auto | cpu | gpu``; ``DeviceError`` if gpu is impossible."""
    if device not in DEVICES:
        raise DeviceError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cpu":
        return "cpu"
    available = gpu_available()
    if device == "gpu" and not available:
        raise DeviceError(
            "--device gpu was requested but no usable GPU was found (merlin-core sees no CUDA device, or cudf "
            "is not installed; see the README's GPU recipe). Use --device cpu or --device auto."
        )
    return "gpu" if available else "cpu"


@contextlib.contextmanager
def dask_cluster(device: str, *, workers: int | None = None, scheduler: str | None = None) -> Iterator[object | None]:
    """Run the enclosed NVTabular work on a Dask cluster, or in-process when neither option is given.

    Args:
        device: ``"cpu"`` (``distributed.LocalCluster``) or ``"gpu"`` (``dask_cuda.LocalCUDACluster``).
        workers: start a local cluster with this many single-threaded worker processes. Scripts that
            use it need an ``if __name__ == "__main__":`` guard (workers are spawned); ``python -m
            pipeline`` has one.
        scheduler: address of an existing scheduler (``tcp://host:8786``); it is left running.

    Yields the ``distributed.Client`` (or ``None``). merlin-core picks the active client up itself.
    """
    if workers is not None and scheduler is not None:
        raise DeviceError("give either --workers or --dask-scheduler, not both")
    if workers is None and scheduler is None:
        yield None
        return
    from distributed import Client
    from merlin.core.utils import Distributed

    if scheduler is not None:
        try:
            client = Client(scheduler)  # timeout: dask config distributed.comm.timeouts.connect
        except (OSError, TimeoutError) as err:
            raise DeviceError(f"cannot connect to the Dask scheduler at {scheduler}: {err}") from err
        logger.info("using the Dask scheduler at %s (%d workers)", scheduler, len(client.scheduler_info()["workers"]))
        try:
            with Distributed(client=client):
                yield client
        finally:
            client.close()
        return

    if workers < 1:
        raise DeviceError(f"--workers must be >= 1, got {workers}")
    # Workers preload this module: ``dask_setup`` keeps them from importing TensorFlow (see there).
    options = dict(n_workers=workers, dashboard_address=None, preload=[__name__])
    if device == "cpu":
        options.update(threads_per_worker=1, processes=True)
    logger.info("starting a local Dask cluster with %d %s workers", workers, device.upper())
    with Distributed(cluster_type="cuda" if device == "gpu" else "cpu", force_new=True, **options) as dist:
        yield dist.client


def dask_setup(worker) -> None:
    """Dask preload hook run in each local-cluster worker before its first task.

    merlin-core imports TensorFlow whenever it is installed (~15 s per process here) although no ETL
    task uses it; an ETL worker is never asked to train, so it makes ``import tensorflow`` fail fast.
    Importing this module also imports ``pipeline``, which sets the dask config merlin needs.
    """
    sys.modules.setdefault("tensorflow", None)

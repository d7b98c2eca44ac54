"""Device and Dask-cluster selection for the ETL (this machine has no GPU; the GPU path is the same code)."""

from __future__ import annotations

import pytest

from pipeline.device import dask_cluster, gpu_available, resolve_device
from pipeline.errors import DeviceError


def test_cpu_is_always_available_and_auto_picks_what_exists():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("gpu" if gpu_available() else "cpu")


@pytest.mark.skipif(gpu_available(), reason="this machine has a GPU")
def test_gpu_without_a_gpu_is_a_clear_error():
    with pytest.raises(DeviceError, match="no usable GPU"):
        resolve_device("gpu")


def test_unknown_device_and_conflicting_cluster_options_are_rejected():
    with pytest.raises(DeviceError, match="auto, cpu, gpu"):
        resolve_device("tpu")
    with pytest.raises(DeviceError, match="not both"):
        with dask_cluster("cpu", workers=2, scheduler="tcp://127.0.0.1:8786"):
            pass
    with pytest.raises(DeviceError, match=">= 1"):
        with dask_cluster("cpu", workers=0):
            pass


def test_no_cluster_options_run_in_process():
    with dask_cluster("cpu") as client:
        assert client is None


def test_unreachable_scheduler_is_a_clear_error():
    import dask

    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        with pytest.raises(DeviceError, match="cannot connect to the Dask scheduler at tcp://127.0.0.1:9"):
            with dask_cluster("cpu", scheduler="tcp://127.0.0.1:9"):
                pass

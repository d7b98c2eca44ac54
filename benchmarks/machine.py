"""What every benchmark result records about the machine it ran on, and how results are written
(imported by the benchmark scripts)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path

PACKAGES = ("nvtabular", "merlin-core", "merlin-dataloader", "tensorflow-cpu", "keras", "pandas", "numpy", "pyarrow",
            "dask")


def describe_machine() -> dict:
    """CPU model, cores, memory (GB), Python, platform, package versions and the load average at the call."""
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor() or "unknown")
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem_gb, 1), "gpu": "none (CPU run)",
            "python": platform.python_version(), "platform": platform.platform(), "versions": versions,
            "load_average": [round(x, 2) for x in os.getloadavg()]}


COMMITTED_RESULTS = Path(__file__).resolve().parent / "results"  # the figures the README quotes
SCRATCH_RESULTS = Path(__file__).resolve().parent.parent / "scratch" / "benchmarks"  # git-ignored


def add_results_argument(parser) -> None:
    """``--results DIR`` (every benchmark): where its .json / .md / .png go. The default is a scratch dir, so a
    trial run never overwrites the committed figures; ``--results benchmarks/results`` updates them."""
    parser.add_argument("--results", type=Path, default=SCRATCH_RESULTS,
                        help="directory for the results (default: scratch/benchmarks/, git-ignored; "
                             "benchmarks/results/ holds the committed figures)")


def write_results(stem: Path, report: dict, markdown: str) -> None:
    """Write ``stem``.json (every figure) and ``stem``.md (their table), creating the folder."""
    import json

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_name(stem.name + ".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_name(stem.name + ".md").write_text(markdown)

"""How ETL and training cost grow with the data: 1M, 5M and 25M synthetic ratings (issue 15).

    python benchmarks/scale.py                                   # every size and case (hours on 2 cores)
    python benchmarks/scale.py --sizes 25m --cases etl-external train

Cases, each a fresh ``python -m pipeline`` process run with ``nice -n 10``, one at a time:

- ``etl-inprocess``: ``etl`` with no cluster;
- ``etl-local``: ``etl --workers 2`` (distributed.LocalCluster, spawned by the ETL process);
- ``etl-external``: ``etl --dask-scheduler ADDRESS`` on ``pipeline.cluster.external_cluster``: a
  ``dask scheduler`` and ``dask worker --nworkers 2 --nthreads 1 --memory-limit 4GB`` started as their
  own processes on 127.0.0.1 (what a user runs on real hosts);
- ``train``: ``train --epochs 1`` on that size's ETL output, the loader left on ``auto`` (its log line
  says whether it held the split in memory or streamed it).
- ``train-stream``: the same with ``PIPELINE_LOADER=stream`` (the streaming path at every size, so the
  streamed rate at 1M is measured too). The results state issue 15's training target: the largest size's
  samples/s against the smallest size's, for both cases.

Every process tree is sampled every 0.25 s from /proc (psutil): peak RSS of the client (the ``python -m
pipeline`` process alone), of the whole client tree (with a local cluster's workers), of the scheduler,
of each external worker and of the sum of the worker tree at any moment, plus the load average over
the run. The synthetic raw data of each size is generated first (streamed generator; its time and
peak RSS are recorded too) and kept under ``--work``. Results merge into benchmarks/results/scale.json
(a case re-run replaces its row; every row keeps its own date, command and load), which is re-rendered
as scale.md and scale.png (log-log: time and peak memory against ratings).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from machine import describe_machine  # noqa: E402

# users / movies of ML-1M and ML-25M; 5M sits between them geometrically (as ratings do).
SIZES = {
    "1m": dict(n_users=6_040, n_movies=3_706, n_ratings=1_000_209),
    "5m": dict(n_users=31_334, n_movies=14_793, n_ratings=5_000_000),
    "25m": dict(n_users=162_541, n_movies=59_047, n_ratings=25_000_095),
}
CASES = ("etl-inprocess", "etl-local", "etl-external", "train", "train-stream")
TRAIN_CASES = ("train", "train-stream")  # train-stream: PIPELINE_LOADER=stream (streamed at every size)
WORKER_MEMORY = "4GB"
N_WORKERS = 2
RESULTS = REPO / "benchmarks" / "results" / "scale"


class TreeSampler:
    """Peak RSS (bytes) of process trees, sampled every ``interval`` s in a thread, and the load average."""

    def __init__(self, roots: dict[str, int], interval: float = 0.25):
        import psutil

        self._psutil = psutil
        self.roots = {name: psutil.Process(pid) for name, pid in roots.items()}
        self.interval = interval
        self.peak: dict[str, int] = {}
        self.loads: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _rss(self, proc) -> int:
        try:
            return proc.memory_info().rss
        except (self._psutil.NoSuchProcess, self._psutil.AccessDenied):
            return 0

    def _children(self, proc) -> list:
        try:
            return proc.children(recursive=True)
        except (self._psutil.NoSuchProcess, self._psutil.AccessDenied):
            return []

    def _record(self, key: str, value: int) -> None:
        self.peak[key] = max(self.peak.get(key, 0), value)

    def _run(self) -> None:
        last_load = 0.0
        while not self._stop.is_set():
            for name, root in self.roots.items():
                own = self._rss(root)
                children = self._children(root)
                sizes = {child.pid: self._rss(child) for child in children}
                self._record(name, own)
                self._record(f"{name} tree", own + sum(sizes.values()))
                for child in children:  # Dask workers: spawned by their nanny (external or LocalCluster)
                    try:
                        cmd = " ".join(child.cmdline())
                    except (self._psutil.NoSuchProcess, self._psutil.AccessDenied):
                        continue
                    if "spawn_main" in cmd:
                        self._record(f"worker {child.pid}", sizes.get(child.pid, 0))
            if time.monotonic() - last_load >= 5:
                self.loads.append(os.getloadavg()[0])
                last_load = time.monotonic()
            self._stop.wait(self.interval)


def run_monitored(command: list[str], log: Path, extra_roots: dict[str, int] | None = None,
                  env: dict | None = None) -> dict:
    """Run ``command`` (niced) to completion with its output in ``log``; wall seconds, peaks, loads."""
    inherited = {k: v for k, v in os.environ.items() if k != "PIPELINE_LOADER"}  # only a case's own loader choice
    env = dict(inherited, PYTHONPATH=str(REPO), DASK_DISTRIBUTED__COMM__TIMEOUTS__TCP="300s", **(env or {}))
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(["nice", "-n", "10", *command], stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=REPO)
        with TreeSampler({"client": proc.pid, **(extra_roots or {})}) as sampler:
            code = proc.wait()
    wall = time.perf_counter() - start
    loads = sampler.loads or [os.getloadavg()[0]]
    failure = None
    if code != 0:  # recorded, not raised: a failed run at a size is a result too
        lines = [line for line in log.read_text().splitlines() if line.strip()]
        failure = next((line for line in reversed(lines) if line.startswith("error: ") or "Error" in line.split(":")[0]),
                       lines[-1] if lines else "")[:300]
    return {"exit": code, "failure": failure, "wall_s": round(wall, 2), "peak_rss_mb": {k: round(v / 2**20) for k, v in sorted(sampler.peak.items())},
            "load_average": {"min": round(min(loads), 2), "max": round(max(loads), 2),
                             "mean": round(sum(loads) / len(loads), 2)}}


def generate(size: str, work: Path) -> tuple[Path, dict | None]:
    """The raw synthetic dir of ``size`` (generated in a monitored process when missing)."""
    raw = work / f"raw-{size}"
    code = ("import sys, pipeline; from pipeline.datasets import generate_synthetic; "
            f"generate_synthetic(sys.argv[1], fmt='ml-1m', seed=0, **{SIZES[size]!r})")
    params = raw / "synthetic.json"
    if params.is_file() and all(json.loads(params.read_text()).get(k) == v for k, v in SIZES[size].items()):
        return raw, None
    figures = run_monitored([sys.executable, "-c", code, str(raw)], work / f"generate-{size}.log")
    return raw, figures


def etl(case: str, size: str, raw: Path, work: Path) -> dict:
    out = work / f"etl-{size}" if case == "etl-external" else work / f"etl-{size}-{case}"
    command = [sys.executable, "-m", "pipeline", "etl", "--dataset", "synthetic", "--raw", str(raw), "--out", str(out),
               "--overwrite"]
    log = work / f"{case}-{size}.log"
    if case == "etl-inprocess":
        figures = run_monitored(command, log)
    elif case == "etl-local":
        figures = run_monitored(command + ["--workers", str(N_WORKERS)], log)
    else:
        from pipeline.cluster import external_cluster

        with external_cluster(N_WORKERS, memory_limit=WORKER_MEMORY, local_directory=work / "dask-spill",
                              log_directory=work / f"cluster-{size}") as cluster:
            roots = {"scheduler": cluster.processes[0].pid, "workers": cluster.processes[1].pid}
            figures = run_monitored(command + ["--dask-scheduler", cluster.address], log, roots)
            figures["worker_memory_limit"] = WORKER_MEMORY
        restarts = (work / f"cluster-{size}" / "workers.log").read_text().count("exceeded 95% memory budget")
        figures["workers_restarted_for_memory"] = restarts
    if figures["exit"] != 0:
        return dict(figures, command=" ".join(["python", *command[1:]]), rows=None, rows_per_s=None)
    summary = json.loads((out / "etl.json").read_text())
    rows = summary["rows"]["train"] + summary["rows"]["valid"]
    figures.update(command=" ".join(["python", *command[1:]]) + (" --dask-scheduler ADDRESS" if case == "etl-external"
                                                                   else ""),
                   rows=rows, rows_per_s=round(rows / figures["wall_s"]), etl_seconds=summary["seconds"],
                   partitions=summary["partitions"], output=str(out))
    return figures


def train(size: str, work: Path, stream: bool = False) -> dict:
    """``train --epochs 1`` at ``size``: the loader on auto, or streamed by merlin.dataloader (``stream``)."""
    # the ETL output of the external cluster, else of the in-process run (the same rows: tests/test_cluster.py)
    data = next((d for d in (work / f"etl-{size}", work / f"etl-{size}-etl-inprocess") if (d / "etl.json").is_file()),
                None)
    if data is None:
        raise RuntimeError(f"train at {size} needs an ETL output of that size (run etl-external or etl-inprocess)")
    suffix = "-stream" if stream else ""
    model = work / f"model-{size}{suffix}"
    command = [sys.executable, "-m", "pipeline", "train", "--data", str(data), "--out", str(model), "--epochs", "1",
               "--overwrite"]
    log = work / f"train{suffix}-{size}.log"
    figures = run_monitored(command, log, env={"PIPELINE_LOADER": "stream"} if stream else None)
    prefix = "PIPELINE_LOADER=stream " if stream else ""
    if figures["exit"] != 0:
        return dict(figures, command=prefix + " ".join(["python", *command[1:]]), rows=None, rows_per_s=None)
    metrics = json.loads((model / "metrics.json").read_text())
    epoch = metrics["epochs"][0]
    text = log.read_text()
    # the first loader is the fit rows' (the train split, or its fit part when rows are held out for selection)
    choice = re.findall(r"loader over \S+ \(([\d,]+) rows\): ([^(]+)\(([^)]*)\)", text)
    figures.update(command=prefix + " ".join(["python", *command[1:]]), rows=int(metrics["train_rows"]), data=str(data),
                   fit_rows=metrics.get("fit_rows"), epoch_s=epoch["seconds"],
                   samples_per_s=epoch["samples_per_second"], rows_per_s=round(epoch["samples_per_second"]),
                   valid_auc=metrics["valid"].get("auc"),
                   loader=(choice[0][1].strip() + f" ({choice[0][2]})") if choice else "unknown")
    return figures


def render(report: dict) -> str:
    everything = sorted(report["runs"].values(), key=lambda r: (CASES.index(r["case"]), r["ratings"]))
    rows = [r for r in everything if r.get("exit", 0) == 0]
    failed = [r for r in everything if r.get("exit", 0) != 0]
    lines = [
        "# How cost grows with the data (issue 15)", "",
        f"`python benchmarks/scale.py` on {report['machine']['cpu']}, {report['machine']['cores']} cores, "
        f"{report['machine']['memory_gb']} GB, shared with other agents' jobs (load average per row). "
        "Every case is a fresh `python -m pipeline` process under `nice -n 10`, one at a time; peak RSS is sampled "
        "every 0.25 s from /proc. ETL wall time includes reading the raw `::` files and writing parquet + workflow; "
        f"the external cluster is `dask scheduler` + `dask worker --nworkers {N_WORKERS} --nthreads 1 "
        f"--memory-limit {WORKER_MEMORY}` on 127.0.0.1 (pipeline.cluster.external_cluster).", "",
        "| case | ratings | wall s | rows/s | µs/row | client peak MB | client tree MB | scheduler MB | "
        "worker peaks MB | workers' sum MB | load avg | date |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|---|",
    ]
    for r in rows:
        peaks = r["peak_rss_mb"]
        workers = [v for k, v in peaks.items() if k.startswith("worker ")]
        wall = r["epoch_s"] if r["case"] in TRAIN_CASES else r["wall_s"]
        lines.append(
            f"| {r['case']} | {r['ratings']:,} | {wall:,.1f} | {r['rows_per_s']:,} | {1e6 / r['rows_per_s']:.1f} | "
            f"{peaks.get('client', 0):,} | {peaks.get('client tree', 0):,} | {peaks.get('scheduler tree', '') or ''} | "
            f"{', '.join(f'{w:,}' for w in workers)} | {peaks.get('workers tree', '') or ''} | "
            f"{r['load_average']['min']}-{r['load_average']['max']} | {r['date'][:16]} |")
    lines += ["", "train, train-stream: `wall s` is epoch 1's training time (metrics.json), `rows/s` its samples/s over "
              "the fit rows; the process's whole wall time is in scale.json. train-stream forces "
              "`PIPELINE_LOADER=stream`.", ""]
    for r in rows:
        if r["case"] in TRAIN_CASES:
            lines.append(f"- {r['case']} {r['ratings']:,}: loader {r['loader']}; valid AUC {r['valid_auc']}; "
                         f"process wall {r['wall_s']} s; peak RSS {r['peak_rss_mb'].get('client', 0):,} MB")
    lines += train_target_lines(rows)
    lines += etl_target_lines(rows)
    if failed:
        lines += ["", "Runs that failed (recorded as measured):", ""]
        for r in failed:
            peaks = ", ".join(f"{k} {v:,} MB" for k, v in r["peak_rss_mb"].items() if k.startswith("worker ")
                              or k in ("client", "scheduler"))
            lines.append(f"- {r['case']} {r['ratings']:,}: exit {r['exit']} after {r['wall_s']} s "
                         f"(load {r['load_average']['min']}-{r['load_average']['max']}); peaks {peaks}; "
                         f"workers restarted for memory: {r.get('workers_restarted_for_memory', '-')}; "
                         f"`{r['failure']}` ({r['date'][:16]})")
    gens = report.get("generate", {})
    if gens:
        lines += ["", "Synthetic data generation (streamed generator, `generate_synthetic`):", ""]
        for size, g in sorted(gens.items(), key=lambda kv: SIZES[kv[0]]["n_ratings"]):
            lines.append(f"- {SIZES[size]['n_ratings']:,} ratings: {g['wall_s']} s, peak RSS "
                         f"{g['peak_rss_mb']['client']:,} MB (load {g['load_average']['min']}-"
                         f"{g['load_average']['max']}, {g['date'][:16]})")
    lines += ["", "## Growth", ""] + growth_lines(rows) + [""]
    lines += ["Commands:", ""] + sorted({f"- `{r['command']}`" for r in rows}) + [""]
    return "\n".join(lines)


def train_target_lines(rows: list[dict]) -> list[str]:
    """Issue 15's training target: the largest size's samples/s (streamed) against the smallest size's, per case."""
    runs = {(r["case"], r["ratings"]): r for r in rows if r["case"] in TRAIN_CASES}
    sizes = sorted({n for _, n in runs})
    if len(sizes) < 2:
        return []
    small, large = sizes[0], sizes[-1]
    big = runs.get(("train", large)) or runs.get(("train-stream", large))
    if big is None:
        return []
    out = ["", f"Target (train at {large:,} >= 90 % of the samples/s at {small:,}, peak RSS <= 4 GB): "
               f"{large:,} ran at {big['rows_per_s']:,} samples/s ({big['loader'].split(' (')[0]}), "
               f"peak {big['peak_rss_mb'].get('client', 0):,} MB;"]
    for case in TRAIN_CASES:
        base = runs.get((case, small))
        if base:
            ratio = big["rows_per_s"] / base["rows_per_s"]
            out.append(f"  {ratio:.0%} of {small:,} {case} ({base['rows_per_s']:,} samples/s, "
                       f"{base['loader'].split(' (')[0]}): {'met' if ratio >= 0.9 else 'missed'}")
    return out


def etl_target_lines(rows: list[dict]) -> list[str]:
    """Issue 15's ETL targets: the largest size through the external 2-worker cluster in <= 8 min, no worker
    above its limit, and its time per row within 1.5x of the smallest size's (same case)."""
    runs = {r["ratings"]: r for r in rows if r["case"] == "etl-external"}
    if len(runs) < 2:
        return []
    small, large = runs[min(runs)], runs[max(runs)]
    limit_mb = int(WORKER_MEMORY.rstrip("GB")) * 1000  # dask's "4GB" is 4e9 bytes
    peak = max(v for k, v in large["peak_rss_mb"].items() if k.startswith("worker "))
    per_row = (large["wall_s"] / large["ratings"]) / (small["wall_s"] / small["ratings"])
    load = lambda r: f"load {r['load_average']['min']}-{r['load_average']['max']}"  # noqa: E731
    return ["", f"ETL targets (etl-external, {N_WORKERS} workers of {WORKER_MEMORY}):",
            f"- {large['ratings']:,} ratings in {large['wall_s']:,.0f} s ({load(large)}) against 480 s: "
            f"{'met' if large['wall_s'] <= 480 else 'missed by ' + format(large['wall_s'] - 480, ',.0f') + ' s'}",
            f"- largest worker peak {peak:,} MB against {limit_mb:,} MB, restarts for memory "
            f"{large.get('workers_restarted_for_memory', '-')}: {'met' if peak <= limit_mb else 'missed'}",
            f"- time per row {per_row:.2f}x that at {small['ratings']:,} ({small['wall_s']:,.1f} s, {load(small)}) "
            f"against 1.5x: {'met' if per_row <= 1.5 else 'missed'}"]


def growth_lines(rows: list[dict]) -> list[str]:
    """Per case, time per row at the largest size against the smallest, and the log-log slopes."""
    out = []
    for case in CASES:
        pts = sorted((r["ratings"], r) for r in rows if r["case"] == case)
        if len(pts) < 2:
            continue
        (n0, a), (n1, b) = pts[0], pts[-1]
        t0 = a["epoch_s"] if case in TRAIN_CASES else a["wall_s"]
        t1 = b["epoch_s"] if case in TRAIN_CASES else b["wall_s"]
        slope_t = math.log(t1 / t0) / math.log(n1 / n0)
        key = "client" if case != "etl-external" else "workers tree"
        m0, m1 = a["peak_rss_mb"].get(key, 0), b["peak_rss_mb"].get(key, 0)
        slope_m = math.log(m1 / m0) / math.log(n1 / n0) if m0 and m1 else float("nan")
        out.append(f"- {case}: time per row at {n1:,} is {(t1 / n1) / (t0 / n0):.2f}x that at {n0:,} "
                   f"(log-log slope of time {slope_t:.2f}); peak {key} memory {m0:,} -> {m1:,} MB "
                   f"(slope {slope_m:.2f})")
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for case in CASES:
        pts = sorted((r["ratings"], r) for r in report["runs"].values() if r["case"] == case and r.get("exit", 0) == 0)
        if not pts:
            continue
        n = [p[0] for p in pts]
        t = [p[1]["epoch_s"] if case in TRAIN_CASES else p[1]["wall_s"] for p in pts]
        key = "workers tree" if case == "etl-external" else "client tree"
        m = [p[1]["peak_rss_mb"].get(key, 0) for p in pts]
        ax_t.plot(n, t, "o-", label=case + (" (epoch 1)" if case in TRAIN_CASES else ""))
        ax_m.plot(n, m, "o-", label=f"{case} ({'sum of the 2 workers' if case == 'etl-external' else 'process tree'})")
        if case == "etl-external":
            c = [p[1]["peak_rss_mb"].get("client", 0) for p in pts]
            ax_m.plot(n, c, "o--", label="etl-external (client)")
    lo, hi = 8e5, 3e7
    for ax in (ax_t, ax_m):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo, hi)
        ax.set_xlabel("ratings")
        ax.grid(True, which="both", alpha=0.3)
    ax_t.plot([lo, hi], [10, 10 * hi / lo], ":", color="grey", label="linear (slope 1)")
    ax_m.axhline(4096, color="red", ls=":", label="one worker's limit (4 GB)")
    ax_t.set_ylabel("wall seconds")
    ax_m.set_ylabel("peak RSS, MB")
    ax_t.set_title("time")
    ax_m.set_title("memory")
    ax_t.legend(fontsize=7)
    ax_m.legend(fontsize=7)
    fig.suptitle(f"scale.py, {report['machine']['cores']}-core shared machine")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--work", type=Path, default=REPO / "scratch" / "scale", help="data, outputs and logs")
    parser.add_argument("--results", type=Path, default=RESULTS, help="stem of the .json/.md/.png results")
    parser.add_argument("--render-only", action="store_true", help="re-render md/png from the json")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    json_path = args.results.with_name(args.results.name + ".json")
    report = json.loads(json_path.read_text()) if json_path.is_file() else {"runs": {}, "generate": {}}
    report["machine"] = describe_machine()
    if not args.render_only:
        for size in sorted(args.sizes, key=lambda s: SIZES[s]["n_ratings"]):
            raw, generated = generate(size, args.work)
            if generated is not None:
                report["generate"][size] = dict(generated, date=datetime.now(timezone.utc).isoformat())
            for case in args.cases:
                print(f"{size} {case} ...", flush=True)
                figures = (train(size, args.work, stream=case == "train-stream") if case in TRAIN_CASES
                           else etl(case, size, raw, args.work))
                figures.update(case=case, size=size, ratings=SIZES[size]["n_ratings"],
                               date=datetime.now(timezone.utc).isoformat())
                report["runs"][f"{case} {size}"] = figures
                print(json.dumps(figures), flush=True)
                save(report, args.results)
    save(report, args.results)


def save(report: dict, stem: Path) -> None:
    from machine import write_results

    write_results(stem, report, render(report))
    plot(report, stem.with_name(stem.name + ".png"))


if __name__ == "__main__":
    main()

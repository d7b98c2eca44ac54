"""ETL benchmark: our ``run_etl`` against Merlin's own MovieLens recipe, same data, same machine, same run.

    .venv/bin/python benchmarks/etl.py                       # default-size synthetic ml-1m (1,000,209 ratings)
    .venv/bin/python benchmarks/etl.py --n-ratings 200000    # smaller, for a quick look

Contenders (each in its own fresh process, so peak memory and imports are its own):

- ``ours``: ``pipeline.etl.run_etl("ml-1m", ...)`` on the synthetic raw dir: fast validated reader, seeded
  split, ``workflows/movielens.py`` (our k-fold target encoding), parquet + schema, saved workflow.
- ``merlin``: Merlin's ``get_movielens`` recipe for ml-1m (merlin-models ``prepare_movielens`` +
  ``default_ml1m_transformation`` + ``workflow_fit_transform``), re-typed here because merlin-models is not
  installed: ``pd.read_csv(sep="::", engine="python")``, genres split, ``sample`` + 80/20 split written to
  parquet, then JoinExternal x2, Categorify, NVTabular ``TargetEncoding(kfold=5, p_smooth=20) >> Normalize``,
  ValueCount, LambdaOp targets; fit on train, transform train and valid to parquet, save the workflow.
- ``cli``: ``python -m pipeline etl --dataset ml-1m --raw ...`` wall time, including interpreter start and imports.

Reported per contender: seconds per phase (read, split, fit, transform + write, save), total, and peak
resident memory per phase and overall (sampled every 20 ms from /proc). Results go to
benchmarks/results/etl.md and etl.json with the command, the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from machine import (  # benchmarks/machine.py (the script's own folder is on sys.path)
    add_results_argument,
    describe_machine,
    write_results,
)

REPO = Path(__file__).resolve().parents[1]


# -- memory sampling --------------------------------------------------------------------------------


class RssSampler:
    """Samples this process's resident set size; ``mark(phase)`` starts a new phase, ``peaks`` gives MB per phase."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.phase = "startup"
        self.peaks: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _run(self):
        while not self._stop.is_set():
            rss = self.rss_mb()
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), rss)
            time.sleep(self.interval)

    def mark(self, phase: str):
        rss = self.rss_mb()
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), rss)
        self.phase = phase
        self.peaks[phase] = max(self.peaks.get(phase, 0.0), rss)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.mark("end")
        self._stop.set()
        self._thread.join()


class Phases:
    """Wall time per phase, with the RSS sampler following along."""

    def __init__(self, sampler: RssSampler):
        self.sampler = sampler
        self.seconds: dict[str, float] = {}
        self._name, self._start = None, None

    def start(self, name: str):
        self.stop()
        self._name, self._start = name, time.perf_counter()
        self.sampler.mark(name)

    def stop(self):
        if self._name is not None:
            self.seconds[self._name] = time.perf_counter() - self._start
            self._name = None


# -- contenders (run in a child process) ------------------------------------------------------------


def run_ours(raw: Path, work: Path, sampler: RssSampler) -> dict:
    import logging

    sys.modules.setdefault("tensorflow", None)  # as the CLI does: the ETL never uses TF (merlin imports it)
    import merlin.io  # noqa: F401  (imported before the clock starts, as in the Merlin recipe)
    import nvtabular  # noqa: F401

    import pipeline  # noqa: F401
    from pipeline.etl import run_etl
    from pipeline.ops import KFoldTargetEncoding  # noqa: F401
    from workflows.movielens import movielens_workflow  # noqa: F401

    # Phase boundaries for the memory sampler come from run_etl's own phase log lines.
    class PhaseLog(logging.Handler):
        def emit(self, record):
            message = record.getMessage()
            if message.startswith("etl "):
                done = message.split()[1]
                following = {"read": "split", "split": "fit", "fit": "transform_train",
                             "transform_train": "transform_valid", "transform_valid": "save", "save": "end"}
                sampler.mark(following.get(done, "end"))

    logger = logging.getLogger("pipeline.etl")
    logger.setLevel(logging.INFO)
    logger.addHandler(PhaseLog())
    sampler.mark("read")
    start = time.perf_counter()
    summary = run_etl("ml-1m", work / "ours", raw=raw, seed=0, device="cpu")
    total = time.perf_counter() - start
    seconds = {k: v for k, v in summary["seconds"].items() if k != "total"}
    return {"seconds": seconds, "total": total, "rows": summary["rows"]}


def run_merlin(raw: Path, work: Path, sampler: RssSampler) -> dict:
    sys.modules.setdefault("tensorflow", None)  # same import conditions as ours
    import numpy as np
    import nvtabular as nvt
    import pandas as pd
    from merlin.io import Dataset
    from nvtabular import ops

    import pipeline  # noqa: F401  (the dask settings merlin needs on this stack)

    phases = Phases(sampler)
    out = work / "merlin"
    prepared = work / "merlin_raw"
    prepared.mkdir(parents=True)
    os.chdir(work)  # Categorify / TargetEncoding write ./categories, as in the recipe
    start = time.perf_counter()

    phases.start("read")
    users = pd.read_csv(raw / "users.dat", sep="::", names=["userId", "gender", "age", "occupation", "zipcode"],
                        engine="python")
    ratings = pd.read_csv(raw / "ratings.dat", sep="::", names=["userId", "movieId", "rating", "timestamp"],
                          engine="python")
    movies = pd.read_csv(raw / "movies.dat", names=["movieId", "title", "genres"], sep="::", encoding="latin1",
                         engine="python")
    movies["genres"] = movies["genres"].str.split("|")

    phases.start("split")
    movies.to_parquet(prepared / "movies_converted.parquet")
    users.to_parquet(prepared / "users_converted.parquet")
    ratings = ratings.sample(len(ratings), replace=False, random_state=np.random.RandomState(0))
    num_valid = int(len(ratings) * 0.2)
    ratings[:-num_valid].to_parquet(prepared / "train.parquet")
    ratings[-num_valid:].to_parquet(prepared / "valid.parquet")

    phases.start("fit")
    movies = pd.read_parquet(prepared / "movies_converted.parquet")
    users = pd.read_parquet(prepared / "users_converted.parquet")
    joined = ["userId", "movieId"] >> ops.JoinExternal(movies, on=["movieId"]) >> ops.JoinExternal(users, on=["userId"])
    cat_features = joined >> ops.Categorify(dtype="int32")
    label = nvt.ColumnSelector(["rating"])
    te_features = (
        nvt.ColumnSelector(["movieId", "userId"]) + joined[["age", "gender", "occupation", "zipcode"]]
        >> ops.TargetEncoding(label, kfold=5, p_smooth=20)
    )
    te_norm = te_features >> ops.Normalize()
    te_user = te_norm[["TE_userId_rating", "TE_age_rating", "TE_gender_rating", "TE_occupation_rating",
                       "TE_zipcode_rating"]] >> ops.AddMetadata(tags=["user"])
    te_item = te_norm[["TE_movieId_rating"]] >> ops.AddMetadata(tags=["item"])
    item = cat_features["movieId"] >> ops.AddMetadata(tags=["item_id", "item"])
    user = cat_features["userId"] >> ops.AddMetadata(tags=["user_id", "user"])
    genres = cat_features["genres"] >> ops.ValueCount() >> ops.TagAsItemFeatures()
    binary = (
        nvt.ColumnSelector(["rating"])
        >> ops.LambdaOp(lambda col: (col > 3).astype("int32"))
        >> ops.AddMetadata(tags=["binary_classification", "target"])
        >> ops.Rename(name="rating_binary")
    )
    target = (
        ["rating"]
        >> ops.LambdaOp(lambda col: col.astype("float32"))
        >> ops.AddMetadata(tags=["regression", "target"])
    )
    workflow = nvt.Workflow(cat_features + te_norm + te_user + te_item + item + user + genres + binary + target)
    train, valid = Dataset(str(prepared / "train.parquet")), Dataset(str(prepared / "valid.parquet"))
    workflow.fit(train)

    phases.start("transform_train")
    workflow.transform(train).to_parquet(str(out / "train"))
    phases.start("transform_valid")
    workflow.transform(valid).to_parquet(str(out / "valid"))
    phases.start("save")
    workflow.save(str(out / "workflow"))
    phases.stop()
    sampler.mark("end")
    rows = {"train": len(ratings) - num_valid, "valid": num_valid}
    return {"seconds": phases.seconds, "total": time.perf_counter() - start, "rows": rows}


def child(args) -> None:
    import resource

    with RssSampler() as sampler:
        imports_start = time.perf_counter()
        runner = {"ours": run_ours, "merlin": run_merlin}[args.child]
        result = runner(Path(args.raw), Path(args.work), sampler)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    # CPU seconds of the whole process (imports included): less sensitive to other load than wall time
    result["cpu_seconds_including_imports"] = usage.ru_utime + usage.ru_stime
    result["peak_rss_mb"] = {k: round(v, 1) for k, v in sampler.peaks.items() if k not in ("startup", "end")}
    result["peak_rss_mb"]["overall"] = round(max(sampler.peaks.values()), 1)
    result["wall_including_imports"] = time.perf_counter() - imports_start
    print("RESULT " + json.dumps(result))


# -- driver --------------------------------------------------------------------------------------------




def run_child(name: str, raw: Path, work: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, __file__, "--child", name, "--raw", str(raw), "--work", str(work)],
                          capture_output=True, text=True, env=env, cwd=REPO)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise SystemExit(f"{name} failed:\n{done.stderr[-4000:]}")
    return json.loads(line[len("RESULT "):])


def run_cli(raw: Path, work: Path) -> float:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pipeline", "etl", "--dataset", "ml-1m", "--raw", str(raw),
                           "--out", str(work / "cli"), "--device", "cpu"], capture_output=True, text=True, env=env,
                          cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"cli failed:\n{done.stderr[-4000:]}")
    return time.perf_counter() - start


def report(results: dict, meta: dict) -> str:
    phases = ["read", "split", "fit", "transform_train", "transform_valid", "save"]
    lines = [
        "# ETL benchmark: ours vs Merlin's MovieLens recipe",
        "",
        f"Command: `{meta['command']}`  ",
        f"Date: {meta['date']}  ",
        f"Data: synthetic ml-1m, {meta['n_ratings']:,} ratings ({meta['raw']})  ",
        f"Machine: {meta['machine']['cpu']}, {meta['machine']['cores']} cores, {meta['machine']['memory_gb']} GB, "
        f"no GPU; Python {meta['machine']['python']}; "
        + ", ".join(f"{k} {v}" for k, v in meta["machine"]["versions"].items())
        + "  ",
        f"Load average before / after: {meta['load_before']} / {meta['load_after']}",
        "",
        f"Best of {meta['repeat']} interleaved runs per contender, each in a fresh process. Seconds per phase "
        "(imports excluded except in the last three rows):",
        "",
        "| phase | ours | Merlin recipe |",
        "|---|---:|---:|",
    ]
    ours, merlin = results["ours"], results["merlin"]
    for phase in phases:
        lines.append(f"| {phase} | {ours['seconds'].get(phase, 0):.2f} | {merlin['seconds'].get(phase, 0):.2f} |")
    lines += [
        f"| **total (read -> saved)** | **{ours['total']:.1f}** | **{merlin['total']:.1f}** |",
        f"| process incl. imports | {ours['wall_including_imports']:.1f} | {merlin['wall_including_imports']:.1f} |",
        f"| process CPU (user+sys) incl. imports | {ours['cpu_seconds_including_imports']:.1f} | "
        f"{merlin['cpu_seconds_including_imports']:.1f} |",
        f"| `python -m pipeline etl` wall | {results['cli_wall']:.1f} | - |",
        "",
        "Peak resident memory (MB) per phase:",
        "",
        "| phase | ours | Merlin recipe |",
        "|---|---:|---:|",
    ]
    for phase in phases + ["overall"]:
        lines.append(f"| {phase} | {ours['peak_rss_mb'].get(phase, float('nan')):.0f} | "
                     f"{merlin['peak_rss_mb'].get(phase, float('nan')):.0f} |")
    lines += ["", f"Speed-up (total): {merlin['total'] / ours['total']:.1f}x. Target: <= 50 s for 1M ratings.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-ratings", type=int, default=None, help="synthetic size (default: ML-1M's 1,000,209)")
    parser.add_argument("--raw", type=Path, help="existing ml-1m-format raw dir (default: generated)")
    add_results_argument(parser)
    parser.add_argument("--repeat", type=int, default=2, help="interleaved runs of each contender; best is reported")
    parser.add_argument("--child", choices=("ours", "merlin"), help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    sys.path.insert(0, str(REPO))
    import pipeline  # noqa: F401
    from pipeline.datasets import generate_synthetic

    raw = args.raw
    if raw is None:
        # a smaller set keeps ML-1M's ratings per user (the generator needs >= 20 each)
        scale = 1.0 if args.n_ratings is None else args.n_ratings / 1_000_209
        sizes = {} if args.n_ratings is None else {
            "n_ratings": args.n_ratings, "n_users": max(50, int(6040 * scale)), "n_movies": max(50, int(3706 * scale))}
        name = "synthetic" if args.n_ratings is None else f"synthetic-{args.n_ratings}"
        raw = generate_synthetic(REPO / "data" / "raw" / name, fmt="ml-1m", seed=0, **sizes)
    n_ratings = sum(1 for _ in open(Path(raw) / "ratings.dat", "rb"))
    meta = {"command": "python " + " ".join([os.path.relpath(__file__, REPO), *sys.argv[1:]]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "raw": str(raw), "n_ratings": n_ratings,
            "machine": describe_machine(), "load_before": [round(x, 2) for x in os.getloadavg()]}
    runs: dict[str, list] = {"ours": [], "merlin": [], "cli_wall": []}
    with tempfile.TemporaryDirectory(dir=REPO / "data") as tmp:
        # Interleaved repetitions: load from other processes then hits every contender alike.
        for repetition in range(args.repeat):
            for name in ("ours", "merlin", "cli"):
                work = Path(tmp) / f"{name}-{repetition}"
                work.mkdir()
                print(f"run {repetition + 1}/{args.repeat}: {name} (load {os.getloadavg()[0]:.2f}) ...", flush=True)
                if name == "cli":
                    runs["cli_wall"].append(run_cli(Path(raw), work))
                else:
                    runs[name].append(run_child(name, Path(raw), work))
                    print(json.dumps(runs[name][-1]), flush=True)
                shutil.rmtree(work, ignore_errors=True)
    # best of the repetitions (the run least disturbed by other load); all runs are kept in the json
    results = {name: min(runs[name], key=lambda r: r["total"]) for name in ("ours", "merlin")}
    results["cli_wall"] = min(runs["cli_wall"])
    meta["repeat"] = args.repeat
    meta["load_after"] = [round(x, 2) for x in os.getloadavg()]
    text = report(results, meta)
    write_results(args.results / "etl", {"meta": meta, "best": results, "runs": runs}, text)
    print(text)


if __name__ == "__main__":
    main()

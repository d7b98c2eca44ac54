"""Retrieval benchmark: ranking metrics of popularity, the DLRM over every movie, the two-tower over its catalog
index and two-stage (two-tower candidates ranked by the DLRM), and `/recommend` latency per path, per dataset.

    .venv/bin/python benchmarks/retrieval.py                                  # every dataset below
    .venv/bin/python benchmarks/retrieval.py --datasets synthetic-ml-1m --work scratch/retrieval/bench

Datasets (each built under --work if missing: raw data, ETL, DLRM, two-tower):
- ``synthetic-ml-1m``: the generator at ML-1M's size (6,040 users, 3,706 movies, 1,000,209 ratings);
- ``synthetic-25m-catalog``: ML-25M's catalog (59,047 movies) with fewer users and ratings than ML-25M
  (``--catalog-users``, ``--catalog-ratings``; the catalog size is what the two-stage latency depends on);
- ``ml-100k``: real MovieLens 100K (random 80/20 split, seed 0), when data/raw/ml-100k is present.

Per dataset: the DLRM is trained with the train stage's defaults (early stopping) under an epoch cap
(``--dlrm-epochs``), the two-tower with ``pipeline.retrieval.TwoTowerConfig``'s defaults (early stopping and
the popularity prior's weight on held-out training positives) except ``TWO_TOWER``'s per-dataset caps; metrics come from
``pipeline.evaluate.evaluate_models`` (the same users for every ranker; ``--max-users`` caps them per dataset,
a seeded sample); latency is client-side, one request at a time, ``GET /recommend?k=10&exclude_rated=true``
for random known users against ``python -m pipeline serve --retrieval`` in its own process, both paths of the
same server, one path after the other. The load average is recorded around every measurement (the machine is shared).

Results: benchmarks/results/retrieval.json, retrieval.md and retrieval.png (results of earlier datasets are kept;
``--latency-only`` re-measures the latencies and keeps the recorded metrics).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from machine import describe_machine, write_results  # benchmarks/machine.py

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "retrieval"
ML1M = dict(n_users=6040, n_movies=3706, n_ratings=1_000_209)
ML25M_MOVIES = 59_047
MAX_USERS = {"synthetic-ml-1m": 2000, "synthetic-25m-catalog": 200, "ml-100k": None}
# the 25M catalog's 0.9M positives: an epoch takes minutes on the shared 2 cores, so a 3-epoch cap (best of 3 kept)
TWO_TOWER = {"synthetic-25m-catalog": dict(epochs=3, select_users=500)}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message} (load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)


def build(name: str, work: Path, args) -> tuple[Path, Path, Path, dict]:
    """``(etl_dir, dlrm_dir, two_tower_dir, sizes)`` of dataset ``name``, built under ``work`` where missing."""
    import pipeline  # noqa: F401
    from pipeline.etl import run_etl
    from pipeline.retrieval import TwoTowerConfig, fit_two_tower
    from pipeline.train import train_model

    base = work / name
    etl, dlrm, tt = base / "etl", base / "dlrm", base / "two_tower"
    timings = {}
    if not (etl / "workflow").is_dir():
        if name == "ml-100k":
            raw, variant = ROOT / "data" / "raw" / "ml-100k", "ml-100k"
        else:
            from pipeline.datasets import generate_synthetic

            sizes = ML1M if name == "synthetic-ml-1m" else dict(
                n_users=args.catalog_users, n_movies=ML25M_MOVIES, n_ratings=args.catalog_ratings)
            raw, variant = base / "raw", "ml-1m"
            if not (raw / "ratings.dat").is_file():
                log(f"{name}: generating {sizes}")
                generate_synthetic(raw, fmt="ml-1m", seed=0, **sizes)
        log(f"{name}: ETL")
        started = time.perf_counter()
        run_etl(variant, etl, raw=raw, seed=0)
        timings["etl_seconds"] = round(time.perf_counter() - started, 1)
    if not (dlrm / "model.keras").is_file():
        log(f"{name}: training the DLRM (cap {args.dlrm_epochs} epochs)")
        started = time.perf_counter()
        train_model(etl, dlrm, epochs=args.dlrm_epochs, seed=0, verbose=0)
        timings["dlrm_seconds"] = round(time.perf_counter() - started, 1)
    if not (tt / "model.keras").is_file():
        log(f"{name}: training the two-tower")
        started = time.perf_counter()
        fit_two_tower(etl, tt, TwoTowerConfig(seed=0, **TWO_TOWER.get(name, {})), verbose=0, evaluate=False)
        timings["two_tower_seconds"] = round(time.perf_counter() - started, 1)
    summary = json.loads((etl / "etl.json").read_text())
    dlrm_metrics = json.loads((dlrm / "metrics.json").read_text())
    tt_metrics = json.loads((tt / "metrics.json").read_text())
    sizes = {"train_rows": summary["rows"]["train"], "valid_rows": summary["rows"]["valid"],
             "movies": None, "users": None, "dlrm_valid_auc": dlrm_metrics["valid"].get("auc"),
             "dlrm_epochs": dlrm_metrics.get("best_epoch"), "two_tower_epoch": tt_metrics.get("best_epoch"),
             "two_tower_epochs_run": len(tt_metrics.get("epochs", [])),
             "two_tower_prior_weight": tt_metrics.get("prior_weight"),
             "two_tower_fit_seconds": tt_metrics.get("fit_seconds"), **timings}
    return etl, dlrm, tt, sizes


def server(etl: Path, dlrm: Path, tt: Path):
    """``python -m pipeline serve --retrieval`` in its own process; returns ``(process, url)`` once ready."""
    import httpx

    from pipeline.serve import free_port

    port = free_port()
    command = [sys.executable, "-m", "pipeline", "serve", "--data", str(etl), "--model-dir", str(dlrm), "--retrieval",
               str(tt), "--host", "127.0.0.1", "--port", str(port), "--no-access-log"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while True:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.terminate()
            raise RuntimeError(f"the server did not start: {' '.join(command)}")
        time.sleep(1)


def latency(url: str, users: np.ndarray, requests: int, seed: int = 0) -> dict:
    """p50 / p99 ms of ``/recommend`` per path, the same users for both paths, one path after the other."""
    import httpx

    rng = np.random.default_rng(seed)
    picks = rng.choice(users, size=requests + 20)
    times = {"two-stage": [], "rank-all": []}
    load = [round(os.getloadavg()[0], 2)]
    with httpx.Client(base_url=url, timeout=60) as client:
        # one path after the other: interleaved, each two-stage request followed a 59k-row rank-all one (its
        # caches evicted, the scoring thread still busy), which measured the neighbour, not the path
        for path, user, i in ((p, u, i) for p in times for i, u in enumerate(picks)):
            started = time.perf_counter()
            response = client.get("/recommend", params={"userId": int(user), "k": 10, "exclude_rated": "true",
                                                        "path": path})
            seconds = time.perf_counter() - started
            if response.status_code != 200 or response.json()["path"] != path:
                raise RuntimeError(f"/recommend {path} answered {response.status_code}: {response.text[:200]}")
            if i >= 20:  # the first requests warm caches up
                times[path].append(seconds)
    load.append(round(os.getloadavg()[0], 2))
    out = {}
    for path, seconds in times.items():
        ms = np.asarray(seconds) * 1e3
        out[path] = {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
                     "mean_ms": round(float(ms.mean()), 2), "n": len(ms)}
    out["load_average"] = load
    return out


def run(name: str, work: Path, args, previous: dict | None = None) -> dict:
    from pipeline.evaluate import evaluate_models

    etl, dlrm, tt, sizes = build(name, work, args)
    if args.latency_only and previous:
        report = previous["ranking"]
    else:
        log(f"{name}: evaluating")
        load_before = round(os.getloadavg()[0], 2)
        max_users = args.max_users if args.max_users is not None else MAX_USERS[name]
        report = evaluate_models(etl, [tt, dlrm], candidates=args.candidates, max_users=max_users, seed=0,
                                 progress=False)
        report["load_average"] = [load_before, round(os.getloadavg()[0], 2)]
    log(f"{name}: /recommend latency")
    process, url = server(etl, dlrm, tt)
    try:
        import httpx

        meta = httpx.get(url + "/metadata", timeout=30).json()
        users = np.asarray(meta_users(etl))
        timing = latency(url, users, args.requests)
        sizes["movies"] = meta["retrieval"]["movies"]
        sizes["users"] = int(len(users))
    finally:
        process.terminate()
        process.wait(timeout=60)
    return {"dataset": name, "command": "python benchmarks/retrieval.py " + " ".join(sys.argv[1:]),
            "sizes": sizes, "ranking": report, "latency": timing,
            "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def meta_users(etl: Path) -> list[int]:
    """The raw userIds of the dataset (users.dat of the raw data the ETL read)."""
    summary = json.loads((etl / "etl.json").read_text())
    raw = Path(summary["raw"])
    raw = raw if raw.is_absolute() else ROOT / raw
    if (raw / "users.dat").is_file():
        return [int(line.split(b"::", 1)[0]) for line in (raw / "users.dat").read_bytes().splitlines() if line]
    return [int(line.split(b"|", 1)[0]) for line in (raw / "u.user").read_bytes().splitlines() if line]


def render(report: dict) -> str:
    lines = ["# Retrieval: two-tower, two-stage, DLRM over every movie, popularity", "",
             "Command: `python benchmarks/retrieval.py` (each dataset's own command below).", "",
             f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, "
             f"{report['machine']['memory_gb']} GB, no GPU, shared with other agents' jobs "
             "(load averages per measurement below; 2 cores, so load > 2 means waiting for a core).", "",
             "Metrics: per valid user with a held-out positive (rating_binary == 1), every movie of the saved workflow "
             "ranked with the user's training movies excluded; binary relevance; averaged over users "
             "(`python -m pipeline evaluate`). Two-stage: 200 two-tower candidates ranked by the DLRM. "
             "Latency: client-side `GET /recommend?k=10&exclude_rated=true`, one request at a time, both paths of one "
             "`serve --retrieval` process, one path after the other.", ""]
    for name, entry in report["datasets"].items():
        r, s, t = entry["ranking"], entry["sizes"], entry["latency"]
        m = r["metrics"]
        lines += [f"## {name}", "", f"`{entry.get('command', report['command'])}`", "",
                  f"{s['users']:,} users, {s['movies']:,} movies, {s['train_rows']:,} train / {s['valid_rows']:,} valid "
                  f"ratings; {r['users']:,} evaluated users{' (seeded sample)' if r['max_users'] else ''}; "
                  f"DLRM valid AUC {s['dlrm_valid_auc']:.4f} (best epoch {s['dlrm_epochs']}); two-tower: epoch "
                  f"{s.get('two_tower_epoch')} of {s.get('two_tower_epochs_run')} picked on held-out training "
                  f"positives, popularity-prior weight {s.get('two_tower_prior_weight')}; measured "
                  f"{entry['measured_at']}, load average {r['load_average']} (metrics), {t['load_average']} (latency).", "",
                  "| ranker | Recall@10 | Recall@50 | NDCG@10 | MAP@10 | vs popularity (R@50 / NDCG@10) | seconds |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        pop = m["popularity"]
        for ranker in ("popularity", "dlrm", "two-tower", "two-stage"):
            x = m[ranker]
            vs = "—" if ranker == "popularity" else (
                f"{x['recall@50'] / pop['recall@50']:.2f}x / {x['ndcg@10'] / pop['ndcg@10']:.2f}x")
            lines.append(f"| {ranker} | {x['recall@10']:.4f} | {x['recall@50']:.4f} | {x['ndcg@10']:.4f} | "
                         f"{x['map@10']:.4f} | {vs} | {x['seconds']:.0f} |")
        gap = m["two-stage"]["ndcg@10"] / m["dlrm"]["ndcg@10"] - 1
        lines += ["", f"Two-stage NDCG@10 vs the DLRM over every movie: {gap:+.1%}.", "",
                  "| /recommend path | p50 ms | p99 ms | mean ms | requests |", "|---|---:|---:|---:|---:|"]
        for path in ("two-stage", "rank-all"):
            lines.append(f"| {path} | {t[path]['p50_ms']} | {t[path]['p99_ms']} | {t[path]['mean_ms']} | {t[path]['n']} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Recall@50 and NDCG@10 of every ranker per dataset, as grouped bars (``retrieval.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rankers = ("popularity", "dlrm", "two-tower", "two-stage")
    names = list(report["datasets"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, metric in zip(axes, ("recall@50", "ndcg@10")):
        for j, ranker in enumerate(rankers):
            values = [report["datasets"][n]["ranking"]["metrics"][ranker][metric] for n in names]
            ax.bar(np.arange(len(names)) + (j - 1.5) * 0.2, values, 0.2, label=ranker)
        ax.set_xticks(np.arange(len(names)), names, fontsize=8)
        ax.set_title(metric)
    axes[1].legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["synthetic-ml-1m", "synthetic-25m-catalog", "ml-100k"],
                        choices=list(MAX_USERS))
    parser.add_argument("--work", type=Path, default=ROOT / "data" / "bench-retrieval",
                        help="where raw data, ETL outputs and models are built (reused when present)")
    parser.add_argument("--dlrm-epochs", type=int, default=8, help="the DLRM's epoch cap (early stopping below it)")
    parser.add_argument("--catalog-users", type=int, default=20_000)
    parser.add_argument("--catalog-ratings", type=int, default=2_000_000)
    parser.add_argument("--candidates", type=int, default=200)
    parser.add_argument("--max-users", type=int, default=None, help="evaluated users per dataset (default: per dataset)")
    parser.add_argument("--requests", type=int, default=300, help="/recommend requests per path")
    parser.add_argument("--render-only", action="store_true", help="re-write retrieval.md from retrieval.json")
    parser.add_argument("--latency-only", action="store_true",
                        help="re-measure /recommend latency only, keeping the recorded ranking metrics")
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("pipeline.retrieval.fit").setLevel(logging.INFO)  # epochs and model selection
    previous = json.loads(RESULTS.with_suffix(".json").read_text()) if RESULTS.with_suffix(".json").is_file() else {}
    datasets = dict(previous.get("datasets", {}))
    if args.render_only:
        write_results(RESULTS, previous, render(previous))
        plot(previous, RESULTS.with_suffix(".png"))
        return 0
    for name in args.datasets:
        if name == "ml-100k" and not (ROOT / "data" / "raw" / "ml-100k").is_dir():
            log("ml-100k: data/raw/ml-100k is not there: skipped")
            continue
        datasets[name] = run(name, args.work, args, datasets.get(name))
        report = {"command": "python benchmarks/retrieval.py " + " ".join(sys.argv[1:]), "machine": describe_machine(),
                  "datasets": datasets}
        write_results(RESULTS, report, render(report))
        plot(report, RESULTS.with_suffix(".png"))
        log(f"{name}: written to {RESULTS}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

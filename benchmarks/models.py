"""Every ranking model of the train stage on the same splits: Merlin's "Iterating over Deep Learning Models" as a report.

Usage::

    python -m pipeline etl --dataset ml-100k --split official --seed 42 --out scratch/etl-ml100k   # ua.base / ua.test
    python -m pipeline etl --dataset synthetic --out scratch/etl-synth                            # ML-1M size
    python benchmarks/models.py [--ml-100k scratch/etl-ml100k] [--synthetic scratch/etl-synth] \
        [--seeds-ml-100k 3] [--seeds-synthetic 1] [--models dlrm,dcn,deepfm,wide-deep,mlp] [--results DIR]

Each (dataset, model, seed) is one ``pipeline.train.train_model(data_dir, out_dir, model=name, seed=seed,
verbose=0)`` call with every other setting the train stage's default, in a fresh Python process (two
``train_model`` calls in one process may not reproduce a fresh one bit for bit: README), so every model gets the
same step-budget policy, epochs cap and model selection rule, whatever those defaults are when this runs; each
model dir's config.json is recorded in the results. ``trace_valid=True`` is passed when ``train_model`` has it:
it only scores the valid split after every epoch for the per-epoch curve (nothing reads it to pick or stop).

Reported per dataset and model, mean and spread (sample standard deviation, min-max) over the seeds: valid AUC
and logloss of the published model (metrics.json ``valid``), train samples/s (mean over the epochs run, from
metrics.json ``epochs``), parameter count (``model.count_params()`` of the saved model.keras), seconds
(``train_model`` wall time, from the data to the published model dir, plus the fit loop's own ``fit_seconds``),
epochs run and the epoch selected. Beside them the popularity, user + movie bias and biased-MF baselines of
benchmarks/quality.py (``baselines``: ALS on the stars, penalties picked on the selection rows) on the very same
rows: the ETL's train and valid parquet, categorified ids as indices (an id unseen in train is the OOV row, as for the
models). A dataset whose ETL dir is absent is skipped with a message.

Results: ``DIR/models.json`` (every run), ``DIR/models.md`` (the table, command, machine, date) and, when
matplotlib is importable, ``DIR/models_auc.png`` (AUC by model with spread) and ``DIR/models_epochs.png``
(valid AUC per epoch). The model dirs go under ``--work`` (default scratch/models-bench); a complete one is
reused unless ``--retrain`` (its config.json says what it was trained with).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from machine import add_results_argument, describe_machine, write_results  # noqa: E402  (benchmarks/machine.py)

from pipeline.registry import ARCHITECTURES as MODELS  # noqa: E402

DATASETS = {  # name -> (flag, default ETL dir, default seeds)
    "ml-100k": ("--ml-100k", "scratch/etl-ml100k", 3),
    "synthetic ml-1m": ("--synthetic", "scratch/etl-synth", 1),
}


# --------------------------------------------------------------------------- one run, in a child process
def run_one(data_dir: str, out_dir: str, model: str, seed: int) -> dict:
    """Train one model with the train stage's defaults; return its figures (run in a fresh process)."""
    import inspect

    import pipeline  # noqa: F401  (dask settings before merlin)
    from pipeline.train import train_model

    extra = {"trace_valid": True} if "trace_valid" in inspect.signature(train_model).parameters else {}
    started = time.perf_counter()
    train_model(Path(data_dir), Path(out_dir), model=model, seed=seed, verbose=0, **extra)
    return {"wall_seconds": round(time.perf_counter() - started, 2), "trace_valid": bool(extra)}


def count_params(out_dir: Path) -> int:
    import keras

    import pipeline.models  # noqa: F401  (registers the layers model.keras names)

    return int(keras.saving.load_model(out_dir / "model.keras").count_params())


def _child(args) -> int:
    out_dir = Path(args.out_dir)
    figures = run_one(args.data_dir, args.out_dir, args.model, args.seed)
    figures["params"] = count_params(out_dir)
    (out_dir / "benchmark_run.json").write_text(json.dumps(figures))
    return 0


def _has_current_defaults(out_dir: Path) -> bool:
    """Whether the model dir was trained with the train stage's defaults as they are now (else it is retrained)."""
    from dataclasses import asdict

    from pipeline.train import TrainConfig

    config = json.loads((out_dir / "config.json").read_text())
    for key, value in asdict(TrainConfig()).items():
        if key in ("model", "seed", "targets"):
            continue
        if key not in config:  # the run predates this setting, so it was trained without it
            print(f"    {out_dir}: trained before the {key} setting existed (default now {value!r}): retraining",
                  flush=True)
            return False
        if key == "patience" and not config.get("early_stopping"):
            continue
        if json.dumps(config[key]) != json.dumps(list(value) if isinstance(value, tuple) else value):
            print(f"    {out_dir}: trained with {key}={config[key]!r}, the default is now {value!r}: retraining", flush=True)
            return False
    return True


def train_in_fresh_process(data_dir: Path, out_dir: Path, model: str, seed: int, retrain: bool) -> dict:
    """``(figures)`` of one run: the model dir's metrics.json and config.json plus wall seconds and parameters."""
    run_file = out_dir / "benchmark_run.json"
    reused = run_file.is_file() and (out_dir / "metrics.json").is_file() and not retrain and _has_current_defaults(out_dir)
    if not reused:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_one", str(data_dir), str(out_dir), model, str(seed)]
        started = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not run_file.is_file():
            tail = "\n".join((done.stderr or "").strip().splitlines()[-15:])
            raise RuntimeError(f"{model} seed {seed} on {data_dir} failed (exit {done.returncode}):\n{tail}")
        print(f"    {model} seed {seed}: {time.perf_counter() - started:.0f} s in its process", flush=True)
    figures = json.loads(run_file.read_text())
    metrics = json.loads((out_dir / "metrics.json").read_text())
    config = json.loads((out_dir / "config.json").read_text())
    epochs = metrics["epochs"]
    valid = metrics["valid"]
    return {
        "model": model, "seed": seed, "model_dir": str(out_dir), "reused": reused,
        "valid_auc": valid.get("auc"), "valid_logloss": valid.get("logloss"),
        "valid": valid,
        # epoch 1 includes tracing the graphs; the steady speed is the mean of the later epochs
        "samples_per_second": float(np.mean([e["samples_per_second"] for e in epochs[1:] or epochs])),
        "samples_per_second_epoch1": float(epochs[0]["samples_per_second"]),
        "samples_per_second_by_epoch": [e["samples_per_second"] for e in epochs],
        "params": figures["params"], "wall_seconds": figures["wall_seconds"], "fit_seconds": metrics.get("fit_seconds"),
        "epochs_run": len(epochs), "best_epoch": metrics.get("best_epoch"),
        "select_auc_by_epoch": [e.get("select", {}).get("auc") for e in epochs],
        "valid_auc_by_epoch": [e["valid_trace"].get("auc") for e in epochs] if all("valid_trace" in e for e in epochs) else None,
        "model_selection": metrics.get("model_selection"),
        "train_rows": metrics.get("train_rows"), "fit_rows": metrics.get("fit_rows"), "valid_rows": metrics.get("valid_rows"),
        "config": {k: v for k, v in config.items() if k not in ("data_dir", "features")},
    }


# --------------------------------------------------------------------------- the biased-MF baseline
def mf_baselines(data_dir: Path, seed: int = 0) -> dict:
    """benchmarks/quality.py's baselines on the ETL's own rows: popularity, user + movie biases and biased MF (rank
    ``MF_RANK``, ALS on the stars), their ridge penalties picked on the selection rows of ``train --seed seed``
    (never on the valid rows), then refitted on every training row and scored on the valid rows."""
    from quality import MF_RANK, baselines  # benchmarks/quality.py

    started = time.perf_counter()
    out = baselines(data_dir, seed)
    out["mf_settings"] = (f"biased MF rank {MF_RANK} (ALS on the stars, ridge penalty {out['mf_penalty']:g} picked on "
                          f"the train --seed {seed} selection rows; benchmarks/quality.py)")
    out["bias_settings"] = f"user + movie biases (ridge penalty {out['bias_penalty']:g}, picked the same way)"
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


# --------------------------------------------------------------------------- summary
def _stats(values) -> dict:
    values = [float(v) for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def summarize(runs: list[dict]) -> dict:
    by_model = {}
    for model in dict.fromkeys(r["model"] for r in runs):
        mine = [r for r in runs if r["model"] == model]
        by_model[model] = {key: _stats([r[key] for r in mine]) for key in
                           ("valid_auc", "valid_logloss", "samples_per_second", "samples_per_second_epoch1", "params", "wall_seconds",
                            "fit_seconds", "epochs_run", "best_epoch")}
        by_model[model]["seeds"] = [r["seed"] for r in mine]
    return by_model


def policy(runs: list[dict]) -> dict:
    """The training config every run of a dataset shares, and the keys on which runs differ (should be model, seed)."""
    configs = [r["config"] for r in runs]
    keys = sorted(set().union(*configs)) if configs else []
    shared, differing = {}, []
    for k in keys:
        vals = {json.dumps(c.get(k), sort_keys=True) for c in configs}
        if len(vals) == 1:
            shared[k] = configs[0].get(k)
        else:
            differing.append(k)
    return {"shared": shared, "differing": differing}


# --------------------------------------------------------------------------- report
def _pm(s: dict, digits: int = 4) -> str:
    if s["mean"] is None:
        return "n/a"
    if s["n"] < 2:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def render(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# Ranking models on the same splits (benchmarks/models.py)",
        "",
        f"Command: `{report['command']}`  ",
        f"Date: {report['date']} (UTC), {report['minutes']:.0f} min in all  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, no GPU, Python {m['python']}; "
        f"load average {report['load_average']['start']} at start, {report['load_average']['end']} at the end "
        "(the machine was shared with other engineers' jobs: treat speeds as ±20 % or worse)  ",
        "Every run is `pipeline.train.train_model(data_dir, out_dir, model=name, seed=seed, verbose=0)` with the train "
        "stage's defaults in a fresh process (plus `trace_valid=True` when available: the valid split scored after "
        "each epoch, for the curve only). ± is the sample standard deviation over seeds; a single seed has none.  ",
        f"Runs at once: {report.get('jobs', 1)} (with 2, two trainings share the 2 cores: speeds are lower than alone).",
        "",
        "Columns: valid AUC / logloss of the published model (`rating_binary` head; the epoch picked on held-out train rows); "
        "train samples/s from metrics.json `epochs` (validation excluded): epoch 1 (which includes tracing the graphs) and "
        "steady, the mean of the later epochs; parameters "
        "(`count_params()` of model.keras, every head); seconds: `train_model` wall time, data to published dir "
        "(holdout copy, fit, per-epoch valid trace, final scoring, SavedModel export); epochs run (selected). "
        "vs DLRM: AUC difference and speed ratio; vs MF: AUC difference to the biased-MF baseline on the same rows.",
        "",
    ]
    for name, d in report["datasets"].items():
        if d.get("skipped"):
            lines += [f"## {name}", "", f"Skipped: {d['skipped']}", ""]
            continue
        if not d.get("runs"):
            lines += [f"## {name}", "", "No run finished yet.", ""]
            continue
        base = d["baselines"]
        summary = d["summary"]
        dlrm = summary.get("dlrm")
        seeds = sorted({s for v in summary.values() for s in v["seeds"]})
        fit = (min(r["fit_rows"] for r in d["runs"]), max(r["fit_rows"] for r in d["runs"]))
        lines += [
            f"## {name}",
            "",
            f"Data: `{d['data_dir']}` ({d['etl']['split']} split, ETL seed {d['etl']['seed']}): "
            f"{d['etl']['rows']['train']:,} train rows ({fit[0]:,}-{fit[1]:,} fitted, the rest held out for model selection: "
            "a seeded hash of (userId, movieId), so the rows differ by seed) / "
            f"{d['etl']['rows']['valid']:,} valid rows; seeds {', '.join(map(str, seeds))} ({len(seeds)}).",
            "",
            "| model | seeds | valid AUC | AUC min-max | logloss | samples/s epoch 1 | samples/s steady | parameters | seconds | epochs run (selected) "
            "| AUC vs DLRM | speed vs DLRM | AUC vs biased MF |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for model, s in summary.items():
            auc = s["valid_auc"]["mean"]
            vs_dlrm = f"{auc - dlrm['valid_auc']['mean']:+.4f}" if dlrm and model != "dlrm" else "—"
            speed = (f"{s['samples_per_second']['mean'] / dlrm['samples_per_second']['mean']:.2f}x"
                     if dlrm and model != "dlrm" else "—")
            lines.append(
                f"| {model} | {s['valid_auc']['n']} | {_pm(s['valid_auc'])} | {s['valid_auc']['min']:.4f}-{s['valid_auc']['max']:.4f} "
                f"| {_pm(s['valid_logloss'])} | {s['samples_per_second_epoch1']['mean']:,.0f} | {s['samples_per_second']['mean']:,.0f} "
                f"| {s['params']['mean']:,.0f} | {s['wall_seconds']['mean']:.0f} "
                f"| {s['epochs_run']['mean']:.3g} ({s['best_epoch']['mean']:.3g}) | {vs_dlrm} | {speed} "
                f"| {auc - base['mf']:+.4f} |")
        lines += [
            f"| {base.get('mf_settings', 'biased MF')} | | {base['mf']:.4f} | | | | | | "
            f"{base['seconds']:.0f} (all baselines) | | | | |",
            f"| {base.get('bias_settings', 'user + movie biases')} | | {base['bias']:.4f} | | | | | | | | | "
            f"| {base['bias'] - base['mf']:+.4f} |",
            *([f"| popularity (smoothed positive rate per movie) | | {base['popularity']:.4f} | | | | | | | | | "
               f"| {base['popularity'] - base['mf']:+.4f} |"] if "popularity" in base else []),
        ]
        curves = [(r["model"], r["seed"], r["valid_auc_by_epoch"]) for r in d["runs"] if r.get("valid_auc_by_epoch")]
        if curves:
            width = max(len(c[2]) for c in curves)
            lines += ["", "Valid AUC after each epoch (trace; the published model is the selected epoch's):", "",
                      "| model | seed | " + " | ".join(f"epoch {k + 1}" for k in range(width)) + " |",
                      "|---|---:|" + "---:|" * width]
            for model, seed, curve in curves:
                cells = [f"{v:.4f}" for v in curve] + [""] * (width - len(curve))
                lines.append(f"| {model} | {seed} | " + " | ".join(cells) + " |")
        reused = sum(r["reused"] for r in d["runs"])
        if reused:
            lines += ["", f"{reused} of {len(d['runs'])} runs were trained by an earlier invocation of this script into the same "
                      "`--work` dir (same defaults: see the config below) and read back from their model dirs."]
        pol = d["policy"]
        lines += ["", f"Training config shared by every run (config.json): `{json.dumps(pol['shared'], sort_keys=True)}`  ",
                  f"Differs between runs: {', '.join(pol['differing']) or 'nothing'}", ""]
    lines += [f"Plots: {', '.join(report['plots']) if report['plots'] else report['plots_note']}", ""]
    return "\n".join(lines)


def plot(report: dict, results: Path) -> list[str]:
    """AUC by model with spread, and valid AUC per epoch; returns the files written ([] without matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = {k: d for k, d in report["datasets"].items() if d.get("runs")}
    if not datasets:
        return []
    written = []
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    for ax, (name, d) in zip(axes[0], datasets.items()):
        models = list(d["summary"])
        means = [d["summary"][m]["valid_auc"]["mean"] for m in models]
        stds = [d["summary"][m]["valid_auc"]["std"] or 0.0 for m in models]
        ax.errorbar(range(len(models)), means, yerr=stds, fmt="o", color="tab:blue", ms=7, capsize=5,
                    label="mean ± sd over seeds")
        for k, m in enumerate(models):
            aucs = [r["valid_auc"] for r in d["runs"] if r["model"] == m]
            ax.scatter(k + 0.12 + 0.04 * np.arange(len(aucs)), aucs, color="black", s=12, zorder=3,
                       label="one seed" if k == 0 else None)
        ax.set_xticks(range(len(models)), models)
        ax.set_xlim(-0.5, len(models) - 0.3)
        ax.axhline(d["baselines"]["mf"], color="tab:red", ls="--", label="biased MF")
        ax.axhline(d["baselines"]["bias"], color="tab:gray", ls=":", label="user + movie biases")
        values = [r["valid_auc"] for r in d["runs"]] + [d["baselines"]["mf"], d["baselines"]["bias"]]
        ax.set_ylim(min(values) - 0.005, max(values) + 0.005)
        n = max(len(v["seeds"]) for v in d["summary"].values())
        ax.set_title(f"{name}: valid AUC, {n} seed{'s' if n > 1 else ''} per model")
        ax.set_ylabel("valid AUC")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(results / "models_auc.png", dpi=110)
    plt.close(fig)
    written.append("models_auc.png")

    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    for ax, (name, d) in zip(axes[0], datasets.items()):
        colors = dict(zip(d["summary"], plt.rcParams["axes.prop_cycle"].by_key()["color"]))
        for r in d["runs"]:
            curve = r.get("valid_auc_by_epoch") or []
            if curve:
                first = r["seed"] == d["summary"][r["model"]]["seeds"][0]
                ax.plot(range(1, len(curve) + 1), curve, marker="o", color=colors[r["model"]], alpha=0.7,
                        label=r["model"] if first else None)
        ax.axhline(d["baselines"]["mf"], color="tab:red", ls="--", label="biased MF")
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.set_ylabel("valid AUC")
        ax.set_title(f"{name}: valid AUC per epoch (one line per seed)")
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(results / "models_epochs.png", dpi=110)
    plt.close(fig)
    written.append("models_epochs.png")
    return written


# --------------------------------------------------------------------------- main
def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--_one":
        ns = argparse.Namespace(data_dir=sys.argv[2], out_dir=sys.argv[3], model=sys.argv[4], seed=int(sys.argv[5]))
        return _child(ns)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, (flag, default, seeds) in DATASETS.items():
        key = flag.lstrip("-")
        parser.add_argument(flag, dest=key.replace("-", "_"), type=Path, default=Path(default),
                            help=f"ETL dir of {name} (skipped when absent; default {default})")
        parser.add_argument(f"--seeds-{key}", dest=f"seeds_{key.replace('-', '_')}", type=int, default=seeds,
                            help=f"seeds 0..N-1 on {name} (default {seeds})")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated (default: all)")
    parser.add_argument("--work", type=Path, default=Path("scratch/models-bench"), help="where the model dirs go")
    add_results_argument(parser)
    parser.add_argument("--retrain", action="store_true", help="train again even where a complete run is in --work")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at once (default 1; 2 shares the cores between two runs, so speeds are lower)")
    args = parser.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")

    started = time.perf_counter()
    report = {"command": " ".join(["python", *sys.argv]),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
              "machine": describe_machine(), "load_average": {"start": [round(x, 2) for x in os.getloadavg()]},
              "datasets": {}}

    def save():  # after every run, plots included: a run cut short leaves consistent results
        report["load_average"]["end"] = [round(x, 2) for x in os.getloadavg()]
        report["minutes"] = (time.perf_counter() - started) / 60
        report["plots"], report["plots_note"] = [], "none written"
        args.results.mkdir(parents=True, exist_ok=True)
        try:
            report["plots"] = plot(report, args.results)
        except ImportError:
            report["plots_note"] = ("none: matplotlib is not installed in this environment "
                                    "(it is not in requirements/lock.txt); the per-epoch curves are the table above")
        write_results(args.results / "models", report, render(report))

    tasks = []  # (dataset, seed, model): every model at seed 0 first, so a cut-short run still compares them all
    for name, (flag, _, _) in DATASETS.items():
        key = flag.lstrip("-").replace("-", "_")
        data_dir, n_seeds = getattr(args, key), getattr(args, f"seeds_{key}")
        if not ((data_dir / "etl.json").is_file() and (data_dir / "train").is_dir() and (data_dir / "valid").is_dir()):
            msg = f"no ETL output at {data_dir} (run `python -m pipeline etl ... --out {data_dir}`, see the usage)"
            print(f"{name}: skipped: {msg}", flush=True)
            report["datasets"][name] = {"skipped": msg}
            continue
        if n_seeds < 1:
            report["datasets"][name] = {"skipped": f"{flag.replace('--', '--seeds-')} 0"}
            continue
        etl = json.loads((data_dir / "etl.json").read_text())
        print(f"{name}: {data_dir}, {len(models)} models x {n_seeds} seeds", flush=True)
        entry = {"data_dir": str(data_dir), "etl": {k: etl.get(k) for k in ("dataset", "variant", "split", "seed",
                                                                              "valid_fraction", "rows", "run_id")},
                 "baselines": mf_baselines(data_dir), "runs": []}
        print(f"  baselines: biased MF {entry['baselines']['mf']}, biases {entry['baselines']['bias']}", flush=True)
        report["datasets"][name] = entry
        tasks += [(name, data_dir, seed, model) for seed in range(n_seeds) for model in models]
    # datasets interleaved, in the order above within each
    order = sorted(range(len(tasks)), key=lambda i: (sum(t[0] == tasks[i][0] for t in tasks[:i]), i))
    report["jobs"] = args.jobs
    lock = threading.Lock()

    def one(task):
        name, data_dir, seed, model = task
        run = train_in_fresh_process(data_dir, args.work / name.replace(" ", "-") / f"{model}-seed{seed}", model, seed,
                                     args.retrain)
        with lock:
            entry = report["datasets"][name]
            entry["runs"].append(run)
            entry["runs"].sort(key=lambda r: (r["seed"], models.index(r["model"])))
            entry["summary"] = summarize(entry["runs"])
            entry["summary"] = {m: entry["summary"][m] for m in models if m in entry["summary"]}
            entry["policy"] = policy(entry["runs"])
            print(f"    {name} {model} seed {seed}: valid AUC {run['valid_auc']:.4f}, {run['samples_per_second']:,.0f} "
                  f"samples/s, {run['epochs_run']} epochs (best {run['best_epoch']})", flush=True)
            save()

    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        for future in [pool.submit(one, tasks[i]) for i in order]:
            future.result()
    save()
    print(render(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

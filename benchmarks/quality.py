"""Valid AUC of the default ``train`` on real and synthetic MovieLens, against baselines fitted in the same run.

Usage::

    python benchmarks/quality.py [--datasets ml-100k-ua ml-100k-random synthetic-ml-1m synthetic-ml-100k]
                                 [--seeds 42 43 44] [--work scratch/quality] [--old-tree DIR] [--no-merlin]

One run per dataset, each in its own folder under ``--work``: the ETL (``python -m pipeline etl ...``), then
for each seed ``python -m pipeline train --data ETL --out MODEL --seed S`` with no other flag (a fresh process
per run, as a user runs it), then on the same train / valid rows:

- **popularity**: each movie's smoothed share of ratings > 3 in train;
- **user + movie biases** and **biased MF** (rank 16, ALS on the stars): their ridge penalty picked on the
  same seeded slice of the training rows that ``train`` holds out for model selection
  (``pipeline.train.selection_mask``), then refitted on all training rows; never on the valid rows;
- on synthetic data, the **learnable ceiling** (the generator's own model family fitted by MAP with its true
  priors; ``ceiling``) and the **oracle** (the true P(rating > 3)), which no estimator can reach;
- on real ML-100K's ua split, **Merlin's DLRMModel** (emb 64, Adam, 3 epochs) measured in this run with
  ../shared/merlin-reference (``.venv-merlin`` in the repo root), next to its recorded figure 0.7683;
- with ``--old-tree DIR`` (a ``git worktree`` of an earlier commit), that commit's default ``train``.

Real datasets whose raw files are absent are skipped with a message. Results: benchmarks/results/quality.json,
quality.md (table + targets met / missed) and quality.png (valid AUC per dataset and estimator, seed spread).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import ndtr
from scipy.stats import norm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from machine import describe_machine, write_results  # noqa: E402  (benchmarks/machine.py)

import pipeline  # noqa: E402,F401  (dask settings before merlin)
from pipeline.datasets import read_oracle  # noqa: E402
from pipeline.datasets.synthetic import generate_synthetic, read_synthetic_params, sample_movielens  # noqa: E402
from pipeline.etl import split_ratings  # noqa: E402
from pipeline.metrics import roc_auc  # noqa: E402
from pipeline.train import TrainConfig, selection_mask  # noqa: E402

DEFAULTS = dataclasses.asdict(TrainConfig())  # recorded with every result

logger = logging.getLogger("quality")
RESULTS = Path(__file__).resolve().parent / "results"
# The tuning trials behind the defaults (hand-kept: commands and selection-row figures on the tuning splits),
# appended to quality.md so the table and the evidence for the defaults stay in one page.
TRIALS = RESULTS / "quality_trials.md"
MERLIN_REFERENCE = ROOT.parent / "shared" / "merlin-reference"
MERLIN_RECORDED = 0.7683  # DLRMModel, ua split, 3 epochs, seed 42 (../shared/merlin-reference/README.md)
# Today's default before issue 10 (3 epochs, cosine, seed 42), from the issue and the README.
BEFORE = {"ml-100k-ua": 0.7413, "synthetic-ml-1m": 0.8138}

DATASETS = {
    "ml-100k-ua": dict(label="real ML-100K, official ua split", raw=ROOT / "data/raw/ml-100k", real=True,
                       etl=["--dataset", "ml-100k", "--split", "official", "--seed", "42"], merlin=True),
    "ml-100k-random": dict(label="real ML-100K, random 80/20", raw=ROOT / "data/raw/ml-100k", real=True,
                           etl=["--dataset", "ml-100k", "--split", "random", "--seed", "42"]),
    "synthetic-ml-1m": dict(label="synthetic ML-1M (default size)", raw=ROOT / "data/raw/synthetic", fmt="ml-1m",
                            etl=["--dataset", "synthetic", "--seed", "0"]),
    "synthetic-ml-100k": dict(label="synthetic, ML-100K format and size", raw=ROOT / "data/raw/synthetic-ml-100k",
                              fmt="ml-100k", etl=["--dataset", "ml-100k", "--split", "random", "--seed", "0"]),
}
TARGETS = {"ml-100k-ua": 0.778, "synthetic-ml-1m": 0.822}
MF_RANK = 16
BIAS_PENALTIES = (1.0, 3.0, 10.0, 30.0)
MF_PENALTIES = (3.0, 5.0, 10.0, 20.0, 40.0)


# --------------------------------------------------------------------------- alternating ridge
def ridge_per_group(groups, obs, offset, features, precision, mean=None) -> np.ndarray:
    """Per group of rows, the posterior mean of w in ``obs - offset ~ [1, features] @ w`` under the prior
    N(mean, precision^-1) (noise variance folded into ``precision``, a (1 + k, 1 + k) matrix).

    ``obs``, ``offset`` (n,) and ``features`` (n, k) are per row; ``groups`` lists row indices per group.
    Returns (n_groups, 1 + k): bias then weights; a group without rows gets its prior mean.
    """
    width = 1 + features.shape[1]
    mean = np.zeros((len(groups), width)) if mean is None else mean
    out = mean.copy()
    for k, idx in enumerate(groups):
        if idx.size:
            x = np.hstack([np.ones((idx.size, 1)), features[idx]])
            out[k] = np.linalg.solve(x.T @ x + precision, x.T @ (obs[idx] - offset[idx]) + precision @ mean[k])
    return out


def alternating_ridge(obs, user, movie, train, n_users, n_movies, rank, *, user_precision, movie_precision,
                      movie_mean=None, iters=8):
    """Fit obs[train] ~ b_u + b_m + <p_u, q_m> by alternating ridge solves (posterior means under Gaussian
    priors with the given diagonal precisions over (bias, factors), noise variance folded in).

    Returns a function (rows) -> predicted obs.
    """
    rng = np.random.default_rng(0)
    movie_mean = np.zeros((n_movies, rank + 1)) if movie_mean is None else movie_mean
    p = np.zeros((n_users, rank + 1))
    q = movie_mean.copy()
    if rank:
        q[:, 1:] += 0.1 * rng.standard_normal((n_movies, rank))
    rows = np.flatnonzero(train)
    by_user = _groups(user[rows], n_users, rows)
    by_movie = _groups(movie[rows], n_movies, rows)
    lu, lm = np.diag(user_precision), np.diag(movie_precision)
    for _ in range(iters):
        p = ridge_per_group(by_user, obs, q[movie, 0], q[movie, 1:], lu)
        q = ridge_per_group(by_movie, obs, p[user, 0], p[user, 1:], lm, movie_mean)
    return lambda r: p[user[r], 0] + q[movie[r], 0] + np.einsum("nk,nk->n", p[user[r], 1:], q[movie[r], 1:])


def _groups(keys: np.ndarray, n: int, rows: np.ndarray) -> list[np.ndarray]:
    order = np.argsort(keys, kind="stable")
    bounds = np.searchsorted(keys[order], np.arange(n + 1))
    return [rows[order[bounds[k]:bounds[k + 1]]] for k in range(n)]


# --------------------------------------------------------------------------- baselines on an ETL output
def read_split(etl_dir: Path, split: str) -> pd.DataFrame:
    columns = ["userId", "movieId", "rating", "rating_binary"]
    return pd.concat([pd.read_parquet(p, columns=columns) for p in sorted((etl_dir / split).glob("*.parquet"))],
                     ignore_index=True)


def baselines(etl_dir: Path, seed: int) -> dict:
    """Popularity, user + movie biases and biased MF on ``etl_dir``'s train rows, scored on its valid rows.

    The ridge penalties are picked on the selection rows of ``train --seed seed`` (a seeded slice of the
    training rows), then each model is refitted on every training row.
    """
    train, valid = read_split(etl_dir, "train"), read_split(etl_dir, "valid")
    frame = pd.concat([train, valid], ignore_index=True)
    user, movie = frame["userId"].to_numpy(), frame["movieId"].to_numpy()
    n_users, n_movies = int(user.max()) + 1, int(movie.max()) + 1
    is_valid = np.arange(len(frame)) >= len(train)
    fraction = min(DEFAULTS["select_fraction"], 100_000 / len(train))
    select = np.zeros(len(frame), bool)
    select[:len(train)] = selection_mask(train["userId"].to_numpy(), train["movieId"].to_numpy(), seed, fraction)
    stars = frame["rating"].to_numpy().astype(float)
    labels = frame["rating_binary"].to_numpy()
    out = {}

    positive = train.groupby("movieId")["rating_binary"].agg(["sum", "count"])
    rate = (positive["sum"] + 10 * train["rating_binary"].mean()) / (positive["count"] + 10)
    out["popularity"] = round(roc_auc(labels[is_valid], valid["movieId"].map(rate).fillna(rate.mean())), 4)

    def fit(rows: np.ndarray, rank: int, penalty: float):
        centered = stars - stars[rows].mean()
        predict = alternating_ridge(centered, user, movie, rows, n_users, n_movies, rank,
                                    user_precision=[penalty] * (rank + 1), movie_precision=[penalty] * (rank + 1),
                                    iters=4 if rank == 0 else 8)
        return predict

    for name, rank, penalties in (("bias", 0, BIAS_PENALTIES), ("mf", MF_RANK, MF_PENALTIES)):
        fit_rows = ~is_valid & ~select
        picked = {lam: roc_auc(labels[select], fit(fit_rows, rank, lam)(np.flatnonzero(select))) for lam in penalties}
        best = max(picked, key=picked.get)
        out[name] = round(roc_auc(labels[is_valid], fit(~is_valid, rank, best)(np.flatnonzero(is_valid))), 4)
        out[f"{name}_penalty"] = best
        out[f"{name}_select_auc"] = {str(k): round(v, 4) for k, v in picked.items()}
    out["train_rows"], out["valid_rows"] = int(len(train)), int(len(valid))
    return out


# --------------------------------------------------------------------------- the synthetic ceiling
def ceiling(raw: Path, etl_seed: int) -> dict:
    """Valid AUC of the generator's own model family fitted by MAP (true priors and population structure
    given), of the same with every movie parameter known, and of the oracle, on the ETL's random split of
    ``raw`` with ``etl_seed``."""
    params = read_synthetic_params(raw)
    sample = sample_movielens(params)
    ratings, truth = sample.ratings, sample.truth
    if not np.allclose(read_oracle(raw)["p_positive"].to_numpy(), ratings["p_positive"].to_numpy()):
        raise SystemExit(f"{raw}: oracle.parquet differs from a fresh draw of {params} (generator changed?)")
    _, valid_rows = split_ratings(ratings.assign(row=np.arange(len(ratings))), "random", 0.2, etl_seed)
    valid = np.zeros(len(ratings), bool)
    valid[valid_rows["row"].to_numpy()] = True
    train = ~valid
    user, movie = truth["user_idx"], truth["movie_idx"]
    n_users, n_movies, rank = params["n_users"], params["n_movies"], truth["user_factors"].shape[1]
    labels = (ratings["rating"].to_numpy()[valid] > 3).astype(int)
    auc = lambda scores: round(float(roc_auc(labels, scores)), 4)  # noqa: E731
    out = {"params": params, "oracle": auc(ratings["p_positive"].to_numpy()[valid])}

    # The generator's family: latent = b_u + b_m + <p_u, q_m> + taste_u . genres_m / sqrt(n_genres) + N(0, 1).
    flags = sample.genre_flags.astype(float)
    n_genres = truth["n_genres"]
    taste = np.einsum("ng,ng->n", truth["taste"][user], flags[movie]) / np.sqrt(n_genres[movie])
    sd_user_bias, sd_user_factor = truth["user_bias"].std(), truth["user_factors"].std()
    sd_movie_bias = truth["movie_bias"].std()
    genre_part = flags @ truth["genre_factors"] / np.sqrt(n_genres)[:, None] / np.sqrt(2.0 * rank)
    sd_movie_noise = 1.0 / np.sqrt(2.0 * rank)
    # Stars -> E[latent | star interval] under the latent's marginal; its residual variance plays the noise.
    cuts = np.concatenate([[-np.inf], truth["thresholds"], [np.inf]])
    sd_latent = truth["latent"].std()
    star = ratings["rating"].to_numpy()
    lo, hi = cuts[star - 1] / sd_latent, cuts[star] / sd_latent
    obs = sd_latent * (norm.pdf(lo) - norm.pdf(hi)) / np.maximum(ndtr(hi) - ndtr(lo), 1e-12)
    noise_var = float(np.var(obs - truth["latent"]) + 1.0)
    movie_mean = np.hstack([np.zeros((n_movies, 1)), genre_part])
    fit = alternating_ridge(obs - taste, user, movie, train, n_users, n_movies, rank,
                            user_precision=noise_var / np.array([sd_user_bias**2] + [sd_user_factor**2] * rank),
                            movie_precision=noise_var / np.array([sd_movie_bias**2] + [sd_movie_noise**2] * rank),
                            movie_mean=movie_mean)
    out["true_model_map"] = auc(fit(np.flatnonzero(valid)) + taste[valid])
    known = truth["movie_bias"][movie] + taste
    factors = truth["movie_factors"][movie]
    prior = noise_var * np.diag([1 / sd_user_bias**2] + [1 / sd_user_factor**2] * rank)
    rows = np.flatnonzero(train)
    w = ridge_per_group(_groups(user[rows], n_users, rows), obs, known, factors, prior)
    scores = known + w[user, 0] + np.einsum("nk,nk->n", w[user, 1:], factors)
    out["movies_known"] = auc(scores[valid])
    out["valid_rows"] = int(valid.sum())
    return out


# --------------------------------------------------------------------------- runs
def _run(cmd: list[str], log: Path, cwd: Path = ROOT) -> float:
    started = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(map(str, cmd))}; see {log}")
    return round(time.perf_counter() - started, 1)


def run_dataset(name: str, spec: dict, work: Path, seeds: list[int], old_tree: Path | None, merlin: bool) -> dict | None:
    raw = spec["raw"]
    if spec.get("real") and not (raw / "u.data").is_file():
        logger.warning("%s: skipped, no raw files at %s (see DEVELOPERS.md for real ML-100K)", name, raw)
        return None
    if spec.get("fmt") == "ml-100k":
        generate_synthetic(raw, fmt="ml-100k", seed=0)
    work = work / name
    work.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    etl = work / "etl"
    out: dict = {"label": spec["label"], "etl_command": ["python", "-m", "pipeline", "etl", *spec["etl"]]}
    raw_flag = [] if spec["etl"][1] == "synthetic" else ["--raw", str(raw)]
    logger.info("%s: ETL", name)
    out["etl_seconds"] = _run([python, "-m", "pipeline", "etl", *spec["etl"], *raw_flag, "--out", str(etl),
                               "--overwrite"], work / "etl.log")
    runs = []
    for seed in seeds:
        model = work / f"dlrm_seed{seed}"
        logger.info("%s: default train, seed %d", name, seed)
        seconds = _run([python, "-m", "pipeline", "train", "--data", str(etl), "--out", str(model), "--seed", str(seed),
                        "--overwrite"], work / f"train_seed{seed}.log")
        metrics = json.loads((model / "metrics.json").read_text())
        runs.append({"seed": seed, "auc": round(metrics["valid"]["auc"], 4), "best_epoch": metrics["best_epoch"],
                     "epochs_run": len(metrics["epochs"]), "seconds": seconds,
                     "select_auc": round(metrics["epochs"][metrics["best_epoch"] - 1]["select"]["auc"], 4),
                     # the picked epoch of the selection run: the model --no-refit publishes, scored in the same run
                     "auc_without_refit": round(metrics.get("refit", {}).get("valid_of_the_selection_run",
                                                                              metrics["valid"])["auc"], 4),
                     "model_selection": metrics["model_selection"]})
        logger.info("%s: seed %d valid AUC %.4f (epoch %d of %d)", name, seed, runs[-1]["auc"],
                    runs[-1]["best_epoch"], runs[-1]["epochs_run"])
    aucs = np.array([r["auc"] for r in runs])
    out["dlrm"] = {"runs": runs, "mean": round(float(aucs.mean()), 4), "min": float(aucs.min()), "max": float(aucs.max()),
                   "std": round(float(aucs.std(ddof=1)) if len(aucs) > 1 else 0.0, 4),
                   "command": "python -m pipeline train --data ETL --out MODEL --seed S"}
    if old_tree is not None:
        model = work / "old_default_seed42"
        logger.info("%s: the earlier default train (%s)", name, old_tree)
        _run([python, "-m", "pipeline", "train", "--data", str(etl), "--out", str(model), "--seed", "42", "--overwrite"],
             work / "old_default.log", cwd=old_tree)
        out["old_default"] = round(json.loads((model / "metrics.json").read_text())["valid"]["auc"], 4)
    elif name in BEFORE:
        out["old_default"] = BEFORE[name]
    logger.info("%s: baselines", name)
    out["baselines"] = baselines(etl, seed=seeds[0])
    if spec.get("fmt"):
        out["ceiling"] = ceiling(raw, etl_seed=int(spec["etl"][spec["etl"].index("--seed") + 1]))
    if spec.get("merlin"):  # --no-merlin: the recorded figure
        out["merlin"] = run_merlin(raw, work) if merlin else {"recorded": MERLIN_RECORDED}
    return out


def run_merlin(raw: Path, work: Path) -> dict:
    """Merlin's DLRMModel (emb 64, Adam, 3 epochs, seed 42) on the ua split with the merlin-reference harness."""
    venv = ROOT / ".venv-merlin" / "bin" / "python"
    result = {"recorded": MERLIN_RECORDED}
    if not venv.is_file():
        logger.warning("no %s (bash %s/setup.sh builds it): Merlin's figure is the recorded one", venv, MERLIN_REFERENCE)
        return result
    logger.info("Merlin's DLRMModel, 3 epochs")
    out = work / "merlin"
    result["seconds"] = _run([str(venv), str(MERLIN_REFERENCE / "merlin_reference.py"), "--raw", str(raw), "--variant",
                              "ml-100k", "--epochs", "3", "--seed", "42", "--models", "dlrm_highlevel", "--no-save",
                              "--out", str(out)], work / "merlin.log")
    measured = json.loads((out / "results.json").read_text())["models"]["dlrm_highlevel"]
    result["measured"] = round(measured["valid_auc"], 4)
    return result


# --------------------------------------------------------------------------- report
ESTIMATORS = [("popularity", "popularity"), ("bias", "user + movie biases"), ("mf", f"biased MF rank {MF_RANK} (ALS)"),
              ("merlin", "Merlin DLRMModel, 3 epochs"), ("old_default", "our DLRM, previous default (3 epochs)"),
              ("dlrm", "our DLRM, default train"), ("true_model_map", "learnable ceiling (true model, MAP)"),
              ("oracle", "oracle (true P)")]


def figures(d: dict) -> dict:
    """``{estimator: AUC}`` of one dataset's result (the DLRM as its seed mean)."""
    b, c = d["baselines"], d.get("ceiling", {})
    merlin = d.get("merlin", {})
    out = {"popularity": b["popularity"], "bias": b["bias"], "mf": b["mf"], "dlrm": d["dlrm"]["mean"]}
    if merlin:
        out["merlin"] = merlin.get("measured", merlin["recorded"])
    if "old_default" in d:
        out["old_default"] = d["old_default"]
    for key in ("true_model_map", "oracle"):
        if key in c:
            out[key] = c[key]
    return out


def targets(name: str, d: dict) -> list[tuple[str, float, float]]:
    """(what, goal, achieved) of each target for one dataset."""
    f = figures(d)
    rows = [("DLRM >= max(biases, MF) + 0.005", round(max(f["bias"], f["mf"]) + 0.005, 4), f["dlrm"])]
    if name in TARGETS:
        rows.append((f"DLRM >= {TARGETS[name]}", TARGETS[name], f["dlrm"]))
    if "old_default" in f:
        rows.append(("DLRM >= previous default", f["old_default"], f["dlrm"]))
    return rows


def report(r: dict) -> str:
    names = list(r["datasets"])
    lines = ["# Model quality on real and synthetic MovieLens", "",
             "Valid AUC of rating > 3 on each dataset's valid split. The DLRM is `python -m pipeline train` with no flag "
             "but `--seed` (mean over the seeds, [min, max]); the baselines' penalties are picked on the same held-out "
             "slice of the training rows that `train` selects its epoch on; nothing is tuned on the valid rows.", "",
             "| dataset | command (one run per dataset) | seeds | seconds | machine, load average at start |",
             "|---|---|---|---:|---|"]
    for n in names:
        d = r["datasets"][n]
        m = d["machine"]
        lines.append(f"| {d['label']} | `{d['command']}` | {d['seeds']} | {d['seconds']} | {m['cpu']}, {m['cores']} cores, "
                     f"{m['memory_gb']} GB; {m['load_average']} (shared with other jobs) |")
    lines.append("")
    if r.get("skipped"):
        lines += [f"Skipped (no raw data): {', '.join(r['skipped'])}.", ""]
    lines += ["| estimator | " + " | ".join(r["datasets"][n]["label"] for n in names) + " |",
              "|---|" + "---:|" * len(names)]
    for key, label in ESTIMATORS:
        cells = []
        for n in names:
            d, f = r["datasets"][n], figures(r["datasets"][n])
            if key not in f:
                cells.append("")
            elif key == "dlrm":
                cells.append(f"**{f[key]:.4f}** [{d['dlrm']['min']:.4f}, {d['dlrm']['max']:.4f}]")
            elif key == "merlin":
                m = d["merlin"]
                cells.append(f"{m['measured']:.4f} (recorded {m['recorded']:.4f})" if "measured" in m
                             else f"{m['recorded']:.4f} (recorded)")
            else:
                cells.append(f"{f[key]:.4f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| DLRM epoch picked (of epochs run), per seed | " + " | ".join(
        ", ".join(f"{x['best_epoch']}/{x['epochs_run']}" for x in r["datasets"][n]["dlrm"]["runs"]) for n in names) + " |")
    lines += ["", "## Targets (benchmark figures, DLRM seed mean)", "", "| dataset | target | goal | DLRM | met? |",
              "|---|---|---:|---:|---|"]
    for n in names:
        for what, goal, got in targets(n, r["datasets"][n]):
            verdict = "met" if got >= goal else f"missed by {goal - got:.4f}"
            lines.append(f"| {r['datasets'][n]['label']} | {what} | {goal:.4f} | {got:.4f} | {verdict} |")
    lines += ["", "Plot: `quality.png`. Every figure, seed and command: `quality.json`.", ""]
    if TRIALS.is_file():
        lines += [TRIALS.read_text().rstrip(), ""]
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(r["datasets"])
    keys = [k for k, _ in ESTIMATORS if any(k in figures(r["datasets"][n]) for n in names)]
    labels = dict(ESTIMATORS)
    fig, ax = plt.subplots(figsize=(2.6 * len(names) + 3, 5))
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
        xs, ys, errs = [], [], []
        for j, n in enumerate(names):
            f = figures(r["datasets"][n])
            if key in f:
                xs.append(j + (i - (len(keys) - 1) / 2) * width)
                ys.append(f[key])
                d = r["datasets"][n]["dlrm"]
                errs.append([f[key] - d["min"], d["max"] - f[key]] if key == "dlrm" else [0, 0])
        ax.bar(xs, ys, width, label=labels[key], yerr=np.array(errs).T if key == "dlrm" else None, capsize=3)
        if key == "dlrm":
            for x, n in zip(xs, [n for n in names if key in figures(r["datasets"][n])]):
                seeds = [s["auc"] for s in r["datasets"][n]["dlrm"]["runs"]]
                ax.scatter([x] * len(seeds), seeds, s=8, color="black", zorder=3)
    for j, n in enumerate(names):
        if n in TARGETS:
            ax.hlines(TARGETS[n], j - 0.45, j + 0.45, colors="red", linestyles="dashed",
                      label="target" if j == names.index(next(m for m in names if m in TARGETS)) else None)
    low = min(min(figures(r["datasets"][n]).values()) for n in names)
    ax.set_ylim(max(0.5, low - 0.02), None)
    ax.set_xticks(range(len(names)), [r["datasets"][n]["label"] for n in names], fontsize=8)
    ax.set_ylabel("valid AUC (rating > 3)")
    ax.set_title("Default train vs baselines in the same run\n(our DLRM: seed mean, min-max bar, dots = seeds)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    parser.add_argument("--work", type=Path, default=ROOT / "scratch" / "quality")
    parser.add_argument("--old-tree", type=Path, default=None,
                        help="a checkout of an earlier commit whose default train is run too (git worktree)")
    parser.add_argument("--no-merlin", action="store_true", help="use Merlin's recorded figure, do not run it")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--report-only", action="store_true", help="re-render quality.md / .png from quality.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.report_only:
        stem = args.results / "quality"
        result = json.loads(stem.with_suffix(".json").read_text())
        write_results(stem, result, report(result))
        plot(result, args.results / "quality.png")
        print(report(result))
        return 0
    command = "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    # One run per dataset; a run updates its datasets' entries and keeps the others' (each with its own
    # command, machine and time), so the table can be filled dataset by dataset.
    stem = args.results / "quality"
    previous = json.loads(stem.with_suffix(".json").read_text()) if stem.with_suffix(".json").is_file() else {}
    result = {"datasets": {k: v for k, v in previous.get("datasets", {}).items() if "dlrm" in v and k in DATASETS},
              "skipped": [], "defaults": DEFAULTS}
    for name in args.datasets:
        machine, started = describe_machine(), time.perf_counter()
        done = run_dataset(name, DATASETS[name], args.work, args.seeds, args.old_tree, not args.no_merlin)
        if done is None:
            result["skipped"].append(name)
            continue
        done.update(command=command, machine=machine, seconds=round(time.perf_counter() - started, 1),
                    seeds=args.seeds, defaults=DEFAULTS)
        result["datasets"][name] = done
    if not result["datasets"]:
        raise SystemExit("no dataset to benchmark")
    # merge with what other runs wrote meanwhile (several datasets may run at once)
    latest = json.loads(stem.with_suffix(".json").read_text()) if stem.with_suffix(".json").is_file() else {}
    merged = {k: v for k, v in latest.get("datasets", {}).items() if "dlrm" in v and k in DATASETS}
    merged.update({k: result["datasets"][k] for k in args.datasets if k in result["datasets"]})
    result["datasets"] = {k: merged[k] for k in DATASETS if k in merged}
    write_results(stem, result, report(result))
    plot(result, args.results / "quality.png")
    print(report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

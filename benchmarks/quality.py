"""How close to the synthetic generator's oracle can any model get? The learnable ceiling of the default data.

Usage::

    python -m pipeline etl --dataset synthetic --out /tmp/etl_full        # writes data/raw/synthetic too
    python benchmarks/quality.py [--raw data/raw/synthetic] [--model-dir MODEL_DIR ...]

The oracle AUC scores each valid rating with the generator's true P(rating > 3). No model trained on the
ratings can reach it: each user's taste has to be estimated from the ~130 ratings the user has in train.
This script regenerates the sample from ``synthetic.json`` (same bytes: checked against oracle.parquet),
splits it exactly as the ETL does (``pipeline.etl.split_ratings``) and reports the valid AUC of estimators
that are given more and more of the generator's truth:

- **bias**: user + movie biases fitted to the star ratings (ridge, alternating);
- **mf**: biased matrix factorization of the stars, rank 8 (the true rank), ridge lambda 5 (best of 1-30);
- **true model, MAP**: the generator's own model family fitted by alternating posterior means from the
  stars (converted to E[latent | star]), given the true priors and the population-level structure (18 x 8
  genre factors, the demographic x genre tastes); users' and movies' parameters are learned;
- **movies known**: every movie parameter is the truth; only users' biases and factors are estimated
  (exact Bayesian posterior mean from the stars) - an upper bound for any model of this data size;
- **oracle**: the true P(rating > 3).

``--model-dir`` adds trained models (their metrics.json valid AUC on the same valid rows). Results go to
benchmarks/results/quality.json and quality.md with the command and the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import ndtr
from scipy.stats import norm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pipeline  # noqa: E402,F401  (dask settings before merlin)
from machine import describe_machine, write_results  # noqa: E402  (benchmarks/machine.py)
from pipeline.datasets import read_oracle  # noqa: E402
from pipeline.datasets.synthetic import read_synthetic_params, sample_movielens  # noqa: E402
from pipeline.etl import split_ratings  # noqa: E402
from pipeline.metrics import roc_auc  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


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


def ceiling(raw: Path) -> dict:
    """The valid AUC of each estimator (see the module docstring) on the ETL's split of ``raw``."""
    params = read_synthetic_params(raw)
    if params is None:
        raise SystemExit(f"{raw}: not a synthetic raw dir (no synthetic.json)")
    started = time.perf_counter()
    sample = sample_movielens(params)
    ratings, truth = sample.ratings, sample.truth
    on_disk = read_oracle(raw)
    if not np.allclose(on_disk["p_positive"].to_numpy(), ratings["p_positive"].to_numpy()):
        raise SystemExit(f"{raw}: oracle.parquet differs from a fresh draw of {params} (generator changed?)")
    etl = {"split": "random", "valid_fraction": 0.2, "seed": params["seed"]}
    _, valid_rows = split_ratings(ratings.assign(row=np.arange(len(ratings))), etl["split"], etl["valid_fraction"],
                                  etl["seed"])
    valid = np.zeros(len(ratings), bool)
    valid[valid_rows["row"].to_numpy()] = True
    train = ~valid
    user, movie = truth["user_idx"], truth["movie_idx"]
    n_users, n_movies, rank = params["n_users"], params["n_movies"], truth["user_factors"].shape[1]
    stars = ratings["rating"].to_numpy().astype(float)
    labels = (stars[valid] > 3).astype(int)
    auc = lambda scores: round(float(roc_auc(labels, scores)), 4)  # noqa: E731
    out = {"params": params, "valid_rows": int(valid.sum()), "train_rows": int(train.sum())}
    out["oracle"] = auc(ratings["p_positive"].to_numpy()[valid])

    centered = stars - stars[train].mean()
    bias = alternating_ridge(centered, user, movie, train, n_users, n_movies, 0,
                             user_precision=[5.0], movie_precision=[5.0], iters=4)
    out["bias"] = auc(bias(np.flatnonzero(valid)))
    mf = alternating_ridge(centered, user, movie, train, n_users, n_movies, rank,
                           user_precision=[5.0] * (rank + 1), movie_precision=[5.0] * (rank + 1))
    out["mf"] = auc(mf(np.flatnonzero(valid)))

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

    # Movies known: Bayesian linear regression of each user's (bias, factors) on the true movie factors.
    known = truth["movie_bias"][movie] + taste
    factors = truth["movie_factors"][movie]
    prior = noise_var * np.diag([1 / sd_user_bias**2] + [1 / sd_user_factor**2] * rank)
    rows = np.flatnonzero(train)
    w = ridge_per_group(_groups(user[rows], n_users, rows), obs, known, factors, prior)
    scores = known + w[user, 0] + np.einsum("nk,nk->n", w[user, 1:], factors)
    out["movies_known"] = auc(scores[valid])
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--raw", type=Path, default=Path("data/raw/synthetic"))
    parser.add_argument("--model-dir", type=Path, action="append", default=[],
                        help="a trained model dir (its metrics.json valid AUC is listed)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = ceiling(args.raw)
    models = {}
    for model_dir in args.model_dir:
        metrics = json.loads((model_dir / "metrics.json").read_text())
        valid = metrics["valid"]
        models[str(model_dir)] = {
            "auc": round(valid.get("auc", valid.get("rating_binary_auc", float("nan"))), 4),
            "epochs": len(metrics["epochs"]),
            "config": json.loads((model_dir / "config.json").read_text()),
        }
    result["models"] = models
    result["command"] = "python " + " ".join(sys.argv)
    result["machine"] = describe_machine()
    write_results(args.results / "quality", result, _report(result))
    print(_report(result))
    return 0


def _report(r: dict) -> str:
    o = r["oracle"]
    rows = [("user + movie biases (ridge on stars)", r["bias"]),
            ("biased MF rank 8 (ALS on stars, lambda 5)", r["mf"]),
            ("the generator's model family, MAP fit from stars, true priors", r["true_model_map"]),
            ("movies known exactly, users estimated (Bayes, from stars)", r["movies_known"])]
    rows += [(f"trained: {name} ({m['config'].get('model')}, {m['epochs']} epochs, targets "
              f"{', '.join(m['config'].get('targets') or [])})", m["auc"]) for name, m in r["models"].items()]
    rows.append(("oracle: the true P(rating > 3)", o))
    lines = [
        "# Quality ceiling of the synthetic data",
        "",
        f"`{r['command']}` ({r['seconds']} s). Data: {r['params']}; valid rows {r['valid_rows']:,} "
        f"(the ETL's random split, seed {r['params']['seed']}).",
        "",
        "| estimator | valid AUC | gap to oracle |",
        "|---|---:|---:|",
        *[f"| {name} | {auc:.4f} | {o - auc:+.4f} |" for name, auc in rows],
        "",
        f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores, {r['machine']['memory_gb']} GB.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

"""Retrieval benchmark: ranking metrics of popularity, the DLRM over every movie, the two-tower over its catalog
index and two-stage (two-tower candidates ranked by the DLRM), and `/recommend` latency per path, per dataset.

    .venv/bin/python benchmarks/retrieval.py                                  # every dataset below
    .venv/bin/python benchmarks/retrieval.py --datasets synthetic-ml-1m --work scratch/retrieval/bench

Datasets (each built under --work if missing: raw data, ETL, DLRM, two-tower):
- ``synthetic-ml-1m``: the generator at ML-1M's size (6,040 users, 3,706 movies, 1,000,209 ratings);
- ``synthetic-25m-catalog``: ML-25M's catalog (59,047 movies) with fewer users and ratings than ML-25M
  (``--catalog-users``, ``--catalog-ratings``; the catalog size is what the two-stage latency depends on);
- ``ml-100k``: real MovieLens 100K (random 80/20 split, seed 0), when data/raw/ml-100k is present.

``--selection-by-taste L`` generates the synthetic datasets with the generator's ``selection_by_taste`` (how much
the planted taste decides which movies a user rates; default 0, popularity alone): their results are kept under
``<dataset> (selection_by_taste L)`` beside the default data's. ``--calibrate-selection L1 L2 ...`` measures, in
seconds and without models, popularity, item-kNN and the oracle at ML-100K's size for each value against real
ML-100K (``selection_calibration``), the measurement the value is chosen by.

Per dataset: the DLRM is trained with the train stage's defaults (early stopping) under an epoch cap
(``--dlrm-epochs``), the two-tower with ``pipeline.retrieval.TwoTowerConfig``'s defaults (early stopping and
the popularity prior's weight on held-out training positives) except ``TWO_TOWER``'s per-dataset caps; metrics come from
``pipeline.evaluate.evaluate_models`` (the same users for every ranker; ``--max-users`` caps them per dataset,
a seeded sample; two-stage with ``popularity_weight="auto"``, plus ``two-stage (w=0)`` and, on synthetic data, the
generator's oracles, ``oracle_rankers``: the ceiling of any ranker there); latency is client-side, one request at a time, ``GET /recommend?k=10&exclude_rated=true``
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
# the 25M catalog: the DLRM over its 59k movies takes ~0.5 s a user on the shared cores
MAX_USERS = {"synthetic-ml-1m": 2000, "synthetic-25m-catalog": 1000, "ml-100k": None}
# the 25M catalog's 0.9M positives: an epoch takes minutes on the shared 2 cores, so a 3-epoch cap (best of 3 kept)
TWO_TOWER = {"synthetic-25m-catalog": dict(epochs=3, select_users=500)}
# table rows, in this order where measured (the oracles on synthetic data only)
RANKERS = ("popularity", "dlrm", "two-tower", "two-stage", "two-stage (DLRM only)", "oracle-popularity",
           "oracle-taste", "oracle")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message} (load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)


def label(name: str, selection_by_taste: float) -> str:
    """The results key of dataset ``name`` generated with ``selection_by_taste`` (the name alone at 0 or real data)."""
    if name == "ml-100k" or not selection_by_taste:
        return name
    return f"{name} (selection_by_taste {selection_by_taste:g})"


def build(name: str, work: Path, args) -> tuple[Path, Path, Path, dict]:
    """``(etl_dir, dlrm_dir, two_tower_dir, sizes)`` of dataset ``name``, built under ``work`` where missing."""
    import pipeline  # noqa: F401
    from pipeline.etl import run_etl
    from pipeline.retrieval import TwoTowerConfig, fit_two_tower
    from pipeline.train import train_model

    taste = args.selection_by_taste if name != "ml-100k" else 0.0
    base = work / (name if not taste else f"{name}-taste{taste:g}")
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
                generate_synthetic(raw, fmt="ml-1m", seed=0, selection_by_taste=taste, **sizes)
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


def server(etl: Path, dlrm: Path, tt: Path, popularity_weight: float = 0.0, retrieval_weight: float = 0.0):
    """``python -m pipeline serve --retrieval`` in its own process; returns ``(process, url)`` once ready."""
    import httpx

    from pipeline.serve import free_port

    port = free_port()
    command = [sys.executable, "-m", "pipeline", "serve", "--data", str(etl), "--model-dir", str(dlrm), "--retrieval",
               str(tt), "--popularity-weight", str(popularity_weight),
               "--retrieval-weight", str(retrieval_weight), "--host", "127.0.0.1", "--port", str(port),
               "--no-access-log"]
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
        # two-stage: log(DLRM) + w log(1 + training ratings) + v two-tower score, (w, v) picked on held-out
        # training positives
        report = evaluate_models(etl, [tt, dlrm], candidates=args.candidates, max_users=max_users, seed=0,
                                 progress=False, popularity_weight="auto", retrieval_weight="auto")
        report["metrics"].update(extra_rankers(etl, dlrm, tt, args.candidates, max_users, report["users"]))
        report["load_average"] = [load_before, round(os.getloadavg()[0], 2)]
    log(f"{name}: /recommend latency")
    weights = report.get("two_stage") or {}
    process, url = server(etl, dlrm, tt, weights.get("popularity_weight", 0.0), weights.get("retrieval_weight", 0.0))
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
    return {"dataset": name, "selection_by_taste": args.selection_by_taste if name != "ml-100k" else None,
            "command": "python benchmarks/retrieval.py " + " ".join(sys.argv[1:]),
            "sizes": sizes, "ranking": report, "latency": timing,
            "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def raw_dir(etl: Path) -> Path:
    """The raw data dir the ETL read (etl.json's ``raw``)."""
    raw = Path(json.loads((etl / "etl.json").read_text())["raw"])
    return raw if raw.is_absolute() else ROOT / raw


def extra_rankers(etl: Path, dlrm: Path, tt: Path, candidates: int, max_users: int | None, users: int) -> dict:
    """Metrics of two-stage by the DLRM's score alone (``two-stage (DLRM only)``: its order of the candidates)
    and, on synthetic data, of the generator's oracles (``oracle_rankers``), on ``evaluate_models``' users."""
    from pipeline.inference import Predictor
    from pipeline.retrieval import Retriever
    from pipeline.retrieval.ranking import HeldOut, evaluate_rankers, two_stage_ranker

    retriever, ranker = Retriever.load(etl, tt), Predictor.load(etl, dlrm)
    held_out = HeldOut.load(etl, retriever.predictor).sample(max_users, 0)  # evaluate_models' sample
    if len(held_out.users) != users:
        raise RuntimeError(f"{len(held_out.users)} users here, {users} in evaluate_models")
    rankers = {"two-stage (DLRM only)": two_stage_ranker(retriever, ranker, candidates),
               **oracle_rankers(raw_dir(etl), ranker)}
    return evaluate_rankers(held_out, rankers, progress=False)


def meta_users(etl: Path) -> list[int]:
    """The raw userIds of the dataset (users.dat of the raw data the ETL read)."""
    raw = raw_dir(etl)
    if (raw / "users.dat").is_file():
        return [int(line.split(b"::", 1)[0]) for line in (raw / "users.dat").read_bytes().splitlines() if line]
    return [int(line.split(b"|", 1)[0]) for line in (raw / "u.user").read_bytes().splitlines() if line]


def rated_probability(log_weight: np.ndarray, pool: np.ndarray, remaining: int) -> np.ndarray:
    """P(movie j is among a user's other rated movies) (n_movies,), given that the generator drew the user's movies
    without replacement with weights ``exp(log_weight)`` (n_movies,) (Gumbel top-k), ``pool`` (n_movies,) bool the
    movies not known to be rated (0 where False) and ``remaining`` movies of the pool rated.

    As exponential races, given the known movies the others are in the rated set about independently with
    ``1 - exp(-w_j * lam)``, ``lam`` such that these sum to ``remaining`` (for the oracle: the user's planted count
    less its training ratings, known to the generator, i.e. the user's valid count).
    """
    if remaining <= 0:
        return np.zeros(len(log_weight))
    log_weight = log_weight - log_weight[pool].max()  # the same races, no overflow
    weight = np.exp(log_weight)
    w = weight[pool]
    lo, hi = -60.0, 60.0  # bisection on log lam: sum(1 - exp(-w lam)) rises with lam
    for _ in range(50):  # 120 / 2**50: lam to ~1e-13 in log
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if -np.expm1(-w * np.exp(mid)).sum() < remaining else (lo, mid)
    return -np.expm1(-weight * np.exp(0.5 * (lo + hi))) * pool


ORACLES = {"oracle": lambda p_in, p_like: p_in * p_like, "oracle-popularity": lambda p_in, _: p_in,
           "oracle-taste": lambda _, p_like: p_like}


def oracle_rankers(raw: Path, predictor, combine: dict | None = None) -> dict:
    """The generator's own rankings of a synthetic raw dir (``{}`` for real data), over the same catalog and with
    the same training movies excluded as every other ranker:

    - ``oracle``: ``P(rated in valid | training movies) x P(rating > 3 | rated)``, the expected relevance of each
      movie, i.e. the Bayes-optimal ranking for a held-out liked movie (what no estimator can beat on average);
    - ``oracle-popularity``: the first factor alone (at ``selection_by_taste`` 0 the true popularity, the best
      popularity ranking; above 0 the true P(rated), popularity and taste: the name is kept for the row);
    - ``oracle-taste``: the second factor alone (the true ``P(like | rated)``: what a rating model such as the DLRM
      estimates).

    The generator picks each user's ``c_u`` movies without replacement with weights
    ``w_uj = exp(sd * popularity_j + selection_by_taste * (s_uj - b_u))`` (Gumbel top-k; ``selection_by_taste`` 0:
    popularity alone), see ``rated_probability``. ``P(rating > 3 | rated) = Phi(s_uj - t_3)`` from the planted
    score. The planted parameters (popularity and the selection weight included) come from
    ``sample_movielens``' truth, recomputed from the seed in synthetic.json.
    """
    import pandas as pd
    from scipy.special import ndtr

    from pipeline.datasets import synthetic
    from pipeline.retrieval.ranking import DEPTH, ITEM, USER, _pad
    from pipeline.retrieval.retriever import known_ids

    params = synthetic.read_synthetic_params(raw)
    if params is None or params.get("version") != synthetic.GENERATOR_VERSION:
        return {}
    sample = synthetic.sample_movielens(params)
    truth = sample.truth
    n_users, n_movies = len(sample.users), len(sample.movies)
    planted_count = np.bincount(truth["user_idx"], minlength=n_users)
    genre_share = sample.genre_flags / np.sqrt(truth["n_genres"])[:, None]
    movie_ids = sample.movies["movieId"].to_numpy()
    user_ids = sample.users["userId"].to_numpy()

    items = predictor.candidate_items
    movie_row = np.searchsorted(movie_ids, items)
    if not np.array_equal(movie_ids[np.minimum(movie_row, n_movies - 1)], items):
        raise RuntimeError(f"{raw}: the workflow's movies are not the generator's")
    first_user = known_ids(predictor.workflow, USER)[0]
    item_codes = np.ravel(predictor.features(pd.DataFrame({USER: np.full(len(items), first_user), ITEM: items}))[ITEM])

    def expected(user_id: int, rated: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(P(in valid), P(like | rated), candidates allowed) over ``items`` for one user."""
        u = int(np.searchsorted(user_ids, user_id))
        allowed = ~np.isin(item_codes, rated) if len(rated) else np.ones(len(items), bool)
        pool = np.ones(n_movies, bool)
        pool[movie_row[~allowed]] = False
        remaining = planted_count[u] - int((~pool).sum())
        score = (truth["user_bias"][u] + truth["movie_bias"] + truth["movie_factors"] @ truth["user_factors"][u]
                 + genre_share @ truth["taste"][u])
        log_weight = truth["pick_log_weight"] * truth["popularity"] + truth["selection_by_taste"] * (
            score - truth["user_bias"][u])
        p_in = rated_probability(log_weight, pool, remaining)
        p_like = ndtr(score - truth["thresholds"][2])
        return p_in[movie_row], p_like[movie_row], allowed

    combine = combine or ORACLES
    ranked: dict[int, dict[str, list]] = {}  # user -> every combination's top movies (one pass per user)

    def ranker(name: str):
        def rank(users: np.ndarray) -> np.ndarray:
            codes = np.ravel(predictor.features(pd.DataFrame({USER: users, ITEM: np.full(len(users), items[0])}))[USER])
            for user_id, code in zip(users.tolist(), codes.tolist()):
                if user_id not in ranked:
                    p_in, p_like, allowed = expected(user_id, predictor.rated_codes(int(code)))
                    ranked[user_id] = {
                        n: items[np.argsort(-np.where(allowed, fn(p_in, p_like), -np.inf), kind="stable")[:DEPTH]]
                        .tolist() for n, fn in combine.items()}
            return _pad([ranked[u][name] for u in users.tolist()])

        return rank

    return {name: ranker(name) for name in combine}


def selection_calibration(lambdas: list[float], real: Path | None, fmt: str = "ml-100k", sizes: dict | None = None,
                          seed: int = 0) -> dict:
    """How strongly taste decides what is rated, measured on real data and on the generator at one size.

    For real ML-100K (``real``, when given) and for the generator in ``fmt`` (default ML-100K's size; ``sizes``:
    n_users / n_movies / n_ratings) at every ``selection_by_taste`` in ``lambdas``: the ETL's random 80/20 split
    (``split_ratings``, ``seed``), every valid user's positives (rating > 3) of movies rated in train held out, the
    user's training movies excluded, over every movie with training ratings; rankers fitted on the training
    ratings alone, without a model or the ETL (seconds):

    - ``popularity``: training positives per movie (the benchmark's popularity);
    - ``item-knn``: ``sum over the user's training movies of cosine(movie, that movie)`` over the binary
      user x movie training matrix (a model-free taste ranker: the same code on real and synthetic data);
    - ``oracle`` (synthetic): ``rated_probability x P(like | rated)`` from the planted parameters.

    Returns ``{"real": {ranker: metrics}, "synthetic": {lambda: {ranker: metrics}}}`` (``ranking_metrics``).
    """
    import pandas as pd
    from scipy.special import ndtr

    from pipeline.datasets import read_movielens, synthetic
    from pipeline.etl import split_ratings
    from pipeline.retrieval.ranking import DEPTH, ranking_metrics

    def evaluate(ratings: pd.DataFrame, oracle=None) -> dict:
        train, valid = split_ratings(ratings[["userId", "movieId", "rating", "timestamp"]], "random", 0.2, seed)
        movies = np.unique(train["movieId"].to_numpy())
        users = np.unique(ratings["userId"].to_numpy())
        t_user = np.searchsorted(users, train["userId"].to_numpy())
        t_movie = np.searchsorted(movies, train["movieId"].to_numpy())
        rated = np.zeros((len(users), len(movies)), bool)  # ML-100K / ML-1M sizes: small
        rated[t_user, t_movie] = True
        positive = valid[(valid["rating"] > 3) & valid["movieId"].isin(movies)]
        held = positive.groupby("userId")["movieId"].apply(lambda m: m.to_numpy(np.int64))
        rows = np.searchsorted(users, held.index.to_numpy())
        counts = np.bincount(t_movie[train["rating"].to_numpy() > 3], minlength=len(movies)).astype(float)
        x = rated.astype(np.float64)
        norm = np.sqrt(x.sum(0))
        similarity = (x.T @ x) / np.maximum(np.outer(norm, norm), 1e-12)
        np.fill_diagonal(similarity, 0.0)
        scores = {"popularity": np.broadcast_to(counts, (len(rows), len(movies))), "item-knn": x[rows] @ similarity}
        if oracle is not None:
            scores["oracle"] = oracle(users[rows], movies, rated[rows])
        out = {}
        for name, score in scores.items():
            score = np.where(rated[rows], -np.inf, score)
            # ties by movie index (stable), as the popularity ranker's ties go to the lower movieId
            top = np.argsort(-score, axis=1, kind="stable")[:, :DEPTH]
            out[name] = ranking_metrics(movies[top], list(held.to_numpy()))
        out["users"] = int(len(rows))
        return out

    report: dict = {"fmt": fmt, "sizes": sizes or {}, "seed": seed, "synthetic": {}}
    if real is not None:
        report["real"] = evaluate(read_movielens("ml-100k", real).ratings)
        log(f"calibration: real ML-100K {report['real']}")
    for lam in lambdas:
        params = synthetic.synthetic_params(fmt, seed=0, selection_by_taste=lam, **(sizes or {}))
        sample = synthetic.sample_movielens(params)
        truth = sample.truth
        planted_count = np.bincount(truth["user_idx"], minlength=len(sample.users))
        genre_share = sample.genre_flags / np.sqrt(truth["n_genres"])[:, None]
        movie_ids, user_ids = sample.movies["movieId"].to_numpy(), sample.users["userId"].to_numpy()

        def oracle(users, movies, rated, truth=truth, planted_count=planted_count, genre_share=genre_share,
                   movie_ids=movie_ids, user_ids=user_ids):
            """The generator's expected relevance (len(users), len(movies)) given each user's training movies."""
            column = np.searchsorted(movie_ids, movies)
            out = np.empty(rated.shape)
            for i, user in enumerate(users):
                u = int(np.searchsorted(user_ids, user))
                score = (truth["user_bias"][u] + truth["movie_bias"] + truth["movie_factors"] @ truth["user_factors"][u]
                         + genre_share @ truth["taste"][u])
                log_weight = truth["pick_log_weight"] * truth["popularity"] + truth["selection_by_taste"] * (
                    score - truth["user_bias"][u])
                pool = np.ones(len(movie_ids), bool)
                pool[column[rated[i]]] = False
                p_in = rated_probability(log_weight, pool, int(planted_count[u] - rated[i].sum()))
                out[i] = (p_in * ndtr(score - truth["thresholds"][2]))[column]
            return out

        report["synthetic"][f"{lam:g}"] = evaluate(sample.ratings, oracle)
        log(f"calibration: selection_by_taste {lam:g}: {report['synthetic'][f'{lam:g}']}")
    return report


def render_calibration(calibration: dict) -> list[str]:
    """The markdown lines of ``selection_calibration``'s report."""
    def ratio(m: dict, name: str) -> str:
        return (f"{m[name]['recall@50'] / m['popularity']['recall@50']:.2f}x / "
                f"{m[name]['ndcg@10'] / m['popularity']['ndcg@10']:.2f}x")

    lines = ["## Calibrating `selection_by_taste` (how much taste decides what is rated)", "",
             f"`{calibration.get('command', '')}`", "",
             f"Generator in {calibration['fmt']} format at {calibration['sizes'] or 'its real size'} (seed 0) vs real "
             "ML-100K; the ETL's random 80/20 split (seed 0); held-out positives as above; rankers fitted on the "
             "training ratings in seconds, no model: popularity (training positives), item-kNN (cosine over the "
             "binary user x movie training matrix, summed over the user's training movies), the generator's oracle. "
             f"Measured {calibration.get('measured_at', '')}.", "",
             "| data | selection_by_taste | popularity R@50 / NDCG@10 | item-kNN R@50 / NDCG@10 | item-kNN vs "
             "popularity | oracle vs popularity |", "|---|---:|---|---|---|---|"]
    rows = ([("real ML-100K", "—", calibration["real"])] if "real" in calibration else []) + [
        ("synthetic", lam, m) for lam, m in calibration["synthetic"].items()]
    for data, lam, m in rows:
        oracle = ratio(m, "oracle") if "oracle" in m else "—"
        lines.append(f"| {data} | {lam} | {m['popularity']['recall@50']:.3f} / {m['popularity']['ndcg@10']:.3f} | "
                     f"{m['item-knn']['recall@50']:.3f} / {m['item-knn']['ndcg@10']:.3f} | {ratio(m, 'item-knn')} | "
                     f"{oracle} |")
    if "real" in calibration and calibration["synthetic"]:
        def knn_ratio(m: dict) -> float:
            return m["item-knn"]["recall@50"] / m["popularity"]["recall@50"]

        target = knn_ratio(calibration["real"])
        closest = min(calibration["synthetic"], key=lambda lam: abs(knn_ratio(calibration["synthetic"][lam]) - target))
        lines += ["", f"Closest to real ML-100K's item-kNN / popularity Recall@50 ({target:.2f}x): selection_by_taste "
                  f"{closest} ({knn_ratio(calibration['synthetic'][closest]):.2f}x). Load average "
                  f"{calibration.get('load_average')}."]
    return lines + [""]


def render(report: dict) -> str:
    lines = ["# Retrieval: two-tower, two-stage, DLRM over every movie, popularity", "",
             "Command: `python benchmarks/retrieval.py` (each dataset's own command below).", "",
             f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, "
             f"{report['machine']['memory_gb']} GB, no GPU, shared with other agents' jobs "
             "(load averages per measurement below; 2 cores, so load > 2 means waiting for a core).", "",
             "Metrics: per valid user with a held-out positive (rating_binary == 1), every movie of the saved workflow "
             "ranked with the user's training movies excluded; binary relevance; averaged over users "
             "(`python -m pipeline evaluate`). Two-stage: 200 two-tower candidates ranked by log(DLRM) + w x "
             "log(1 + training ratings) + v x two-tower score (`--popularity-weight auto --retrieval-weight auto`). Oracles (synthetic data): the generator's own "
             "rankings from its planted parameters (`oracle_rankers` in benchmarks/retrieval.py). "
             "Latency: client-side `GET /recommend?k=10&exclude_rated=true`, one request at a time, both paths of one "
             "`serve --retrieval` process, one path after the other.", ""]
    for name, entry in report["datasets"].items():
        r, s, t = entry["ranking"], entry["sizes"], entry["latency"]
        m = r["metrics"]
        heading = name if name == "ml-100k" or "selection_by_taste" in name else (
            f"{name} (selection_by_taste 0: popularity alone picks the rated movies)")
        lines += [f"## {heading}", "", f"`{entry.get('command', report['command'])}`", "",
                  f"{s['users']:,} users, {s['movies']:,} movies, {s['train_rows']:,} train / {s['valid_rows']:,} valid "
                  f"ratings; {r['users']:,} evaluated users{' (seeded sample)' if r['max_users'] else ''}; "
                  f"DLRM valid AUC {s['dlrm_valid_auc']:.4f} (best epoch {s['dlrm_epochs']}); two-tower: epoch "
                  f"{s.get('two_tower_epoch')} of {s.get('two_tower_epochs_run')} picked on held-out training "
                  f"positives, popularity-prior weight {s.get('two_tower_prior_weight')}; measured "
                  f"{entry['measured_at']}, load average {r['load_average']} (metrics), {t['load_average']} (latency).", "",
                  "| ranker | Recall@10 | Recall@50 | NDCG@10 | MAP@10 | vs popularity (R@50 / NDCG@10) | seconds |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        pop = m["popularity"]
        for ranker in (r for r in RANKERS if r in m):
            x = m[ranker]
            vs = "—" if ranker == "popularity" else (
                f"{x['recall@50'] / pop['recall@50']:.2f}x / {x['ndcg@10'] / pop['ndcg@10']:.2f}x")
            lines.append(f"| {ranker} | {x['recall@10']:.4f} | {x['recall@50']:.4f} | {x['ndcg@10']:.4f} | "
                         f"{x['map@10']:.4f} | {vs} | {x['seconds']:.0f} |")
        gap = m["two-stage"]["ndcg@10"] / m["dlrm"]["ndcg@10"] - 1
        lines += ["", f"Two-stage NDCG@10 vs the DLRM over every movie: {gap:+.1%}."]
        two_stage = r.get("two_stage") or {}
        picked = two_stage.get("picked_on_held_out_training_positives")
        if picked and "by_weights" in picked:  # (earlier runs recorded a popularity weight alone)
            by = picked["by_weights"]
            best = by[f"{two_stage['popularity_weight']:g},{two_stage['retrieval_weight']:g}"]["recall@50"]
            lines += ["", f"Two-stage score: log(DLRM) + {two_stage['popularity_weight']:g} x log(1 + training "
                      f"ratings) + {two_stage['retrieval_weight']:g} x two-tower score, the weights picked on "
                      f"{picked['users']:,} users' held-out training positives (rows neither model fitted): Recall@50 "
                      f"there {best:.4f}, DLRM alone {by['0,0']['recall@50']:.4f}, best with popularity only "
                      f"{max(m['recall@50'] for k, m in by.items() if k.endswith(',0')):.4f}, best with the two-tower "
                      f"only {max(m['recall@50'] for k, m in by.items() if k.startswith('0,')):.4f}. "
                      "`two-stage (DLRM only)`: the DLRM's order alone."]
        if "oracle" in m:
            o = m["oracle"]
            share = {k: (m["two-tower"][k] - pop[k]) / (o[k] - pop[k]) if o[k] != pop[k] else float("nan")
                     for k in ("recall@50", "ndcg@10")}
            lines += ["", f"The ceiling: the generator's own Bayes-optimal ranking (`oracle`, P(rated in valid | training "
                      f"movies) x P(like | rated)) is {o['recall@50'] / pop['recall@50']:.2f}x / "
                      f"{o['ndcg@10'] / pop['ndcg@10']:.2f}x popularity (R@50 / NDCG@10); the two-tower has "
                      f"{share['recall@50']:.0%} / {share['ndcg@10']:.0%} of the oracle's gain over popularity."]
            if entry.get("selection_by_taste"):
                lines += ["", f"Generated with selection_by_taste {entry['selection_by_taste']:g}: users rate what "
                          "they are planted to like, so `oracle-popularity` (P(rated in valid) alone) carries taste "
                          "too; `oracle-taste` is P(like | rated) alone, what the DLRM estimates."]
        lines += ["",
                  "| /recommend path | p50 ms | p99 ms | mean ms | requests |", "|---|---:|---:|---:|---:|"]
        for path in ("two-stage", "rank-all"):
            lines.append(f"| {path} | {t[path]['p50_ms']} | {t[path]['p99_ms']} | {t[path]['mean_ms']} | {t[path]['n']} |")
        lines.append("")
    if "selection_calibration" in report:
        lines += render_calibration(report["selection_calibration"])
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Recall@50 and NDCG@10 of every ranker per dataset, as grouped bars (``retrieval.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rankers = ("popularity", "dlrm", "two-tower", "two-stage", "oracle")
    names = list(report["datasets"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    width = 0.8 / len(rankers)
    for ax, metric in zip(axes, ("recall@50", "ndcg@10")):
        for j, ranker in enumerate(rankers):
            values = [report["datasets"][n]["ranking"]["metrics"].get(ranker, {}).get(metric, 0.0) for n in names]
            ax.bar(np.arange(len(names)) + (j - (len(rankers) - 1) / 2) * width, values, width, label=ranker)
        ticks = [n.replace("synthetic-", "synth. ").replace(" (selection_by_taste ", "\nselection_by_taste ")
                 .rstrip(")") if "selection_by_taste" in n else n.replace("synthetic-", "synth. ") for n in names]
        ax.set_xticks(np.arange(len(names)), ticks, fontsize=7, rotation=20, ha="right")
        ax.set_title(metric)
    axes[1].legend(fontsize=8, loc="upper left")
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
    parser.add_argument("--selection-by-taste", type=float, default=0.0, metavar="LAMBDA",
                        help="synthetic datasets: the generator's selection_by_taste (default 0: popularity alone)")
    parser.add_argument("--calibrate-selection", type=float, nargs="+", metavar="LAMBDA",
                        help="only measure popularity / item-kNN / oracle at ML-100K size for these values against "
                             "real ML-100K (selection_calibration), kept in the results")
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
    command = "python benchmarks/retrieval.py " + " ".join(sys.argv[1:])
    if args.calibrate_selection:
        real = ROOT / "data" / "raw" / "ml-100k"
        calibration = selection_calibration(args.calibrate_selection, real if real.is_dir() else None)
        calibration.update(command=command, load_average=[round(x, 2) for x in os.getloadavg()],
                           measured_at=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
        report = dict(previous, selection_calibration=calibration)
        write_results(RESULTS, report, render(report))
        log(f"calibration: written to {RESULTS}.md")
        return 0
    for name in args.datasets:
        if name == "ml-100k" and not (ROOT / "data" / "raw" / "ml-100k").is_dir():
            log("ml-100k: data/raw/ml-100k is not there: skipped")
            continue
        key = label(name, args.selection_by_taste)
        datasets[key] = run(name, args.work, args, datasets.get(key))
        report = {"command": command, "machine": describe_machine(), "datasets": datasets,
                  **({"selection_calibration": previous["selection_calibration"]}
                     if "selection_calibration" in previous else {})}
        write_results(RESULTS, report, render(report))
        plot(report, RESULTS.with_suffix(".png"))
        log(f"{name}: written to {RESULTS}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

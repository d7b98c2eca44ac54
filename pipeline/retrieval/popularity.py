"""Two-stage scoring with popularity: the ranker's ``log P(like | rated)`` plus ``w * log(1 + training ratings)``.

A rating model (the DLRM) is trained on the ratings that exist, so it scores ``P(rating > 3 | the user rated the
movie)``; a held-out liked movie must also be rated at all, and how often a movie is rated is its popularity.
``combined_score`` ranks the candidates by ``log p + w * log(1 + n_ratings)`` (``w = 0``: the ranker's score
alone, unchanged). ``pick_popularity_weight`` chooses ``w`` as the two-tower's prior weight is chosen: on the
held-out *training* rows that neither model fitted (``pipeline.train.selection_mask`` with the ranker's
selection seed and fraction), with the ratings counted on the fitted rows only; never on the valid split.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from pipeline.errors import ArtifactError, DataError, UsageError

logger = logging.getLogger(__name__)

USER, ITEM = "userId", "movieId"
POPULARITY_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
MIN_PROBABILITY = 1e-12  # log of a ranker probability of 0 stays finite


def combined_score(probability: np.ndarray, log_popularity: np.ndarray, weight: float) -> np.ndarray:
    """``log(probability) + weight * log_popularity`` (float64, same shape); ``weight == 0``: ``probability``."""
    if weight == 0.0:
        return np.asarray(probability)
    return np.log(np.maximum(np.asarray(probability, np.float64), MIN_PROBABILITY)) + weight * np.asarray(
        log_popularity, np.float64)


def _train_ids(train_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(encoded userIds, encoded movieIds, rating_binary)`` of every training row."""
    import pyarrow.parquet as pq

    files = sorted(Path(train_dir).glob("*.parquet"))
    if not files:
        raise DataError(f"{train_dir}: no parquet files (is it the train split of `python -m pipeline etl`?)")
    tables = [pq.read_table(f, columns=[USER, ITEM, "rating_binary"]) for f in files]
    return tuple(np.concatenate([t[c].to_numpy() for t in tables]).astype(np.int64)
                 for c in (USER, ITEM, "rating_binary"))


def training_log_popularity(retriever, holdout: tuple[int, float] | None = None) -> np.ndarray:
    """``log(1 + training ratings)`` of every index row's movie, ``(n_movies,)`` float64 (cold movies: 0).

    ``holdout = (seed, fraction)``: count only the rows outside that selection mask (the fitted rows).
    """
    from pipeline.train import selection_mask

    users, items, _ = _train_ids(retriever.predictor.etl_dir / "train")
    if holdout is not None:
        items = items[~selection_mask(users, items, holdout[0], holdout[1])]
    counts = np.bincount(items, minlength=int(retriever.item_codes.max(initial=0)) + 1)
    return np.log1p(counts[retriever.item_codes].astype(np.float64))


def selection_holdout(*model_dirs: str | Path) -> tuple[int, float]:
    """``(seed, fraction)`` of the training rows the models in ``model_dirs`` held out of fitting (their
    metrics.json ``model_selection``); ``UsageError`` if they differ (then no row is unseen by both) or if a
    model held none out."""
    found = set()
    for model_dir in model_dirs:
        try:
            metrics = json.loads((Path(model_dir) / "metrics.json").read_text())
            config = json.loads((Path(model_dir) / "config.json").read_text())
        except (OSError, ValueError) as err:
            raise ArtifactError(f"{model_dir}: cannot read metrics.json / config.json ({err})") from err
        fraction = (metrics.get("model_selection") or {}).get("fraction")
        if not fraction:
            raise UsageError(f"{model_dir} held no training rows out of fitting (select_fraction 0): the popularity "
                             "weight cannot be picked without the valid split; pass a number instead")
        found.add((int(config.get("seed", 0)), float(fraction)))
    if len(found) != 1:
        raise UsageError(f"the models held out different training rows ({sorted(found)} as (seed, fraction)): train "
                         "them with the same --seed and --select-fraction to pick the popularity weight")
    return found.pop()


def pick_popularity_weight(recommender, weights=POPULARITY_WEIGHTS, *, max_users: int = 2000,
                           seed: int = 0) -> dict:
    """The ``weights`` entry whose ``combined_score`` ranks the held-out training positives best (Recall@50).

    ``recommender``: a compiled ``TwoStageRecommender`` (its retriever and ranker). For at most ``max_users``
    users (a seeded sample) with held-out positives, the two-tower retrieves ``candidates`` movies, the user's
    *fitted* movies excluded; the ranker scores them once and every weight re-ranks them, popularity counted
    on the fitted rows. Returns ``{"weight", "by_weight": {w: metrics}, "users", "holdout"}``.
    """
    from pipeline.retrieval.ranking import DEPTH, ranking_metrics
    from pipeline.train import selection_mask

    if not recommender.compiled:
        raise UsageError("picking the popularity weight needs a ranker with a feature cache (the compiled path)")
    retriever, ranker = recommender.retriever, recommender.ranker
    holdout = selection_holdout(retriever.predictor.model_dir, ranker.model_dir)
    users, items, target = _train_ids(retriever.predictor.etl_dir / "train")
    held = selection_mask(users, items, *holdout)
    log_popularity = training_log_popularity(retriever, holdout)
    row_of = retriever._row_of_code
    item_rows = np.where(items < len(row_of), row_of[np.minimum(items, len(row_of) - 1)], -1)
    known = np.isin(users, retriever.user_codes)
    positive = held & (target == 1) & (item_rows >= 0) & known
    candidates = np.unique(users[positive])
    if not len(candidates):
        raise DataError("no held-out training positives to pick the popularity weight on")
    if len(candidates) > max_users:
        candidates = np.sort(np.random.default_rng(seed).choice(candidates, max_users, replace=False))
    order = np.argsort(users, kind="stable")
    starts = np.searchsorted(users[order], candidates)
    ends = np.searchsorted(users[order], candidates, side="right")
    user_at = {int(c): i for i, c in enumerate(retriever.user_codes)}
    ranked = {w: [] for w in weights}
    relevant = []
    for code, lo, hi in zip(candidates, starts, ends):
        rows_of_user = order[lo:hi]
        fitted = item_rows[rows_of_user[~held[rows_of_user]]]
        relevant.append(np.unique(item_rows[rows_of_user[positive[rows_of_user]]]))
        at = user_at[int(code)]
        rows = retriever.index.search_rows(retriever.user_vectors[at:at + 1], recommender.candidates,
                                           [fitted[fitted >= 0]])[0][0]
        rows = np.sort(rows[rows >= 0])
        probability = recommender.score_rows(int(retriever.users[at]), rows)
        for w in weights:
            score = combined_score(probability, log_popularity[rows], w)
            ranked[w].append(rows[np.argsort(-score, kind="stable")[:DEPTH]])
    by_weight = {}
    for w in weights:
        padded = np.full((len(relevant), DEPTH), -1, np.int64)
        for i, top in enumerate(ranked[w]):
            padded[i, :len(top)] = top
        by_weight[float(w)] = ranking_metrics(padded, relevant)
    best = max(by_weight, key=lambda w: (by_weight[w]["recall@50"], -abs(w)))  # a tie: the smaller weight
    logger.info("two-stage popularity weight %g picked on %d users' held-out training positives (recall@50 %s)",
                best, len(relevant), {w: round(m["recall@50"], 4) for w, m in by_weight.items()})
    return {"weight": best, "by_weight": by_weight, "users": len(relevant),
            "holdout": {"seed": holdout[0], "fraction": holdout[1]}}


def popularity_weight_arg(text: str) -> float | str:
    """argparse type of ``--popularity-weight``: a finite number, or ``auto`` (``pick_popularity_weight``)."""
    import argparse
    import math

    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number or 'auto', got {text!r}")
    return value


def resolve_popularity_weight(recommender, weight: float | str, *, seed: int = 0) -> tuple[float, dict | None]:
    """``(weight, how it was picked)``: a number as given (``None``), or ``auto`` picked by
    ``pick_popularity_weight`` (its report)."""
    if weight == "auto":
        picked = pick_popularity_weight(recommender, seed=seed)
        return picked["weight"], picked
    return float(weight), None

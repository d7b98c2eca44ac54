"""Two-stage scoring: the ranker's ``log P(like | rated)`` plus ``w * log(1 + training ratings)`` plus ``v *`` the
two-tower's retrieval score.

A rating model (the DLRM) is trained on the ratings that exist, so it scores ``P(rating > 3 | the user rated the
movie)``; a held-out liked movie must also be rated at all, and how often a movie is rated is its popularity.
The two-tower, trained on the positives alone, scores ``log P(this liked movie | user)`` up to a constant per user.
``combined_score`` ranks the candidates by ``log p + w * log(1 + n_ratings) + v * retrieval score`` (``w = v =
0``: the ranker's score alone, unchanged). ``pick_two_stage_weights`` chooses ``w`` and ``v`` as the two-tower's
prior weight is chosen: on the held-out *training* rows that neither model fitted
(``pipeline.train.selection_mask`` with the models' selection seed and fraction), with the ratings counted on the
fitted rows only; never on the valid split.
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
RETRIEVAL_WEIGHTS = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0)  # the retrieval score is cosine / 0.05 + per-movie terms
MIN_PROBABILITY = 1e-12  # log of a ranker probability of 0 stays finite


def combined_score(probability: np.ndarray, log_popularity: np.ndarray, weight: float,
                   retrieval: np.ndarray | None = None, retrieval_weight: float = 0.0) -> np.ndarray:
    """``log(probability) + weight * log_popularity + retrieval_weight * retrieval`` (float64, same shape); both
    weights 0: ``probability`` as given."""
    if weight == 0.0 and retrieval_weight == 0.0:
        return np.asarray(probability)
    score = np.log(np.maximum(np.asarray(probability, np.float64), MIN_PROBABILITY))
    if weight:
        score = score + weight * np.asarray(log_popularity, np.float64)
    if retrieval_weight:
        score = score + retrieval_weight * np.asarray(retrieval, np.float64)
    return score


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


def pick_two_stage_weights(recommender, popularity_weights=POPULARITY_WEIGHTS,
                           retrieval_weights=RETRIEVAL_WEIGHTS, *, max_users: int = 2000, seed: int = 0) -> dict:
    """The pair ``(w, v)`` of ``popularity_weights`` x ``retrieval_weights`` whose ``combined_score`` ranks the
    held-out training positives best (Recall@50; a tie: the smaller weights).

    ``recommender``: a compiled ``TwoStageRecommender`` (its retriever and ranker). For at most ``max_users``
    users (a seeded sample) with held-out positives, the two-tower retrieves ``candidates`` movies, the user's
    *fitted* movies excluded; the ranker scores them once and every pair re-ranks them, popularity counted
    on the fitted rows. Returns ``{"popularity_weight", "retrieval_weight", "by_weights": {"w,v": metrics},
    "users", "holdout"}``.
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
    pairs = [(float(w), float(v)) for w in popularity_weights for v in retrieval_weights]
    ranked = {pair: [] for pair in pairs}
    relevant = []
    for code, lo, hi in zip(candidates, starts, ends):
        rows_of_user = order[lo:hi]
        fitted = item_rows[rows_of_user[~held[rows_of_user]]]
        relevant.append(np.unique(item_rows[rows_of_user[positive[rows_of_user]]]))
        at = user_at[int(code)]
        rows, retrieval = retriever.index.search_rows(retriever.user_vectors[at:at + 1], recommender.candidates,
                                                      [fitted[fitted >= 0]])
        rows, retrieval = rows[0][rows[0] >= 0], retrieval[0][rows[0] >= 0]
        by_movie = np.argsort(rows)  # movieId order, as the serving path ranks them
        rows, retrieval = rows[by_movie], retrieval[by_movie]
        probability = recommender.score_rows(int(retriever.users[at]), rows)
        for w, v in pairs:
            score = combined_score(probability, log_popularity[rows], w, retrieval, v)
            ranked[(w, v)].append(rows[np.argsort(-score, kind="stable")[:DEPTH]])
    by_pair = {}
    for pair in pairs:
        padded = np.full((len(relevant), DEPTH), -1, np.int64)
        for i, top in enumerate(ranked[pair]):
            padded[i, :len(top)] = top
        by_pair[pair] = ranking_metrics(padded, relevant)
    best = max(by_pair, key=lambda p: (by_pair[p]["recall@50"], -abs(p[1]), -abs(p[0])))
    logger.info("two-stage weights (popularity %g, retrieval %g) picked on %d users' held-out training positives "
                "(recall@50 %.4f; both 0: %.4f)", *best, len(relevant), by_pair[best]["recall@50"],
                by_pair.get((0.0, 0.0), {}).get("recall@50", float("nan")))
    return {"popularity_weight": best[0], "retrieval_weight": best[1],
            "by_weights": {f"{w:g},{v:g}": m for (w, v), m in by_pair.items()}, "users": len(relevant),
            "holdout": {"seed": holdout[0], "fraction": holdout[1]}}


def weight_arg(text: str) -> float | str:
    """argparse type of ``--popularity-weight`` / ``--retrieval-weight``: a finite number, or ``auto``
    (``pick_two_stage_weights``)."""
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


def set_two_stage_weights(recommender, popularity_weight: float | str = 0.0, retrieval_weight: float | str = 0.0, *,
                          seed: int = 0) -> dict:
    """Set ``recommender``'s two weights: each a number as given, or ``auto``: picked (both jointly when both are
    ``auto``) by ``pick_two_stage_weights``. Returns ``{"popularity_weight", "retrieval_weight", "picked"}``
    (``picked``: the pick's report, or None)."""
    picked = None
    if "auto" in (popularity_weight, retrieval_weight):
        grid = {name: (POPULARITY_WEIGHTS if name == "popularity" else RETRIEVAL_WEIGHTS) if value == "auto"
                else (float(value),) for name, value in (("popularity", popularity_weight),
                                                        ("retrieval", retrieval_weight))}
        picked = pick_two_stage_weights(recommender, grid["popularity"], grid["retrieval"], seed=seed)
        popularity_weight, retrieval_weight = picked["popularity_weight"], picked["retrieval_weight"]
    recommender.popularity_weight, recommender.retrieval_weight = float(popularity_weight), float(retrieval_weight)
    return {"popularity_weight": recommender.popularity_weight, "retrieval_weight": recommender.retrieval_weight,
            "picked": picked}

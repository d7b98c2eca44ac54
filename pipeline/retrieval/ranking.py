"""Top-k ranking metrics over held-out positives, and the rankers they compare.

``HeldOut.load(etl_dir, predictor)`` reads the valid split's positives (``rating_binary == 1``) per user and maps
the encoded ids back to raw userId / movieId through the saved workflow (a ``Predictor``'s features of every
known user and movie), so every ranker answers in raw ids as ``/recommend`` does. Valid positives of movies
without training ratings share Categorify's out-of-vocabulary code and cannot be told apart: they are
dropped (and counted). Every ranker excludes the movies the user rated in training.

Metrics per user, averaged over users with at least one held-out positive (binary relevance):
Recall@k = hits in the top k / held-out positives; NDCG@k = DCG of the top k / the best possible DCG with
min(k, positives) hits; MAP@k = the mean over hits of precision at the hit's rank, divided by min(k, positives).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from pipeline.errors import DataError

logger = logging.getLogger(__name__)

USER, ITEM = "userId", "movieId"
CUTOFFS = {"recall@10": 10, "recall@50": 50, "ndcg@10": 10, "map@10": 10}
DEPTH = max(CUTOFFS.values())  # how many movies every ranker returns per user


def ranking_metrics(ranked: np.ndarray, relevant: Sequence[np.ndarray]) -> dict[str, float]:
    """``ranked`` ``(users, >= 50)`` movie ids best first (-1 = none), ``relevant`` one id array per user ->
    ``{"recall@10", "recall@50", "ndcg@10", "map@10"}`` averaged over users (each user counts once)."""
    ranked = np.asarray(ranked)
    if ranked.ndim != 2 or len(ranked) != len(relevant):
        raise ValueError(f"ranked must be (users, depth) for {len(relevant)} users, got {ranked.shape}")
    if not len(ranked):
        raise DataError("no users with held-out positives to evaluate")
    hits = np.zeros(ranked.shape, dtype=bool)
    for u, rel in enumerate(relevant):
        row = ranked[u]
        hits[u] = np.isin(row, rel) & (row >= 0)
        # a movie listed twice counts once
        _, first = np.unique(row, return_index=True)
        hits[u, np.setdiff1d(np.arange(len(row)), first)] = False
    n_rel = np.array([len(r) for r in relevant], dtype=np.float64)
    out = {}
    for name, k in CUTOFFS.items():
        h = hits[:, :k].astype(np.float64)
        if name.startswith("recall"):
            per_user = h.sum(1) / n_rel
        elif name.startswith("ndcg"):
            discounts = 1.0 / np.log2(np.arange(2, k + 2))
            ideal = np.cumsum(discounts)[np.minimum(n_rel, k).astype(int) - 1]
            per_user = (h * discounts[: h.shape[1]]).sum(1) / ideal
        else:
            precision = np.cumsum(h, axis=1) / np.arange(1, h.shape[1] + 1)
            per_user = (precision * h).sum(1) / np.minimum(n_rel, k)
        out[name] = float(per_user.mean())
    return out


@dataclass
class HeldOut:
    """The valid split's positives per user, in raw ids.

    Attributes:
        users: ``(n,)`` raw userIds with at least one held-out positive, sorted.
        relevant: one array of raw movieIds per user.
        dropped: valid positives not counted (cold movies sharing the OOV code, or unknown users).

    Args:
        users, relevant, dropped: as above (``HeldOut.load`` builds them from an ETL output).

    Example:
        >>> held_out = HeldOut.load("data/synthetic/etl", predictor).sample(1000, seed=0)  # doctest: +SKIP
        >>> evaluate_rankers(held_out, {"popularity": popularity_ranker(predictor)})  # doctest: +SKIP
    """

    users: np.ndarray
    relevant: list[np.ndarray]
    dropped: int

    @classmethod
    def load(cls, etl_dir: str | Path, predictor, target: str = "rating_binary") -> "HeldOut":
        import pyarrow.parquet as pq

        from pipeline.retrieval.retriever import known_ids

        valid = Path(etl_dir) / "valid"
        files = sorted(valid.glob("*.parquet"))
        if not files:
            raise DataError(f"{valid}: no parquet files (is {etl_dir} the output of `python -m pipeline etl`?)")
        table = pd.concat([pq.read_table(f, columns=[USER, ITEM, target]).to_pandas() for f in files])
        positives = table[table[target] == 1]
        users = known_ids(predictor.workflow, USER)
        items = predictor.candidate_items
        user_codes = np.ravel(predictor.features(pd.DataFrame({USER: users, ITEM: np.full(len(users), items[0])}))[USER])
        item_codes = np.ravel(predictor.features(pd.DataFrame({USER: np.full(len(items), users[0]), ITEM: items}))[ITEM])
        raw_user = dict(zip(user_codes.tolist(), users.tolist()))
        codes, counts = np.unique(item_codes, return_counts=True)
        unique = set(codes[counts == 1].tolist())
        raw_item = {int(c): int(m) for c, m in zip(item_codes, items) if int(c) in unique}
        keep = positives[USER].isin(list(raw_user)) & positives[ITEM].isin(list(raw_item))
        frame = pd.DataFrame({USER: positives[USER][keep].map(raw_user), ITEM: positives[ITEM][keep].map(raw_item)})
        grouped = frame.groupby(USER)[ITEM].apply(lambda s: np.unique(s.to_numpy(dtype=np.int64)))
        logger.info("held-out positives: %d users, %d movies (%d dropped: cold movies or unknown users)",
                    len(grouped), int(keep.sum()), int((~keep).sum()))
        return cls(grouped.index.to_numpy(dtype=np.int64), list(grouped.to_numpy()), int((~keep).sum()))

    def sample(self, max_users: int | None, seed: int = 0) -> "HeldOut":
        """At most ``max_users`` users, a seeded draw (the same users for every ranker)."""
        if max_users is None or max_users >= len(self.users):
            return self
        rows = np.sort(np.random.default_rng(seed).choice(len(self.users), size=max_users, replace=False))
        return HeldOut(self.users[rows], [self.relevant[i] for i in rows], self.dropped)


# A ranker: raw userIds (n,) -> (n, DEPTH) raw movieIds best first, training movies excluded (-1 pads).
Ranker = Callable[[np.ndarray], np.ndarray]


def _pad(lists: list[list[int]], depth: int = DEPTH) -> np.ndarray:
    out = np.full((len(lists), depth), -1, dtype=np.int64)
    for i, movies in enumerate(lists):
        out[i, : min(depth, len(movies))] = movies[:depth]
    return out


def popularity_ranker(predictor) -> Ranker:
    """Every movie by its number of training positives (most first; ties by movieId), training movies excluded."""
    import pyarrow.parquet as pq

    files = sorted((predictor.etl_dir / "train").glob("*.parquet"))
    table = pd.concat([pq.read_table(f, columns=[ITEM, "rating_binary"]).to_pandas() for f in files])
    codes = table.loc[table["rating_binary"] == 1, ITEM].to_numpy(dtype=np.int64)
    counts = np.bincount(codes)
    items = predictor.candidate_items
    from pipeline.retrieval.retriever import known_ids

    first_user = known_ids(predictor.workflow, USER)[0]
    item_codes = np.ravel(predictor.features(pd.DataFrame({USER: np.full(len(items), first_user), ITEM: items}))[ITEM])
    score = np.where(item_codes < len(counts), counts[np.minimum(item_codes, len(counts) - 1)], 0).astype(np.float64)
    order = np.argsort(-score, kind="stable")  # items are sorted by movieId: ties go to the lower id

    def rank(user_ids: np.ndarray) -> np.ndarray:
        user_codes = np.ravel(predictor.features(
            pd.DataFrame({USER: user_ids, ITEM: np.full(len(user_ids), items[0])}))[USER])
        out = []
        for code in user_codes:
            rated = predictor.rated_codes(int(code))
            allowed = order[~np.isin(item_codes[order], rated)] if len(rated) else order
            out.append(items[allowed[:DEPTH]].tolist())
        return _pad(out)

    return rank


def rank_all_ranker(predictor) -> Ranker:
    """A ranking model scoring every movie per user (``Predictor.recommend``, training movies excluded)."""
    def rank(user_ids: np.ndarray) -> np.ndarray:
        return _pad([[m for m, _ in predictor.recommend(int(u), k=DEPTH, exclude_rated=True)] for u in user_ids])

    return rank


def retrieval_ranker(retriever, chunk: int = 256) -> Ranker:
    """A two-tower model's top movies over the whole catalog (the item index), training movies excluded."""
    def rank(user_ids: np.ndarray) -> np.ndarray:
        parts = [retriever.retrieve_many(user_ids[i:i + chunk], DEPTH, exclude_rated=True)[0]
                 for i in range(0, len(user_ids), chunk)]
        return np.concatenate(parts) if parts else np.zeros((0, DEPTH), np.int64)

    return rank


def two_stage_ranker(retriever, predictor, candidates: int, popularity_weight: float = 0.0,
                     recommender=None) -> Ranker:
    """``candidates`` movies from the two-tower model, ranked by the ranking model (``TwoStageRecommender``, what
    ``serve --retrieval`` answers; ``popularity_weight`` as there). ``recommender``: one already built."""
    from pipeline.retrieval.retriever import TwoStageRecommender

    if recommender is None:
        recommender = TwoStageRecommender(retriever, predictor, candidates, popularity_weight)

    def rank(user_ids: np.ndarray) -> np.ndarray:
        return _pad([[m for m, _ in recommender.recommend(int(u), DEPTH, exclude_rated=True)] for u in user_ids])

    return rank


def evaluate_rankers(held_out: HeldOut, rankers: dict[str, Ranker], *, batch: int = 512,
                     progress: bool = True) -> dict[str, dict]:
    """``{name: {metrics..., "users", "seconds"}}`` of every ranker on the same held-out users."""
    from tqdm.auto import tqdm

    results = {}
    for name, rank in rankers.items():
        start = time.perf_counter()
        parts = []
        with tqdm(total=len(held_out.users), desc=name, unit="users", disable=not progress) as bar:
            for i in range(0, len(held_out.users), batch):
                parts.append(rank(held_out.users[i:i + batch]))
                bar.update(len(parts[-1]))
        ranked = np.concatenate(parts)
        results[name] = {**ranking_metrics(ranked, held_out.relevant), "users": int(len(held_out.users)),
                         "seconds": round(time.perf_counter() - start, 3)}
        logger.info("%s: %s", name, {k: round(v, 4) for k, v in results[name].items() if "@" in k})
    return results

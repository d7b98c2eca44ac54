"""Retrieval through the saved workflow: a two-tower model's item index over every movie, and two-stage ranking.

``Retriever.load(etl_dir, model_dir)`` loads a trained two-tower model with ``pipeline.inference.Predictor``
(checksums, the ETL run, the schema fingerprint and the feature cache are checked as for any model), runs
the candidate tower once over every movie the saved workflow knows (``Predictor.candidate_items``) into an
``ItemIndex``, and the query tower once over every known user. A request for a known user is then one row
lookup and one index search; an unseen user goes through the workflow (its out-of-vocabulary rows) and the
query tower. ``two_stage_recommend`` ranks the retrieved candidates with a ranking model's ``Predictor``
(through its request validation and feature path); ``TwoStageRecommender`` answers the same per request with
one index search and one compiled ranking call of fixed shape (what ``serve --retrieval`` uses).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from pipeline.errors import ArtifactError
from pipeline.retrieval.index import BruteForceIndex, ItemIndex

logger = logging.getLogger(__name__)

USER, ITEM = "userId", "movieId"  # the request columns (as in Predictor.recommend)
TOWER_BATCH = 65_536  # rows per tower call when embedding the catalog or every user
DEFAULT_CANDIDATES = 200  # two-stage: movies retrieved for the ranker


def known_ids(workflow, key: str) -> np.ndarray:
    """Raw ids of ``key`` the saved workflow knows (sorted): the inference package's helper."""
    try:
        from pipeline.inference import known_ids as known
    except ImportError:  # pipeline.inference before it became a package
        from pipeline.inference import _known_ids as known
    return known(workflow, key)


def _embed(tower: Callable, arrays: dict[str, np.ndarray], rows: int) -> np.ndarray:
    """``tower`` over ``arrays`` in batches of ``TOWER_BATCH`` rows -> ``(rows, dim)`` float32."""
    out = []
    for start in range(0, rows, TOWER_BATCH):
        batch = {name: a[start:start + TOWER_BATCH] for name, a in arrays.items()}
        out.append(np.asarray(tower(batch), dtype=np.float32))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


class Retriever:
    """Top-k movies for a user from a two-tower model, over every movie of the saved workflow.

    Attributes:
        predictor: the two-tower model's ``Predictor`` (features of raw ids through the saved workflow).
        index: the ``ItemIndex`` of the movies' candidate vectors (ids: raw movieIds, sorted).
        item_codes: ``(n_movies,)`` each index row's encoded movieId (cold movies share the OOV code).

    Args:
        predictor, index, item_codes: as above; users, user_codes, user_vectors: the known raw userIds (sorted),
            their encoded ids and query vectors (``Retriever.load`` computes them all).

    Example:
        >>> retriever = Retriever.load("data/synthetic/etl", "data/synthetic/models/two_tower")  # doctest: +SKIP
        >>> retriever.retrieve(7, k=3, exclude_rated=True)  # doctest: +SKIP
        [(2858, 0.71), (1196, 0.69), (260, 0.68)]
    """

    def __init__(self, predictor, index: ItemIndex, item_codes: np.ndarray, users: np.ndarray,
                 user_codes: np.ndarray, user_vectors: np.ndarray):
        self.predictor = predictor
        self.model = predictor.model
        self.index = index
        self.item_codes = np.asarray(item_codes, dtype=np.int64)
        self.users = users  # sorted raw userIds with a precomputed query vector
        self.user_codes = user_codes
        self.user_vectors = user_vectors
        # encoded movieId -> index row; movies rated in training always have their own code (Categorify's
        # vocabulary is the training split), so the OOV code shared by cold movies is never looked up
        self._row_of_code = np.full(int(self.item_codes.max(initial=0)) + 1, -1, dtype=np.int64)
        self._row_of_code[self.item_codes[::-1]] = np.arange(len(self.item_codes))[::-1]
        self._lock = threading.Lock()

    @classmethod
    def load(cls, etl_dir: str | Path, model_dir: str | Path, *, index_type: type[ItemIndex] = BruteForceIndex,
             feature_cache: bool = True) -> "Retriever":
        """Load a two-tower model dir with the workflow of ``etl_dir``; embed every movie and known user."""
        from pipeline.inference import Predictor
        from pipeline.models import TwoTower

        predictor = Predictor.load(etl_dir, model_dir, feature_cache=feature_cache)
        model = predictor.model
        if not isinstance(model, TwoTower):
            raise ArtifactError(f"{model_dir} holds a {type(model).__name__} ({getattr(model, 'name', '?')}), not a "
                                "two-tower model: train one with `python -m pipeline train --model two-tower`")
        items = predictor.candidate_items
        users = predictor.cache.keys[USER] if predictor.cache is not None else known_ids(predictor.workflow, USER)
        item_arrays = predictor.features(pd.DataFrame({USER: np.full(len(items), users[0]), ITEM: items}))
        index = index_type(items, _embed(model.index_candidate_vectors, item_arrays, len(items)))
        user_arrays = predictor.features(pd.DataFrame({USER: users, ITEM: np.full(len(users), items[0])}))
        user_vectors = _embed(model.index_query_vectors, user_arrays, len(users))
        logger.info("retrieval index: %d movies x %d dims (%s), %d users", len(index), index.dim,
                    type(index).__name__, len(users))
        return cls(predictor, index, item_arrays[ITEM].ravel(), users, user_arrays[USER].ravel(), user_vectors)

    # ---- queries --------------------------------------------------------------------------------
    def queries(self, user_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(vectors (n, dim), encoded user ids (n,))`` for raw ``user_ids``; unseen users through the workflow."""
        user_ids = np.asarray(user_ids, dtype=np.int64).ravel()
        pos = np.minimum(np.searchsorted(self.users, user_ids), len(self.users) - 1)
        known = self.users[pos] == user_ids
        vectors = self.user_vectors[pos].copy()
        codes = self.user_codes[pos].astype(np.int64)
        if not known.all():
            unseen = np.flatnonzero(~known)
            frame = pd.DataFrame({USER: user_ids[unseen], ITEM: np.full(len(unseen), self.index.ids[0])})
            arrays = self.predictor.features(frame)
            with self._lock:
                vectors[unseen] = _embed(self.model.index_query_vectors, arrays, len(unseen))
            codes[unseen] = np.ravel(arrays[USER])
        return vectors, codes

    def rated_rows(self, encoded_user: int) -> np.ndarray:
        """Index rows of the movies the (encoded) user rated in the training split."""
        codes = self.predictor.rated_codes(int(encoded_user))
        codes = codes[codes < len(self._row_of_code)]
        rows = self._row_of_code[codes]
        return rows[rows >= 0]

    def retrieve_many(self, user_ids: np.ndarray, k: int, exclude_rated: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``(movieIds, scores)`` each ``(n_users, min(k, n_movies))``, best first (padding: -1, -inf)."""
        vectors, codes = self.queries(user_ids)
        exclude = [self.rated_rows(c) for c in codes] if exclude_rated else None
        return self.index.search(vectors, k, exclude)

    def retrieve(self, user_id: int, k: int = 10, exclude_rated: bool = False) -> list[tuple[int, float]]:
        """Top ``k`` ``(movieId, score)`` for one raw ``user_id`` (as ``Predictor.recommend`` answers); the score is
        the model's pair score (``TwoTower``: the cosine, or the logit with a movie bias / popularity prior)."""
        ids, scores = self.retrieve_many(np.array([user_id]), k, exclude_rated)
        return [(int(m), float(s)) for m, s in zip(ids[0], scores[0]) if m >= 0]


def two_stage_recommend(retriever: Retriever, ranker, user_id: int, k: int = 10, *,
                        candidates: int = DEFAULT_CANDIDATES, exclude_rated: bool = False,
                        popularity_weight: float = 0.0, log_popularity: np.ndarray | None = None,
                        retrieval_weight: float = 0.0) -> list[tuple[int, float]]:
    """Top ``k`` ``(movieId, score)``: ``candidates`` movies retrieved by the two-tower model, scored by the
    ranking model's ``Predictor`` (through the saved workflow), best first; ties broken by movieId.

    The score is the ranker's; with a ``popularity_weight`` or a ``retrieval_weight`` it is ``log(ranker score) +
    popularity_weight * log(1 + training ratings) + retrieval_weight * the two-tower's score``
    (``pipeline.retrieval.popularity``; ``log_popularity``: per index row, computed from the training split when
    not given). ``ArtifactError`` if the ranker gives a candidate a non-finite score.
    """
    ids, retrieval = retriever.retrieve_many(np.array([user_id]), max(int(k), int(candidates)), exclude_rated)
    order = np.argsort(ids[0][ids[0] >= 0])
    movies, retrieval = ids[0][ids[0] >= 0][order], retrieval[0][ids[0] >= 0][order]
    if not len(movies):
        return []
    frame = pd.DataFrame({USER: np.full(len(movies), user_id, dtype=np.int64), ITEM: movies})
    scores = ranker.score_inputs(ranker.features(frame))
    bad = np.flatnonzero(~np.isfinite(scores))
    if len(bad):
        raise ArtifactError(f"the model in {ranker.model_dir} gave non-finite scores to {len(bad)} of {len(movies)} "
                            f"candidates for user {user_id} (first: movieId {int(movies[bad[0]])})")
    if popularity_weight or retrieval_weight:
        from pipeline.retrieval.popularity import combined_score, training_log_popularity

        if log_popularity is None:
            log_popularity = training_log_popularity(retriever) if popularity_weight else np.zeros(len(retriever.index))
        scores = combined_score(scores, log_popularity[np.searchsorted(retriever.index.ids, movies)],
                                popularity_weight, retrieval, retrieval_weight)
    top = np.argsort(-scores, kind="stable")[:int(k)]  # movies are sorted: a tie goes to the lower movieId
    return [(int(movies[i]), float(scores[i])) for i in top]


class TwoStageRecommender:
    """``two_stage_recommend`` for serving: the same answers, at a fixed cost per request.

    At construction the ranker's feature tables (its ``FeatureCache``: one row per known user and per known
    movie) go into a ``tf.function`` with a fixed input signature, ``(user row, candidates movie rows)``, that
    gathers the features and runs the ranking model in one call (traced once; no pandas, no per-request
    input conversion, no retracing for another candidate count). A request for a known user is then a row
    lookup, one index search (``exclude_rated`` as index rows) and that call. Unseen users, ``k`` above
    ``candidates``, a catalog with fewer allowed movies than ``candidates``, or a ranker without a feature
    cache take ``two_stage_recommend`` (the workflow's out-of-vocabulary rows).

    Args:
        retriever: the two-tower ``Retriever``.
        ranker: the ranking model's ``Predictor`` (same ETL output as the retriever).
        candidates: movies retrieved per request and ranked.
        popularity_weight, retrieval_weight: rank by ``log(ranker score) + popularity_weight * log(1 + training
            ratings) + retrieval_weight * the two-tower's score`` (``pipeline.retrieval.popularity``; both 0: the
            ranker's score alone). The ranker scores ``P(like | rated)``; the popularity term brings in how likely
            the movie is to be rated at all, the retrieval score the two-tower's own estimate.

    Example:
        >>> recommender = TwoStageRecommender(retriever, ranker, candidates=200)  # doctest: +SKIP
        >>> recommender.recommend(7, k=3, exclude_rated=True)  # doctest: +SKIP
        [(2858, 0.93), (1196, 0.91), (260, 0.90)]
    """

    def __init__(self, retriever: Retriever, ranker, candidates: int = DEFAULT_CANDIDATES,
                 popularity_weight: float = 0.0, retrieval_weight: float = 0.0):
        if int(candidates) < 1:
            raise ValueError(f"candidates must be positive, got {candidates}")
        self.retriever = retriever
        self.ranker = ranker
        self.candidates = min(int(candidates), len(retriever.index))
        self._log_popularity = None
        self.popularity_weight = popularity_weight
        self.retrieval_weight = retrieval_weight
        self._score = self._compile()

    @property
    def retrieval_weight(self) -> float:
        """The weight of the two-tower's score in the two-stage score (0: left out)."""
        return self._retrieval_weight

    @retrieval_weight.setter
    def retrieval_weight(self, weight: float) -> None:
        if not np.isfinite(weight):
            raise ValueError(f"retrieval_weight must be a finite number, got {weight}")
        self._retrieval_weight = float(weight)

    @property
    def popularity_weight(self) -> float:
        """The weight of ``log(1 + training ratings)`` in the two-stage score (0: the ranker's score alone)."""
        return self._popularity_weight

    @popularity_weight.setter
    def popularity_weight(self, weight: float) -> None:
        if not np.isfinite(weight):
            raise ValueError(f"popularity_weight must be a finite number, got {weight}")
        self._popularity_weight = float(weight)
        if self._popularity_weight:
            self.log_popularity  # read now (at start-up), not by the first request  # noqa: B018

    @property
    def log_popularity(self) -> np.ndarray:
        """``log(1 + training ratings)`` per index row (``pipeline.retrieval.popularity``), read once."""
        if self._log_popularity is None:
            from pipeline.retrieval.popularity import training_log_popularity

            self._log_popularity = training_log_popularity(self.retriever)
        return self._log_popularity

    def score_rows(self, user_id: int, rows: np.ndarray) -> np.ndarray:
        """The ranker's scores ``(len(rows),)`` of index ``rows`` (at most ``candidates``) for a known raw
        ``user_id``, by the compiled call."""
        row = int(np.searchsorted(self._users, int(user_id)))
        if row >= len(self._users) or self._users[row] != int(user_id):
            raise ValueError(f"user {user_id} is not in the ranker's feature cache")
        padded = np.zeros(self.candidates, np.int64)
        padded[:len(rows)] = self._movie_row[rows]
        return self._score(np.int64(row), padded).numpy()[:len(rows)]

    @property
    def compiled(self) -> bool:
        """Whether known users are ranked by the compiled call (else every request takes ``two_stage_recommend``)."""
        return self._score is not None

    def _compile(self):
        import tensorflow as tf

        cache = getattr(self.ranker, "cache", None)
        if cache is None or set(cache.keys) != {USER, ITEM}:
            logger.info("two-stage: the ranker has no feature cache; every request goes through the workflow")
            return None
        movies = cache.keys[ITEM]
        pos = np.minimum(np.searchsorted(movies, self.retriever.index.ids), len(movies) - 1)
        if not np.array_equal(movies[pos], self.retriever.index.ids):
            logger.warning("two-stage: the ranker's movies differ from the retrieval index's; not compiled")
            return None
        self._movie_row = pos.astype(np.int64)  # index row -> the ranker's movie table row
        self._users = cache.keys[USER]
        tables = {}
        for key, table in cache.tables.items():
            for name, values in table.items():
                if name in {i.name for i in self.ranker.inputs}:
                    tables[name] = (key, tf.Variable(values, trainable=False, name=f"{name}_table"))
        self._tables = tables  # the variables live as long as the function
        model, target, n = self.ranker.model, self.ranker.target, self.candidates

        @tf.function(input_signature=[tf.TensorSpec([], tf.int64), tf.TensorSpec([n], tf.int64)])
        def score(user_row, movie_rows):
            inputs = {}
            for name, (key, table) in tables.items():
                if key == USER:  # one user: its row repeated for every candidate
                    row = tf.gather(table, user_row)
                    inputs[name] = tf.tile(tf.expand_dims(row, 0), [n] + [1] * len(row.shape))
                else:
                    inputs[name] = tf.gather(table, movie_rows)
            out = model(inputs, training=False)
            if isinstance(out, dict):
                out = out[target] if target in out else next(iter(out.values()))
            elif isinstance(out, (list, tuple)):
                out = out[0]
            return tf.reshape(tf.cast(out, tf.float32), [-1])

        return score.get_concrete_function()

    def recommend(self, user_id: int, k: int = 10, exclude_rated: bool = False) -> list[tuple[int, float]]:
        """Top ``k`` ``(movieId, score)`` as ``two_stage_recommend`` answers them."""
        r = self.retriever
        if self._score is None or int(k) > self.candidates:
            return self._reference(user_id, k, exclude_rated)
        user = int(user_id)
        at = int(np.searchsorted(r.users, user))
        row = int(np.searchsorted(self._users, user))
        if at >= len(r.users) or r.users[at] != user or row >= len(self._users) or self._users[row] != user:
            return self._reference(user_id, k, exclude_rated)  # unseen: its features come from the workflow
        exclude = [r.rated_rows(int(r.user_codes[at]))] if exclude_rated else None
        rows, retrieval = r.index.search_rows(r.user_vectors[at:at + 1], self.candidates, exclude)
        rows, retrieval = rows[0], retrieval[0]
        if rows[-1] < 0:  # fewer allowed movies than candidates
            return self._reference(user_id, k, exclude_rated)
        order = np.argsort(rows)  # index rows are in movieId order: a tie goes to the lower movieId
        rows, retrieval = rows[order], retrieval[order]
        scores = self._score(np.int64(row), self._movie_row[rows]).numpy()
        if not np.isfinite(scores).all():
            bad = np.flatnonzero(~np.isfinite(scores))
            raise ArtifactError(f"the model in {self.ranker.model_dir} gave non-finite scores to {len(bad)} of "
                                f"{len(rows)} candidates for user {user} (first: movieId "
                                f"{int(r.index.ids[rows[bad[0]]])})")
        if self.popularity_weight or self.retrieval_weight:
            from pipeline.retrieval.popularity import combined_score

            log_popularity = self.log_popularity[rows] if self.popularity_weight else None
            scores = combined_score(scores, log_popularity, self.popularity_weight, retrieval, self.retrieval_weight)
        top = np.argsort(-scores, kind="stable")[:int(k)]
        return [(int(r.index.ids[rows[i]]), float(scores[i])) for i in top]

    def _reference(self, user_id: int, k: int, exclude_rated: bool) -> list[tuple[int, float]]:
        return two_stage_recommend(self.retriever, self.ranker, user_id, k, candidates=self.candidates,
                                   exclude_rated=exclude_rated, popularity_weight=self.popularity_weight,
                                   log_popularity=self.log_popularity if self.popularity_weight else None,
                                   retrieval_weight=self.retrieval_weight)

"""``Predictor``: scores raw ``(userId, movieId)`` rows with a saved workflow + model pair.

Request frames are validated (``request_ids``), transformed in-process by merlin's ``LocalExecutor`` through
the serving graph (no Dask graph per request), assembled as the training loader formats batches and fed to
the model; known ids skip the graph through the ``FeatureCache``. Unseen users or movies go through the graph
and land on Categorify's out-of-vocabulary rows.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.errors import ArtifactError, DataError
from pipeline.inference.artifacts import REQUEST_DTYPE, Artifacts, known_ids, load_artifacts, rated_by_user, versions
from pipeline.inference.cache import FeatureCache
from pipeline.inference.features import FeatureAssembler, ModelInput, model_inputs, request_ids

logger = logging.getLogger(__name__)


class Predictor:
    """Scores raw ``(userId, movieId)`` rows with a saved workflow + model pair.

    Build it with ``Predictor.load(etl_dir, model_dir)``. ``predict(df)`` returns one float32 score
    (P(rating > 3) for the default binary target) per row of ``df``, in order; ``recommend(user_id, k)``
    ranks every known movie for one user. Thread-safe: calls are serialised by a lock (the HTTP service
    batches concurrent requests before they reach the predictor).

    Args:
        artifacts: the verified workflow + model pair (``load_artifacts``).
        inputs: the model's inputs (``model_inputs``).
        target: the scored target (the model's first head).
        metadata: what ``/metadata`` reports (built by ``load``).

    Example:
        >>> predictor = Predictor.load("data/synthetic/etl", "data/synthetic/models/dlrm")  # doctest: +SKIP
        >>> predictor.predict(pd.DataFrame({"userId": [1, 2], "movieId": [10, 20]}))  # doctest: +SKIP
        array([0.71, 0.43], dtype=float32)
    """

    def __init__(self, artifacts: Artifacts, inputs: list[ModelInput], target: str, metadata: dict[str, Any]):
        from merlin.dag.executors import LocalExecutor

        self.artifacts = artifacts
        self.workflow = artifacts.workflow
        self.serving = artifacts.serving
        self.model = artifacts.model
        self.etl_dir: Path = artifacts.etl_dir
        self.model_dir: Path = artifacts.model_dir
        self.inputs = list(inputs)
        self.assembler = FeatureAssembler(self.inputs)
        self.target = target
        self.metadata = metadata
        self.request_columns: list[str] = list(self.serving.input_schema.column_names)
        # what features() returns: the model inputs plus the encoded request ids (recommend, exclude_rated)
        produced = self.serving.output_schema.column_names
        self.output_names = self.assembler.names + [c for c in self.request_columns if c in produced]
        self._executor = LocalExecutor()
        self._lock = threading.RLock()
        self._candidates: np.ndarray | None = None
        self._rated: dict[int, np.ndarray] | None = None
        self.cache: FeatureCache | None = None

    @classmethod
    def load(cls, etl_dir: str | Path, model_dir: str | Path, *, feature_cache: bool = True) -> "Predictor":
        """Verify and load ``etl_dir/workflow`` and ``model_dir/model.keras`` (``load_artifacts``).

        ``feature_cache``: precompute the serving graph's per-user and per-movie outputs
        (``FeatureCache``, verified against the graph) so requests skip the graph for known ids.
        """
        from merlin.schema import Tags

        artifacts = load_artifacts(etl_dir, model_dir)
        inputs = model_inputs(artifacts.model, artifacts.trained_schema, artifacts.etl_dir)
        # The model's first head is its primary target (pipeline.train.default_targets puts binary first).
        binary = artifacts.trained_schema.select_by_tag(Tags.TARGET).select_by_tag(Tags.BINARY_CLASSIFICATION)
        target = (list(getattr(artifacts.model, "target_names", None) or []) or binary.column_names or ["score"])[0]
        predictor = cls(artifacts, inputs, target, _metadata(artifacts, inputs, target))
        logger.info("loaded workflow %s and model %s (%d features, target %s)",
                    artifacts.workflow_dir, artifacts.model_dir / "model.keras", len(inputs), target)
        if feature_cache:
            ids = {k: known_ids(predictor.workflow, k) for k in predictor.request_columns}
            predictor.cache = FeatureCache.build(predictor.transform, predictor.assembler, ids, predictor.output_names)
        predictor.metadata["feature_cache"] = predictor.cache is not None
        return predictor

    # ---- request validation ---------------------------------------------------------------

    def validate(self, df: pd.DataFrame) -> pd.DataFrame:
        """``df`` restricted to the request columns as int64; ``DataError`` naming a missing, extra or bad field."""
        if not isinstance(df, pd.DataFrame):
            raise DataError(f"expected a pandas DataFrame of {self.request_columns}, got {type(df).__name__}")
        missing = [c for c in self.request_columns if c not in df.columns]
        if missing:
            raise DataError(f"missing field(s) {missing}: a request needs {self.request_columns}")
        extra = [c for c in df.columns if c not in self.request_columns]
        if extra:
            raise DataError(f"unexpected field(s) {extra}: a request has exactly {self.request_columns}")
        out = {}
        for name in self.request_columns:
            out[name] = request_ids(df[name], name)
        return pd.DataFrame(out)

    # ---- scoring --------------------------------------------------------------------------

    def transform(self, df: pd.DataFrame) -> pd.DataFrame:
        """Raw request rows -> the serving graph's output columns (one row per input row, same order)."""
        df = self.validate(df)
        if not len(df):
            return pd.DataFrame({i.name: pd.Series([], dtype=i.dtype) for i in self.inputs})
        with self._lock:
            # merlin's in-process executor on the pandas frame: no Dask graph per request
            out = self._executor.transform(df, self.serving.output_node)
        if len(out) != len(df):
            raise ArtifactError(f"the serving workflow returned {len(out)} rows for {len(df)} request rows")
        return out

    def model_inputs(self, transformed: pd.DataFrame) -> dict[str, np.ndarray]:
        """Transformed rows -> the model's input arrays: ``(rows, 1)``, or ``(rows, width)`` for lists."""
        return self.assembler.arrays(transformed)

    def features(self, df: pd.DataFrame) -> dict[str, np.ndarray]:
        """Raw request rows -> model input arrays plus the encoded request columns (same order).

        Known ids come from the ``FeatureCache`` when there is one, the rest from the serving graph.
        """
        df = self.validate(df)
        names = self.output_names
        if not len(df):
            return {n: np.zeros((0,), dtype=np.int64) for n in names}
        if self.cache is None:
            return self.assembler.arrays(self.transform(df), names)
        arrays, found = self.cache.lookup(df)
        if not found.all():
            missing = np.flatnonzero(~found)
            computed = self.assembler.arrays(self.transform(df.iloc[missing].reset_index(drop=True)), names)
            for name in names:
                arrays[name] = arrays[name].copy()
                arrays[name][missing] = computed[name]
        return arrays

    def score_inputs(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """Model inputs -> float32 scores of shape ``(rows,)``."""
        arrays = {i.name: arrays[i.name] for i in self.inputs}
        with self._lock:
            out = self.model.predict_on_batch(arrays)
        if isinstance(out, dict):
            out = out[self.target] if self.target in out else next(iter(out.values()))
        elif isinstance(out, (list, tuple)):
            out = out[0]
        return np.asarray(out, dtype=np.float32).reshape(-1)

    def predict(self, df: pd.DataFrame) -> np.ndarray:
        """Scores for raw rows ``df`` (columns exactly ``request_columns``): float32, shape ``(len(df),)``."""
        arrays = self.features(df)
        if not len(df):
            return np.zeros(0, dtype=np.float32)
        return self.score_inputs(arrays)

    # ---- recommendation -------------------------------------------------------------------

    @property
    def candidate_items(self) -> np.ndarray:
        """Every movieId the workflow knows (its movies side table, else Categorify's vocabulary), sorted."""
        if self._candidates is None:
            self._candidates = known_ids(self.workflow, "movieId")
        return self._candidates

    def recommend(self, user_id: int, k: int = 10, exclude_rated: bool = False) -> list[tuple[int, float]]:
        """Top ``k`` ``(movieId, score)`` for ``user_id`` over every known movie, scored in one batch.

        ``exclude_rated`` drops the movies the user rated in the training split. Ties are broken
        by movieId, so the answer is deterministic. ``ArtifactError`` if the model gives any movie a
        non-finite score (a broken model must not answer with a shorter list).
        """
        items = self.candidate_items
        frame = pd.DataFrame({"userId": np.full(len(items), user_id, dtype=REQUEST_DTYPE), "movieId": items})
        arrays = self.features(frame)
        scores = self.score_inputs(arrays)
        bad = np.flatnonzero(~np.isfinite(scores))
        if len(bad):
            raise ArtifactError(f"the model in {self.model_dir} gave non-finite scores to {len(bad)} of {len(items)} "
                                f"movies for user {user_id} (first: movieId {int(items[bad[0]])})")
        if exclude_rated:
            rated = self.rated_codes(int(np.ravel(arrays["userId"])[0]))
            if len(rated):
                scores = np.where(np.isin(np.ravel(arrays["movieId"]), rated), -np.inf, scores)
        k = max(0, min(int(k), int(np.isfinite(scores).sum())))
        if not k:
            return []
        # Ties broken by movieId over the whole catalog (movies without ratings share the OOV rows, so
        # equal scores are common): every movie scoring at least the k-th best score, in movieId order
        # (``items`` is sorted), stably sorted by score. argpartition alone picks arbitrary members of
        # a tie at the k boundary.
        kth = np.partition(-scores, k - 1)[k - 1]
        candidates = np.flatnonzero(-scores <= kth)
        top = candidates[np.argsort(-scores[candidates], kind="stable")[:k]]
        return [(int(items[i]), float(scores[i])) for i in top]

    def rated_codes(self, encoded_user: int) -> np.ndarray:
        """Encoded movieIds the (encoded) user rated in the processed training split; empty if none."""
        if self._rated is None:
            with self._lock:
                if self._rated is None:
                    self._rated = rated_by_user(self.etl_dir / "train")
        return self._rated.get(encoded_user, np.zeros(0, dtype=np.int64))


def _metadata(artifacts: Artifacts, inputs: list[ModelInput], target: str) -> dict[str, Any]:
    """What ``/metadata`` reports about a loaded pair."""
    from pipeline.inference.artifacts import read_json

    features = artifacts.trained_schema.select_by_name([i.name for i in inputs])
    return {
        "model": {"dir": str(artifacts.model_dir), "file": "model.keras",
                  "name": getattr(artifacts.model, "name", None), "config": artifacts.config,
                  "metrics": artifacts.metrics},
        "workflow": {"dir": str(artifacts.workflow_dir),
                     "request_columns": list(artifacts.serving.input_schema.column_names),
                     "targets_removed": artifacts.targets, **read_json(artifacts.workflow_dir / "metadata.json")},
        "schema": {c.name: {"dtype": str(c.dtype.to_numpy), "tags": sorted(str(t.value) for t in c.tags),
                            "is_list": c.is_list} for c in features},
        "target": target,
        "versions": versions(),
    }

"""Scoring raw ``(userId, movieId)`` rows through the saved NVTabular workflow and the saved model.

``Predictor.load(etl_dir, model_dir)`` loads both artifacts once. Loading a workflow runs pickle, so
it is loaded only if its files match the sha256 manifest the ETL recorded (``pipeline.manifest``), and
the model only if its directory matches the manifest the train stage recorded. From the saved workflow it derives a
*serving graph*: a deep copy with the target inputs removed, so requests need no ``rating`` column,
while the loaded workflow stays exactly as saved. The side tables the workflow joins (users,
movies) travel inside it. Request frames are transformed in-process by merlin's ``LocalExecutor``
(no Dask graph per request), formatted as ``pipeline.loader.Loader`` formats training batches,
and fed to the model. ``FeatureCache`` precomputes the graph's output for every known user and
movie (verified against the graph at load), so known ids skip the graph.

Unseen users or movies go through the graph and land on Categorify's out-of-vocabulary rows. The
train stage's schema fingerprint must match the serving graph's output schema, else
``ArtifactError``.

The ``predict`` CLI stage streams a csv / parquet file of raw rows through the predictor in batches
and writes ``input columns + score`` as parquet, atomically.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd

from pipeline.errors import ArtifactError, DataError, UsageError
from pipeline.manifest import MANIFEST_NAME, verify_manifest, write_manifest  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

REQUEST_DTYPE = np.int64




# --------------------------------------------------------------------------------------------
# The serving graph
# --------------------------------------------------------------------------------------------


def serving_workflow(workflow, targets: list[str]):
    """A copy of ``workflow`` that computes every non-target output from request columns alone.

    ``targets`` are the output columns tagged TARGET. The raw inputs they come from (e.g. ``rating``)
    are removed from a deep copy of the graph with NVTabular's ``remove_inputs``, which also drops
    the target branches and target dependencies (the target encoding reads its target only while
    fitting). The copy matters: ``remove_inputs`` mutates nodes in place, and the loaded workflow
    must stay exactly as saved. Raises ``ArtifactError`` if a feature still needs a target.
    Returns an ``nvt.Workflow`` with its schemas computed.
    """
    import nvtabular as nvt

    mapping = workflow.graph.column_mapping
    features = [c for c in workflow.output_schema.column_names if c not in targets]
    feature_sources = {src for c in features for src in mapping.get(c, [c])}
    raw_targets = sorted({src for t in targets for src in mapping.get(t, [t])} - feature_sources)
    serving = copy.deepcopy(workflow)
    if raw_targets:
        serving.remove_inputs(raw_targets)
    still_needed = sorted(set(serving._input_columns()) & set(raw_targets))
    if still_needed:
        raise ArtifactError(
            f"the saved workflow needs target column(s) {still_needed} to compute its features: "
            "it cannot serve requests that carry no target"
        )
    produced = serving.output_schema.column_names
    lost = [c for c in features if c not in produced]
    if lost:
        raise ArtifactError(f"removing the target inputs {raw_targets} from the workflow also removed features {lost}")
    request_columns = serving._input_columns()
    serving = nvt.Workflow(serving.output_node)
    serving.fit_schema(workflow.input_schema.select_by_name(request_columns))
    return serving


def _read_schema(path: Path):
    from merlin.schema.io.tensorflow_metadata import TensorflowMetadata

    if not path.is_file():
        raise ArtifactError(f"{path} is missing (the schema the model was trained on)")
    return TensorflowMetadata.from_proto_text_file(str(path.parent), file_name=path.name).to_merlin_schema()


def _pad_lists(column: pd.Series, width: int, dtype) -> np.ndarray:
    """A list column as a ``(rows, width)`` array, padded with ``PAD_ID`` and cut at ``width``.

    The same layout ``pipeline.loader.Loader`` builds from ``__values`` / ``__offsets``.
    """
    from pipeline.loader import PAD_ID

    lengths = np.fromiter((len(v) for v in column), dtype=np.int64, count=len(column))
    out = np.full((len(column), width), PAD_ID, dtype=dtype)
    if lengths.sum():
        values = np.concatenate([np.asarray(v, dtype=dtype) for v in column if len(v)])
        rows = np.repeat(np.arange(len(column)), lengths)
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        cols = np.arange(len(values)) - starts
        inside = cols < width
        out[rows[inside], cols[inside]] = values[inside]
    return out


@dataclass
class _ModelInput:
    name: str
    dtype: np.dtype
    width: int | None  # columns that arrive as lists are padded / cut to this width


# --------------------------------------------------------------------------------------------
# Per-entity feature cache
# --------------------------------------------------------------------------------------------


class FeatureCache:
    """The serving graph's outputs for every known user and movie, looked up instead of recomputed.

    Every feature of the MovieLens workflow is a function of one request column: the user's
    (userId code, demographics, their encodings) or the movie's (movieId code, title, genres, its
    encoding). ``build`` runs the serving graph once over all known ids, finds which request column
    each feature follows (it must not change when the other ids change, checked against several
    reference ids), and verifies the lookup against the graph on random pairs: any difference, or a
    feature that follows no single column, and no cache is used. Ids outside the tables (unseen
    users / movies) always go through the graph. The cache holds ready model-input arrays, so a
    request costs a ``searchsorted`` and a gather per feature.
    """

    def __init__(self, keys: dict[str, np.ndarray], tables: dict[str, dict[str, np.ndarray]]):
        self.keys = keys  # request column -> sorted known raw ids
        self.tables = tables  # request column -> {output name -> array, one row per known id}

    @classmethod
    def build(cls, predictor: "Predictor", *, references: int = 4, checks: int = 1024, seed: int = 0) -> "FeatureCache | None":
        """The cache for ``predictor``, or ``None`` (logged) if its features do not split by request column."""
        rng = np.random.default_rng(seed)
        columns = predictor.request_columns
        keys = {k: _known_ids(predictor.workflow, k) for k in columns}
        wanted = [i.name for i in predictor.inputs] + [c for c in columns if c in predictor.serving.output_schema.column_names]
        owner: dict[str, str] = {}
        tables: dict[str, dict[str, np.ndarray]] = {}
        for key in columns:
            ids = keys[key]
            others = {k: rng.choice(keys[k], size=min(references, len(keys[k])), replace=False) for k in columns if k != key}
            n_refs = max((len(v) for v in others.values()), default=1)
            frame = pd.DataFrame({key: np.tile(ids, n_refs),
                                  **{k: np.repeat(v[np.arange(n_refs) % len(v)], len(ids)) for k, v in others.items()}})
            arrays = predictor._arrays(predictor.transform(frame[columns]), wanted)
            blocks = {name: np.split(a, n_refs) for name, a in arrays.items()}
            tables[key] = {}
            for name, parts in blocks.items():
                if all(np.array_equal(parts[0], p) for p in parts[1:]):
                    owner.setdefault(name, key)
                    if owner[name] == key:
                        tables[key][name] = parts[0]
        free = [n for n in wanted if n not in owner]
        if free:
            logger.warning("no feature cache: %s depend on more than one request column", free)
            return None
        for key, table in tables.items():
            for name, values in table.items():
                if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
                    # the model may turn a NaN input into a finite score: catch it where it is made
                    raise ArtifactError(f"the workflow computes non-finite {name!r} for some known {key} values: "
                                        "re-run the ETL (its statistics are broken)")
        cache = cls(keys, tables)
        sample = pd.DataFrame({k: rng.choice(keys[k], size=checks) for k in columns})
        expected = predictor._arrays(predictor.transform(sample), wanted)
        got, found = cache.lookup(sample)
        bad = [n for n in wanted if not np.array_equal(expected[n], got[n])]
        if not found.all() or bad:
            logger.warning("no feature cache: looked-up features %s differ from the workflow's", bad)
            return None
        logger.info("feature cache: %s", {k: len(v) for k, v in keys.items()})
        return cache

    def lookup(self, df: pd.DataFrame) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """``(arrays, found)``: cached outputs for the rows of ``df`` whose ids are all known (``found``);
        the other rows hold arbitrary values and must be computed by the graph."""
        found = np.ones(len(df), dtype=bool)
        positions = {}
        for key, ids in self.keys.items():
            values = df[key].to_numpy()
            pos = np.searchsorted(ids, values)
            pos[pos >= len(ids)] = 0
            found &= ids[pos] == values
            positions[key] = pos
        arrays = {}
        for key, table in self.tables.items():
            for name, values in table.items():
                arrays[name] = values[positions[key]]
        return arrays, found


# --------------------------------------------------------------------------------------------
# Predictor
# --------------------------------------------------------------------------------------------


class Predictor:
    """Scores raw ``(userId, movieId)`` rows with a saved workflow + model pair.

    Build it with ``Predictor.load(etl_dir, model_dir)``. ``predict(df)`` returns one float32
    score (P(rating > 3) for the default binary target) per row of ``df``, in order;
    ``recommend(user_id, k)`` ranks every known movie for one user.
    Thread-safe: calls are serialised by a lock (the HTTP service batches concurrent requests
    before they reach the predictor).
    """

    def __init__(self, *, workflow, serving, model, inputs: list[_ModelInput], target: str,
                 etl_dir: Path, model_dir: Path, metadata: dict[str, Any]):
        from merlin.dag.executors import LocalExecutor

        self.workflow = workflow
        self.serving = serving
        self.model = model
        self.inputs = inputs
        self.target = target
        self.etl_dir = etl_dir
        self.model_dir = model_dir
        self.metadata = metadata
        self.request_columns: list[str] = list(serving.input_schema.column_names)
        self._executor = LocalExecutor()
        self._lock = threading.RLock()
        self._candidates: np.ndarray | None = None
        self._rated: dict[int, np.ndarray] | None = None
        self.cache: FeatureCache | None = None

    # ---- loading ---------------------------------------------------------------------------

    @classmethod
    def load(cls, etl_dir: str | Path, model_dir: str | Path, *, feature_cache: bool = True) -> "Predictor":
        """Verify checksums, load ``etl_dir/workflow`` and ``model_dir/model.keras``, check they match.

        ``feature_cache``: precompute the serving graph's per-user and per-movie outputs
        (``FeatureCache``, verified against the graph) so requests skip the graph for known ids.
        """
        import pipeline  # noqa: F401  (dask settings before nvtabular)
        import nvtabular as nvt
        from merlin.schema import Tags

        etl_dir, model_dir = Path(etl_dir), Path(model_dir)
        workflow_dir, model_file = etl_dir / "workflow", model_dir / "model.keras"
        for path in (workflow_dir, model_file):
            if not path.exists():
                raise ArtifactError(f"{path} is missing")
        verify_manifest(workflow_dir, required=("workflow.pkl",))
        verify_manifest(model_dir, required=("model.keras", "config.json"))
        config = _read_json(model_dir / "config.json")
        _check_run(etl_dir, model_dir, config)
        _check_metrics(model_dir)

        workflow = nvt.Workflow.load(str(workflow_dir))
        targets = workflow.output_schema.select_by_tag(Tags.TARGET).column_names
        serving = serving_workflow(workflow, targets)

        trained_schema = _read_schema(model_dir / "schema.pbtxt")
        _check_schema(serving.output_schema, trained_schema, config, model_dir)

        from pipeline.models import load_model  # registers our layers with Keras

        try:
            model = load_model(str(model_file))
        except Exception as err:  # keras raises many types for a bad file
            raise ArtifactError(f"cannot load the model {model_file}: {err}") from err

        inputs = _model_inputs(model, trained_schema, etl_dir)
        features = trained_schema.select_by_name([i.name for i in inputs])
        # The model's first head is its primary target (pipeline.train.default_targets puts binary first).
        target = (list(getattr(model, "target_names", None) or [])
                  or trained_schema.select_by_tag(Tags.TARGET).select_by_tag(Tags.BINARY_CLASSIFICATION).column_names
                  or ["score"])[0]

        metadata = {
            "model": {"dir": str(model_dir), "file": "model.keras", "name": getattr(model, "name", None),
                      "config": config, "metrics": _read_json(model_dir / "metrics.json")},
            "workflow": {"dir": str(workflow_dir), "request_columns": list(serving.input_schema.column_names),
                         "targets_removed": targets, **_read_json(workflow_dir / "metadata.json")},
            "schema": {c.name: {"dtype": str(c.dtype.to_numpy), "tags": sorted(str(t.value) for t in c.tags),
                                "is_list": c.is_list} for c in features},
            "target": target,
            "versions": _versions(),
        }
        logger.info("loaded workflow %s and model %s (%d features, target %s)",
                    workflow_dir, model_file, len(inputs), target)
        predictor = cls(workflow=workflow, serving=serving, model=model, inputs=inputs, target=target,
                        etl_dir=etl_dir, model_dir=model_dir, metadata=metadata)
        if feature_cache:
            predictor.cache = FeatureCache.build(predictor)
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
        return self._arrays(transformed, [i.name for i in self.inputs])

    def _arrays(self, transformed: pd.DataFrame, names: list[str]) -> dict[str, np.ndarray]:
        specs = {i.name: i for i in self.inputs}
        arrays = {}
        for name in names:
            if name not in transformed.columns:
                raise ArtifactError(f"the serving workflow does not produce model input {name!r}")
            column = transformed[name]
            spec = specs.get(name)
            if spec is None:  # not a model input (an encoded request id): as produced
                arrays[name] = column.to_numpy()
            elif column.dtype == object:  # list column (whatever the schema says; the data decides)
                arrays[name] = _pad_lists(column, spec.width or _longest(column), spec.dtype)
            else:
                arrays[name] = column.to_numpy(dtype=spec.dtype).reshape(-1, 1)
        return arrays

    def features(self, df: pd.DataFrame) -> dict[str, np.ndarray]:
        """Raw request rows -> model input arrays plus the encoded request columns (same order).

        Known ids come from the ``FeatureCache`` when there is one, the rest from the serving graph.
        """
        df = self.validate(df)
        names = [i.name for i in self.inputs] + [c for c in self.request_columns
                                                 if c in self.serving.output_schema.column_names]
        if not len(df):
            return {n: np.zeros((0,), dtype=np.int64) for n in names}
        if self.cache is None:
            return self._arrays(self.transform(df), names)
        arrays, found = self.cache.lookup(df)
        if not found.all():
            missing = np.flatnonzero(~found)
            computed = self._arrays(self.transform(df.iloc[missing].reset_index(drop=True)), names)
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
            self._candidates = _known_ids(self.workflow, "movieId")
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
                    self._rated = _rated_by_user(self.etl_dir / "train")
        return self._rated.get(encoded_user, np.zeros(0, dtype=np.int64))


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ArtifactError(f"{path} is not valid JSON ({err})") from err


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("movielens-pipeline", "nvtabular", "merlin-core", "tensorflow-cpu", "keras", "pandas", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return out


def _schema_summary(schema) -> dict[str, tuple]:
    """What must agree between the workflow's output and the model's training schema."""
    out = {}
    for col in schema:
        sizes = col.properties.get("embedding_sizes") or {}
        out[col.name] = (str(col.dtype.to_numpy), col.is_list, sizes.get("cardinality"))
    return out


def _check_run(etl_dir: Path, model_dir: Path, config: dict) -> None:
    """``ArtifactError`` unless the model was trained on this very ETL run (``pipeline.etl.etl_run_id``).

    Two ETL runs of the same raw data with other seeds have the same schema but other splits and
    encodings; a model scores wrongly with the other's workflow. Models of earlier releases record
    no run and are checked by schema only.
    """
    trained_on = config.get("etl_run_id")
    if trained_on is None:
        logger.warning("%s records no ETL run: cannot check it belongs with %s", model_dir, etl_dir)
        return
    run = (_read_json(etl_dir / "workflow" / MANIFEST_NAME)).get("run_id")
    if run != trained_on:
        raise ArtifactError(
            f"the model in {model_dir} was trained on ETL run {trained_on[:12]} ({config.get('data_dir')}), "
            f"but {etl_dir} is ETL run {str(run)[:12] if run else '(unrecorded)'}: serve a model with the ETL "
            "output it was trained on, or retrain it on this one"
        )


def _check_metrics(model_dir: Path) -> None:
    """``ArtifactError`` if the model's recorded valid metrics are not finite (a diverged run)."""
    valid = _read_json(model_dir / "metrics.json").get("valid", {})
    bad = sorted(k for k, v in valid.items() if isinstance(v, (int, float)) and not np.isfinite(v))
    if bad:
        raise ArtifactError(f"the model in {model_dir} has non-finite valid metrics ({', '.join(bad)}): "
                            "it diverged in training; refusing to score with it")


def _check_schema(serving_schema, trained_schema, config: dict, model_dir: Path) -> None:
    """``ArtifactError`` unless the serving graph produces the features the model was trained on.

    Compares ``pipeline.train.schema_fingerprint`` of the serving graph's output with the one the
    train stage recorded in config.json, then (also for models without a recorded fingerprint)
    checks every feature of the training schema by name, dtype, list-ness and cardinality.
    """
    from merlin.schema import Tags

    from pipeline.train import schema_fingerprint

    recorded = config.get("schema_fingerprint")
    if recorded is not None:
        actual = schema_fingerprint(serving_schema)
        if actual != recorded:
            raise ArtifactError(
                f"the workflow's output schema (fingerprint {actual[:12]}) is not the schema the model in {model_dir} "
                f"was trained on (fingerprint {recorded[:12]}): the workflow and model do not belong together"
            )
    features = trained_schema.excluding_by_tag(Tags.TARGET)
    have = _schema_summary(serving_schema)
    for name, want in _schema_summary(features).items():
        if name not in have:
            raise ArtifactError(f"the model in {model_dir} needs feature {name!r}, which the workflow does not produce")
        if have[name] != want:
            raise ArtifactError(
                f"feature {name!r}: the workflow produces (dtype, is_list, cardinality) {have[name]} but the model "
                f"in {model_dir} was trained on {want}: the workflow and model do not belong together"
            )


def _model_inputs(model, trained_schema, etl_dir: Path) -> list[_ModelInput]:
    """Name, dtype and list width of every model input, from the model's own input record.

    ``pipeline.models.Model`` records the shapes it was built on (``input_signature``), which for a
    list column is the padded width the training loader used. Other Keras models fall back to the
    training schema and the loader's width rule on the train split.
    """
    from merlin.schema import Tags

    try:
        signature = model.input_signature()
    except (AttributeError, ValueError, TypeError):
        signature = None
    if signature:
        out = []
        for name, spec in signature.items():
            shape = list(spec.shape)
            width = int(shape[1]) if len(shape) > 1 and shape[1] is not None else None
            out.append(_ModelInput(name, np.dtype(spec.dtype.as_numpy_dtype), width))
        return out
    features = trained_schema.excluding_by_tag(Tags.TARGET)
    list_names = [c.name for c in features if c.is_list]
    widths = _list_widths(etl_dir, list_names) if list_names else {}
    return [_ModelInput(c.name, np.dtype(c.dtype.to_numpy), widths.get(c.name)) for c in features]


def _longest(column: pd.Series) -> int:
    return max(1, max((len(v) for v in column), default=1))


def _list_widths(etl_dir: Path, names: list[str]) -> dict[str, int]:
    """Fixed list widths exactly as the training loader computes them from the train split."""
    from merlin.io import Dataset

    from pipeline.loader import list_max_lengths

    train = etl_dir / "train"
    if not train.is_dir():
        raise ArtifactError(f"{train} is missing (needed for the list-column widths the model was trained with)")
    return list_max_lengths(Dataset(str(train), engine="parquet"), names)


def request_ids(col: pd.Series, name: str) -> np.ndarray:
    """One request column as int64 ids; ``DataError`` naming the first missing, non-integer or negative row.

    The id rule of every stage (the ETL's readers, ``predict``, ``serve``): ids are integers in
    ``[0, 2**63)``. Integer-valued floats (a csv column with a missing value is read as floats) pass.
    """
    if pd.api.types.is_bool_dtype(col.dtype):
        raise DataError(f"field {name!r} must hold integer ids, got dtype {col.dtype}")
    if pd.api.types.is_integer_dtype(col.dtype):
        if col.hasnans:  # nullable integer dtypes
            raise DataError(f"field {name!r} has a missing value at row {int(np.flatnonzero(col.isna())[0])}")
        values = col.to_numpy(dtype=REQUEST_DTYPE)
    elif pd.api.types.is_float_dtype(col.dtype):
        raw = col.to_numpy(dtype=np.float64)
        missing = np.flatnonzero(np.isnan(raw))
        if len(missing):
            raise DataError(f"field {name!r} has a missing value at row {int(missing[0])}")
        fractional = np.flatnonzero((raw != np.round(raw)) | (np.abs(raw) >= 2.0**63))
        if len(fractional):
            row = int(fractional[0])
            raise DataError(f"field {name!r} must hold integer ids (row {row}: {float(raw[row])!r})")
        values = raw.astype(REQUEST_DTYPE)
    elif col.dtype == object:  # python ints (e.g. from JSON)
        for i, value in enumerate(col):
            if value is None or (isinstance(value, float) and np.isnan(value)):
                raise DataError(f"field {name!r} has a missing value at row {i}")
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                raise DataError(f"field {name!r} must hold integer ids, got dtype object (row {i}: {value!r})")
            if not -(2**63) <= value < 2**63:
                raise DataError(f"field {name!r}: id {value} at row {i} does not fit in int64")
        values = col.to_numpy(dtype=REQUEST_DTYPE)
    else:
        raise DataError(f"field {name!r} must hold integer ids, got dtype {col.dtype}")
    negative = np.flatnonzero(values < 0)
    if len(negative):
        row = int(negative[0])
        raise DataError(f"field {name!r}: id {int(values[row])} at row {row} is negative (ids are >= 0)")
    return values


def _known_ids(workflow, key: str) -> np.ndarray:
    """Raw ids of ``key`` the workflow knows: its side tables joined on ``key``, else Categorify's vocabulary."""
    from merlin.dag import Graph, iter_nodes
    from nvtabular import ops

    nodes = list(iter_nodes([workflow.output_node]))
    ids = []
    for node in Graph.get_nodes_by_op_type(nodes, ops.JoinExternal):
        on = node.op.on if isinstance(node.op.on, list) else [node.op.on]
        if on == [key]:
            ids.append(np.asarray(node.op._ext[key]))
    if not ids:
        for node in Graph.get_nodes_by_op_type(nodes, ops.Categorify):
            path = node.op.categories.get(key)
            if path:
                vocab = pd.read_parquet(path)[key].dropna()
                ids.append(vocab.to_numpy())
    if not ids:
        raise ArtifactError(f"the workflow has neither a side table nor a vocabulary for {key!r}")
    return np.unique(np.concatenate(ids).astype(REQUEST_DTYPE))


def _rated_by_user(train_dir: Path) -> dict[int, np.ndarray]:
    """Encoded userId -> encoded movieIds rated in the processed train split."""
    import pyarrow.parquet as pq

    files = sorted(train_dir.glob("*.parquet"))
    if not files:
        raise ArtifactError(f"no parquet files in {train_dir}: cannot tell which movies a user rated")
    table = pd.concat([pq.read_table(f, columns=["userId", "movieId"]).to_pandas() for f in files])
    users, movies = table["userId"].to_numpy(), table["movieId"].to_numpy()
    order = np.argsort(users, kind="stable")
    users, movies = users[order], movies[order]
    keys, starts = np.unique(users, return_index=True)
    return {int(u): m for u, m in zip(keys, np.split(movies, starts[1:]))}


# --------------------------------------------------------------------------------------------
# batch predict over files
# --------------------------------------------------------------------------------------------


def iter_input_batches(path: Path, columns: list[str], batch_size: int) -> Iterator[pd.DataFrame]:
    """Frames of at most ``batch_size`` rows from a csv or parquet file, read incrementally (pyarrow)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    suffix = path.suffix.lower()
    if not path.is_file():
        raise DataError(f"input file {path} does not exist")
    if suffix in (".parquet", ".pq"):
        try:
            reader = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(f"{path} is not a readable parquet file ({err})") from err
        _check_input_columns(path, reader.schema_arrow.names, columns)
        for batch in reader.iter_batches(batch_size=batch_size):
            yield batch.to_pandas()
    elif suffix in (".csv", ".tsv", ".txt"):
        delimiter = "\t" if suffix == ".tsv" else ","
        try:
            reader = pacsv.open_csv(
                path,
                read_options=pacsv.ReadOptions(block_size=1 << 22),
                parse_options=pacsv.ParseOptions(delimiter=delimiter),
                convert_options=pacsv.ConvertOptions(column_types={c: pa.int64() for c in columns}),
            )
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(f"{path}: cannot read as csv ({err})") from err
        _check_input_columns(path, reader.schema.names, columns)
        pending: list[pd.DataFrame] = []
        size = 0
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                break
            except pa.ArrowInvalid as err:
                # pyarrow names the offending row and value (e.g. "In CSV column #0: ... 'abc'")
                raise DataError(f"{path}: {err}") from err
            pending.append(batch.to_pandas())
            size += batch.num_rows
            while size >= batch_size:
                frame = pd.concat(pending, ignore_index=True)
                yield frame.iloc[:batch_size].reset_index(drop=True)
                rest = frame.iloc[batch_size:].reset_index(drop=True)
                pending, size = [rest], len(rest)
        if size:
            yield pd.concat(pending, ignore_index=True)
    else:
        raise DataError(f"input file {path}: unsupported extension {path.suffix!r} (use .csv or .parquet)")


def _check_input_columns(path: Path, names: list[str], columns: list[str]) -> None:
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataError(f"{path} has no column(s) {missing} (it has {names}); predict needs {columns}")


PREDICTIONS_KEY = b"pipeline.stage"  # parquet metadata that marks a file as a predict output


def is_predictions_file(path: Path) -> bool:
    """Whether ``path`` is a parquet file written by ``predict_file`` (which a new run may replace)."""
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_schema(path).metadata or {}
    except Exception:  # not parquet at all
        return False
    return metadata.get(PREDICTIONS_KEY) == b"predict"


def check_predict_paths(input_path: Path, output_path: Path, etl_dir: Path | None = None,
                        model_dir: Path | None = None, overwrite: bool = False) -> None:
    """``UsageError`` unless ``output_path`` can be written without destroying anything (see
    ``pipeline.atomic.check_output``): not the input, not inside the ETL or model dir, not a directory, and
    an existing file only if it is a previous predict output (or ``overwrite``)."""
    from pipeline.atomic import check_output

    check_output(output_path, stage="predict", flag="--output", is_previous_output=is_predictions_file,
                 inputs=[("--input", input_path), ("--data", etl_dir), ("--model", model_dir)],
                 overwrite=overwrite, kind="file")


def predict_file(predictor: Predictor, input_path: str | Path, output_path: str | Path, *,
                 batch_size: int = 65_536, progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Score every row of ``input_path`` (csv / parquet with the request columns) into ``output_path``.

    The output parquet holds the input columns plus ``score``, in input order. It is written to a
    temporary sibling and renamed into place only when complete; an existing ``output_path`` is replaced
    only if it is a previous predict output (or with ``overwrite``). Non-finite scores stop the run with
    ``ArtifactError`` naming the rows. Returns a summary dict.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    from pipeline.atomic import atomic_file

    input_path, output_path = Path(input_path), Path(output_path)
    check_predict_paths(input_path, output_path, predictor.etl_dir, predictor.model_dir, overwrite)
    total = _count_rows(input_path)
    start = time.perf_counter()
    rows = 0
    writer = None
    with atomic_file(output_path) as tmp, tqdm(total=total, unit="rows", disable=not progress,
                                                desc="predict") as bar:
        try:
            for frame in iter_input_batches(input_path, predictor.request_columns, batch_size):
                try:
                    scores = predictor.predict(frame[predictor.request_columns])
                except DataError as err:
                    raise DataError(f"{input_path}, rows {rows}-{rows + len(frame) - 1}: {err}") from err
                bad = np.flatnonzero(~np.isfinite(scores))
                if len(bad):
                    raise ArtifactError(f"the model in {predictor.model_dir} gave non-finite scores ({scores[bad[0]]}) "
                                        f"to {len(bad)} rows of {input_path}, first row {rows + int(bad[0])}; "
                                        "nothing was written")
                frame = frame.assign(score=scores)
                table = _mark(pa.Table.from_pandas(frame, preserve_index=False))
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table)
                rows += len(frame)
                bar.update(len(frame))
            if writer is None:  # empty input: still an (empty) output with the right columns
                empty = pd.DataFrame({c: pd.Series([], dtype=REQUEST_DTYPE) for c in predictor.request_columns})
                pq.write_table(_mark(pa.Table.from_pandas(empty.assign(score=np.zeros(0, np.float32)),
                                                          preserve_index=False)), tmp)
        finally:
            if writer is not None:
                writer.close()
    seconds = time.perf_counter() - start
    return {"input": str(input_path), "output": str(output_path), "rows": rows, "seconds": round(seconds, 3),
            "rows_per_second": round(rows / seconds, 1) if seconds > 0 else None}


def _mark(table):
    """``table`` with the metadata that tells a later run this file is a predict output."""
    return table.replace_schema_metadata({**(table.schema.metadata or {}), PREDICTIONS_KEY: b"predict"})


def _count_rows(path: Path) -> int | None:
    if path.suffix.lower() in (".parquet", ".pq") and path.is_file():
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows
        except Exception:  # reported properly by iter_input_batches
            return None
    return None


# --------------------------------------------------------------------------------------------
# CLI: python -m pipeline predict
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path, help="ETL output dir (holds workflow/ and train/)")
    parser.add_argument("--model", required=True, type=Path, help="model dir written by `train`")
    parser.add_argument("--input", required=True, type=Path, help="csv or parquet with raw userId, movieId")
    parser.add_argument("--output", required=True, type=Path,
                        help="parquet: input columns + score; a previous predict output there is replaced")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --output even if it is not a previous predict output (never --input)")
    parser.add_argument("--batch-size", type=int, default=65_536, help="rows scored per batch (default 65536)")
    parser.add_argument("--no-feature-cache", action="store_true",
                        help="run every row through the serving graph instead of the per-user/movie feature cache")


def main(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be positive, got {args.batch_size}")
    # before the slow load: a bad --output is known at once
    check_predict_paths(args.input, args.output, args.data, args.model, args.overwrite)
    predictor = Predictor.load(args.data, args.model, feature_cache=not args.no_feature_cache)
    summary = predict_file(predictor, args.input, args.output, batch_size=args.batch_size, overwrite=args.overwrite)
    print(json.dumps(summary, indent=1))
    if summary["rows"] <= 20:  # a handful of example requests: show their scores
        print(pd.read_parquet(args.output).to_string(index=False))
    return 0

"""Raw-request export: one TF SavedModel from raw ``(userId, movieId)`` to the score, with no Python,
pipeline or NVTabular code needed to serve it (TF Serving, Triton's TensorFlow backend, ``tf.saved_model.load``).

Every output column of the MovieLens workflow is a function of the userId alone or of the movieId
alone (joins, Categorify, target encodings): that is what ``pipeline.inference.FeatureCache``
verifies and exploits. The export bakes those per-user and per-movie tables into the graph:

    userId  -> tf.lookup.StaticHashTable (raw id -> row) -> tf.gather, user feature table  \\
                                                                                          -> Keras model -> score
    movieId -> tf.lookup.StaticHashTable (raw id -> row) -> tf.gather, movie feature table /

An id missing from a table (an unseen user or movie) maps to one extra last row holding the
out-of-vocabulary features, which are computed by running unseen ids through the predictor's own
serving graph (and checked to be the same for several unseen ids). Negative ids are an error, as
in the predictor. The signature ``serving_default`` takes ``userId``, ``movieId`` (int64,
shape ``[None]``) and returns ``{"score": float32 [None]}``.

``export_raw_model`` writes it atomically and checks the written model against ``Predictor.predict``
before it lands. ``python -m pipeline export --data ETL_DIR --model MODEL_DIR [--out DIR]`` is the CLI
stage; the default output is ``MODEL_DIR/serving_raw/``, in which case the model directory's
manifest is verified first and re-written after, so ``Predictor.load`` still accepts the directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.config import add_renamed
from pipeline.errors import ArtifactError

if TYPE_CHECKING:
    from pipeline.inference import Predictor

logger = logging.getLogger(__name__)

EXPORT_DIR = "serving_raw"
EXPORT_INFO = "export.json"
# Largest difference to Predictor.predict the written model may show (float32 scores in [0, 1]).
TOLERANCE = 1e-6


def feature_tables(predictor: "Predictor") -> dict[str, dict[str, Any]]:
    """Per request column: its known raw ids and, for each model input it owns, the table of rows.

    Returns ``{column: {"ids": int64 (n,), "features": {input name: (n + 1, width) array}}}``; row ``n``
    of every table is the out-of-vocabulary row, what the serving graph gives any unseen id.
    Raises ``ArtifactError`` without a feature cache, or if unseen ids do not all share one row.
    """
    import pandas as pd

    cache = predictor.cache
    if cache is None:
        raise ArtifactError("the raw-request export needs the predictor's feature cache (every feature a function "
                            "of one request column), and this workflow + model has none")
    columns = list(predictor.request_columns)
    inputs = {i.name: i for i in predictor.inputs}
    owned = {name: key for key, table in cache.tables.items() for name in table if name in inputs}
    missing = sorted(set(inputs) - set(owned))
    if missing:
        raise ArtifactError(f"model inputs {missing} are in no per-column feature table: cannot export")

    # Several unseen ids per column: beyond the largest known id, far beyond it, and a gap inside the range.
    unseen = {key: _unseen_ids(cache.keys[key]) for key in columns}
    n = max(len(v) for v in unseen.values())
    frame = pd.DataFrame({key: np.resize(v, n) for key, v in unseen.items()})
    oov = predictor.features(frame)
    out: dict[str, dict[str, Any]] = {}
    for key in columns:
        ids = np.asarray(cache.keys[key], dtype=np.int64)
        features = {}
        for name, table in cache.tables[key].items():
            if name not in inputs:
                continue
            rows = oov[name]
            if not all(np.array_equal(rows[0], r) for r in rows[1:]):
                raise ArtifactError(f"unseen {key}s get different {name!r} values ({rows.tolist()}): the feature is "
                                    "not one out-of-vocabulary row, so it cannot be baked into a lookup table")
            spec = inputs[name]
            features[name] = np.concatenate([table, rows[:1]]).astype(spec.dtype, copy=False)
        out[key] = {"ids": ids, "features": features}
    return out


def _unseen_ids(ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64)
    top = int(ids.max()) if len(ids) else 0
    candidates = [top + 1, top + 1_000_003, 2**40]
    gaps = np.setdiff1d(np.arange(0, min(top, 10**6) + 1, dtype=np.int64), ids)
    if len(gaps):
        candidates.append(int(gaps[0]))
    return np.asarray(candidates, dtype=np.int64)


def raw_request_module(predictor: "Predictor"):
    """A ``tf.Module`` whose ``serve(userId, movieId)`` (int64 ``[None]`` each) returns ``{"score": float32 [None]}``.

    Holds the lookup tables, the feature tables (as non-trainable variables, so large catalogs stay
    out of the graph proto) and the predictor's Keras model.
    """
    import tensorflow as tf

    tables = feature_tables(predictor)
    columns = list(predictor.request_columns)
    input_names = [i.name for i in predictor.inputs]
    target = predictor.target

    class RawRequestModel(tf.Module):
        def __init__(self):
            super().__init__(name="raw_request_model")
            self.model = predictor.model
            self.index = {}
            self.features = {}
            for key in columns:
                ids = tables[key]["ids"]
                self.index[key] = tf.lookup.StaticHashTable(
                    tf.lookup.KeyValueTensorInitializer(tf.constant(ids, tf.int64),
                                                        tf.range(len(ids), dtype=tf.int64)),
                    default_value=tf.constant(len(ids), tf.int64))  # the out-of-vocabulary row
                for name, values in tables[key]["features"].items():
                    self.features[name] = (key, tf.Variable(values, trainable=False, name=f"{name}_table"))

        @tf.function(input_signature=[tf.TensorSpec([None], tf.int64, name=c) for c in columns])
        def serve(self, *ids):
            rows = {}
            checks = []
            for key, values in zip(columns, ids):
                checks.append(tf.debugging.assert_non_negative(values, message=f"{key} must be a non-negative id"))
                rows[key] = self.index[key].lookup(values)
            with tf.control_dependencies(checks):
                inputs = {name: tf.gather(self.features[name][1], rows[self.features[name][0]])
                          for name in input_names}
            out = self.model(inputs, training=False)
            if isinstance(out, dict):
                out = out[target] if target in out else next(iter(out.values()))
            elif isinstance(out, (list, tuple)):
                out = out[0]
            return {"score": tf.reshape(tf.cast(out, tf.float32), [-1])}

    return RawRequestModel()


def is_export_dir(path: Path) -> bool:
    """Whether ``path`` holds an earlier output of this stage (which it may replace)."""
    return (path / EXPORT_INFO).is_file() and (path / "saved_model.pb").is_file()


def export_raw_model(predictor: "Predictor", out: str | Path | None = None, *, overwrite: bool = False,
                     check_pairs: int = 2048, seed: int = 0) -> dict[str, Any]:
    """Write the raw-request SavedModel of ``predictor`` to ``out`` (default ``MODEL_DIR/serving_raw``).

    Built in a temporary sibling; before it is renamed into place it is loaded back and must score
    ``check_pairs`` random known pairs plus unseen ones within ``TOLERANCE`` of ``predictor.predict``.
    ``out`` may replace an earlier export, anything else only with ``overwrite``; never the model or
    ETL directory. Inside the model directory, its manifest is verified first and re-written after
    (same recorded fields). Returns a summary.
    """
    import pandas as pd
    import tensorflow as tf

    from pipeline.atomic import atomic_dir, check_output
    from pipeline.errors import UsageError
    from pipeline.manifest import read_manifest, verify_manifest, write_manifest

    model_dir = Path(predictor.model_dir).resolve()
    out = Path(out) if out is not None else model_dir / EXPORT_DIR
    resolved = out.resolve()
    if resolved == model_dir or model_dir.is_relative_to(resolved):
        raise UsageError(f"--out {out} would replace the model directory {predictor.model_dir}")
    check_output(out, stage="export", flag="--out", is_previous_output=is_export_dir, overwrite=overwrite,
                 inputs=[("--data", predictor.etl_dir)])
    inside = resolved.parent == model_dir
    if inside:  # the directory must still be what the train stage wrote before we add to it
        verify_manifest(model_dir, required=("model.keras",))
        fields = {k: v for k, v in (read_manifest(model_dir) or {}).items() if k not in ("algorithm", "files")}

    start = time.perf_counter()
    module = raw_request_module(predictor)
    rng = np.random.default_rng(seed)
    keys = predictor.cache.keys
    columns = list(predictor.request_columns)
    sample = pd.DataFrame({c: rng.choice(keys[c], size=check_pairs) for c in columns})
    unseen = pd.DataFrame({c: np.resize(_unseen_ids(keys[c]), 8) for c in columns})
    half = pd.DataFrame({c: (np.resize(_unseen_ids(keys[c]), 8) if i == 0 else rng.choice(keys[c], 8))
                         for i, c in enumerate(columns)})
    check = pd.concat([sample, unseen, half], ignore_index=True)
    expected = predictor.predict(check)

    with atomic_dir(out) as tmp:
        tf.saved_model.save(module, str(tmp), signatures={"serving_default": module.serve})
        loaded = tf.saved_model.load(str(tmp))
        got = loaded.signatures["serving_default"](**{c: tf.constant(check[c].to_numpy(np.int64)) for c in columns})
        got = got["score"].numpy()
        diff = float(np.max(np.abs(got - expected))) if len(check) else 0.0
        if not diff <= TOLERANCE:
            raise ArtifactError(f"the exported model differs from the predictor by up to {diff:.3g} "
                                f"(> {TOLERANCE:g}) on {len(check)} check pairs: not written")
        info = {
            "signature": "serving_default",
            "inputs": {c: "int64 [None]" for c in columns}, "outputs": {"score": "float32 [None]"},
            "target": predictor.target, "model_dir": str(model_dir),
            "workflow_dir": str(Path(predictor.etl_dir) / "workflow"),
            "known_ids": {c: int(len(keys[c])) for c in columns},
            "unseen_ids": "out-of-vocabulary features (the serving graph's, for any unseen id)",
            "negative_ids": "InvalidArgumentError",
            "checked_pairs": int(len(check)), "max_abs_difference_to_predictor": diff,
        }
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=1))
    if inside:
        write_manifest(model_dir, **fields)
    info["out"] = str(out)
    info["seconds"] = round(time.perf_counter() - start, 2)
    logger.info("exported the raw-request model to %s (max |difference| to the predictor %.2g)", out, diff)
    return info


# --------------------------------------------------------------------------------------------
# CLI: python -m pipeline export
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path, help="ETL output dir (holds workflow/)")
    add_renamed(parser, "--model-dir", ("--model",), required=True, type=Path, help="model dir written by `train`")
    parser.add_argument("--out", type=Path, default=None, help=f"output dir (default MODEL_DIR/{EXPORT_DIR})")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out that is not an earlier export")


def main(args: argparse.Namespace) -> dict:
    from pipeline.inference import Predictor

    predictor = Predictor.load(args.data, args.model_dir)
    return export_raw_model(predictor, args.out, overwrite=args.overwrite)

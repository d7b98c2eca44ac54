"""Training a two-tower model: ``fit_two_tower(data_dir, out_dir)`` (``python -m pipeline train --model two-tower``).

The model directory has the train stage's layout (model.keras, saved_model/, metrics.json, schema.pbtxt,
config.json with the schema fingerprint and the ETL run, manifest.json), so ``Predictor.load`` and
``Retriever.load`` check and read it as any model. Training reads the training split's positive rows only
(``rating_binary == 1``, copied part by part into ``MODEL_DIR.partial``), in shuffled batches of
``batch_size`` (the in-batch negatives), for ``epochs`` epochs; metrics.json holds the training loss per
epoch and the ranking metrics of the item index on the valid split (``pipeline.retrieval.ranking``),
next to popularity's on the same users.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np

from pipeline.errors import DataError, TrainingDiverged, UsageError

logger = logging.getLogger(__name__)

# Merlin Models' retrieval defaults (in-batch softmax, logQ, temperature 0.05-0.1) at our embedding width; a fixed
# number of epochs (no model selection yet). First run, real ML-100K ua: Recall@50 0.566 vs popularity 0.346.
# benchmarks/results/retrieval.md has these defaults on every benchmark dataset.
DEFAULTS = dict(epochs=10, batch_size=1024, learning_rate=2e-3, embedding_dim=64, tower_dims=(128, 64),
                temperature=0.05, logq_correction=True, remove_accidental_hits=True, seed=0)
POSITIVES = "positives"  # the training split's positive rows, inside MODEL_DIR.partial while training


def write_positives(train_dir: Path, out_dir: Path, target: str) -> int:
    """Copy the rows of ``train_dir``'s parquet parts with ``target == 1`` into ``out_dir`` (with the split's schema
    files, so merlin reads it as an ETL split). Returns the number of rows."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    shutil.copyfile(train_dir / "schema.pbtxt", out_dir / "schema.pbtxt")
    if (train_dir / ".merlin").is_dir():
        shutil.copytree(train_dir / ".merlin", out_dir / ".merlin")
    rows = 0
    for k, part in enumerate(sorted(train_dir.glob("*.parquet"))):
        table = pq.read_table(part)
        table = table.filter(pc.equal(table[target], 1))
        pq.write_table(table, out_dir / f"part_{k:05d}.parquet")
        rows += table.num_rows
    return rows


def fit_two_tower(data_dir: str | Path, out_dir: str | Path, *, epochs: int = DEFAULTS["epochs"],
                  batch_size: int = DEFAULTS["batch_size"], learning_rate: float = DEFAULTS["learning_rate"],
                  embedding_dim: int = DEFAULTS["embedding_dim"], tower_dims=DEFAULTS["tower_dims"],
                  temperature: float = DEFAULTS["temperature"], logq_correction: bool = DEFAULTS["logq_correction"],
                  remove_accidental_hits: bool = DEFAULTS["remove_accidental_hits"], seed: int = DEFAULTS["seed"],
                  overwrite: bool = False, evaluate: bool = True, max_eval_users: int | None = None,
                  verbose: int | str = "auto") -> dict:
    """Train a ``TwoTowerModel`` on ``data_dir``'s training positives; write ``out_dir`` atomically.

    Deterministic for a given ``seed``. ``evaluate``: score the item index on the valid split's positives
    (``max_eval_users``: a seeded sample of them) into metrics.json. Returns the metrics.
    """
    import pipeline  # noqa: F401  (dask settings before merlin)
    from pipeline.atomic import check_output, replace_dir
    from pipeline.manifest import write_manifest
    from pipeline.train import _etl_run, _open_split, is_model_dir, schema_fingerprint

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    if epochs < 1:
        raise UsageError(f"--epochs must be at least 1, got {epochs}")
    if batch_size < 2:
        raise UsageError(f"--batch-size must be at least 2 (in-batch negatives), got {batch_size}")
    if not (math.isfinite(learning_rate) and learning_rate > 0):
        raise UsageError(f"--learning-rate must be a positive finite number, got {learning_rate}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise UsageError(f"--temperature must be a positive finite number, got {temperature}")
    work = out_dir.with_name(out_dir.name + ".partial")
    check_output(out_dir, stage="train", flag="--out", is_previous_output=is_model_dir,
                 inputs=[("--data", data_dir)], overwrite=overwrite)
    if work.exists():
        shutil.rmtree(work)
    train_ds = _open_split(data_dir, "train")
    schema = train_ds.schema
    from merlin.schema import Tags

    binary = schema.select_by_tag(Tags.BINARY_CLASSIFICATION).column_names
    if not binary:
        raise DataError(f"{data_dir / 'train'}: no binary target column (e.g. rating_binary) marks the positives")
    target = binary[0]
    etl_run = _etl_run(data_dir)

    import keras
    import tensorflow as tf
    from merlin.io import Dataset

    import pipeline.models as mm

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    work.mkdir(parents=True)
    try:
        positives = write_positives(data_dir / "train", work / POSITIVES, target)
        if positives < batch_size:
            raise DataError(f"{data_dir / 'train'}: {positives} positive rows ({target} == 1) are fewer than "
                            f"--batch-size {batch_size}")
        net = mm.TwoTowerModel(schema, embedding_dim=embedding_dim, tower_dims=tower_dims, temperature=temperature,
                               logq_correction=logq_correction, remove_accidental_hits=remove_accidental_hits)
        pos_ds = Dataset(str(work / POSITIVES), engine="parquet")
        import pyarrow.parquet as pq

        item_ids = np.concatenate([pq.read_table(p, columns=[net.item_id])[net.item_id].to_numpy()
                                   for p in sorted((work / POSITIVES).glob("*.parquet"))])
        net.set_sampling_probabilities(item_ids)
        # drop_last: every step's softmax has batch_size candidates
        loader = net.make_loader(pos_ds, batch_size, shuffle=True, seed=seed, drop_last=True)
        net.compile(optimizer=keras.optimizers.Adam(learning_rate))
        history: list[dict] = []
        started = time.perf_counter()
        try:
            fitted = net.fit(loader, epochs=epochs, verbose=verbose,
                             callbacks=[_EpochLog(history, loader.num_batches * batch_size)])
        finally:
            loader.stop()
        fit_seconds = time.perf_counter() - started
        losses = fitted.history.get("loss", [])
        if not all(math.isfinite(v) for v in losses):
            raise TrainingDiverged(f"two-tower training diverged (loss {losses}); nothing was published to {out_dir}")
        shutil.rmtree(work / POSITIVES)
        net.save(work / "model.keras")
        net.export(str(work / "saved_model"), format="tf_saved_model", input_signature=[net.input_signature()],
                   verbose=False)
        shutil.copyfile(data_dir / "train" / "schema.pbtxt", work / "schema.pbtxt")
        config = {"model": "two-tower", "epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate,
                  "embedding_dim": embedding_dim, "tower_dims": list(tower_dims), "temperature": temperature,
                  "logq_correction": logq_correction, "remove_accidental_hits": remove_accidental_hits, "seed": seed,
                  "positives": f"{target} == 1", "data_dir": str(data_dir.resolve()),
                  "schema_fingerprint": schema_fingerprint(schema), "etl_run_id": etl_run,
                  "features": net.input_feature_names(), "query_features": net.query_feature_names(),
                  "candidate_features": net.candidate_feature_names(), "targets": []}
        (work / "config.json").write_text(json.dumps(config, indent=2))
        metrics = {"valid": {}, "epochs": history, "best_epoch": len(history), "positive_rows": positives,
                   "fit_seconds": round(fit_seconds, 3), "targets": [],
                   "model_selection": {"rows": None, "epoch": len(history), "rule": "the last epoch; no rows held out"}}
        (work / "metrics.json").write_text(json.dumps(metrics, indent=2))
        write_manifest(work, stage="train", etl_run_id=etl_run)
        if evaluate:
            metrics["ranking"] = _evaluate(data_dir, work, max_eval_users, seed)
            metrics["valid"] = {k: v for k, v in metrics["ranking"]["two-tower"].items() if "@" in k}
            (work / "metrics.json").write_text(json.dumps(metrics, indent=2))
            write_manifest(work, stage="train", etl_run_id=etl_run)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    replace_dir(work, out_dir)
    logger.info("two-tower model written to %s; valid %s", out_dir, {k: round(v, 4) for k, v in metrics["valid"].items()})
    return metrics


# The train stage's settings that a two-tower reads; the others (weight decay, early stopping, heads) are the
# ranking models' and do not apply.
TRAIN_SETTINGS = ("epochs", "batch_size", "learning_rate", "embedding_dim", "seed")


def train_two_tower(data_dir: str | Path, out_dir: str | Path, config, *, overwrite: bool = False,
                    verbose: int | str = "auto") -> dict:
    """``python -m pipeline train --arch two-tower``: ``fit_two_tower`` with the train stage's ``config``.

    A setting of ``TRAIN_SETTINGS`` that differs from the train stage's default overrides the two-tower's own
    default (``DEFAULTS``); left at the stage's default (e.g. its 50-epoch cap, meant for early stopping), the
    two-tower's own applies. Returns the metrics.
    """
    stage_defaults = type(config)()
    chosen = {name: getattr(config, name) for name in TRAIN_SETTINGS
              if getattr(config, name) != getattr(stage_defaults, name)}
    return fit_two_tower(data_dir, out_dir, overwrite=overwrite, verbose=verbose, **chosen)


def _evaluate(data_dir: Path, model_dir: Path, max_users: int | None, seed: int) -> dict:
    from pipeline.retrieval.ranking import HeldOut, evaluate_rankers, popularity_ranker, retrieval_ranker
    from pipeline.retrieval.retriever import Retriever

    retriever = Retriever.load(data_dir, model_dir)
    held_out = HeldOut.load(data_dir, retriever.predictor).sample(max_users, seed)
    results = evaluate_rankers(held_out, {"two-tower": retrieval_ranker(retriever),
                                          "popularity": popularity_ranker(retriever.predictor)})
    return {**results, "split": "valid", "dropped_positives": held_out.dropped}


class _EpochLog:
    """Keras callback recording each epoch's seconds, samples/s and loss into ``history``."""

    def __new__(cls, history: list, rows: int):
        import keras

        class EpochLog(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self._start = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                seconds = time.perf_counter() - self._start
                history.append({"epoch": epoch + 1, "seconds": round(seconds, 3),
                                "samples_per_second": round(rows / seconds, 1),
                                "train": {k: float(v) for k, v in (logs or {}).items()}})
                logger.info("epoch %d: %.1f s, loss %.4f", epoch + 1, seconds, float((logs or {}).get("loss", np.nan)))

        return EpochLog()

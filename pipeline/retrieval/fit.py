"""Training a two-tower model: ``fit_two_tower(data_dir, out_dir, TwoTowerConfig(...))`` (``train --arch two-tower``).

The model directory has the train stage's layout (model.keras, saved_model/, metrics.json, schema.pbtxt,
config.json with the schema fingerprint and the ETL run, manifest.json), so ``Predictor.load`` and
``Retriever.load`` check and read it as any model.

Model selection never reads the valid split. As in the ranking train stage, a seeded ``select_fraction`` of the
training rows is held out of fitting (``pipeline.train.split_for_selection``, the same hash of (userId,
movieId)); training reads the positive rows (``rating_binary == 1``) of the rest, in shuffled batches of
``batch_size`` (the in-batch negatives). After every epoch the held-out rows' positives are ranked over every
movie of the training split, each user's fitted movies excluded (``SelectionPositives``): the epoch with the
best ``monitor`` (Recall@50) is restored (``pipeline.train.best_epoch``; early stopping after ``patience``
epochs without a better one, ``should_stop``), and the weight of the log-popularity prior in the retrieval
score is the one of ``prior_weights`` that ranks those positives best. metrics.json holds every epoch's
loss and selection metrics, the chosen epoch and prior weight, and the ranking metrics of the item index on
the valid split next to popularity's on the same users.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from pipeline.config import documented, setting
from pipeline.errors import DataError, TrainingDiverged, UsageError

logger = logging.getLogger(__name__)

POSITIVES = "positives"  # the fitted positive rows, inside MODEL_DIR.partial while training
HOLDOUT = "holdout"  # the fit / select split of the training rows, inside MODEL_DIR.partial while training
MONITORS = ("recall@10", "recall@50", "ndcg@10", "map@10")


# Merlin Models' retrieval defaults (in-batch softmax, logQ, temperature 0.05) at our embedding width, plus a per-movie
# bias and a log-popularity prior (the synthetic generator picks which movies a user rates by popularity alone, so
# a popularity-corrected score alone cannot beat popularity there; benchmarks/results/retrieval.md has the figures).
@documented
@dataclass(frozen=True)
class TwoTowerConfig:
    """Every setting of a two-tower training run (``fit_two_tower``'s config, config.json's fields).

    Example:
        >>> config = TwoTowerConfig(epochs=3, temperature=0.1)
        >>> config.epochs, config.item_bias, config.monitor
        (3, True, 'recall@50')
    """

    epochs: int = setting(20, "the most epochs to train (early stopping usually ends sooner)")
    batch_size: int = setting(1024, "positives per training step (the in-batch negatives)")
    learning_rate: float = setting(2e-3, "Adam's learning rate")
    embedding_dim: int = setting(64, "width of every embedding of both towers")
    tower_dims: tuple[int, ...] = setting((128, 64), "the towers' layer widths (the last is the vectors' width)")
    temperature: float = setting(0.05, "the in-batch logits are cosine / temperature")
    embeddings_l2: float = setting(0.0, "L2 penalty on the embeddings of each batch (both towers' "
                                        "EmbeddingFeatures), added to the in-batch loss")
    logq_correction: bool = setting(True, "subtract log P(movie in a batch) from the in-batch logits")
    remove_accidental_hits: bool = setting(True, "mask in-batch negatives that are the row's own positive movie")
    item_bias: bool = setting(True, "learn a per-movie bias in the score (one more index dimension)")
    prior_weights: tuple[float, ...] = setting((0.0, 0.25, 0.5, 0.75, 1.0, 1.5), "weights of the log-popularity "
                                               "prior tried on the selection positives (the best is kept)")
    select_fraction: float = setting(0.1, "share of the training rows held out of fitting to pick the epoch and "
                                          "the prior weight (0: none, the last epoch and no prior)")
    select_users: int = setting(2000, "selection users ranked after each epoch (a seeded sample)")
    monitor: str = setting("recall@50", "the selection metric (higher is better)", choices=MONITORS)
    early_stopping: bool = setting(True, "stop after --patience epochs without a better selection metric")
    patience: int = setting(2, "epochs without a better selection metric before stopping")
    seed: int = setting(0, "seeds the weights, the shuffling and the selection rows")

    def __post_init__(self) -> None:
        for name in ("tower_dims", "prior_weights"):  # lists from callers; a frozen config holds tuples
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))

    def check(self) -> None:
        """``UsageError`` naming the setting that cannot train a model."""
        if self.epochs < 1:
            raise UsageError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 2:
            raise UsageError(f"--batch-size must be at least 2 (in-batch negatives), got {self.batch_size}")
        for name in ("learning_rate", "temperature"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise UsageError(f"--{name.replace('_', '-')} must be a positive finite number, got {value}")
        if not (math.isfinite(self.embeddings_l2) and self.embeddings_l2 >= 0):
            raise UsageError(f"embeddings_l2 must be a finite number >= 0, got {self.embeddings_l2}")
        if self.embedding_dim < 1 or not self.tower_dims or min(self.tower_dims) < 1:
            raise UsageError(f"embedding_dim and tower_dims must be positive, got {self.embedding_dim}, {self.tower_dims}")
        if not self.prior_weights or not all(math.isfinite(w) for w in self.prior_weights):
            raise UsageError(f"prior_weights must be finite numbers, got {self.prior_weights}")
        if not (math.isfinite(self.select_fraction) and 0.0 <= self.select_fraction < 0.5):
            raise UsageError(f"--select-fraction must be in [0, 0.5), got {self.select_fraction}")
        if self.early_stopping and self.select_fraction == 0:
            raise UsageError("early stopping needs selection rows: --select-fraction > 0, or --no-early-stopping")
        if self.patience < 1 or self.select_users < 1:
            raise UsageError(f"patience and select_users must be positive, got {self.patience}, {self.select_users}")
        if self.monitor not in MONITORS:
            raise UsageError(f"monitor must be one of {MONITORS}, got {self.monitor!r}")


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


class SelectionPositives:
    """The held-out training positives ranked after each epoch, in encoded ids (no workflow needed).

    The catalog is every movie of the fitted rows (one feature row each, taken from those rows); each sampled
    user's fitted movies are excluded from its ranking, and its held-out positives of catalog movies are the
    relevant ones. ``evaluate(model)`` ranks them with the model's index vectors for every prior weight.

    Args:
        fit_dir, select_dir: the fit / select parquet splits (``pipeline.train.split_for_selection``).
        target: the binary target marking positives.
        user, item: the encoded id columns.
        query_names, candidate_names: the towers' input columns.
        max_users: how many users to sample (seeded).
        seed: the sample's seed.
    """

    def __init__(self, fit_dir: Path, select_dir: Path, target: str, user: str, item: str,
                 query_names: list[str], candidate_names: list[str], max_users: int, seed: int):
        import pandas as pd
        from merlin.io import Dataset

        from pipeline.loader import list_columns, list_max_lengths

        fit = pd.concat([pd.read_parquet(p) for p in sorted(fit_dir.glob("*.parquet"))], ignore_index=True)
        select = pd.concat([pd.read_parquet(p, columns=[user, item, target])
                            for p in sorted(select_dir.glob("*.parquet"))], ignore_index=True)
        dataset = Dataset(str(fit_dir), engine="parquet")
        lists = list_columns(dataset)
        widths = list_max_lengths(dataset, [n for n in {*query_names, *candidate_names} if n in lists])
        items = fit.drop_duplicates(item).sort_values(item)
        self.item_codes = items[item].to_numpy(dtype=np.int64)
        self.items = _arrays(items, candidate_names, widths)
        positives = select[(select[target] == 1) & select[item].isin(self.item_codes)]
        held = positives.groupby(user)[item].apply(lambda s: np.unique(s.to_numpy(dtype=np.int64)))
        fitted_users = fit[user].unique()
        held = held[held.index.isin(fitted_users)]
        if len(held) > max_users:
            held = held.iloc[np.sort(np.random.default_rng(seed).choice(len(held), max_users, replace=False))]
        self.user_codes = held.index.to_numpy(dtype=np.int64)
        self.relevant = list(held.to_numpy())
        users = fit.drop_duplicates(user).set_index(user).loc[self.user_codes].reset_index()
        self.users = _arrays(users, query_names, widths)
        row_of = {int(c): i for i, c in enumerate(self.item_codes)}
        seen = fit[fit[user].isin(self.user_codes)].groupby(user)[item].apply(
            lambda s: np.array([row_of[int(c)] for c in np.unique(s.to_numpy())], dtype=np.int64))
        self.exclude = [seen.get(int(c), np.zeros(0, np.int64)) for c in self.user_codes]
        logger.info("selection positives: %d users, %d held-out positives, %d movies", len(self.user_codes),
                    sum(len(r) for r in self.relevant), len(self.item_codes))

    def __len__(self) -> int:
        return len(self.user_codes)

    def evaluate(self, model, prior_weights, batch: int = 256) -> dict[float, dict[str, float]]:
        """``{prior weight: ranking metrics}`` of ``model``'s index over the catalog for every weight."""
        from pipeline.retrieval.index import BruteForceIndex
        from pipeline.retrieval.ranking import DEPTH, ranking_metrics

        saved = model.prior_weight
        results = {}
        try:
            for weight in prior_weights:
                model.prior_weight = float(weight)
                queries = _embed_all(model.index_query_vectors, self.users, len(self))
                index = BruteForceIndex(self.item_codes, _embed_all(model.index_candidate_vectors, self.items,
                                                                    len(self.item_codes)))
                ranked = np.concatenate([index.search(queries[i:i + batch], DEPTH, self.exclude[i:i + batch])[0]
                                         for i in range(0, len(self), batch)])
                results[float(weight)] = ranking_metrics(ranked, self.relevant)
        finally:
            model.prior_weight = saved
        return results

    def popularity(self, positive_items: np.ndarray) -> dict[str, float]:
        """The same metrics for popularity: the catalog by its number of fitted positives (``positive_items``,
        one encoded id per positive row), ties by id."""
        from pipeline.retrieval.index import BruteForceIndex
        from pipeline.retrieval.ranking import DEPTH, ranking_metrics

        counts = np.bincount(np.asarray(positive_items, dtype=np.int64), minlength=int(self.item_codes.max()) + 1)
        index = BruteForceIndex(self.item_codes, counts[self.item_codes].astype(np.float32).reshape(-1, 1))
        ranked = index.search(np.ones((len(self), 1), np.float32), DEPTH, self.exclude)[0]
        return ranking_metrics(ranked, self.relevant)


def _arrays(frame, names: list[str], widths: dict[str, int]) -> dict[str, np.ndarray]:
    """Model input arrays of ``frame``'s rows as the training ``Loader`` formats them (lists padded)."""
    from pipeline.inference.features import pad_lists

    out = {}
    for name in names:
        column = frame[name]
        if name in widths:
            first = next((v for v in column if len(v)), np.zeros(0, np.int32))
            out[name] = pad_lists(column, widths[name], np.asarray(first).dtype)
        else:
            values = column.to_numpy()
            out[name] = (values.astype(np.float32) if values.dtype == np.float64 else values).reshape(-1, 1)
    return out


def _embed_all(fn, arrays: dict[str, np.ndarray], rows: int, batch: int = 65_536) -> np.ndarray:
    parts = [np.asarray(fn({k: v[i:i + batch] for k, v in arrays.items()}), dtype=np.float32)
             for i in range(0, rows, batch)]
    return np.concatenate(parts)


def fit_two_tower(data_dir: str | Path, out_dir: str | Path, config: TwoTowerConfig | None = None, *,
                  overwrite: bool = False, evaluate: bool = True, max_eval_users: int | None = None,
                  verbose: int | str = "auto", **settings) -> dict:
    """Train a ``TwoTowerModel`` on ``data_dir``'s training positives; write ``out_dir`` atomically.

    ``config`` (default ``TwoTowerConfig()``) with ``settings`` (any of its fields by name, e.g. ``epochs=3``)
    replaced. Deterministic for a given ``seed``. ``evaluate``: score the item index on the valid split's
    positives (``max_eval_users``: a seeded sample of them) into metrics.json. Returns the metrics.
    """
    import pipeline  # noqa: F401  (dask settings before merlin)
    from pipeline.atomic import check_output, replace_dir
    from pipeline.manifest import write_manifest
    from pipeline.train import (
        SELECT_MAX_ROWS,
        _etl_run,
        _open_split,
        best_epoch,
        is_model_dir,
        schema_fingerprint,
        split_for_selection,
    )

    config = replace(config or TwoTowerConfig(), **settings)
    config.check()
    data_dir, out_dir = Path(data_dir), Path(out_dir)
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

    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()
    work.mkdir(parents=True)
    try:
        net = mm.TwoTowerModel(schema, embedding_dim=config.embedding_dim, tower_dims=config.tower_dims,
                               temperature=config.temperature, logq_correction=config.logq_correction,
                               remove_accidental_hits=config.remove_accidental_hits, item_bias=config.item_bias,
                               embeddings_l2=config.embeddings_l2)
        fit_dir, selection, select = data_dir / "train", None, None
        if config.select_fraction > 0:
            fraction = min(config.select_fraction, SELECT_MAX_ROWS / max(1, int(train_ds.num_rows)))
            selection = split_for_selection(data_dir / "train", work / HOLDOUT, schema, seed=config.seed,
                                            fraction=fraction)
            fit_dir = work / HOLDOUT / "fit"
            user = schema.select_by_tag(Tags.USER_ID).column_names[0]
            select = SelectionPositives(fit_dir, work / HOLDOUT / "select", target, user, net.item_id,
                                        net.query_feature_names(), net.candidate_feature_names(),
                                        config.select_users, config.seed)
            if not len(select):
                raise DataError(f"{data_dir / 'train'}: no held-out positives to select the model on "
                                f"({fraction:.3g} of the rows held out; pass select_fraction=0)")
        positives = write_positives(fit_dir, work / POSITIVES, target)
        if positives < config.batch_size:
            raise DataError(f"{data_dir / 'train'}: {positives} positive rows ({target} == 1) are fewer than "
                            f"--batch-size {config.batch_size}")
        pos_ds = Dataset(str(work / POSITIVES), engine="parquet")
        import pyarrow.parquet as pq

        item_ids = np.concatenate([pq.read_table(p, columns=[net.item_id])[net.item_id].to_numpy()
                                   for p in sorted((work / POSITIVES).glob("*.parquet"))])
        net.set_sampling_probabilities(item_ids)
        # drop_last: every step's softmax has batch_size candidates
        loader = net.make_loader(pos_ds, config.batch_size, shuffle=True, seed=config.seed, drop_last=True)
        net.compile(optimizer=keras.optimizers.Adam(config.learning_rate))
        history: list[dict] = []
        best = {}  # the best epoch's weights, restored at the end
        monitor = config.monitor
        callback = _EpochLog(history, loader.num_batches * config.batch_size, select, config, best)
        started = time.perf_counter()
        try:
            fitted = net.fit(loader, epochs=config.epochs, verbose=verbose, callbacks=[callback])
        finally:
            loader.stop()
        fit_seconds = time.perf_counter() - started
        losses = fitted.history.get("loss", [])
        if not all(math.isfinite(v) for v in losses):
            raise TrainingDiverged(f"two-tower training diverged (loss {losses}); nothing was published to {out_dir}")
        chosen = best_epoch(history, monitor) if select is not None else None
        if chosen is not None:
            net.set_weights(best["weights"])
            net.prior_weight = history[chosen - 1]["select"]["prior_weight"]
            logger.info("restored epoch %d (select %s %.4f), prior weight %g", chosen, monitor,
                        history[chosen - 1]["select"][monitor], net.prior_weight)
        chosen = chosen or len(history)
        shutil.rmtree(work / POSITIVES)
        shutil.rmtree(work / HOLDOUT, ignore_errors=True)  # copies of the training rows: not part of the model
        net.save(work / "model.keras")
        net.export(str(work / "saved_model"), format="tf_saved_model", input_signature=[net.input_signature()],
                   verbose=False)
        shutil.copyfile(data_dir / "train" / "schema.pbtxt", work / "schema.pbtxt")
        record = {"model": "two-tower", **asdict(config), "prior_weight": net.prior_weight,
                  "positives": f"{target} == 1", "data_dir": str(data_dir.resolve()),
                  "schema_fingerprint": schema_fingerprint(schema), "etl_run_id": etl_run,
                  "features": net.input_feature_names(), "query_features": net.query_feature_names(),
                  "candidate_features": net.candidate_feature_names(), "targets": []}
        (work / "config.json").write_text(json.dumps(record, indent=2))
        metrics = {"valid": {}, "epochs": history, "best_epoch": chosen, "positive_rows": positives,
                   "fit_seconds": round(fit_seconds, 3), "targets": [], "prior_weight": net.prior_weight,
                   "model_selection": (
                       {**selection, "monitor": f"select {monitor}", "epoch": chosen, "prior_weight": net.prior_weight,
                        "prior_weights": list(config.prior_weights), "users": len(select),
                        "popularity": select.popularity(item_ids),
                        "early_stopping": config.early_stopping,
                        "patience": config.patience if config.early_stopping else None}
                       if select is not None else
                       {"rows": None, "epoch": chosen, "rule": f"the last epoch ({chosen}); no rows held out"}),
                   "scored": {"split": "valid", "read_by_model_selection": False}}
        (work / "metrics.json").write_text(json.dumps(metrics, indent=2))
        write_manifest(work, stage="train", etl_run_id=etl_run)
        if evaluate:
            metrics["ranking"] = _evaluate(data_dir, work, max_eval_users, config.seed)
            metrics["valid"] = {k: v for k, v in metrics["ranking"]["two-tower"].items() if "@" in k}
            (work / "metrics.json").write_text(json.dumps(metrics, indent=2))
            write_manifest(work, stage="train", etl_run_id=etl_run)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    replace_dir(work, out_dir)
    logger.info("two-tower model written to %s; valid %s", out_dir, {k: round(v, 4) for k, v in metrics["valid"].items()})
    return metrics


# The train stage's settings that a two-tower reads; the others (weight decay, heads, EMA) are the ranking models'.
TRAIN_SETTINGS = ("epochs", "batch_size", "learning_rate", "embedding_dim", "embeddings_l2", "seed", "early_stopping",
                  "patience", "select_fraction")


def train_two_tower(data_dir: str | Path, out_dir: str | Path, config, *, overwrite: bool = False,
                    verbose: int | str = "auto") -> dict:
    """``python -m pipeline train --arch two-tower``: ``fit_two_tower`` with the train stage's ``config``.

    A setting of ``TRAIN_SETTINGS`` that differs from the train stage's default overrides ``TwoTowerConfig``'s
    default; left at the stage's default (e.g. its 50-epoch cap or 16-wide embeddings, meant for the ranking
    models), the two-tower's own applies. Returns the metrics.
    """
    stage_defaults = type(config)()
    chosen = {name: getattr(config, name) for name in TRAIN_SETTINGS
              if getattr(config, name) != getattr(stage_defaults, name)}
    return fit_two_tower(data_dir, out_dir, TwoTowerConfig(**chosen), overwrite=overwrite, verbose=verbose)


def _evaluate(data_dir: Path, model_dir: Path, max_users: int | None, seed: int) -> dict:
    from pipeline.retrieval.ranking import HeldOut, evaluate_rankers, popularity_ranker, retrieval_ranker
    from pipeline.retrieval.retriever import Retriever

    retriever = Retriever.load(data_dir, model_dir)
    held_out = HeldOut.load(data_dir, retriever.predictor).sample(max_users, seed)
    results = evaluate_rankers(held_out, {"two-tower": retrieval_ranker(retriever),
                                          "popularity": popularity_ranker(retriever.predictor)})
    return {**results, "split": "valid", "dropped_positives": held_out.dropped}


class _EpochLog:
    """Keras callback: each epoch's seconds, samples/s and loss into ``history``; with selection positives also
    their ranking metrics at every prior weight (the best weight's kept), the best epoch's weights in
    ``best["weights"]``, and early stopping (``pipeline.train.should_stop``)."""

    def __new__(cls, history: list, rows: int, select: SelectionPositives | None, config: TwoTowerConfig, best: dict):
        import keras

        from pipeline.train import best_epoch, should_stop

        monitor = config.monitor

        class EpochLog(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self._start = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                seconds = time.perf_counter() - self._start
                entry = {"epoch": epoch + 1, "seconds": round(seconds, 3),
                         "samples_per_second": round(rows / seconds, 1),
                         "train": {k: float(v) for k, v in (logs or {}).items()}}
                if select is not None:
                    started = time.perf_counter()
                    by_weight = select.evaluate(self.model, config.prior_weights)
                    weight = max(by_weight, key=lambda w: (by_weight[w][monitor], -abs(w)))  # a tie: the smaller
                    entry["select"] = {**by_weight[weight], "prior_weight": weight,
                                       "by_prior_weight": {str(w): round(m[monitor], 5) for w, m in by_weight.items()},
                                       "seconds": round(time.perf_counter() - started, 3)}
                history.append(entry)
                logger.info("epoch %d: %.1f s, loss %.4f%s", epoch + 1, seconds,
                            float((logs or {}).get("loss", np.nan)),
                            f", select {monitor} {entry['select'][monitor]:.4f} (prior weight "
                            f"{entry['select']['prior_weight']:g})" if select is not None else "")
                if select is not None:
                    if best_epoch(history, monitor) == epoch + 1:
                        best["weights"] = self.model.get_weights()
                    if config.early_stopping and should_stop(history, monitor, config.patience):
                        logger.info("early stop after epoch %d: no better select %s since epoch %d", epoch + 1,
                                    monitor, best_epoch(history, monitor))
                        self.model.stop_training = True

        return EpochLog()

"""Train stage: ETL output -> schema-built model -> fit on the Merlin loader -> saved model + metrics.

``python -m pipeline train --data ETL_DIR --out MODEL_DIR`` writes::

    MODEL_DIR/model.keras          the Keras model (loads with keras.saving.load_model, no custom_objects
                                   once ``pipeline.models`` is imported)
    MODEL_DIR/saved_model/         model.export(): a TF SavedModel for TF Serving / Triton
    MODEL_DIR/metrics.json         valid metrics (auc, logloss, accuracy; rmse for regression heads),
                                   per-epoch seconds and samples/s
    MODEL_DIR/schema.pbtxt         the schema the model was trained on
    MODEL_DIR/config.json          the full training config + the input schema's fingerprint
    MODEL_DIR/checkpoints/         the last epoch's checkpoint (``--resume`` continues from it)
    MODEL_DIR/manifest.json        sha256 of every file, the stage and the ETL run the model was trained on

Everything is built in ``MODEL_DIR.partial`` (checkpoints land there after every epoch, so an
interrupted run can ``--resume``) and renamed into place only when complete. A run whose loss or
valid metrics are not finite stops with ``TrainingDiverged`` and publishes nothing.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path

from pipeline.atomic import check_output, replace_dir
from pipeline.errors import ArtifactError, DataError, TrainingDiverged, UsageError
from pipeline.manifest import read_manifest, write_manifest

logger = logging.getLogger(__name__)

MODELS = ("dlrm", "dcn", "deepfm", "wide-deep", "mlp")  # --model; see _build_model
# Measured on default-size synthetic ml-1m, 3 epochs (valid AUC; oracle 0.848, learnable ceiling ~0.827:
# benchmarks/results/quality.md). Without regularization DLRM overfits the id embeddings from epoch 2;
# decoupled weight decay (AdamW, 1.0) with 16-wide embeddings beats a per-batch embeddings L2 (0.7998 vs
# 0.7947) and trains faster than 64 (the generator's true rank is 8); the star rating as a second head
# (default_targets) 0.808; a cosine-decayed learning rate 0.814-0.817. lr 4e-3 or weight decay 2.0: worse.
DEFAULTS = dict(model="dlrm", epochs=3, batch_size=1024, learning_rate=2e-3, embedding_dim=16, embeddings_l2=0.0,
                weight_decay=1.0, lr_schedule="cosine", seed=0)
LR_SCHEDULES = ("cosine", "constant")
CHECKPOINTS = "checkpoints"
# errno values that mean "the disk is full" (ENOSPC), "over quota", or a file-size limit (EFBIG).
OUT_OF_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def is_model_dir(path: Path) -> bool:
    """Whether ``path`` holds a previous output of this stage (which a new run may replace)."""
    path = Path(path)
    if not (path.is_dir() and (path / "config.json").is_file()):
        return False
    manifest = read_manifest(path)
    if manifest is None:
        return False
    if manifest.get("stage") == "train":
        return True
    try:  # written before manifests named their stage
        return "schema_fingerprint" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False


def check_settings(*, epochs: int, batch_size: int, learning_rate: float, embedding_dim: int,
                   embeddings_l2: float, weight_decay: float, lr_schedule: str, model: str) -> None:
    """``UsageError`` naming the flag of the first setting that cannot train a model."""
    if model not in MODELS:
        raise UsageError(f"--model {model!r} is not one of {', '.join(MODELS)}")
    if epochs < 1:
        raise UsageError(f"--epochs must be at least 1, got {epochs}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be positive, got {batch_size}")
    if embedding_dim < 1:
        raise UsageError(f"--embedding-dim must be at least 1, got {embedding_dim}")
    if not (math.isfinite(learning_rate) and learning_rate > 0):
        raise UsageError(f"--learning-rate must be a positive finite number, got {learning_rate}")
    for flag, value in (("--weight-decay", weight_decay), ("--embeddings-l2", embeddings_l2)):
        if not (math.isfinite(value) and value >= 0):
            raise UsageError(f"{flag} must be a finite number >= 0, got {value}")
    if lr_schedule not in LR_SCHEDULES:
        raise UsageError(f"--lr-schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")


# --------------------------------------------------------------------------- schema fingerprint
def schema_fingerprint(schema) -> str:
    """A hash of the model-facing part of a merlin ``Schema``: every non-target column's name, kind
    (int / float / string), list-ness, tags and cardinality.

    Two schemas with the same fingerprint feed a model identically. Inference compares the saved
    workflow's output schema against the fingerprint recorded at training time (config.json).
    Storage details (bit width, file paths of category tables) are deliberately left out.
    """
    from merlin.schema import Tags

    rows = []
    for col in schema.excluding_by_tag(Tags.TARGET):
        sizes = col.properties.get("embedding_sizes") or {}
        card = sizes.get("cardinality")
        if card is None and col.int_domain is not None and Tags.CATEGORICAL in col.tags:
            card = None if col.int_domain.max is None else col.int_domain.max + 1
        rows.append(
            [
                col.name,
                col.dtype.element_type.value if col.dtype is not None else None,
                bool(col.is_list),
                sorted(str(getattr(t, "value", t)) for t in col.tags),
                None if card is None else int(card),
            ]
        )
    rows.sort(key=lambda r: r[0])
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- optimizer
def make_optimizer(learning_rate: float, weight_decay: float, lr_schedule: str, total_steps: int):
    """AdamW (plain Adam when ``weight_decay`` is 0) with a constant or cosine-decayed learning rate.

    ``"cosine"`` decays from ``learning_rate`` to 5 % of it over ``total_steps`` (all epochs asked for):
    large steps while the embeddings are far from their values, small ones once the noise of single
    batches dominates.
    """
    import keras

    rate = learning_rate
    if lr_schedule == "cosine":
        rate = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=max(1, total_steps), alpha=0.05)
    if weight_decay:
        # Decoupled weight decay shrinks every weight each step, unlike an L2 loss term whose gradient
        # Adam rescales away.
        return keras.optimizers.AdamW(learning_rate=rate, weight_decay=weight_decay)
    return keras.optimizers.Adam(learning_rate=rate)


# --------------------------------------------------------------------------- targets
def default_targets(schema) -> list[str]:
    """Every TARGET column of ``schema``, binary-classification ones first.

    The first is the *primary* target: the one predict / serve score and metrics.json reports
    unprefixed. The others are auxiliary heads on the same body: the star rating next to
    rating_binary gives every example a graded label instead of one bit (valid AUC of the binary head
    0.808 vs 0.800 alone after 3 epochs on default-size synthetic ml-1m).
    """
    from merlin.schema import Tags

    targets = schema.select_by_tag(Tags.TARGET).column_names
    binary = set(schema.select_by_tag(Tags.BINARY_CLASSIFICATION).column_names)
    return sorted(targets, key=lambda name: name not in binary)


def primary_metrics(logs: dict, targets: list[str]) -> dict:
    """``logs`` plus, for a multi-task model, the primary target's metrics without their prefix
    (``rating_binary_auc`` -> ``auc``) so that ``auc`` always means the scored head's AUC."""
    out = dict(logs)
    if len(targets) < 2:
        return out
    for stage in ("", "val_"):
        prefix = f"{stage}{targets[0]}_"
        # the total "loss" (all heads) keeps its name
        out.update({stage + k[len(prefix):]: v for k, v in logs.items()
                    if k.startswith(prefix) and k[len(prefix):] != "loss"})
    return out


# --------------------------------------------------------------------------- data
def _open_split(data_dir: Path, split: str):
    from merlin.io import Dataset

    path = data_dir / split
    if not path.is_dir() or not any(path.glob("*.parquet")):
        raise DataError(f"{path}: no parquet files (is {data_dir} the output of `python -m pipeline etl`?)")
    if not (path / "schema.pbtxt").is_file():
        raise DataError(f"{path / 'schema.pbtxt'}: missing (the ETL writes it next to the parquet files)")
    import pyarrow.parquet as pq

    try:
        rows = sum(pq.read_metadata(p).num_rows for p in sorted(path.glob("*.parquet")))
    except Exception as err:
        raise DataError(f"{path}: unreadable parquet file: {err}") from err
    if rows == 0:
        raise DataError(f"{path}: the {split} set is empty (0 rows)")
    try:
        dataset = Dataset(str(path), engine="parquet")
    except Exception as err:  # pyarrow / merlin raise many types for corrupt files
        raise DataError(f"{path}: cannot read the parquet dataset: {err}") from err
    _check_schema_files(path, dataset.schema)
    return dataset


def _schema_rows(schema) -> dict[str, tuple]:
    """What a model is built from, per column: kind, list-ness, tags, cardinality."""
    rows = {}
    for col in schema:
        sizes = col.properties.get("embedding_sizes") or {}
        rows[col.name] = (
            col.dtype.element_type.value if col.dtype is not None else None,
            bool(col.is_list),
            tuple(sorted(str(getattr(t, "value", t)) for t in col.tags)),
            sizes.get("cardinality"),
        )
    return rows


def _check_schema_files(path: Path, schema) -> None:
    """``DataError`` when ``schema.pbtxt`` and ``.merlin/schema.json`` of one split disagree.

    merlin reads ``.merlin/schema.json`` when it exists and ignores ``schema.pbtxt``; the model
    directory keeps ``schema.pbtxt``. Both are written by the ETL, so a difference means one was
    edited: train on neither until they agree (edit both, or delete ``.merlin/``).
    """
    if not (path / ".merlin" / "schema.json").is_file():
        return  # merlin read schema.pbtxt itself
    from merlin.schema.io.tensorflow_metadata import TensorflowMetadata

    try:
        pbtxt = TensorflowMetadata.from_proto_text_file(str(path), file_name="schema.pbtxt").to_merlin_schema()
    except Exception as err:  # a hand-edited file that does not parse
        raise DataError(f"{path / 'schema.pbtxt'}: cannot be parsed ({err})") from err
    ours, theirs = _schema_rows(pbtxt), _schema_rows(schema)
    for name in sorted(set(ours) | set(theirs)):
        if ours.get(name) != theirs.get(name):
            raise DataError(
                f"{path / 'schema.pbtxt'} and {path / '.merlin' / 'schema.json'} disagree on column {name!r} "
                f"((kind, is_list, tags, cardinality) {ours.get(name)} vs {theirs.get(name)}): merlin reads the "
                "second; make them agree (or delete .merlin/ to use schema.pbtxt alone)"
            )


def _build_model(name: str, schema, embedding_dim: int, targets: list[str] | None, embeddings_l2: float):
    import pipeline.models as mm

    if name not in MODELS:
        raise UsageError(f"unknown model {name!r}; choose one of {MODELS}")
    if targets is None:
        targets = default_targets(schema)
    heads = mm.outputs_from_schema(schema, targets)
    if name == "dlrm":
        return mm.DLRMModel(
            schema,
            embedding_dim=embedding_dim,
            bottom_block=mm.MLPBlock([128, embedding_dim]),
            top_block=mm.MLPBlock([128, 64, 32]),
            prediction_tasks=heads,
            embeddings_l2=embeddings_l2,
        )
    # The other architectures get DLRM's budget: the same embeddings and a deep part as wide as its top MLP.
    shared = dict(prediction_tasks=heads, embeddings_l2=embeddings_l2)
    if name == "dcn":
        return mm.DCNModel(schema, depth=3, deep_block=mm.MLPBlock([128, 64, 32]), embedding_dim=embedding_dim, **shared)
    if name == "deepfm":
        return mm.DeepFMModel(schema, embedding_dim, deep_block=mm.MLPBlock([128, 64, 32]), **shared)
    if name == "wide-deep":
        return mm.WideAndDeepModel(schema, mm.MLPBlock([128, 64, 32]), embedding_dim=embedding_dim, **shared)
    return mm.MLPModel(schema, mm.MLPBlock([128, 64, 32]), embedding_dim=embedding_dim, **shared)


# --------------------------------------------------------------------------- callbacks
def _epoch_callbacks(train_rows: int, work: Path, history: list[dict], targets: list[str], keep: int = 1):
    import keras

    class EpochRecorder(keras.callbacks.Callback):
        """Per epoch: training seconds (validation excluded), samples/s, metrics, and a checkpoint."""

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()
            self._train_seconds = None

        def on_test_begin(self, logs=None):
            if getattr(self, "_start", None) is not None and self._train_seconds is None:
                self._train_seconds = time.perf_counter() - self._start

        def on_epoch_end(self, epoch, logs=None):
            seconds = self._train_seconds or (time.perf_counter() - self._start)
            logs = primary_metrics({k: float(v) for k, v in (logs or {}).items()}, targets)
            bad = [k for k in ("loss", "val_loss") if k in logs and not math.isfinite(logs[k])]
            bad = bad or sorted(k for k, v in logs.items() if not math.isfinite(v))
            if bad:  # before the checkpoint: a diverged epoch is never saved, resumed or published
                raise TrainingDiverged(
                    f"training diverged in epoch {epoch + 1} ({', '.join(f'{k} {logs[k]}' for k in bad[:3])}); "
                    "nothing was published (lower --learning-rate, or check the data)"
                )
            record = {
                "epoch": epoch + 1,
                "seconds": round(seconds, 3),
                "samples_per_second": round(train_rows / seconds, 1),
                "train": {k: v for k, v in logs.items() if not k.startswith("val_")},
                "valid": {k[4:]: v for k, v in logs.items() if k.startswith("val_")},
            }
            history.append(record)
            save_checkpoint(self.model, work / CHECKPOINTS, history, keep=keep)
            logger.info("epoch %d: %.1f s, %.0f samples/s, %s", epoch + 1, seconds, train_rows / seconds,
                        {k: round(v, 4) for k, v in logs.items()})

    return EpochRecorder()


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(model, ckpt_dir: Path, history: list[dict], keep: int = 1) -> Path:
    """Save epoch ``len(history)``: ``history_NNN.json`` first, then ``epoch_NNN.keras`` renamed into place.

    The rename is the one step that makes the checkpoint exist, so a run killed at any moment
    leaves either the previous complete checkpoint or this one, never a model without its history.
    Keeps the newest ``keep`` checkpoints. Returns the model file's path.
    """
    ckpt_dir.mkdir(exist_ok=True)
    epoch = len(history)
    (ckpt_dir / f"history_{epoch:03d}.json").write_text(json.dumps(history, indent=2))
    tmp = ckpt_dir / f".epoch_{epoch:03d}.keras"
    model.save(tmp)
    final = tmp.rename(ckpt_dir / f"epoch_{epoch:03d}.keras")
    for old in sorted(ckpt_dir.glob("epoch_*.keras"))[:-keep]:
        old.unlink()
        (ckpt_dir / f"history_{old.stem.split('_')[1]}.json").unlink(missing_ok=True)
    for stray in ckpt_dir.glob(".epoch_*.keras"):  # a save interrupted by an earlier kill
        stray.unlink()
    return final


def latest_checkpoint(ckpt_dir: Path) -> tuple[Path, list[dict]] | None:
    """``(model file, history)`` of the newest complete checkpoint in ``ckpt_dir``, or None."""
    for ckpt in sorted(ckpt_dir.glob("epoch_*.keras"), reverse=True):
        epoch = int(ckpt.stem.split("_")[1])
        history_file = ckpt_dir / f"history_{epoch:03d}.json"
        if not history_file.is_file():
            history_file = ckpt_dir / "history.json"  # the layout of earlier releases
        if not history_file.is_file():
            continue
        history = json.loads(history_file.read_text())
        if len(history) == epoch:
            return ckpt, history
    return None


# --------------------------------------------------------------------------- the stage
def train_model(
    data_dir: Path,
    out_dir: Path,
    *,
    model: str = DEFAULTS["model"],
    epochs: int = DEFAULTS["epochs"],
    batch_size: int = DEFAULTS["batch_size"],
    learning_rate: float = DEFAULTS["learning_rate"],
    embedding_dim: int = DEFAULTS["embedding_dim"],
    embeddings_l2: float = DEFAULTS["embeddings_l2"],
    weight_decay: float = DEFAULTS["weight_decay"],
    lr_schedule: str = DEFAULTS["lr_schedule"],
    seed: int = DEFAULTS["seed"],
    early_stopping: bool = False,
    resume: bool = False,
    targets: list[str] | None = None,
    overwrite: bool = False,
    verbose: int | str = "auto",
) -> dict:
    """Train ``model`` on ``data_dir``/train, validate on ``data_dir``/valid, write ``out_dir``.

    Returns the metrics written to ``out_dir``/metrics.json. Deterministic for a given ``seed``
    (weights, shuffling and op order: TF op determinism is enabled). ``out_dir`` may hold a previous
    model (it is replaced); any other existing path is refused unless ``overwrite``, and it may never be,
    contain or sit inside ``data_dir``.
    """
    import pipeline  # noqa: F401  (dask settings before merlin)

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    check_settings(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, embedding_dim=embedding_dim,
                   embeddings_l2=embeddings_l2, weight_decay=weight_decay, lr_schedule=lr_schedule, model=model)
    work = out_dir.with_name(out_dir.name + ".partial")
    for path, flag in ((out_dir, "--out"), (work, "--out (its .partial build dir)")):
        check_output(path, stage="train", flag=flag, is_previous_output=is_model_dir if path == out_dir else _is_partial,
                     inputs=[("--data", data_dir)], overwrite=overwrite)
    train_ds, valid_ds = _open_split(data_dir, "train"), _open_split(data_dir, "valid")
    schema = train_ds.schema
    fingerprint = schema_fingerprint(schema)
    if schema_fingerprint(valid_ds.schema) != fingerprint:
        raise DataError(f"{data_dir}/train and {data_dir}/valid have different schemas (schema.pbtxt)")
    train_rows, valid_rows = int(train_ds.num_rows), int(valid_ds.num_rows)
    if train_rows == 0:
        raise DataError(f"{data_dir / 'train'}: the training set is empty")
    if valid_rows == 0:
        raise DataError(f"{data_dir / 'valid'}: the validation set is empty")
    if batch_size > train_rows:
        raise DataError(f"--batch-size {batch_size} is larger than the {train_rows} training rows in {data_dir / 'train'}")

    etl_run = _etl_run(data_dir)

    import keras
    import tensorflow as tf

    config = {
        "model": model, "epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate,
        "embedding_dim": embedding_dim, "embeddings_l2": embeddings_l2, "weight_decay": weight_decay, "lr_schedule": lr_schedule,
        "seed": seed,
        "early_stopping": early_stopping,
        "data_dir": str(data_dir.resolve()), "schema_fingerprint": fingerprint, "etl_run_id": etl_run,
    }
    history: list[dict] = []
    initial_epoch = 0
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()

    checkpoint = _resume_point(work, out_dir) if resume else None
    if checkpoint is not None:
        import pipeline.models  # noqa: F401  (registers the layers a checkpoint names)

        checkpoint, prior = checkpoint
        net = keras.saving.load_model(checkpoint)
        history.extend(prior)
        initial_epoch = len(prior)
        old = json.loads((checkpoint.parent / "config.json").read_text()) if (checkpoint.parent / "config.json").exists() else {}
        if old.get("schema_fingerprint", fingerprint) != fingerprint:
            raise ArtifactError(f"{checkpoint}: was trained on a different schema than {data_dir}; train without --resume")
        if old.get("etl_run_id", etl_run) != etl_run:
            raise ArtifactError(f"{checkpoint}: was trained on another ETL run (run {old['etl_run_id'][:12]}) than "
                                f"{data_dir} (run {etl_run[:12]}); train without --resume")
        logger.info("resuming from %s (epoch %d)", checkpoint, initial_epoch)
        if initial_epoch >= epochs:
            logger.info("already trained for %d epochs (asked for %d): nothing to fit", initial_epoch, epochs)
    else:
        net = _build_model(model, schema, embedding_dim, targets, embeddings_l2)  # schema errors surface before any output
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
    config["targets"] = net.target_names
    config["features"] = net.input_feature_names()
    (work / CHECKPOINTS).mkdir(exist_ok=True)
    (work / CHECKPOINTS / "config.json").write_text(json.dumps(config, indent=2))

    try:
        # first_epoch: the shuffle of epoch k is the same with or without --resume
        train_loader = net.make_loader(train_ds, batch_size, shuffle=True, seed=seed, first_epoch=initial_epoch)
        valid_loader = net.make_loader(valid_ds, batch_size)
    except BaseException:
        _drop_partial_without_checkpoint(work)
        raise
    if checkpoint is None:  # a resumed model keeps its optimizer and schedule from the checkpoint
        net.compile(optimizer=make_optimizer(learning_rate, weight_decay, lr_schedule,
                                             total_steps=epochs * len(train_loader)))
    callbacks = [_epoch_callbacks(train_rows, work, history, net.target_names)]
    if early_stopping:
        primary = net.heads[0]
        auc_name = "val_auc" if len(net.heads) == 1 else f"val_{primary.target}_auc"
        monitor = auc_name if "auc" in [m.name for m in primary.default_metrics()] else "val_loss"
        callbacks.append(keras.callbacks.EarlyStopping(monitor=monitor, mode="max" if "auc" in monitor else "min",
                                                       patience=1, restore_best_weights=True))
    started = time.perf_counter()
    try:
        if initial_epoch < epochs:
            net.fit(train_loader, epochs=epochs, initial_epoch=initial_epoch, validation_data=valid_loader,
                    callbacks=callbacks, verbose=verbose)
        valid_metrics = net.evaluate(valid_loader, return_dict=True, verbose=0)
    except OSError as err:
        _drop_partial_if_out_of_space(err, work)
        raise
    except BaseException:
        _drop_partial_without_checkpoint(work)
        raise
    finally:
        train_loader.stop()
        valid_loader.stop()
    fit_seconds = time.perf_counter() - started
    bad = sorted(k for k, v in valid_metrics.items() if not math.isfinite(float(v)))
    if bad:
        _drop_partial_without_checkpoint(work)
        raise TrainingDiverged(f"the trained model's valid metrics are not finite ({', '.join(bad)}); "
                               f"nothing was published to {out_dir}")

    metrics = {
        "valid": primary_metrics({k: float(v) for k, v in valid_metrics.items()}, net.target_names),
        "epochs": history,
        "train_rows": train_rows,
        "valid_rows": valid_rows,
        "fit_seconds": round(fit_seconds, 3),
        "targets": net.target_names,
    }
    try:
        _write_outputs(net, work, data_dir, config, metrics)
        # the predictor loads only a model dir whose checksums match, with the ETL run it names
        write_manifest(work, stage="train", etl_run_id=etl_run)
    except OSError as err:
        _drop_partial_if_out_of_space(err, work)
        raise
    replace_dir(work, out_dir)
    logger.info("model written to %s; valid %s", out_dir, {k: round(v, 4) for k, v in metrics["valid"].items()})
    return metrics


def _resume_point(work: Path, out_dir: Path) -> tuple[Path, list[dict]]:
    """``(checkpoint, history)`` of an interrupted run (``out_dir.partial``) or of a finished one (``out_dir``)."""
    for base in (work, out_dir):
        found = latest_checkpoint(base / CHECKPOINTS)
        if found is not None:
            if base == out_dir:
                # Continue a finished model in a fresh partial copy; out_dir stays intact until done.
                if work.exists():
                    shutil.rmtree(work)
                shutil.copytree(out_dir, work)
                return work / CHECKPOINTS / found[0].name, found[1]
            return found
    raise ArtifactError(f"--resume: no checkpoint in {work / CHECKPOINTS} or {out_dir / CHECKPOINTS}")


def _is_partial(path: Path) -> bool:
    """A ``MODEL_DIR.partial`` of an earlier run: it holds our checkpoints dir (or nothing)."""
    return path.is_dir() and ((path / CHECKPOINTS).is_dir() or not any(path.iterdir()))


def _etl_run(data_dir: Path) -> str:
    """The identity of the ETL run in ``data_dir`` (``pipeline.etl.etl_run_id``), checked against the one the
    ETL recorded in ``workflow/manifest.json``: different means the splits changed after the ETL wrote them."""
    from pipeline.etl import etl_run_id

    run = etl_run_id(data_dir)
    recorded = (read_manifest(data_dir / "workflow") or {}).get("run_id")
    if recorded is not None and recorded != run:
        raise DataError(
            f"{data_dir}: its train/valid parquet or category files are not the ones its ETL run wrote "
            f"(run {recorded[:12]}, now {run[:12]}); re-run `python -m pipeline etl`"
        )
    return run


def _drop_partial_without_checkpoint(work: Path) -> None:
    """A failed run with no complete checkpoint has nothing to resume from: leave no trace of it."""
    if work.exists() and latest_checkpoint(work / CHECKPOINTS) is None:
        shutil.rmtree(work, ignore_errors=True)


def _drop_partial_if_out_of_space(err: OSError, work: Path) -> None:
    """On a full disk, remove the partial run (its checkpoints are what filled it) and raise an
    ``OSError`` that names it; other errors return to be re-raised as they are."""
    if err.errno not in OUT_OF_SPACE:
        return
    shutil.rmtree(work, ignore_errors=True)
    raise OSError(err.errno, f"{err.strerror or err} while writing the model (the partial run was removed; "
                  "the previous model, if any, is unchanged)", str(work)) from err


def _write_outputs(net, work: Path, data_dir: Path, config: dict, metrics: dict) -> None:
    import keras
    import keras_rs
    import merlin.core
    import nvtabular
    import tensorflow as tf

    for stale in ("model.keras", "saved_model"):
        target = work / stale
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    net.save(work / "model.keras")
    net.export(str(work / "saved_model"), format="tf_saved_model", input_signature=[net.input_signature()], verbose=False)
    shutil.copyfile(data_dir / "train" / "schema.pbtxt", work / "schema.pbtxt")
    config = {
        **config,
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__, "keras_rs": keras_rs.__version__,
                     "merlin_core": merlin.core.__version__, "nvtabular": nvtabular.__version__},
    }
    (work / "config.json").write_text(json.dumps(config, indent=2))
    (work / "metrics.json").write_text(json.dumps(metrics, indent=2))


# --------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="ETL output dir (train/, valid/ with schema.pbtxt)")
    parser.add_argument("--out", type=Path, required=True,
                        help="model dir to write; a previous model there is replaced atomically")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out even if it is not a previous model dir (never the --data dir)")
    parser.add_argument("--model", choices=MODELS, default=DEFAULTS["model"])
    parser.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    parser.add_argument("--learning-rate", type=float, default=DEFAULTS["learning_rate"])
    parser.add_argument("--embedding-dim", type=int, default=DEFAULTS["embedding_dim"])
    parser.add_argument("--embeddings-l2", type=float, default=DEFAULTS["embeddings_l2"],
                        help="L2 penalty on the embeddings used in each batch (0 to disable)")
    parser.add_argument("--weight-decay", type=float, default=DEFAULTS["weight_decay"],
                        help="AdamW decoupled weight decay on every weight (0: plain Adam)")
    parser.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=DEFAULTS["lr_schedule"],
                        help="cosine: decay the learning rate to 5%% of --learning-rate over all epochs")
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    parser.add_argument("--target", action="append", dest="targets", default=None,
                        help="target column to predict (repeat for multi-task; the first is the one scored); "
                             "default: every target of the schema, binary ones first")
    parser.add_argument("--early-stopping", action="store_true", help="stop when valid AUC stops improving")
    parser.add_argument("--resume", action="store_true", help="continue from the last epoch checkpoint")


def main(args: argparse.Namespace) -> int:
    metrics = train_model(
        args.data, args.out, model=args.model, epochs=args.epochs, batch_size=args.batch_size,
        learning_rate=args.learning_rate, embedding_dim=args.embedding_dim, embeddings_l2=args.embeddings_l2,
        weight_decay=args.weight_decay, lr_schedule=args.lr_schedule, seed=args.seed,
        early_stopping=args.early_stopping, resume=args.resume, targets=args.targets, overwrite=args.overwrite,
    )
    last = metrics["epochs"][-1] if metrics["epochs"] else {}
    print(json.dumps({"model_dir": str(args.out), "valid": metrics["valid"],
                      "last_epoch_samples_per_second": last.get("samples_per_second")}, indent=2))
    return 0

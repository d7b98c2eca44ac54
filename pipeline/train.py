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
import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from pipeline.atomic import check_output, replace_dir
from pipeline.config import add_arguments as add_config_arguments
from pipeline.config import documented, from_args, setting
from pipeline.errors import ArtifactError, DataError, TrainingDiverged, UsageError
from pipeline.manifest import read_manifest, write_manifest
from pipeline.registry import ARCHITECTURES, RETRIEVAL_ARCHITECTURES
from pipeline.schema import SUMMARY_FIELDS, schema_fingerprint, schema_summary

logger = logging.getLogger(__name__)

LR_SCHEDULES = ("cosine", "constant", "plateau")
DECAY_REFERENCE_STEPS = 100  # --weight-decay holds as given up to this many steps per epoch (ML-100K: 80)
BATCH_REFERENCE_STEPS = 100  # --batch-size holds as given up to this many steps per epoch (see scaled_batch_size)
SELECT_MAX_ROWS = 100_000  # enough for a stable AUC; more only slows every epoch
# make_optimizer's default: step only the embedding rows a batch gathers (RowSparseAdamW). Keras' AdamW, its decay
# and its average touch every row of every table at every step: at ML-25M size (324k table rows) a step took
# 88-111 ms vs 15 ms row-sparse on the same rows (benchmarks/results/train_step.md). Real ML-100K ua, 3 seeds,
# same session: valid AUC 0.7783 [0.7775, 0.7798] vs 0.7754 [0.7745, 0.7769] dense.
ROW_SPARSE = True


# Early stopping on a held-out slice of the training rows sets the number of epochs (--epochs is only a cap),
# so nothing else depends on it: a constant learning rate, and decoupled weight decay (AdamW) as the one
# regularizer. Measured with early stopping (valid AUC of the picked epoch; tuning data: real ML-100K's ub split
# and a synthetic ML-100K drawn with another seed, never a benchmark's valid split): weight decay 3.0 vs 1.0
# 0.770 vs 0.759 (ub) and 0.784 vs 0.760 (synthetic); 6.0 0.747 (ub); lr 4e-3 0.764; a cosine decay over the cap
# 0.771 (same as constant); without the title and zipcode embeddings 0.754 (their dot products with the user
# embedding learn the user x movie affinity sooner); 32-wide embeddings no better (0.757 at weight decay 1.0).
# benchmarks/results/quality.md has the figures of these defaults on every benchmark dataset.
@documented
@dataclass(frozen=True)
class TrainConfig:
    """Every setting of the train stage: ``train_model``'s keywords, the CLI's flags, config.json's fields.

    Example:
        >>> config = TrainConfig(epochs=3, embedding_dim=32)
        >>> config.epochs, config.model, config.weight_decay
        (3, 'dlrm', 3.0)
    """

    model: str = setting("dlrm", "model architecture, built from the schema", flag="--arch",
                         choices=ARCHITECTURES + RETRIEVAL_ARCHITECTURES, old_flags=("--model",))
    epochs: int = setting(50, "the most epochs to train (early stopping usually ends sooner)")
    # batch_scaling: the rule and its measurements are in scaled_batch_size's docstring
    batch_size: int = setting(1024, f"rows per training step, as given up to {BATCH_REFERENCE_STEPS} steps per epoch "
                                    "(see --batch-scaling)")
    batch_scaling: bool = setting(True, f"above {BATCH_REFERENCE_STEPS} steps per epoch, multiply --batch-size by "
                                        f"sqrt(steps / {BATCH_REFERENCE_STEPS}) rounded to a power of 2 (ML-1M: "
                                        "x2); --no-batch-scaling: exactly --batch-size")
    learning_rate: float = setting(2e-3, "the optimizer's learning rate")
    embedding_dim: int = setting(16, "width of every embedding (and of the bottom MLP's output)")
    embeddings_l2: float = setting(0.0, "L2 penalty on the embeddings used in each batch (0 to disable)")
    weight_decay: float = setting(3.0, "AdamW decoupled weight decay on every weight (0: plain Adam), as given up "
                                       f"to {DECAY_REFERENCE_STEPS} steps per epoch, scaled by "
                                       f"sqrt({DECAY_REFERENCE_STEPS} / steps) above")
    lr_schedule: str = setting("constant", "constant; cosine: decay to 5%% of --learning-rate over all epochs; "
                                           "plateau: halve it after each epoch without a better selection AUC",
                               choices=LR_SCHEDULES)
    seed: int = setting(0, "seeds the weights, the shuffling and the selection rows")
    early_stopping: bool = setting(True, "stop after --patience epochs without a better AUC on the selection rows "
                                         "and publish the best epoch (--epochs is the cap)")
    # patience 5, not 3: before the user x movie interaction switches on, the selection AUC can creep along a
    # plateau for 10-15 epochs with gaps of 4-5 epochs between tiny new bests, and 3 stopped such seeds there,
    # 0.03 below the others. Same seed, same trajectory up to where 3 stopped, so the best selection AUC can only
    # rise; on the tuning splits (selection rows, best epoch): real ML-100K ub seed 44 0.7988 vs 0.7641, synthetic
    # ML-100K seed 44 0.7784 vs 0.7465 (benchmarks/results/quality_trials.md, session 5).
    patience: int = setting(5, "epochs without a better selection AUC before stopping")
    # plateau_tolerance: a run whose selection AUC is still within this of its best after --patience epochs is
    # most likely on the plateau before the user x movie interaction sets in, where it creeps (real ML-100K ub
    # seed 44: 0.7641 at epoch 3, 0.7752 at 18, new bests up to 5 epochs apart, then 0.7988 at 26), and goes on,
    # up to PATIENCE_CAP x --patience epochs; past a peak it usually falls faster (ML-100K: 0.002-0.01 in 5
    # epochs), so those runs stop as with --patience alone. Slow declines (ML-1M: 0.001-0.0015) run longer.
    plateau_tolerance: float = setting(0.001, "after --patience epochs without a better selection AUC, go on while "
                                              "the last one is within this of the best (a plateau, not a decline), "
                                              "up to 3x --patience epochs (0: stop at --patience)")
    # ema_epochs: the weights that are scored, checkpointed and published are an exponential moving average of
    # the trained ones over about this many epochs of steps. It averages out the noise of single batches, as a
    # decaying learning rate would, without slowing the learning (a lower rate, e.g. --lr-schedule plateau,
    # stalls the onset of the user x movie interaction). Measured on the tuning splits (selection rows, best
    # epoch): real ML-100K ub 0.7934 vs 0.7862 (seed 42), 0.7991 vs 0.7971 (seed 44); synthetic ML-100K 0.7744
    # vs 0.7699; benchmarks/results/quality.md ("Tuning trials") has every trial.
    ema_epochs: float = setting(1.0, "score and publish an exponential moving average of the weights over about "
                                     "this many epochs of steps (0: the raw weights)")
    # refit: the selection rows are rows the model would otherwise learn from. The refit runs in a fresh process
    # (see _refit). Measured with the 3-seed benchmark against the selection run's own picked epoch, on the same
    # valid rows (benchmarks/results/quality_trials.md, session 9): 8 wins in 9, real ML-100K ua +0.0003
    # (+0.0023, -0.0036, +0.0022), random 80/20 +0.0026, synthetic ML-100K +0.0034; on the tuning splits
    # (session 8, the lead): 8 wins in 9 at ML-100K size, 3 of 3 at ML-1M size (+0.0007).
    refit: bool = setting(True, "after the selection rows pick the epoch count E, train again from the start on "
                                "every training row (the selection rows too) for E epochs and publish that "
                                "(--no-refit: publish the picked epoch of the selection run)")
    select_fraction: float = setting(0.1, "share of the training rows held out of fitting to pick the epoch "
                                          f"(seeded hash of userId, movieId; at most {SELECT_MAX_ROWS:,} rows; "
                                          "0: none, publish the last epoch)")
    targets: tuple[str, ...] | None = setting(None, "target column to predict (repeat for multi-task; the first is "
                                                    "the one scored); default: every target, binary ones first",
                                              flag="--target", metavar="COLUMN")
    exclude_features: tuple[str, ...] = setting((), "input column to leave out of the model (repeatable)",
                                                flag="--exclude-feature", metavar="COLUMN")

    def __post_init__(self) -> None:
        for name in ("targets", "exclude_features"):  # lists from callers; a frozen config holds tuples
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))

    def check(self) -> None:
        """``UsageError`` naming the flag of the first setting that cannot train a model."""
        if self.model not in ARCHITECTURES + RETRIEVAL_ARCHITECTURES:
            raise UsageError(f"--arch {self.model!r} is not one of {', '.join(ARCHITECTURES + RETRIEVAL_ARCHITECTURES)}")
        if self.epochs < 1:
            raise UsageError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be positive, got {self.batch_size}")
        if self.embedding_dim < 1:
            raise UsageError(f"--embedding-dim must be at least 1, got {self.embedding_dim}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise UsageError(f"--learning-rate must be a positive finite number, got {self.learning_rate}")
        for flag, value in (("--weight-decay", self.weight_decay), ("--embeddings-l2", self.embeddings_l2)):
            if not (math.isfinite(value) and value >= 0):
                raise UsageError(f"{flag} must be a finite number >= 0, got {value}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise UsageError(f"--lr-schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if not (math.isfinite(self.select_fraction) and 0.0 <= self.select_fraction < 0.5):
            raise UsageError(f"--select-fraction must be in [0, 0.5), got {self.select_fraction}")
        if self.lr_schedule == "plateau" and self.select_fraction == 0:
            raise UsageError("--lr-schedule plateau needs selection rows (--select-fraction > 0)")
        if self.early_stopping and self.select_fraction == 0:
            raise UsageError("early stopping needs selection rows: --select-fraction > 0, or --no-early-stopping")
        if self.patience < 1:
            raise UsageError(f"--patience must be at least 1, got {self.patience}")
        if not (math.isfinite(self.plateau_tolerance) and self.plateau_tolerance >= 0):
            raise UsageError(f"--plateau-tolerance must be a finite number >= 0, got {self.plateau_tolerance}")
        if not (math.isfinite(self.ema_epochs) and self.ema_epochs >= 0):
            raise UsageError(f"--ema-epochs must be a finite number >= 0, got {self.ema_epochs}")


PLATEAU_FACTOR = 0.5  # "plateau": the learning rate after each epoch without a better selection AUC
CHECKPOINTS = "checkpoints"
REFIT = "refit"  # the refit run's model dir inside MODEL_DIR.partial
HOLDOUT = "holdout"  # the fit / select parquet copies of the training split, inside MODEL_DIR.partial
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


# --------------------------------------------------------------------------- optimizer
def make_optimizer(learning_rate: float, weight_decay: float, lr_schedule: str, total_steps: int,
                   ema_momentum: float | None = None, row_sparse: bool = ROW_SPARSE):
    """AdamW (plain Adam when ``weight_decay`` is 0) with a constant or cosine-decayed learning rate, keeping an
    exponential moving average of the weights with ``ema_momentum`` when given (``keras.callbacks.SwapEMAWeights``
    swaps it in; see ``ema_momentum``).

    ``row_sparse``: ``pipeline.optimizers.RowSparseAdamW``, which steps only the embedding rows a batch gathers
    (decay and average of the others caught up when they are next gathered; ``RowSync`` brings every row up
    to date before the weights are read), else Keras' dense ``AdamW``, which steps every row of every table.

    ``"cosine"`` decays from ``learning_rate`` to 5 % of it over ``total_steps`` (all epochs asked for):
    large steps while the embeddings are far from their values, small ones once the noise of single
    batches dominates.
    """
    import keras

    from pipeline.optimizers import RowSparseAdamW

    rate = learning_rate
    if lr_schedule == "cosine":
        rate = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=max(1, total_steps), alpha=0.05)
    ema = dict(use_ema=True, ema_momentum=ema_momentum) if ema_momentum else {}
    if row_sparse:
        return RowSparseAdamW(learning_rate=rate, weight_decay=weight_decay, **ema)
    if weight_decay:
        # Decoupled weight decay shrinks every weight each step, unlike an L2 loss term whose gradient
        # Adam rescales away.
        return keras.optimizers.AdamW(learning_rate=rate, weight_decay=weight_decay, **ema)
    return keras.optimizers.Adam(learning_rate=rate, **ema)


def ema_momentum(ema_epochs: float, steps_per_epoch: int) -> float | None:
    """The weight-average momentum whose window (1 / (1 - momentum) steps) is ``ema_epochs`` epochs of
    ``steps_per_epoch`` steps (None: no average). In epochs, so the same at every data size."""
    if not ema_epochs:
        return None
    return 1.0 - 1.0 / max(2.0, ema_epochs * steps_per_epoch)


def scaled_batch_size(batch_size: int, rows: int) -> int:
    """The rows per training step for an epoch of ``rows`` rows: ``batch_size`` while that takes up to
    ``BATCH_REFERENCE_STEPS`` steps, else ``batch_size`` times sqrt(steps / reference) rounded to a power of 2
    (x2 from 200 steps, x4 from 800, x8 from 3,200, x16 from 12,800).

    With a batch of 1024, an epoch of synthetic ML-1M is 704 steps against ML-100K's 80, and the model peaks
    after 4-6 epochs and then overfits: more, noisier steps per pass over the data. Twice the batch takes half the
    steps per pass, each with half the gradient variance (the weight decay and the weight average, set per step
    from the steps per epoch, follow). Measured on a synthetic ML-1M drawn with generator seed 1, selection rows of the best epoch, seeds
    42 / 43 / 44: 2048 0.8203 / 0.8162 / 0.8194 vs 1024 0.8184 / 0.8147 / 0.8163; 4096 0.8191 / 0.8154 / 0.8199;
    8192 0.8192 (seed 42, 17 epochs); a synthetic 2.5M ratings (1,856 steps of 1024; the rule: 4096), seed 42:
    4096 0.8224 vs 1024 0.8189 (benchmarks/results/quality_trials.md, session 8). Below 200 steps (ML-100K:
    80) nothing changes.

    Example:
        >>> scaled_batch_size(1024, 81_000), scaled_batch_size(1024, 720_000), scaled_batch_size(1024, 22_500_000)
        (1024, 2048, 16384)
    """
    steps = -(-rows // batch_size)
    if steps <= BATCH_REFERENCE_STEPS:
        return batch_size
    factor = 2 ** math.floor(0.5 * math.log2(steps / BATCH_REFERENCE_STEPS) + 0.5)
    return batch_size * factor


def scaled_weight_decay(weight_decay: float, steps_per_epoch: int) -> float:
    """``weight_decay`` for up to ``DECAY_REFERENCE_STEPS`` steps per epoch, times sqrt(reference / steps) above.

    AdamW shrinks every embedding row at every step, but a row only gets a gradient when its id is in the
    batch, which on 10x the rows (same ratings per id) happens 10x less often per step. Adam's update of a
    row seen with probability p per step is ~sqrt(p) in size, so the decay that balances it at the same
    norm scales as sqrt(p), i.e. 1 / sqrt(steps per epoch): the same prior per id at any data size.
    Measured on synthetic ML-1M (700 steps per epoch): decay 3.0 learns the interaction slowly (valid AUC
    0.790 after 3 epochs), the scaled 1.1 [see benchmarks/results/quality.md].
    """
    return weight_decay * min(1.0, math.sqrt(DECAY_REFERENCE_STEPS / max(1, steps_per_epoch)))


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
    ours, theirs = schema_summary(pbtxt), schema_summary(schema)
    for name in sorted(set(ours) | set(theirs)):
        if ours.get(name) != theirs.get(name):
            raise DataError(
                f"{path / 'schema.pbtxt'} and {path / '.merlin' / 'schema.json'} disagree on column {name!r} "
                f"({SUMMARY_FIELDS} {ours.get(name)} vs {theirs.get(name)}): merlin reads the "
                "second; make them agree (or delete .merlin/ to use schema.pbtxt alone)"
            )


def model_schema(schema, exclude_features):
    """``schema`` without the input columns in ``exclude_features`` (targets are never excluded)."""
    from merlin.schema import Tags

    targets = set(schema.select_by_tag(Tags.TARGET).column_names)
    unknown = sorted(set(exclude_features) - set(schema.column_names))
    if unknown:
        raise UsageError(f"--exclude-feature: no column(s) {unknown} in the data (it has {schema.column_names})")
    if set(exclude_features) & targets:
        raise UsageError(f"--exclude-feature: {sorted(set(exclude_features) & targets)} are targets (use --target)")
    return schema.excluding_by_name(list(exclude_features)) if exclude_features else schema


def _build_model(name: str, schema, embedding_dim: int, targets: list[str] | None, embeddings_l2: float):
    import pipeline.models as mm

    if name not in ARCHITECTURES:
        raise UsageError(f"unknown architecture {name!r}; choose one of {ARCHITECTURES}")
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



# --------------------------------------------------------------------------- model selection rows
def selection_mask(users, movies, seed: int, fraction: float):
    """Boolean mask of the training rows held out to select the model: a seeded hash of (userId, movieId)
    below ``fraction``.

    A hash of the ids rather than a draw by position: the same rows whatever the partitioning or row
    order of the ETL output, with no state to keep for ``--resume``.
    """
    import numpy as np

    with np.errstate(over="ignore"):
        x = (np.asarray(users, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
             ^ np.asarray(movies, dtype=np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
             ^ np.uint64((seed * 0xD6E8FEB86659FD93 + 0x5E1EC7) % 2**64))
        # splitmix64's finalizer: every input bit moves every output bit
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) / 2.0**53 < fraction


def split_for_selection(train_dir: Path, out_dir: Path, schema, *, seed: int, fraction: float) -> dict:
    """Write ``out_dir``/fit and ``out_dir``/select: the training parquet parts split by ``selection_mask``.

    Part by part (one part in memory at a time), keeping each split's schema files, so the Merlin
    loader reads both like any ETL split. Returns the counts and the rule, for metrics.json.
    """
    import numpy as np
    import pyarrow.parquet as pq
    from merlin.schema import Tags

    user = schema.select_by_tag(Tags.USER_ID).column_names
    item = schema.select_by_tag(Tags.ITEM_ID).column_names
    if out_dir.exists():
        shutil.rmtree(out_dir)  # rebuilt from scratch: the same rows every time
    counts = {"fit": 0, "select": 0}
    offset = 0
    for name in counts:
        (out_dir / name).mkdir(parents=True)
        shutil.copyfile(train_dir / "schema.pbtxt", out_dir / name / "schema.pbtxt")
        if (train_dir / ".merlin").is_dir():
            shutil.copytree(train_dir / ".merlin", out_dir / name / ".merlin")
    for k, part in enumerate(sorted(train_dir.glob("*.parquet"))):
        table = pq.read_table(part)
        if user and item:
            mask = selection_mask(table[user[0]].to_numpy(), table[item[0]].to_numpy(), seed, fraction)
        else:  # no id columns: hash the global row number instead
            rows = np.arange(offset, offset + table.num_rows)
            mask = selection_mask(rows, rows, seed, fraction)
        offset += table.num_rows
        for name, keep in (("fit", ~mask), ("select", mask)):
            pq.write_table(table.filter(keep), out_dir / name / f"part_{k:05d}.parquet")
            counts[name] += int(keep.sum())
    key = f"({user[0]}, {item[0]})" if user and item else "row number"
    return {
        "rows": f"training rows whose seeded hash of {key} (seed {seed}) falls below {fraction:.6g}",
        "fraction": fraction,
        "fit_rows": counts["fit"],
        "select_rows": counts["select"],
    }

# --------------------------------------------------------------------------- callbacks
def best_epoch(history: list[dict], monitor: str) -> int | None:
    """The 1-based epoch of ``history`` with the best selection-rows ``monitor`` (AUC or a ranking metric such as
    ``recall@50``: highest; a loss: lowest; the earliest on a tie), or None when no epoch was scored on selection
    rows."""
    scored = [(e["select"][monitor], e["epoch"]) for e in history if monitor in e.get("select", {})]
    if not scored:
        return None
    sign = 1.0 if "auc" in monitor or "@" in monitor else -1.0
    return max(scored, key=lambda s: (sign * s[0], -s[1]))[1]


PATIENCE_CAP = 3  # a run on a plateau (see should_stop's tolerance) stops this many times --patience after its best


def should_stop(history: list[dict], monitor: str, patience: int, tolerance: float = 0.0) -> bool:
    """Early stopping from the history alone (so a resumed run stops where an uninterrupted one would):
    ``patience`` epochs in a row without a new best on the selection rows, and, with ``tolerance`` > 0, the
    last epoch's ``monitor`` more than ``tolerance`` from the best (a decline, not a plateau) or
    ``PATIENCE_CAP * patience`` epochs without a new best."""
    best = best_epoch(history, monitor)
    if best is None or len(history) - best < patience:
        return False
    if not tolerance or len(history) - best >= PATIENCE_CAP * patience:
        return True
    return abs(history[best - 1]["select"][monitor] - history[-1]["select"][monitor]) > tolerance


def plateau_learning_rate(history: list[dict], monitor: str, learning_rate: float) -> float:
    """``learning_rate`` times ``PLATEAU_FACTOR`` per epoch of ``history`` that did not improve on the best
    selection-rows ``monitor`` before it: large steps while the model improves, smaller ones once it stalls
    (what a cosine tail does, without fixing the number of epochs in advance)."""
    stalls, best = 0, None
    sign = 1.0 if "auc" in monitor else -1.0
    for e in history:
        value = sign * e["select"][monitor]
        if best is not None and value <= best:
            stalls += 1
        best = value if best is None else max(best, value)
    return learning_rate * PLATEAU_FACTOR**stalls


def _epoch_callbacks(train_rows: int, work: Path, history: list[dict], targets: list[str], *,
                     monitor: str | None, patience: int | None, tolerance: float = 0.0, trace=None,
                     plateau_rate=None):
    import keras

    class EpochRecorder(keras.callbacks.Callback):
        """Per epoch: training seconds (validation excluded), samples/s, metrics on the selection rows, a
        checkpoint (the newest and the best one are kept) and the early-stopping decision."""

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()
            self._train_seconds = None
            if plateau_rate is not None:  # from the history alone, so a resumed run gets the same rates
                self.model.optimizer.learning_rate.assign(plateau_rate(history))

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
                # Keras' "validation data" is the selection rows (held out of the training split)
                "select": {k[4:]: v for k, v in logs.items() if k.startswith("val_")},
            }
            if trace is not None:  # diagnostics only: never read by best_epoch / should_stop
                scored = self.model.evaluate(trace, return_dict=True, verbose=0)
                record["valid_trace"] = primary_metrics({k: float(v) for k, v in scored.items()}, targets)
            history.append(record)
            best = best_epoch(history, monitor) if monitor else None
            save_checkpoint(self.model, work / CHECKPOINTS, history, keep=1, also_keep=best)
            if monitor and patience and should_stop(history, monitor, patience, tolerance):
                logger.info("early stop after epoch %d: no better %s on the selection rows since epoch %d",
                            epoch + 1, monitor, best)
                self.model.stop_training = True
            logger.info("epoch %d: %.1f s, %.0f samples/s, %s", epoch + 1, seconds, train_rows / seconds,
                        {k: round(v, 4) for k, v in logs.items()})

    return EpochRecorder()


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(model, ckpt_dir: Path, history: list[dict], keep: int = 1, also_keep: int | None = None) -> Path:
    """Save epoch ``len(history)``: ``history_NNN.json`` first, then ``epoch_NNN.keras`` renamed into place.

    The rename is the one step that makes the checkpoint exist, so a run killed at any moment
    leaves either the previous complete checkpoint or this one, never a model without its history.
    Keeps the newest ``keep`` checkpoints and epoch ``also_keep`` (the best so far, restored at the end).
    Returns the model file's path.
    """
    ckpt_dir.mkdir(exist_ok=True)
    epoch = len(history)
    (ckpt_dir / f"history_{epoch:03d}.json").write_text(json.dumps(history, indent=2))
    tmp = ckpt_dir / f".epoch_{epoch:03d}.keras"
    model.save(tmp)
    final = tmp.rename(ckpt_dir / f"epoch_{epoch:03d}.keras")
    for old in sorted(ckpt_dir.glob("epoch_*.keras"))[:-keep]:
        if also_keep is not None and int(old.stem.split("_")[1]) == also_keep:
            continue
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
    config: TrainConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    verbose: int | str = "auto",
    trace_valid: bool = False,
    **settings,
) -> dict:
    """Train ``config.model`` on ``data_dir``/train, validate on ``data_dir``/valid, write ``out_dir``.

    ``config`` (default ``TrainConfig()``) with ``settings`` (any ``TrainConfig`` field by name, e.g.
    ``epochs=3``) replaced holds every training setting; the others are how this run is carried out.

    Model selection never reads the valid split: a seeded ``select_fraction`` of the training rows (at most
    ``SELECT_MAX_ROWS``) is held out of fitting, scored after every epoch, and picks the epoch that is
    published (``early_stopping``: stop after ``patience`` epochs without a better selection AUC, or later
    while the AUC stays within ``plateau_tolerance`` of the best (``should_stop``), then restore the best
    epoch's weights; ``epochs`` is the cap). The valid split is scored once, at the end
    (``trace_valid`` also scores it after every epoch, for diagnostics; nothing reads it).

    Returns the metrics written to ``out_dir``/metrics.json. Deterministic for a given ``seed``
    (weights, shuffling and op order: TF op determinism is enabled). ``out_dir`` may hold a previous
    model (it is replaced); any other existing path is refused unless ``overwrite``, and it may never be,
    contain or sit inside ``data_dir``.
    """
    import pipeline  # noqa: F401  (dask settings before merlin)

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    config = replace(config or TrainConfig(), **settings)
    config.check()
    if config.model in RETRIEVAL_ARCHITECTURES:  # trained on positives by its own loop (pipeline.retrieval.fit)
        from pipeline.retrieval import train_two_tower

        return train_two_tower(data_dir, out_dir, config, overwrite=overwrite, verbose=verbose)
    model, epochs, batch_size, seed = config.model, config.epochs, config.batch_size, config.seed
    learning_rate, weight_decay, lr_schedule = config.learning_rate, config.weight_decay, config.lr_schedule
    early_stopping, patience, select_fraction = config.early_stopping, config.patience, config.select_fraction
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

    record = {
        **asdict(config),
        "patience": patience if early_stopping else None,
        "exclude_features": list(config.exclude_features),
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
        net = _build_model(model, model_schema(schema, config.exclude_features), config.embedding_dim,
                           list(config.targets) if config.targets else None, config.embeddings_l2)  # schema errors surface before any output
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
    record["targets"] = net.target_names
    record["features"] = net.input_feature_names()
    (work / CHECKPOINTS).mkdir(exist_ok=True)
    (work / CHECKPOINTS / "config.json").write_text(json.dumps(record, indent=2))

    primary = net.heads[0]
    # the selection metric: the scored head's AUC on the selection rows (the total loss for a regression head)
    monitor = "auc" if "auc" in [m.name for m in primary.default_metrics()] else "loss"
    selection = None
    loaders = []
    try:
        fit_ds, select_ds = train_ds, None
        if select_fraction > 0:
            fraction = min(select_fraction, SELECT_MAX_ROWS / train_rows)
            selection = split_for_selection(data_dir / "train", work / HOLDOUT, schema, seed=seed, fraction=fraction)
            if selection["select_rows"] == 0 or selection["fit_rows"] < batch_size:
                raise DataError(f"{data_dir / 'train'}: {train_rows} training rows are too few to hold out "
                                f"{fraction:.3g} of them for model selection (pass --select-fraction 0)")
            from merlin.io import Dataset

            fit_ds = Dataset(str(work / HOLDOUT / "fit"), engine="parquet")
            select_ds = Dataset(str(work / HOLDOUT / "select"), engine="parquet")
        fit_rows = int(fit_ds.num_rows)
        if config.batch_scaling:
            batch_size = scaled_batch_size(config.batch_size, fit_rows)
            if batch_size != config.batch_size:
                logger.info("batch size %d (--batch-size %d at %d steps per epoch, --batch-scaling)", batch_size,
                            config.batch_size, -(-fit_rows // config.batch_size))
        # first_epoch: the shuffle of epoch k is the same with or without --resume
        train_loader = net.make_loader(fit_ds, batch_size, shuffle=True, seed=seed, first_epoch=initial_epoch)
        loaders.append(train_loader)
        select_loader = net.make_loader(select_ds, batch_size) if select_ds is not None else None
        loaders.append(select_loader)
        valid_loader = net.make_loader(valid_ds, batch_size)
        loaders.append(valid_loader)
    except BaseException as err:
        for loader in loaders:
            if loader is not None:
                loader.stop()
        if isinstance(err, OSError):  # e.g. the selection split's parquet on a full disk
            _drop_partial_if_out_of_space(err, work)
        _drop_partial_without_checkpoint(work)
        raise
    decay = scaled_weight_decay(weight_decay, len(train_loader))
    if checkpoint is None:  # a resumed model keeps its optimizer and schedule from the checkpoint
        logger.info("AdamW weight decay %.4g (--weight-decay %g at %d steps per epoch)", decay, weight_decay,
                    len(train_loader))
        net.compile(optimizer=make_optimizer(learning_rate, decay, lr_schedule,
                                             total_steps=epochs * len(train_loader),
                                             ema_momentum=ema_momentum(config.ema_epochs, len(train_loader))))
    # First: a row-sparse optimizer brings every row up to date before the weights are read or swapped.
    from pipeline.optimizers import RowSync

    callbacks = [RowSync()]
    if getattr(net.optimizer, "use_ema", False):
        # Before the recorder: the selection rows are scored and every checkpoint saved with the averaged
        # weights in the model (the raw ones wait in the optimizer's average slots until the next epoch).
        swap = keras.callbacks.SwapEMAWeights(swap_on_epoch=True)
        # A checkpoint holds the average in the model: the first epoch after --resume swaps the raw ones back.
        swap._ema_weights_in_model = checkpoint is not None
        callbacks.append(swap)
    callbacks += [_epoch_callbacks(fit_rows, work, history, net.target_names,
                                  monitor=monitor if select_loader is not None else None,
                                  patience=patience if early_stopping else None,
                                  tolerance=config.plateau_tolerance,
                                  trace=valid_loader if trace_valid else None,
                                  plateau_rate=(lambda h: plateau_learning_rate(h, monitor, learning_rate))
                                  if lr_schedule == "plateau" and select_loader is not None else None)]
    started = time.perf_counter()
    try:
        stopped = early_stopping and should_stop(history, monitor, patience, config.plateau_tolerance)
        if stopped:
            logger.info("the checkpoint's run had stopped early (epoch %d): nothing to fit", len(history))
        if initial_epoch < epochs and not stopped:
            shutil.rmtree(work / REFIT, ignore_errors=True)  # a refit of an earlier pick: the pick may change
            shutil.rmtree(work / (REFIT + ".partial"), ignore_errors=True)
            net.fit(train_loader, epochs=epochs, initial_epoch=initial_epoch, validation_data=select_loader,
                    callbacks=callbacks, verbose=verbose)
        chosen = best_epoch(history, monitor) if select_loader is not None else None
        if chosen is not None and chosen != len(history):
            logger.info("restoring epoch %d, the best %s on the selection rows", chosen, monitor)
            net.load_weights(work / CHECKPOINTS / f"epoch_{chosen:03d}.keras")
        valid_metrics = net.evaluate(valid_loader, return_dict=True, verbose=0)
    except OSError as err:
        _drop_partial_if_out_of_space(err, work)
        raise
    except BaseException:
        _drop_partial_without_checkpoint(work)
        raise
    finally:
        for loader in loaders:
            if loader is not None:
                loader.stop()
    fit_seconds = time.perf_counter() - started
    shutil.rmtree(work / HOLDOUT, ignore_errors=True)  # a copy of the training rows: not part of the model
    bad = sorted(k for k, v in valid_metrics.items() if not math.isfinite(float(v)))
    if bad:
        _drop_partial_without_checkpoint(work)
        raise TrainingDiverged(f"the trained model's valid metrics are not finite ({', '.join(bad)}); "
                               f"nothing was published to {out_dir}")

    chosen = chosen or len(history)
    valid = primary_metrics({k: float(v) for k, v in valid_metrics.items()}, net.target_names)
    averaged = getattr(net.optimizer, "ema_momentum", None) if getattr(net.optimizer, "use_ema", False) else None
    refit = None
    if config.refit and selection is not None:
        refit_dir, refitted = _refit(data_dir, work, config, chosen, resume=resume, verbose=verbose)
        fit_seconds += refitted["fit_seconds"]
        # "epochs" and "best_epoch" describe the run that picked the epoch count, "valid" the published refit
        refit = {"epochs": refitted["epochs"], "rows": refitted["fit_rows"],
                 "effective_batch_size": refitted["effective_batch_size"],
                 "effective_weight_decay": refitted["effective_weight_decay"],
                 "ema_momentum": refitted["ema_momentum"], "fit_seconds": refitted["fit_seconds"], "valid_of_the_selection_run": valid}
        valid = refitted["valid"]
    metrics = {
        "valid": valid,
        "epochs": history,
        "train_rows": train_rows,
        "fit_rows": fit_rows,
        "valid_rows": valid_rows,
        "best_epoch": chosen,
        "effective_batch_size": batch_size,
        "effective_weight_decay": decay,
        "ema_momentum": averaged,
        # which rows picked the published model, and which rows its "valid" figures come from
        "model_selection": (
            {**selection, "monitor": f"select {monitor}", "epoch": chosen,
             "early_stopping": early_stopping, "patience": patience if early_stopping else None,
             "plateau_tolerance": config.plateau_tolerance if early_stopping else None,
             "refit": refit is not None}
            if selection is not None else
            {"rows": None, "epoch": chosen, "rule": f"the last epoch ({chosen}); no rows held out"}
        ),
        "scored": {"split": "valid", "path": str((data_dir / "valid").resolve()), "rows": valid_rows,
                   "read_by_model_selection": False},
        "fit_seconds": round(fit_seconds, 3),
        "targets": net.target_names,
    }
    if refit is not None:
        metrics["refit"] = refit
    try:
        _write_outputs(net, work, data_dir, record, metrics, trained=refit_dir if refit is not None else None)
        # the predictor loads only a model dir whose checksums match, with the ETL run it names
        write_manifest(work, stage="train", etl_run_id=etl_run)
    except OSError as err:
        _drop_partial_if_out_of_space(err, work)
        raise
    replace_dir(work, out_dir)
    logger.info("model written to %s; valid %s", out_dir, {k: round(v, 4) for k, v in metrics["valid"].items()})
    return metrics


def _refit(data_dir: Path, work: Path, config: TrainConfig, epochs: int, *, resume: bool,
           verbose: int | str) -> tuple[Path, dict]:
    """Train ``config`` again from the start on every training row for ``epochs`` epochs, in ``work``/refit.

    Returns ``(its model dir, its metrics.json)``. Resumable: the refit is an ordinary run with its own
    checkpoints (``work``/refit.partial), so ``--resume`` of the outer run continues it.
    """
    import subprocess
    import sys

    out = work / REFIT
    again = resume and any((d / CHECKPOINTS).is_dir() for d in (out, out.with_name(REFIT + ".partial")))
    logger.info("refit: %d epochs on every training row (the selection rows too)", epochs)
    # In a fresh process: run after another model in the same process, the same seed trains a different model
    # (real ML-100K random 80/20, seed 43: first-epoch loss 3.807 vs 3.702 in a fresh process, valid AUC 0.7729
    # vs 0.7981), and a refit is only worth making if it is the model its seed gives.
    job = {"data_dir": str(data_dir), "out_dir": str(out), "resume": again, "overwrite": True, "verbose": verbose,
           "config": asdict(replace(config, epochs=epochs, early_stopping=False, select_fraction=0.0, refit=False))}
    done = subprocess.run([sys.executable, "-c", "import sys; from pipeline.train import _train_in_child; "
                           "_train_in_child(sys.argv[1])", json.dumps(job)], preexec_fn=_die_with_parent)
    if done.returncode:
        raise RuntimeError(f"the refit run in {out} failed (exit {done.returncode}; its messages are above); "
                           "`train --resume` continues it")
    return out, json.loads((out / "metrics.json").read_text())


def _train_in_child(job: str) -> None:
    """``train_model`` from a JSON job (``_refit``), then leave as ``python -m pipeline`` does (its __main__)."""
    import atexit
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = json.loads(job)
    train_model(spec.pop("data_dir"), spec.pop("out_dir"), TrainConfig(**spec.pop("config")), **spec)
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _die_with_parent() -> None:
    """In the refit's process: a SIGKILL for it when the run that started it dies (Linux), so a killed
    ``train`` leaves no process behind to race the ``--resume`` that follows."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


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
    code = err.errno
    if code is None:  # pyarrow's OSError carries the code only in its text: "... [errno 27] File too large"
        found = re.search(r"\[errno (\d+)\]", str(err))
        code = int(found.group(1)) if found else None
    if code not in OUT_OF_SPACE:
        return
    shutil.rmtree(work, ignore_errors=True)
    raise OSError(code, f"{os.strerror(code)} while writing the model (the partial run was removed; "
                  "the previous model, if any, is unchanged)", str(work)) from err


def _write_outputs(net, work: Path, data_dir: Path, config: dict, metrics: dict, trained: Path | None = None) -> None:
    """model.keras and saved_model/ of ``net``, or moved from the model dir ``trained`` (the refit, which wrote
    its own), then schema.pbtxt, config.json and metrics.json."""
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
    if trained is not None:
        for name in ("model.keras", "saved_model"):
            (trained / name).rename(work / name)
        shutil.rmtree(trained)  # its checkpoints are not needed
    else:
        net.save(work / "model.keras")
        net.export(str(work / "saved_model"), format="tf_saved_model", input_signature=[net.input_signature()],
                   verbose=False)
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
    parser.add_argument("--resume", action="store_true", help="continue from the last epoch checkpoint")
    add_config_arguments(parser, TrainConfig, group="training settings")


def main(args: argparse.Namespace) -> dict:
    metrics = train_model(args.data, args.out, from_args(TrainConfig, args), resume=args.resume,
                          overwrite=args.overwrite)
    last = metrics["epochs"][-1] if metrics["epochs"] else {}
    return {"model_dir": str(args.out), "valid": metrics["valid"], "best_epoch": metrics["best_epoch"],
            "last_epoch_samples_per_second": last.get("samples_per_second")}

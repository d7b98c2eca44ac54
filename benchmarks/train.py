"""Training benchmark: our DLRM (blocks + merlin Loader) vs the same layers as a plain Keras model on arrays.

Usage::

    python -m pipeline etl --dataset synthetic --out /tmp/etl_full      # default-size synthetic ml-1m
    python benchmarks/train.py --data /tmp/etl_full [--epochs 3] [--batch-size 1024]

Both models are built in the same run with the same seed, widths and optimizer:

- **ours**: ``pipeline.models.DLRMModel(schema)`` trained with ``model.fit(merlin.io.Dataset, batch_size)``,
  i.e. streamed from parquet through ``pipeline.loader.Loader`` (merlin's dataloader) every epoch;
- **plain**: a Keras functional model of the same layers (Embedding tables of the schema's cardinalities,
  mean-combined genres, bottom MLP, ``keras_rs.layers.DotInteraction``, top MLP, sigmoid head) fed from
  numpy arrays already in memory (the time to build those arrays is reported apart).

Reported per model: samples/s of each training epoch (validation excluded), predict samples/s over the
valid split, valid AUC / logloss after each epoch; plus the generator's oracle AUC on the same valid rows
when the raw synthetic data (with oracle.parquet) is still where the ETL read it. Results go to
benchmarks/results/train.json and train.md with the command and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pipeline  # noqa: E402,F401  (dask settings before merlin)
from machine import describe_machine, write_results  # noqa: E402  (benchmarks/machine.py)
from pipeline.metrics import binary_logloss as logloss, roc_auc as auc  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"




def oracle_auc(etl_dir: Path) -> dict | None:
    """AUC of the generator's true P(rating > 3) on the valid rows the ETL produced (None if unavailable)."""
    from pipeline.datasets import read_movielens, read_oracle
    from pipeline.etl import split_ratings

    summary = json.loads((etl_dir / "etl.json").read_text())
    raw = Path(summary.get("raw") or "")
    if not (raw / "oracle.parquet").exists():
        return None
    ratings = read_movielens(summary.get("variant", "ml-1m"), raw).ratings
    _, valid = split_ratings(ratings, summary["split"], summary["valid_fraction"], summary["seed"])
    joined = valid.merge(read_oracle(raw), on=["userId", "movieId"], how="left")
    labels = (joined["rating"] > 3).to_numpy().astype(int)
    return {"auc": auc(labels, joined["p_positive"].to_numpy()), "logloss": logloss(labels, joined["p_positive"].to_numpy()),
            "rows": int(len(joined))}


class EpochTimer:
    """Keras callback factory: training seconds per epoch (validation excluded) and valid metrics."""

    def __new__(cls, rows: int, records: list):
        import keras

        class _Timer(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self.start, self.train_seconds = time.perf_counter(), None

            def on_test_begin(self, logs=None):
                if self.train_seconds is None:
                    self.train_seconds = time.perf_counter() - self.start

            def on_epoch_end(self, epoch, logs=None):
                seconds = self.train_seconds or time.perf_counter() - self.start
                records.append({"epoch": epoch + 1, "seconds": round(seconds, 2), "samples_per_second": round(rows / seconds),
                                **{k: round(float(v), 4) for k, v in (logs or {}).items() if k.startswith("val_")}})
                print(f"  epoch {epoch + 1}: {seconds:.1f} s, {rows / seconds:,.0f} samples/s, {records[-1]}", flush=True)

        return _Timer()


def in_memory_arrays(split_dir: Path, features: list[str], list_widths: dict[str, int], target: str):
    frame = pd.concat([pd.read_parquet(p) for p in sorted(split_dir.glob("*.parquet"))], ignore_index=True)
    x = {}
    for name in features:
        if name in list_widths:
            width = list_widths[name]
            padded = np.zeros((len(frame), width), dtype=np.int32)
            for i, ids in enumerate(frame[name]):
                padded[i, : len(ids)] = ids[:width]
            x[name] = padded
        else:
            x[name] = frame[name].to_numpy().reshape(-1, 1)
            if x[name].dtype == np.float64:
                x[name] = x[name].astype(np.float32)
    return x, frame[target].to_numpy().astype(np.float32).reshape(-1, 1)


def plain_keras_dlrm(schema, features: list[str], list_widths: dict[str, int], embedding_dim: int, embeddings_l2: float):
    """The same layers as DLRMModel, written as a plain Keras functional model."""
    import keras
    import keras_rs
    from merlin.schema import Tags

    from pipeline.models.features import cardinality

    continuous = [n for n in features if Tags.CONTINUOUS in schema[n].tags]
    categorical = [n for n in features if Tags.CATEGORICAL in schema[n].tags]
    inputs = {}
    for name in features:
        shape = (list_widths.get(name, 1),)
        inputs[name] = keras.Input(shape, name=name, dtype="float32" if name in continuous else "int32")
    vectors = {}
    for name in categorical:
        table = keras.layers.Embedding(cardinality(schema[name]), embedding_dim,
                                       embeddings_initializer=keras.initializers.TruncatedNormal(stddev=0.05))
        looked_up = table(inputs[name])  # (batch, width, dim)
        mask = keras.ops.cast(keras.ops.not_equal(inputs[name], 0), "float32")[..., None]
        if name in list_widths:
            vectors[name] = keras.ops.sum(looked_up * mask, axis=1) / keras.ops.maximum(keras.ops.sum(mask, axis=1), 1.0)
        else:
            vectors[name] = keras.ops.reshape(looked_up, (-1, embedding_dim))
        if embeddings_l2:
            # the same penalty as EmbeddingFeatures(l2_regularization=...): l2 * mean over the batch of |e|^2
            vectors[name] = keras.layers.ActivityRegularization(l2=embeddings_l2)(vectors[name])
    dense = keras.layers.Concatenate()([inputs[n] for n in sorted(continuous)])
    bottom = keras.layers.Dense(embedding_dim, activation="relu")(keras.layers.Dense(128, activation="relu")(dense))
    vectors["continuous"] = bottom
    interaction = keras_rs.layers.DotInteraction()([vectors[k] for k in sorted(vectors)])
    hidden = keras.layers.Concatenate()([bottom, interaction])
    for width in (128, 64, 32):
        hidden = keras.layers.Dense(width, activation="relu")(hidden)
    output = keras.layers.Dense(1, activation="sigmoid")(hidden)
    return keras.Model(inputs, output, name="plain_dlrm")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="ETL output dir (default-size synthetic ml-1m)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--learning-rate", type=float, default=None, help="default: the train stage's")
    parser.add_argument("--embedding-dim", type=int, default=None, help="default: the train stage's")
    parser.add_argument("--embeddings-l2", type=float, default=None, help="default: the train stage's")
    parser.add_argument("--weight-decay", type=float, default=None, help="AdamW's; default: the train stage's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "train.json")
    args = parser.parse_args()

    import keras
    import tensorflow as tf
    from merlin.io import Dataset

    import pipeline.models as mm
    from pipeline.train import DEFAULTS

    lr = args.learning_rate or DEFAULTS["learning_rate"]
    l2 = DEFAULTS["embeddings_l2"] if args.embeddings_l2 is None else args.embeddings_l2
    wd = DEFAULTS["weight_decay"] if args.weight_decay is None else args.weight_decay
    dim = args.embedding_dim or DEFAULTS["embedding_dim"]

    def optimizer():
        return keras.optimizers.AdamW(lr, weight_decay=wd) if wd else keras.optimizers.Adam(lr)
    load_start = os.getloadavg()
    train_ds = Dataset(str(args.data / "train"), engine="parquet")
    valid_ds = Dataset(str(args.data / "valid"), engine="parquet")
    train_rows, valid_rows = int(train_ds.num_rows), int(valid_ds.num_rows)
    tf.config.experimental.enable_op_determinism()
    results = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": describe_machine(),
               "config": {"epochs": args.epochs, "batch_size": args.batch_size, "learning_rate": lr,
                          "embedding_dim": dim, "embeddings_l2": l2, "weight_decay": wd, "seed": args.seed, "train_rows": train_rows,
                          "valid_rows": valid_rows, "data": str(args.data)},
               "versions": {"tensorflow": tf.__version__, "keras": keras.__version__}}

    # --- ours: schema -> DLRMModel, fit / predict on merlin Datasets through the Loader
    print("ours: DLRMModel on the merlin Loader", flush=True)
    keras.utils.set_random_seed(args.seed)
    ours = mm.DLRMModel(train_ds.schema, dim, prediction_tasks=mm.BinaryOutput("rating_binary"), embeddings_l2=l2)
    ours.compile(optimizer=optimizer())
    records: list = []
    started = time.perf_counter()
    ours.fit(train_ds, batch_size=args.batch_size, epochs=args.epochs, seed=args.seed, validation_data=valid_ds,
             validation_batch_size=4096, callbacks=[EpochTimer(train_rows, records)], verbose=0)
    fit_seconds = time.perf_counter() - started
    t = time.perf_counter()
    scores = ours.predict(valid_ds, batch_size=args.batch_size, verbose=0)[:, 0]
    predict_seconds = time.perf_counter() - t
    labels = pd.concat([pd.read_parquet(p, columns=["rating_binary"]) for p in sorted((args.data / "valid").glob("*.parquet"))],
                       ignore_index=True)["rating_binary"].to_numpy()
    results["ours"] = {"epochs": records, "fit_seconds": round(fit_seconds, 1),
                       "predict_samples_per_second": round(valid_rows / predict_seconds),
                       "valid_auc": round(auc(labels, scores), 4), "valid_logloss": round(logloss(labels, scores), 4)}

    # --- plain Keras: the same layers on in-memory numpy arrays
    print("plain: the same layers as a Keras functional model on in-memory arrays", flush=True)
    features = ours.input_feature_names()
    loader = ours.make_loader(train_ds, args.batch_size)
    widths = loader.list_widths
    loader.stop()
    t = time.perf_counter()
    x_train, y_train = in_memory_arrays(args.data / "train", features, widths, "rating_binary")
    x_valid, y_valid = in_memory_arrays(args.data / "valid", features, widths, "rating_binary")
    arrays_seconds = time.perf_counter() - t
    keras.utils.set_random_seed(args.seed)
    plain = plain_keras_dlrm(train_ds.schema, features, widths, dim, l2)
    plain.compile(optimizer=optimizer(), loss="binary_crossentropy",
                  metrics=[keras.metrics.AUC(name="auc"), keras.metrics.BinaryCrossentropy(name="logloss")])
    records = []
    started = time.perf_counter()
    plain.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.epochs, shuffle=True,
              validation_data=(x_valid, y_valid), validation_batch_size=4096,
              callbacks=[EpochTimer(train_rows, records)], verbose=0)
    fit_seconds = time.perf_counter() - started
    t = time.perf_counter()
    scores = plain.predict(x_valid, batch_size=args.batch_size, verbose=0)[:, 0]
    predict_seconds = time.perf_counter() - t
    results["plain_keras"] = {"epochs": records, "fit_seconds": round(fit_seconds, 1),
                              "arrays_seconds": round(arrays_seconds, 1),
                              "predict_samples_per_second": round(valid_rows / predict_seconds),
                              "valid_auc": round(auc(labels, scores), 4), "valid_logloss": round(logloss(labels, scores), 4)}

    results["oracle"] = oracle_auc(args.data)
    results["load_average"] = {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()]}
    write_results(args.out.with_suffix(""), results, render(results))
    print(render(results))
    return 0


def render(r: dict) -> str:
    lines = [
        "# Training benchmark (benchmarks/train.py)",
        "",
        f"Command: `{r['command']}`  ",
        f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores, {r['machine']['memory_gb']} GB, "
        f"Python {r['machine']['python']}; load average at start {r['load_average']['start']} (other jobs share the machine)  ",
        f"Data: {r['config']['train_rows']:,} train / {r['config']['valid_rows']:,} valid rows; batch {r['config']['batch_size']}, "
        f"lr {r['config']['learning_rate']}, embedding dim {r['config']['embedding_dim']}, "
        f"embeddings L2 {r['config']['embeddings_l2']}, AdamW weight decay {r['config'].get('weight_decay', 0)}, "
        f"seed {r['config']['seed']}; both models have the binary head only (same layers)",
        "",
        "| model | epoch | train samples/s | seconds | valid AUC | valid logloss |",
        "|---|---|---|---|---|---|",
    ]
    for key, label in (("ours", "ours: DLRMModel + merlin Loader"), ("plain_keras", "plain Keras on in-memory arrays")):
        for e in r[key]["epochs"]:
            lines.append(f"| {label} | {e['epoch']} | {e['samples_per_second']:,} | {e['seconds']} | "
                         f"{e.get('val_auc', '')} | {e.get('val_logloss', '')} |")
    lines += [
        "",
        "| model | predict samples/s (valid) | final valid AUC | final valid logloss |",
        "|---|---|---|---|",
        f"| ours | {r['ours']['predict_samples_per_second']:,} | {r['ours']['valid_auc']} | {r['ours']['valid_logloss']} |",
        f"| plain Keras | {r['plain_keras']['predict_samples_per_second']:,} | {r['plain_keras']['valid_auc']} | "
        f"{r['plain_keras']['valid_logloss']} |",
    ]
    if r.get("oracle"):
        lines += ["", f"Oracle (the generator's true P(rating > 3)) on the same valid rows: AUC {r['oracle']['auc']:.4f}, "
                      f"logloss {r['oracle']['logloss']:.4f}."]
    lines += ["", f"Plain Keras needed {r['plain_keras']['arrays_seconds']} s to build its in-memory arrays (not in its samples/s)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

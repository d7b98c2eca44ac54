"""Training trials of issue 12 item 2 that need another Keras backend or other layers: the Keras JAX backend and
one embedding table for all categorical features, on the DLRM layers of benchmarks/train.py's plain Keras model.

Usage::

    python benchmarks/train_trials.py --data scratch/etl-synth [--jax-python /tmp/jaxvenv/bin/python] [--epochs 3]

The arrays of --data (train / valid, the columns the train stage's DLRM reads) are written once as .npz, then each
trial runs in its own process on them, the same layers and optimizer as the train stage's defaults (AdamW with the
scaled weight decay, EMA of the weights, lr 2e-3, embedding dim 16, batch 1024, steps_per_execution 8):

- **tf, per-feature tables**: TensorFlow backend, one ``Embedding`` per categorical feature (today's layout);
- **tf, shared table**: one ``Embedding`` for all scalar categorical features, each feature's ids shifted by its
  row offset, looked up in one gather (the list feature, genres, keeps its own table);
- **jax**: the per-feature model on the Keras JAX backend (``KERAS_BACKEND=jax``), from a venv that has jax
  (``--jax-python``; jax is not in the project's lock), with ``steps_per_execution`` 8 and 1.

Results: benchmarks/results/train_trials.{json,md} (with --results benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import add_results_argument  # noqa: E402  (benchmarks/machine.py)

TRIALS = {  # name -> (backend, worker flags)
    "tf_per_feature": ("tensorflow", ["--tables", "per-feature", "--spe", "8"]),
    "tf_shared_table": ("tensorflow", ["--tables", "shared", "--spe", "8"]),
    "jax_per_feature_spe8": ("jax", ["--tables", "per-feature", "--spe", "8"]),
    "jax_per_feature_spe1": ("jax", ["--tables", "per-feature", "--spe", "1"]),
}


def write_arrays(data: Path, out: Path) -> None:
    """The train / valid columns of the train stage's DLRM as .npz, and meta.json (feature kinds, cardinalities)."""
    from merlin.io import Dataset
    from merlin.schema import Tags
    from train import in_memory_arrays  # benchmarks/train.py

    import pipeline  # noqa: F401  (dask settings before merlin)
    from pipeline.models.features import cardinality

    out.mkdir(parents=True, exist_ok=True)
    schema = Dataset(str(data / "train"), engine="parquet").schema
    cont = [c.name for c in schema if Tags.CONTINUOUS in c.tags and Tags.TARGET not in c.tags]
    cat = [c.name for c in schema if Tags.CATEGORICAL in c.tags and Tags.TARGET not in c.tags]
    widths = {c.name: int((c.properties.get("value_count") or {}).get("max") or 0) or 1 for c in schema if c.is_list}
    for split in ("train", "valid"):
        x, y = in_memory_arrays(data / split, cont + cat, widths, "rating_binary")
        np.savez(out / f"{split}.npz", y=y, **x)
    (out / "meta.json").write_text(json.dumps({"continuous": cont, "categorical": cat, "widths": widths,
                                               "cardinality": {n: int(cardinality(schema[n])) for n in cat}}))


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Rank (Mann-Whitney) AUC; no sklearn in either venv."""
    ranks = np.empty(len(scores))
    ranks[np.argsort(scores, kind="mergesort")] = np.arange(1, len(scores) + 1)
    positive = labels > 0.5
    n1, n0 = positive.sum(), (~positive).sum()
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def build_dlrm(meta: dict, tables: str, dim: int = 16):
    """benchmarks/train.py's plain Keras DLRM; ``tables="shared"``: one table for the scalar categorical features."""
    import keras
    import keras_rs

    cont, cat, widths, card = meta["continuous"], meta["categorical"], meta["widths"], meta["cardinality"]
    inputs = {n: keras.Input((widths.get(n, 1),), name=n, dtype="float32" if n in cont else "int32")
              for n in cont + cat}
    init = keras.initializers.TruncatedNormal(stddev=0.05)

    def pooled(table, ids):  # mean over the non-padding ids of a list feature
        mask = keras.ops.cast(keras.ops.not_equal(ids, 0), "float32")[..., None]
        return keras.ops.sum(table(ids) * mask, axis=1) / keras.ops.maximum(keras.ops.sum(mask, axis=1), 1.0)

    vectors = {}
    if tables == "per-feature":
        for n in cat:
            table = keras.layers.Embedding(card[n], dim, embeddings_initializer=init, name=f"emb_{n}")
            vectors[n] = pooled(table, inputs[n]) if n in widths else keras.ops.reshape(table(inputs[n]), (-1, dim))
    else:
        scalar = [n for n in cat if n not in widths]
        offsets = np.cumsum([0] + [card[n] for n in scalar[:-1]]).astype("int32")
        shared = keras.layers.Embedding(int(sum(card[n] for n in scalar)), dim, embeddings_initializer=init,
                                        name="emb_shared")
        ids = keras.layers.Concatenate(axis=1)([inputs[n] for n in scalar]) + keras.ops.convert_to_tensor(offsets)[None, :]
        looked_up = shared(ids)  # (batch, features, dim): one gather for every scalar feature
        for i, n in enumerate(scalar):
            vectors[n] = looked_up[:, i, :]
        for n in cat:
            if n in widths:
                vectors[n] = pooled(keras.layers.Embedding(card[n], dim, embeddings_initializer=init, name=f"emb_{n}"),
                                    inputs[n])
    dense = keras.layers.Concatenate()([inputs[n] for n in sorted(cont)])
    bottom = keras.layers.Dense(dim, activation="relu")(keras.layers.Dense(128, activation="relu")(dense))
    vectors["continuous"] = bottom
    hidden = keras.layers.Concatenate()([bottom, keras_rs.layers.DotInteraction()([vectors[k] for k in sorted(vectors)])])
    for width in (128, 64, 32):
        hidden = keras.layers.Dense(width, activation="relu")(hidden)
    return keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(hidden))


def worker(a) -> None:
    """One trial in this process (KERAS_BACKEND set by the caller); prints its figures as one JSON line."""
    started = time.perf_counter()
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()  # as the train stage does
    meta = json.loads((a.arrays / "meta.json").read_text())
    train, valid = np.load(a.arrays / "train.npz"), np.load(a.arrays / "valid.npz")
    features = meta["continuous"] + meta["categorical"]
    x_train, y_train = {n: train[n] for n in features}, train["y"]
    x_valid, y_valid = {n: valid[n] for n in features}, valid["y"]
    rows = len(y_train)
    keras.utils.set_random_seed(a.seed)
    model = build_dlrm(meta, a.tables)
    steps = -(-rows // a.batch)
    decay = 3.0 * min(1.0, (100 / steps) ** 0.5)  # pipeline.train.scaled_weight_decay of the default 3.0
    optimizer = keras.optimizers.AdamW(learning_rate=2e-3, weight_decay=decay, use_ema=True,
                                       ema_momentum=1 - 1 / max(2, steps))
    jit = {"auto": "auto", "true": True, "false": False}[a.jit]
    model.compile(optimizer=optimizer, loss="binary_crossentropy", metrics=[keras.metrics.AUC(name="auc")],
                  steps_per_execution=a.spe, jit_compile=jit)
    epochs = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            seconds = time.perf_counter() - self.start
            epochs.append(round(rows / seconds))
            print(f"  epoch {epoch + 1}: {seconds:.1f} s, {rows / seconds:,.0f} samples/s", file=sys.stderr, flush=True)

    t = time.perf_counter()
    model.fit(x_train, y_train, batch_size=a.batch, epochs=a.epochs, shuffle=True, callbacks=[Timer()], verbose=0)
    fit_seconds = time.perf_counter() - t
    model.compile(optimizer=optimizer, loss="binary_crossentropy", steps_per_execution=1, jit_compile=jit)
    predict = []
    for _ in range(2):  # the first call includes tracing / compiling the predict function
        t = time.perf_counter()
        scores = model.predict(x_valid, batch_size=a.batch, verbose=0)[:, 0]
        predict.append(round(len(scores) / (time.perf_counter() - t)))
    print(json.dumps({"backend": backend, "tables": a.tables, "spe": a.spe, "jit": a.jit, "epochs_samples_per_s": epochs,
                      "fit_s": round(fit_seconds, 1), "predict_rows_per_s": predict[0], "predict_rows_per_s_2nd": predict[1],
                      "valid_auc": round(roc_auc(y_valid[:, 0], scores), 4),
                      "process_s": round(time.perf_counter() - started, 1)}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="ETL output dir (default-size synthetic ml-1m)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--jax-python", type=Path, default=Path("/tmp/jaxvenv/bin/python"),
                        help="a Python with jax, keras and keras-rs (not the project's venv)")
    parser.add_argument("--runs", default=",".join(TRIALS))
    parser.add_argument("--scratch", type=Path, default=ROOT / "scratch" / "bench-train-trials")
    add_results_argument(parser)
    parser.add_argument("--append", action="store_true",
                        help="add these runs (as a later round) to the ones already in --results' train_trials.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--arrays", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tables", default="per-feature", help=argparse.SUPPRESS)
    parser.add_argument("--spe", type=int, default=8, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1024, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--jit", default="auto", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.worker:
        worker(a)
        return 0
    from machine import describe_machine, write_results

    arrays = a.scratch / "arrays"
    if not (arrays / "meta.json").exists():
        write_arrays(a.data, arrays)
    report = {"command": " ".join(["python", *sys.argv]), "machine": describe_machine(), "data": str(a.data),
              "epochs": a.epochs, "runs": {}}
    if a.append and (a.results / "train_trials.json").exists():
        earlier = json.loads((a.results / "train_trials.json").read_text())
        report["runs"] = earlier["runs"]
        report["command"] = f"{earlier['command']}; then {report['command']}"
        report["machine"]["load_average_earlier_runs"] = earlier["machine"]["load_average"]
    for name in [n.strip() for n in a.runs.split(",") if n.strip()]:
        backend, flags = TRIALS[name]
        python = str(a.jax_python) if backend == "jax" else sys.executable
        if backend == "jax" and not Path(python).exists():
            print(f"{name}: skipped ({python} missing)", flush=True)
            continue
        key = name
        while key in report["runs"]:  # a later round of the same trial
            key = f"{name} #{len([k for k in report['runs'] if k.split(' #')[0] == name]) + 1}"
        print(f"{key} ...", flush=True)
        load = os.getloadavg()[0]
        cmd = [python, __file__, "--worker", "--arrays", str(arrays), "--epochs", str(a.epochs), *flags]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "KERAS_BACKEND": backend})
        if done.returncode != 0:
            report["runs"][key] = {"error": done.stderr[-2000:]}
            print(done.stderr[-2000:], flush=True)
        else:
            report["runs"][key] = {**json.loads(done.stdout.strip().splitlines()[-1]), "load_at_start": round(load, 2)}
            print(f"  {report['runs'][key]}", flush=True)
        report["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        write_results(a.results / "train_trials", report, render(report))
    print(render(report))
    return 0


def render(r: dict) -> str:
    m = r["machine"]
    lines = ["# Training trials: Keras JAX backend, one shared embedding table (benchmarks/train_trials.py)", "",
             f"Command: `{r['command']}`  ",
             f"Machine: {m['cpu']}, {m['cores']} cores (shared with other jobs), load average at start "
             f"{m['load_average']}, at end {r.get('load_average_end')}  ",
             f"Data: {r['data']} (arrays of the train stage's DLRM columns); the DLRM layers of benchmarks/train.py's "
             f"plain Keras model, AdamW + EMA as the train stage, batch 1024, {r['epochs']} epochs, each run in its own process",
             "", "| trial | backend | tables | steps per execution | epoch samples/s | fit (s) | predict rows/s (1st, 2nd call) "
             "| valid AUC | load at start |", "|---|---|---|---|---|---|---|---|---|"]
    for name, run in r["runs"].items():
        if "error" in run:
            lines.append(f"| {name} | failed: {run['error'].splitlines()[-1][:120]} |||||||")
            continue
        eps = ", ".join(f"{e:,}" for e in run["epochs_samples_per_s"])
        lines.append(f"| {name} | {run['backend']} | {run['tables']} | {run['spe']} | {eps} | {run['fit_s']} | "
                     f"{run['predict_rows_per_s']:,}, {run['predict_rows_per_s_2nd']:,} | {run['valid_auc']} | "
                     f"{run['load_at_start']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

"""Where a training step's time goes as the data grows (issue 15): the loader alone, and the model step
with a small vs a large vocabulary on the same rows.

    python benchmarks/train_step.py --small scratch/scale/etl-1m --large scratch/scale/etl-25m-etl-inprocess

- **loader**: ``pipeline.loader.Loader`` over each ETL output's train split (the train stage's batch size,
  shuffled), iterated alone for ``--loader-batches`` batches: rows/s streamed chunk by chunk
  (``mode="stream"``) and by merlin.dataloader (``"merlin"``), and in memory for the small split (set-up
  excluded);
- **step**: the train stage's DLRM built from the small and from the large schema (same layers; only the
  embedding tables' rows differ), fitted on the same ``--steps`` in-memory batches of the small split (their
  ids exist in both vocabularies), with each optimizer variant (``OPTIMIZERS``): samples/s of the second
  pass (the first includes tracing).

Everything runs in this one process, one case after another; the load average is recorded per case.
Results: ``--results``/train_step.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from machine import add_results_argument, describe_machine, write_results  # noqa: E402

import pipeline  # noqa: E402,F401  (dask settings before merlin)

# name -> (weight decay, EMA, row-sparse embedding updates: pipeline.optimizers.RowSparseAdamW)
OPTIMIZERS = {
    "adamw+ema": dict(decay=True, ema=True),
    "adamw": dict(decay=True, ema=False),
    "adam": dict(decay=False, ema=False),
    "sgd": dict(sgd=True),
    "rowsparse+ema": dict(decay=True, ema=True, sparse=True),
}


def loader_rate(data: Path, batch_size: int, batches: int, mode: str, seed: int, via: str = "getitem") -> dict:
    """Rows/s of ``batches`` batches read alone: ``loader[i]`` (``via="getitem"``, Keras' PyDataset protocol) or
    the ``tf_dataset()`` pipeline Model.fit reads (``"tf.data"``)."""
    from merlin.io import Dataset

    from pipeline.train import _build_model

    ds = Dataset(str(data / "train"), engine="parquet")
    net = _build_model("dlrm", ds.schema, 16, None, 0.0)
    started = time.perf_counter()
    loader = net.make_loader(ds, batch_size, shuffle=True, seed=seed, mode=mode)
    setup = time.perf_counter() - started
    n = min(batches, len(loader))
    load0 = os.getloadavg()[0]
    started = time.perf_counter()
    rows = 0
    batches_read = loader.tf_dataset().take(n) if via == "tf.data" else (loader[i] for i in range(n))
    for features, _ in batches_read:
        rows += int(features["userId"].shape[0])
    seconds = time.perf_counter() - started
    loader.stop()
    return {"data": str(data), "mode": loader.mode, "via": via, "batches": n, "rows": rows, "seconds": round(seconds, 2),
            "rows_per_s": round(rows / seconds), "setup_s": round(setup, 2),
            "load": [round(load0, 2), round(os.getloadavg()[0], 2)]}


def make_variant(name: str, steps_per_epoch: int):
    import keras

    from pipeline.train import TrainConfig, ema_momentum, make_optimizer, scaled_weight_decay

    spec, config = OPTIMIZERS[name], TrainConfig()
    if spec.get("sgd"):
        return keras.optimizers.SGD(config.learning_rate)
    decay = scaled_weight_decay(config.weight_decay, steps_per_epoch) if spec["decay"] else 0.0
    momentum = ema_momentum(config.ema_epochs, steps_per_epoch) if spec["ema"] else None
    kwargs = {"row_sparse": spec.get("sparse", False)}
    return make_optimizer(config.learning_rate, decay, config.lr_schedule, total_steps=steps_per_epoch,
                          ema_momentum=momentum, **kwargs)


def step_rate(schema_data: Path, rows_data: Path, steps: int, batch_size: int, optimizer: str, seed: int,
              steps_per_execution: int | None) -> dict:
    import keras
    import tensorflow as tf
    from merlin.io import Dataset

    from pipeline.train import _build_model

    keras.utils.set_random_seed(seed)
    schema = Dataset(str(schema_data / "train"), engine="parquet").schema
    rows = Dataset(str(rows_data / "train"), engine="parquet")
    net = _build_model("dlrm", schema, 16, None, 0.0)
    loader = net.make_loader(rows, batch_size, shuffle=True, seed=seed, mode="memory")
    data = loader.tf_dataset().take(steps).cache()
    extra = {"steps_per_execution": steps_per_execution} if steps_per_execution else {}
    net.compile(optimizer=make_variant(optimizer, steps), **extra)
    net.build_training_state(data)
    table_rows = sum(int(v.shape[0]) for v in net.trainable_variables if "embedding" in v.path)
    times = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.start)

    load0 = os.getloadavg()[0]
    keras.Model.fit(net, data.repeat(), epochs=2, steps_per_epoch=steps, callbacks=[Timer()], verbose=0)
    loss = float(net.evaluate(data, verbose=0, return_dict=True)["loss"])
    del tf
    return {"vocab_of": str(schema_data), "optimizer": optimizer, "embedding_rows": table_rows,
            "steps": steps, "batch_size": batch_size, "steps_per_execution": net.steps_per_execution,
            "first_pass_s": round(times[0], 2), "seconds": round(times[1], 2),
            "samples_per_s": round(steps * batch_size / times[1]), "ms_per_step": round(1000 * times[1] / steps, 2),
            "loss_after": round(loss, 5), "load": [round(load0, 2), round(os.getloadavg()[0], 2)]}


def render(report: dict) -> str:
    lines = ["# Training step decomposition (issue 15)", "",
             f"`{report['command']}` on {report['machine']['cpu']}, {report['machine']['cores']} cores, shared "
             "(load average per row).", ""]
    if report.get("loader"):
        lines += ["## Loader alone", "", "| data | mode | read through | batches | rows/s | set-up s | load |",
                  "|---|---|---|---:|---:|---:|---|"]
        for r in report["loader"]:
            lines.append(f"| {r['data']} | {r['mode']} | {r.get('via', 'getitem')} | {r['batches']} | {r['rows_per_s']:,} | "
                         f"{r['setup_s']} | "
                         f"{r['load'][0]}-{r['load'][1]} |")
        lines.append("")
    if report.get("step"):
        lines += ["## Model step on the same in-memory rows", "",
                  "| vocabulary of | embedding rows | optimizer | steps/exec | ms/step | samples/s | loss after | load |",
                  "|---|---:|---|---:|---:|---:|---:|---|"]
        for r in report["step"]:
            lines.append(f"| {Path(r['vocab_of']).name} | {r['embedding_rows']:,} | {r['optimizer']} | "
                         f"{r['steps_per_execution']} | {r['ms_per_step']} | {r['samples_per_s']:,} | {r['loss_after']} | "
                         f"{r['load'][0]}-{r['load'][1]} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=Path, required=True, help="ETL output whose rows (and small vocab) are used")
    parser.add_argument("--large", type=Path, required=True, help="ETL output whose vocabulary (and rows, loader) is large")
    parser.add_argument("--cases", nargs="+", default=["loader", "step"], choices=["loader", "step"])
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--loader-batches", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--steps-per-execution", type=int, nargs="+", default=[0],
                        help="0: the model's default")
    parser.add_argument("--seed", type=int, default=0)
    add_results_argument(parser)
    args = parser.parse_args()
    report = {"command": "python benchmarks/train_step.py " + " ".join(sys.argv[1:]), "machine": describe_machine(),
              "loader": [], "step": []}
    if "loader" in args.cases:
        for data, mode, via in ((args.small, "memory", "tf.data"), (args.small, "stream", "tf.data"),
                                (args.small, "stream", "getitem"), (args.small, "merlin", "getitem"),
                                (args.large, "stream", "tf.data"), (args.large, "stream", "getitem"),
                                (args.large, "merlin", "getitem")):
            report["loader"].append(loader_rate(data, args.batch_size, args.loader_batches, mode, args.seed, via))
            print(report["loader"][-1], flush=True)
    if "step" in args.cases:
        for spe in args.steps_per_execution:
            for optimizer in args.optimizers:
                for vocab in (args.small, args.large):
                    report["step"].append(step_rate(vocab, args.small, args.steps, args.batch_size, optimizer,
                                                    args.seed, spe or None))
                    print(report["step"][-1], flush=True)
    write_results(args.results / "train_step", report, render(report))
    print(render(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

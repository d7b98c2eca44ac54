"""Can training run data-parallel over 2 processes on this stack (TF 2.21, Keras 3) with MultiWorkerMirroredStrategy?

    python benchmarks/multiworker.py            # both probes, 2 worker processes each on 127.0.0.1

Each probe starts two worker processes with a TF_CONFIG naming both (127.0.0.1, free ports), builds the
same small Keras 3 model under ``tf.distribute.MultiWorkerMirroredStrategy`` and trains 2 epochs on the
same seeded data (200,000 rows, 16 features, a planted linear rule, global batch 1024):

- ``fit``: ``model.fit(tf.data.Dataset)``, the way the train stage trains;
- ``loop``: a custom loop, ``strategy.run`` of a GradientTape step on the distributed dataset.

A third run, ``single``, trains the loop's model in one process without a strategy, for the final
loss. Writes benchmarks/results/multiworker.md / .json: per probe, exit status, the error line if
any, seconds, the final loss and whether both workers ended with identical weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

WORKER = r'''
import json, os, sys, time
mode, index, ports = sys.argv[1], int(sys.argv[2]), sys.argv[3:5]
if mode != "single":
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                                          "task": {"type": "worker", "index": index}})
import numpy as np, tensorflow as tf, keras
keras.utils.set_random_seed(0)
strategy = tf.distribute.MultiWorkerMirroredStrategy() if mode != "single" else tf.distribute.get_strategy()
rng = np.random.default_rng(0)
x = rng.standard_normal((200_000, 16)).astype("float32")
y = (x @ rng.standard_normal(16) > 0).astype("float32")[:, None]
data = tf.data.Dataset.from_tensor_slices((x, y)).batch(1024)
with strategy.scope():
    model = keras.Sequential([keras.layers.Input((16,)), keras.layers.Dense(32, activation="relu"),
                              keras.layers.Dense(1, activation="sigmoid")])
    optimizer = keras.optimizers.Adam()
start = time.perf_counter()
losses = []
if mode == "fit":
    model.compile(optimizer=optimizer, loss="binary_crossentropy")
    losses = model.fit(data, epochs=2, verbose=0).history["loss"]
else:
    per_example = keras.losses.BinaryCrossentropy(reduction="none")
    with strategy.scope():
        optimizer.build(model.trainable_variables)
    def replica_step(xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.nn.compute_average_loss(per_example(yb, model(xb, training=True)))
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        return loss
    @tf.function
    def step(batch):
        # each replica's loss is already divided by the global batch: their sum is the batch mean
        return strategy.reduce("SUM", strategy.run(replica_step, args=batch), axis=None)
    batches = strategy.experimental_distribute_dataset(data) if mode == "loop" else data
    for epoch in range(2):
        values = [float(step(batch)) for batch in batches]
        losses.append(sum(values) / len(values))
print("RESULT " + json.dumps({"seconds": round(time.perf_counter() - start, 2), "losses": losses,
                              "weights_sum": float(sum(float(np.sum(w)) for w in model.get_weights()))}), flush=True)
'''


def run_probe(mode: str) -> dict:
    from pipeline.serve import free_port

    ports = [str(free_port()), str(free_port())]
    n = 1 if mode == "single" else 2
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    procs = [subprocess.Popen(["nice", "-n", "10", sys.executable, "-c", WORKER, mode, str(i), *ports],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for i in range(n)]
    start = time.perf_counter()
    outputs = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        outputs.append((proc.returncode, out))
    workers = []
    for code, out in outputs:
        result = next((json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")), None)
        errors = [line for line in out.splitlines() if line.split(":")[0].endswith("Error")]
        workers.append({"exit": code, "result": result, "error": errors[-1][:300] if errors else None})
    sums = [w["result"]["weights_sum"] for w in workers if w["result"]]
    return {"mode": mode, "wall_s": round(time.perf_counter() - start, 1), "workers": workers,
            "same_weights_on_every_worker": len(sums) == n and len(set(sums)) == 1}


def main() -> None:
    from machine import describe_machine, write_results

    report = {"machine": describe_machine(), "probes": [run_probe(mode) for mode in ("fit", "loop", "single")]}
    lines = ["# Data-parallel training over 2 processes (MultiWorkerMirroredStrategy), CPU", "",
             f"`python benchmarks/multiworker.py`; load average at the start {report['machine']['load_average']} "
             "(2 shared cores). Same model and data in every probe (see the script's docstring).", "",
             "| probe | processes | exit codes | wall s | final loss (epoch 2) | same weights on both | error |",
             "|---|---:|---|---:|---:|---|---|"]
    for p in report["probes"]:
        losses = [w["result"]["losses"][-1] for w in p["workers"] if w["result"]]
        err = next((w["error"] for w in p["workers"] if w["error"]), "")
        lines.append(f"| {p['mode']} | {len(p['workers'])} | {', '.join(str(w['exit']) for w in p['workers'])} | "
                     f"{p['wall_s']} | {', '.join(f'{v:.4f}' for v in losses) or '-'} | "
                     f"{p['same_weights_on_every_worker']} | {err.replace('|', '/')} |")
    write_results(REPO / "benchmarks" / "results" / "multiworker", report, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Serving benchmark: latency of the HTTP API, batch predict throughput, and the per-request transform
against NVTabular's naive path, all measured in one run on the same artifacts.

    .venv/bin/python benchmarks/serve.py                       # builds data/bench-serve/{etl,model} if missing
    .venv/bin/python benchmarks/serve.py --data DIR --model MODEL_DIR

Measured:
- per-request transform of one pair and of all movies for one user, in-process: the naive
  ``workflow.transform(nvt.Dataset(df))`` (a Dask graph per request), merlin's ``LocalExecutor``
  (what the predictor runs for unseen ids, or for every id without the cache),
  and the ``FeatureCache`` lookup;
- p50 / p99 client-side latency of a one-pair ``POST /predict`` and of ``GET /recommend?k=10`` (every
  movie scored) against ``python -m pipeline serve`` running in its own process on 127.0.0.1, with
  and without the feature cache;
- 20 concurrent clients x 100 one-pair requests with httpx threads (the method of the earlier figure);
- the same throughput with ``pipeline.serve.mixed_load``'s asyncio client (valid pairs only), with the
  server's own CPU time per request (from /proc), and with ``wrk`` when it is installed;
- the mixed load (valid, invalid, oversize, disconnecting and silent clients at once, 20 clients):
  throughput, p50 / p99 of the valid requests, lost / mixed-up answers, health after;
- the raw-request SavedModel (``python -m pipeline export``): one pair in-process, p50 / p99;
- ``python -m pipeline predict`` throughput (rows/s) on a parquet of random pairs.

Results: benchmarks/results/serve.json and serve.md (with the command and the machine).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
from machine import (  # benchmarks/machine.py (the script's own folder is on sys.path)
    add_results_argument,
    describe_machine,
    write_results,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipeline  # noqa: E402,F401  (dask settings before nvtabular)


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "mean_ms": round(float(ms.mean()), 3), "n": len(ms)}


def timed(fn, repeats: int, warmup: int = 3) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return percentiles(seconds)




def ensure_artifacts(data: Path, model: Path) -> None:
    """Full-size synthetic ml-1m ETL output and a 1-epoch DLRM, built only if missing."""
    from pipeline.etl import run_etl
    from pipeline.train import train_model

    if not (data / "workflow").exists():
        run_etl("synthetic", data, raw=data.parent / "raw", seed=0)
    if not (model / "model.keras").exists():
        train_model(data, model, epochs=1, seed=0)


def transform_comparison(cached, pairs: pd.DataFrame, user_rows: pd.DataFrame, repeats: int) -> dict:
    import nvtabular as nvt
    from merlin.dag.executors import LocalExecutor

    serving = cached.serving
    local = LocalExecutor()
    out = {}
    for label, frame, n in (("one_pair", pairs.iloc[:1].reset_index(drop=True), repeats),
                            ("all_movies_one_user", user_rows, max(5, repeats // 10))):
        def naive(frame=frame):
            return serving.transform(nvt.Dataset(frame.copy(), cpu=True)).to_ddf().compute()

        out[label] = {
            "rows": len(frame),
            "naive_workflow_transform_dataset": timed(naive, max(5, n // 10)),
            "merlin_local_executor": timed(lambda frame=frame: local.transform(frame.copy(), serving.output_node), n),
            "feature_cache": timed(lambda frame=frame: cached.cache.lookup(frame), n) if cached.cache else None,
        }
        # the paths agree: the same features from the naive path and the in-process one
        graph = local.transform(frame.copy(), serving.output_node)
        naive_out = naive()
        for col in graph.columns:
            if not graph[col].map(repr).equals(naive_out[col].reset_index(drop=True).map(repr)):
                raise AssertionError(f"naive and in-process transforms differ on {col}")
    return out


@contextlib.contextmanager
def server_process(data: Path, model: Path, *extra: str):
    """``python -m pipeline serve`` in its own process (as a user runs it); yields ``(url, pid)``."""
    from pipeline.serve import serve_in_subprocess

    with serve_in_subprocess("--data", str(data), "--model-dir", str(model), *extra, startup_timeout=300,
                             stdout=subprocess.DEVNULL, cwd=ROOT) as (process, url):
        yield url, process.pid


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (all its threads)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def async_throughput(url: str, pid: int, pairs: pd.DataFrame, clients: int = 20, per_client: int = 150) -> dict:
    """Valid one-pair requests only, through mixed_load's cheap asyncio client; server CPU per request."""
    from pipeline.serve import mixed_load

    mixed_load(url, pairs.iloc[:50], clients=clients, requests_per_client=20, mix={"valid": 1.0},
               silent_clients=0, max_pairs=1)  # warm-up (and the reference pass of its own)
    before = cpu_seconds(pid)
    report = mixed_load(url, pairs, clients=clients, requests_per_client=per_client, mix={"valid": 1.0},
                        silent_clients=0, max_pairs=1)
    spent = cpu_seconds(pid) - before
    summary = report.summary()
    answered = sum(report.outcomes["valid"].values())
    reference_requests = len(pairs)  # the reference pass also ran on the server, one request per pair
    return {"clients": clients, "requests": answered, "requests_per_second": summary["valid_per_second"],
            "p50_ms": summary["valid_p50_ms"], "p99_ms": summary["valid_p99_ms"], "lost": summary["lost"],
            "wrong": summary["wrong"],
            "server_cpu_ms_per_request": round(1e3 * spent / (answered + reference_requests), 3)}


WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local bodies = {%s}
local i = 0
request = function()
  i = i + 1
  return wrk.format(nil, "/predict", nil, bodies[(i %% #bodies) + 1])
end
"""


def wrk_throughput(url: str, pairs: pd.DataFrame, clients: int = 20, seconds: int = 10) -> dict | None:
    """``wrk`` (a C load generator, one thread) with ``clients`` connections of one-pair requests, if installed."""
    import re
    import shutil

    if shutil.which("wrk") is None:
        return None
    bodies = ", ".join("'" + json.dumps({"pairs": [{"userId": int(r.userId), "movieId": int(r.movieId)}]}) + "'"
                       for r in pairs.iloc[:200].itertuples())
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT % bodies)
    out = subprocess.run(["wrk", "-t1", f"-c{clients}", f"-d{seconds}s", "--latency", "-s", script.name, url],
                         capture_output=True, text=True, timeout=seconds + 60).stdout
    os.unlink(script.name)

    def ms(label):
        m = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return None
        return round(float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)], 3)

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"clients": clients, "seconds": seconds, "requests_per_second": float(rps.group(1)) if rps else None,
            "p50_ms": ms("50%"), "p99_ms": ms("99%"), "non_2xx": int(errors.group(1)) if errors else 0,
            "output": out}


def mixed(url: str, pairs: pd.DataFrame, clients: int = 20, per_client: int = 150) -> dict:
    """The mixed load of the issue: valid, invalid, oversize, disconnecting and silent clients at once."""
    from pipeline.serve import mixed_load

    report = mixed_load(url, pairs.iloc[:300], clients=clients, requests_per_client=per_client, silent_clients=10)
    return report.summary()


def raw_export_latency(predictor, workdir: Path, repeats: int) -> dict:
    """The raw-request SavedModel, loaded back with tf.saved_model.load: one pair, in-process."""
    import tensorflow as tf

    from pipeline.export import export_raw_model

    info = export_raw_model(predictor, workdir / "serving_raw")
    model = tf.saved_model.load(str(workdir / "serving_raw"))
    signature = model.signatures["serving_default"]
    users, movies = predictor.cache.keys["userId"], predictor.cache.keys["movieId"]
    rng = np.random.default_rng(0)
    ids = [(tf.constant([int(u)], tf.int64), tf.constant([int(m)], tf.int64))
           for u, m in zip(rng.choice(users, 64), rng.choice(movies, 64))]

    def one_pair(i=[0]):  # noqa: B006  (a counter)
        u, m = ids[i[0] % len(ids)]
        i[0] += 1
        signature(userId=u, movieId=m)["score"].numpy()

    return {"export_seconds": info["seconds"], "max_abs_difference_to_predictor": info["max_abs_difference_to_predictor"],
            "one_pair_serving_default": timed(one_pair, repeats, warmup=50)}


def http_latency(url: str, pairs: pd.DataFrame, users: np.ndarray, n_predict: int, n_recommend: int) -> dict:
    import httpx

    with httpx.Client(base_url=url, timeout=120) as http:
        def one_pair(i=[0]):  # noqa: B006  (a counter)
            row = pairs.iloc[i[0] % len(pairs)]
            i[0] += 1
            r = http.post("/predict", json={"pairs": [{"userId": int(row.userId), "movieId": int(row.movieId)}]})
            r.raise_for_status()

        def recommend(i=[0]):  # noqa: B006
            user = int(users[i[0] % len(users)])
            i[0] += 1
            r = http.get("/recommend", params={"userId": user, "k": 10})
            r.raise_for_status()
            assert len(r.json()["items"]) == 10

        return {"predict_one_pair": timed(one_pair, n_predict, warmup=20),
                "recommend_k10_all_movies": timed(recommend, n_recommend, warmup=5)}


def http_concurrent(url: str, pairs: pd.DataFrame, clients: int = 20, per_client: int = 100) -> dict:
    import httpx

    before = httpx.get(url + "/metadata").json()["server"]  # url: the server's base URL
    latencies: list[float] = []
    lock = threading.Lock()

    def run(c: int) -> None:
        mine = []
        with httpx.Client(base_url=url, timeout=120) as http:
            for i in range(per_client):
                row = pairs.iloc[(c * per_client + i) % len(pairs)]
                start = time.perf_counter()
                r = http.post("/predict", json={"pairs": [{"userId": int(row.userId), "movieId": int(row.movieId)}]})
                r.raise_for_status()
                mine.append(time.perf_counter() - start)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    after = httpx.get(url + "/metadata").json()["server"]
    return {"clients": clients, "requests_per_client": per_client, "seconds": round(wall, 3),
            "requests_per_second": round(clients * per_client / wall, 1), **percentiles(latencies),
            "model_calls": after["batches"] - before["batches"], "requests_batched": after["requests"] - before["requests"]}


def httpx_status(url: str) -> int:
    import httpx

    return httpx.get(url, timeout=30).status_code


def batch_predict(predictor, users: np.ndarray, rows: int, workdir: Path, rng) -> dict:
    from pipeline.inference import predict_file

    frame = pd.DataFrame({"userId": rng.choice(users, rows), "movieId": rng.choice(predictor.candidate_items, rows)})
    src = workdir / "pairs.parquet"
    frame.to_parquet(src, index=False)
    start = time.perf_counter()
    predict_file(predictor, src, workdir / "scores.parquet", progress=False)
    wall = time.perf_counter() - start
    return {"rows": rows, "seconds": round(wall, 3), "rows_per_second": round(rows / wall, 1),
            "batch_size": 65_536}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "bench-serve" / "etl")
    parser.add_argument("--model", type=Path, default=ROOT / "data" / "bench-serve" / "model")
    parser.add_argument("--requests", type=int, default=500, help="one-pair requests timed per path")
    parser.add_argument("--batch-rows", type=int, default=1_000_000, help="rows for the batch predict run")
    add_results_argument(parser)
    args = parser.parse_args()

    import logging

    logging.basicConfig(level=logging.WARNING)
    ensure_artifacts(args.data, args.model)
    from pipeline.inference import Predictor

    info = {"command": "python benchmarks/serve.py " + " ".join(sys.argv[1:]), "machine": describe_machine(),
            "data": str(args.data), "model": str(args.model)}
    etl = json.loads((args.data / "etl.json").read_text())
    info["dataset_rows"] = etl.get("rows")
    rng = np.random.default_rng(0)

    start = time.perf_counter()
    cached = Predictor.load(args.data, args.model)
    info["load_seconds_with_cache"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    graph = Predictor.load(args.data, args.model, feature_cache=False)
    info["load_seconds_graph_only"] = round(time.perf_counter() - start, 2)

    users = cached.cache.keys["userId"]
    pairs = pd.DataFrame({"userId": rng.choice(users, 5000), "movieId": rng.choice(cached.candidate_items, 5000)})
    user_rows = pd.DataFrame({"userId": np.full(len(cached.candidate_items), users[0]), "movieId": cached.candidate_items})
    info["movies"] = len(cached.candidate_items)
    info["users"] = len(users)

    results = {"transform": transform_comparison(cached, pairs, user_rows, args.requests)}
    # The servers run in their own process (the CLI), as in production: the client's threads do not
    # share the server's interpreter lock.
    with server_process(args.data, args.model) as (url, pid):
        results["http_feature_cache"] = http_latency(url, pairs, users, args.requests, max(50, args.requests // 2))
        results["http_concurrent_20x100_feature_cache"] = http_concurrent(url, pairs)
        results["http_async_client_20_clients"] = async_throughput(url, pid, pairs.iloc[:300])
        results["http_async_client_1_client"] = async_throughput(url, pid, pairs.iloc[:300], clients=1, per_client=1000)
        results["wrk_20_connections"] = wrk_throughput(url, pairs)
        results["mixed_load_20_clients"] = mixed(url, pairs)
        results["healthy_after_all_loads"] = httpx_status(url + "/healthz") == 200
    with server_process(args.data, args.model, "--no-raw-graph") as (url, pid):
        results["http_predictor_predict"] = http_latency(url, pairs, users, args.requests, 20)
        results["http_async_client_20_clients_predictor_predict"] = async_throughput(url, pid, pairs.iloc[:300])
    with server_process(args.data, args.model, "--no-feature-cache") as (url, pid):
        results["http_serving_graph"] = http_latency(url, pairs, users, max(50, args.requests // 5), 50)
    with tempfile.TemporaryDirectory() as tmp:
        results["raw_export"] = raw_export_latency(cached, Path(tmp), max(1000, args.requests * 2))
        results["batch_predict_feature_cache"] = batch_predict(cached, users, args.batch_rows, Path(tmp), rng)
        results["batch_predict_serving_graph"] = batch_predict(graph, users, args.batch_rows, Path(tmp), rng)
    info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report = {**info, "results": results}

    write_results(args.results / "serve", report, render(report))
    print(render(report))
    return 0


def render(report: dict) -> str:
    r = report["results"]
    t1, tall = r["transform"]["one_pair"], r["transform"]["all_movies_one_user"]
    hc, hg, cc = r["http_feature_cache"], r["http_serving_graph"], r["http_concurrent_20x100_feature_cache"]

    def row(label, stats):
        return f"| {label} | {stats['p50_ms']:.2f} | {stats['p99_ms']:.2f} | {stats['n']} |" if stats else f"| {label} | - | - | - |"

    lines = [
        "# Serving benchmark",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, {report['machine']['memory_gb']} GB, "
        f"no GPU; load average at start {tuple(round(x, 2) for x in report['machine']['load_average'])}, "
        f"at end {tuple(report.get('load_average_at_end') or ())} (2 cores: above 2, other jobs shared the machine)  ",
        f"Data: {report['data']} ({report['dataset_rows']}), {report['users']} users, {report['movies']} movies  ",
        f"Predictor load: {report['load_seconds_with_cache']} s with the feature cache, "
        f"{report['load_seconds_graph_only']} s without (the first includes importing TensorFlow)",
        "",
        "## Per-request transform (in-process, ms)",
        "",
        "| path | p50 | p99 | n |",
        "|---|---|---|---|",
        row("one pair: naive workflow.transform(nvt.Dataset(df))", t1["naive_workflow_transform_dataset"]),
        row("one pair: merlin LocalExecutor", t1["merlin_local_executor"]),
        row("one pair: FeatureCache lookup", t1["feature_cache"]),
        row(f"{tall['rows']} movies x 1 user: naive", tall["naive_workflow_transform_dataset"]),
        row(f"{tall['rows']} movies x 1 user: merlin LocalExecutor", tall["merlin_local_executor"]),
        row(f"{tall['rows']} movies x 1 user: FeatureCache lookup", tall["feature_cache"]),
        "",
        "## HTTP, one client, sequential (client-side ms; target p99 < 10 one pair, < 50 top-10)",
        "",
        "| request | p50 | p99 | n |",
        "|---|---|---|---|",
        row("POST /predict one pair (feature cache)", hc["predict_one_pair"]),
        row("GET /recommend k=10 over all movies (feature cache)", hc["recommend_k10_all_movies"]),
        row("POST /predict one pair (serving graph per request)", hg["predict_one_pair"]),
        row("GET /recommend k=10 (serving graph per request)", hg["recommend_k10_all_movies"]),
        row("POST /predict one pair (scored by Predictor.predict, --no-raw-graph)", r["http_predictor_predict"]["predict_one_pair"]),
        "",
        "## Throughput, one-pair POST /predict (target with 20 clients: >= 2 x 410 = 820 requests/s)",
        "",
        "| client | requests/s | p50 ms | p99 ms | server CPU ms / request |",
        "|---|---|---|---|---|",
        f"| httpx, 20 threads x 100 (the earlier figure's method) | {cc['requests_per_second']} | {cc['p50_ms']:.2f} | "
        f"{cc['p99_ms']:.2f} | - |",
        *[f"| {label} | {a['requests_per_second']} | {a['p50_ms']:.2f} | {a['p99_ms']:.2f} | "
          f"{a['server_cpu_ms_per_request']} |"
          for label, a in (("asyncio client (mixed_load), 1 client", r["http_async_client_1_client"]),
                           ("asyncio client (mixed_load), 20 clients", r["http_async_client_20_clients"]),
                           ("asyncio client, 20 clients, server scoring with Predictor.predict",
                            r["http_async_client_20_clients_predictor_predict"]))],
        (f"| wrk, 1 thread, 20 connections, {r['wrk_20_connections']['seconds']} s | "
         f"{r['wrk_20_connections']['requests_per_second']} | {r['wrk_20_connections']['p50_ms']} | "
         f"{r['wrk_20_connections']['p99_ms']} | - |" if r.get("wrk_20_connections") else "| wrk | not installed | | | |"),
        "",
        f"httpx threads: {cc['requests_batched']} requests in {cc['model_calls']} model calls.",
        "",
        "## Mixed load (20 clients: valid pairs, invalid bodies, oversize bodies, disconnects; 10 silent connections)",
        "",
        f"- sent: {r['mixed_load_20_clients']['sent']}",
        f"- outcomes: {r['mixed_load_20_clients']['outcomes']}",
        f"- answered {r['mixed_load_20_clients']['answered_per_second']} requests/s; valid requests p50 "
        f"{r['mixed_load_20_clients']['valid_p50_ms']} ms, p99 {r['mixed_load_20_clients']['valid_p99_ms']} ms",
        f"- lost: {r['mixed_load_20_clients']['lost']}, mixed up: {r['mixed_load_20_clients']['wrong']} (largest "
        f"difference to the single-request score: {r['mixed_load_20_clients']['max_ulps_from_single_request']} float32 ulps); "
        f"silent connections closed by the server after {r['mixed_load_20_clients']['silent_connections_closed_by_server_after_s']} s; "
        f"healthy after: {r['mixed_load_20_clients']['healthy_after']} (and after every load: {r['healthy_after_all_loads']})",
        "",
        "## Raw-request SavedModel (`python -m pipeline export`), one pair in-process (target p99 < 2 ms)",
        "",
        "| call | p50 | p99 | n |",
        "|---|---|---|---|",
        row("tf.saved_model.load(...).signatures['serving_default']", r["raw_export"]["one_pair_serving_default"]),
        "",
        f"Export took {r['raw_export']['export_seconds']} s; largest difference to Predictor.predict on its check pairs: "
        f"{r['raw_export']['max_abs_difference_to_predictor']}.",
        "",
        "## Batch predict (`predict_file`, parquet in and out, batches of 65,536)",
        "",
        f"- feature cache: {r['batch_predict_feature_cache']['rows_per_second']:,.0f} rows/s "
        f"({r['batch_predict_feature_cache']['rows']:,} rows in {r['batch_predict_feature_cache']['seconds']} s)",
        f"- serving graph: {r['batch_predict_serving_graph']['rows_per_second']:,.0f} rows/s "
        f"({r['batch_predict_serving_graph']['rows']:,} rows in {r['batch_predict_serving_graph']['seconds']} s)",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

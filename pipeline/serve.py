"""HTTP JSON API over a ``Predictor``: FastAPI app, a micro-batcher, the server and the ``serve`` CLI stage.

Endpoints:

- ``POST /predict`` ``{"pairs": [{"userId": 1, "movieId": 31}, ...]}`` -> ``{"scores": [...]}`` in request order;
- ``GET /recommend?userId=..&k=10&exclude_rated=false`` -> ``{"userId": .., "items": [{"movieId": .., "score": ..}]}``,
  every known movie scored for the user in one batch;
- ``GET /healthz`` liveness: 200 ``{"status": "ok"}``, or 503 when the micro-batcher thread is not running or
  the model has produced non-finite scores (the process needs a restart, or the model replacing);
- ``GET /readyz`` readiness: 200 once the model is loaded and warmed up, 503 while shutting down or unhealthy;
- ``GET /metadata`` -> model, workflow, schema, versions, metrics and server settings;
- ``GET /metrics`` -> Prometheus text format (requests by endpoint and status, latencies, batch sizes,
  queue depth, the model's and workflow's manifest fingerprints).

Every error answers ``{"error": "..."}``: 422 for a bad body or parameter (naming the field, e.g.
``pairs[3].movieId``), 404 / 405 for unknown routes and methods, 413 for a body over the size limit
(checked on ``Content-Length`` and on the bytes streamed, before anything is parsed), 500 when
scoring failed or gave non-finite scores, 503 when the batcher is not running, 504 when scoring did
not finish within the request timeout.

Concurrent ``/predict`` requests are merged by ``MicroBatcher``: one worker thread takes the
first pending request, drains the queue of whatever else is waiting (up to ``max_rows``, waiting
at most ``max_delay`` seconds for more), scores everything with one model call, and hands each
request its own slice of the scores. A request whose caller gave up (its future was cancelled,
e.g. by the request timeout) is skipped; an error is confined to the requests it concerns and the
thread carries on.

The server (``run_server``) is uvicorn with three additions: each request must arrive in full within
``read_timeout`` seconds of its first byte (or of the connection opening), so idle or half-sent
connections are closed; SIGTERM / SIGINT stop accepting connections, finish the requests already
received, and return normally (exit status 0); the port is bound before the model is loaded.
Every request is logged as one JSON line on the ``pipeline.serve.access`` logger.

``mixed_load`` is a bounded load generator for this API (valid, invalid, oversize, silent and
disconnecting clients at once), used by the tests and ``benchmarks/serve.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import errno
import gc
import hashlib
import json
import logging
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from pipeline.config import add_arguments as add_config_arguments
from pipeline.config import add_renamed, documented, from_args, setting
from pipeline.errors import DataError, PipelineError, UsageError

if TYPE_CHECKING:
    import pandas as pd
    from fastapi import FastAPI

    from pipeline.inference import Predictor
    from pipeline.retrieval import Retriever

logger = logging.getLogger(__name__)
access_logger = logging.getLogger(__name__ + ".access")

MAX_PAIRS_PER_REQUEST = 100_000
MAX_ID = 2**63 - 1  # ids travel as int64
# 100,000 pairs of 7-digit ids are ~4.5 MB of JSON: the default body limit leaves room for them.
DEFAULT_MAX_BODY_BYTES = 8 * 2**20
ENDPOINTS = ("/predict", "/recommend", "/healthz", "/readyz", "/metadata", "/metrics")


class ServiceUnavailable(Exception):
    """The micro-batcher is not running (stopped, shutting down, or its thread died): HTTP 503."""


class NonFiniteScores(Exception):
    """The model returned NaN or infinite scores: HTTP 500, and the service reports itself unhealthy."""


# --------------------------------------------------------------------------------------------
# micro-batcher
# --------------------------------------------------------------------------------------------


@dataclass
class _Job:
    frame: "pd.DataFrame | dict[str, np.ndarray]"
    future: concurrent.futures.Future


def _settle(future: concurrent.futures.Future, *, result: Any = None, error: BaseException | None = None) -> None:
    """Resolve ``future`` unless its caller already gave up on it (cancelled) or it is resolved."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


def _rows(frame) -> int:
    """Rows of a request frame (a DataFrame, or column -> 1-d array)."""
    return len(frame) if not isinstance(frame, dict) else len(next(iter(frame.values()), ()))


def _merge(frames: list) -> "pd.DataFrame":
    """Request frames (DataFrames or column -> array dicts) as one DataFrame, rows in order."""
    import pandas as pd  # imported lazily: `serve` checks its port before paying for pandas

    if len(frames) == 1 and isinstance(frames[0], pd.DataFrame):
        return frames[0]
    columns = list(frames[0])
    if all(list(f) == columns for f in frames):
        return pd.DataFrame({c: np.concatenate([np.asarray(f[c]) for f in frames]) for c in columns})
    return pd.concat([pd.DataFrame(f) for f in frames], ignore_index=True)  # the predictor names what is wrong


def raw_scorer(predictor: "Predictor", *, tolerance: float = 1e-6, checks: int = 256, seed: int = 0):
    """``frame -> float32 scores`` through the raw-request graph of ``pipeline.export``, or None.

    The graph looks the ids up in the predictor's feature tables and runs the model in one TF call:
    about a third of the CPU of ``Predictor.predict`` (pandas lookups, 14 input conversions, Keras'
    ``predict_on_batch``), which the micro-batcher pays once per batch. Requests are still validated
    by ``predictor.validate``. The scorer is checked against ``predictor.predict`` on known and unseen
    ids and returned only if it agrees within ``tolerance``; None without a feature cache or on any
    disagreement (the caller keeps ``predictor.predict``).
    """
    import pandas as pd
    import tensorflow as tf

    from pipeline.export import raw_request_module

    if predictor.cache is None:
        return None
    try:
        module = raw_request_module(predictor)
    except PipelineError as err:
        logger.warning("no raw-request graph (%s); scoring with Predictor.predict", err)
        return None
    call = module.serve.get_concrete_function()
    columns = list(predictor.request_columns)

    def score(frame) -> np.ndarray:
        frame = predictor.validate(frame)
        if not len(frame):
            return np.zeros(0, dtype=np.float32)
        return call(*[tf.constant(frame[c].to_numpy()) for c in columns])["score"].numpy()

    score.module = module  # the graph's tables live as long as the scorer
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({c: rng.choice(predictor.cache.keys[c], checks) for c in columns})
    frame.iloc[: checks // 8, 0] = 2**40  # unseen ids too (out-of-vocabulary rows)
    frame.iloc[checks // 8: checks // 4, -1] = 2**40
    diff = float(np.max(np.abs(score(frame) - predictor.predict(frame))))
    if not diff <= tolerance:
        logger.warning("the raw-request graph differs from Predictor.predict by %.3g; not used", diff)
        return None
    return score


class MicroBatcher:
    """Merges concurrently submitted request frames into one ``Predictor.predict`` call.

    Args:
        predictor: the loaded predictor.
        max_rows: stop merging once a batch holds this many rows.
        max_delay: seconds to wait for more requests after the first one (0: take only what is
            already queued; under load requests queue up while a batch is scored, so they still merge).
        on_batch: called after each scored batch with ``(requests, rows, seconds)`` (metrics).
        score: ``frame -> float32 scores`` used instead of ``predictor.predict`` (e.g. ``raw_scorer``).

    ``submit(frame)`` returns a ``Future`` of float32 scores of shape ``(len(frame),)``. A future
    cancelled before its batch starts is skipped. Scoring errors go to the futures they concern
    (a failed merged batch is re-scored request by request, so one bad request fails alone);
    non-finite scores fail their request with ``NonFiniteScores`` and are counted in ``nonfinite``.
    """

    def __init__(self, predictor: "Predictor", *, max_rows: int = 65_536, max_delay: float = 0.0,
                 on_batch=None, score=None):
        self.predictor = predictor
        self.score = score  # frame -> scores; default predictor.predict (looked up per call)
        self.max_rows = int(max_rows)
        self.max_delay = float(max_delay)
        self.on_batch = on_batch
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._accepting = False
        self._running = False  # cleared first thing when the loop ends, before callers are told
        self._inflight: list[_Job] = []
        self.batches = 0
        self.requests = 0
        self.cancelled = 0
        self.failed_batches = 0
        self.nonfinite = 0

    @property
    def alive(self) -> bool:
        """Whether the worker thread is running."""
        return self._running and self._thread is not None and self._thread.is_alive()

    @property
    def depth(self) -> int:
        """Requests waiting in the queue (not counting the batch being scored)."""
        return self._queue.qsize()

    def start(self) -> "MicroBatcher":
        if self._thread is None:
            self._accepting = self._running = True
            self._thread = threading.Thread(target=self._run, name="micro-batcher", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop accepting requests, score everything already queued, then end the thread."""
        self._accepting = False
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    def submit(self, frame: "pd.DataFrame | dict[str, np.ndarray]") -> concurrent.futures.Future:
        """Queue ``frame`` (request rows: a DataFrame, or column -> 1-d array) for scoring; the future
        resolves to its scores.

        Raises ``ServiceUnavailable`` if the batcher is not running.
        """
        if not self._accepting or not self.alive:
            raise ServiceUnavailable("the scoring thread is not running" if self._accepting
                                     else "the server is not accepting requests (stopped or shutting down)")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put(_Job(frame, future))
        return future

    def _collect(self, first: _Job) -> tuple[list[_Job], bool]:
        jobs, rows, stop = [first], _rows(first.frame), False
        deadline = time.perf_counter() + self.max_delay
        while rows < self.max_rows:
            timeout = deadline - time.perf_counter()
            try:
                job = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                stop = True
                break
            jobs.append(job)
            rows += _rows(job.frame)
        return jobs, stop

    def _run(self) -> None:
        try:
            stop = False
            while not stop:
                first = self._queue.get()
                if first is None:
                    break
                jobs, stop = self._collect(first)
                self._inflight = jobs
                try:
                    self._score(jobs)
                except Exception as err:  # a bug of ours, not the model's: contain it to this batch
                    logger.exception("scoring a batch of %d requests failed", len(jobs))
                    for job in jobs:
                        _settle(job.future, error=err)
                self._inflight = []
        finally:
            # Whatever ended the loop (stop, or an exception that is not an Exception), no caller
            # may wait forever: fail the batch in flight and everything still queued.
            self._accepting = self._running = False
            gone = ServiceUnavailable("the scoring thread stopped")
            for job in self._inflight:
                _settle(job.future, error=gone)
            while True:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is not None and job.future.set_running_or_notify_cancel():
                    _settle(job.future, error=gone)

    def _score(self, jobs: list[_Job]) -> None:
        # A cancelled future (its caller timed out or went away) is skipped; the others become
        # RUNNING, which a late cancel() can no longer interrupt, so set_result below is safe.
        live = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        self.cancelled += len(jobs) - len(live)
        if not live:
            return
        self.batches += 1
        self.requests += len(live)
        start = time.perf_counter()
        try:
            scores = self._predict(_merge([j.frame for j in live]))
        except Exception as err:
            self.failed_batches += 1
            if len(live) == 1:
                _settle(live[0].future, error=err)
            else:  # one bad request must not fail the others: score them one by one
                for job in live:
                    self._resolve_alone(job)
        else:
            self._deliver(live, scores)
        if self.on_batch is not None:
            self.on_batch(len(live), sum(_rows(j.frame) for j in live), time.perf_counter() - start)

    def _resolve_alone(self, job: _Job) -> None:
        try:
            scores = self._predict(_merge([job.frame]))
        except Exception as err:  # delivered to the caller, who turns it into an HTTP error
            _settle(job.future, error=err)
        else:
            self._deliver([job], scores)

    def _predict(self, frame: "pd.DataFrame") -> np.ndarray:
        return (self.score or self.predictor.predict)(frame)

    def _deliver(self, jobs: list[_Job], scores: np.ndarray) -> None:
        scores = np.asarray(scores)
        rows = sum(_rows(j.frame) for j in jobs)
        if scores.shape != (rows,):
            raise RuntimeError(f"the predictor returned scores of shape {scores.shape} for {rows} rows")
        start = 0
        for job in jobs:
            end = start + _rows(job.frame)
            mine = scores[start:end]
            start = end
            if not np.isfinite(mine).all():
                self.nonfinite += 1
                bad = int(np.flatnonzero(~np.isfinite(mine))[0])
                row = {c: int(np.asarray(job.frame[c])[bad]) for c in job.frame}
                logger.error("the model returned a non-finite score (%s) for %s", mine[bad], row)
                _settle(job.future, error=NonFiniteScores(f"the model returned a non-finite score for pairs[{bad}] {row}"))
            else:
                _settle(job.future, result=mine)


# --------------------------------------------------------------------------------------------
# request bodies
# --------------------------------------------------------------------------------------------

Id = Annotated[StrictInt, Field(ge=0, le=MAX_ID)]


class Pair(BaseModel):
    """One (userId, movieId) pair of raw MovieLens ids; no other fields."""

    model_config = ConfigDict(extra="forbid")
    userId: Id
    movieId: Id


class PredictRequest(BaseModel):
    """``{"pairs": [...]}``: 1 to ``MAX_PAIRS_PER_REQUEST`` pairs."""

    model_config = ConfigDict(extra="forbid")
    pairs: list[Pair] = Field(min_length=1, max_length=MAX_PAIRS_PER_REQUEST)


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------


def manifest_fingerprint(directory: str | Path) -> str | None:
    """sha256 of ``directory/manifest.json`` (which holds the sha256 of every file), or None."""
    path = Path(directory) / "manifest.json"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


class ServiceMetrics:
    """The service's Prometheus metrics, in a registry of its own (one per app, so apps do not collide)."""

    def __init__(self, predictor: "Predictor", batcher: MicroBatcher):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, disable_created_metrics

        disable_created_metrics()  # no *_created series: they double the output and nobody graphs them
        self.registry = CollectorRegistry()
        ns = "movielens"
        self.requests = Counter(f"{ns}_http_requests", "HTTP requests answered, by endpoint, method and status",
                                ["endpoint", "method", "status"], registry=self.registry)
        self.latency = Histogram(
            f"{ns}_http_request_duration_seconds", "Time from the request's head to the end of the response, by endpoint",
            ["endpoint"], registry=self.registry,
            buckets=(0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.batch_requests = Histogram(f"{ns}_batch_requests", "Requests merged into one model call",
                                        registry=self.registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.batch_rows = Histogram(f"{ns}_batch_rows", "Rows scored by one model call", registry=self.registry,
                                    buckets=(1, 4, 16, 64, 256, 1024, 4096, 16384, 65536))
        self.batch_seconds = Histogram(f"{ns}_batch_duration_seconds", "Time to score one micro-batch",
                                       registry=self.registry,
                                       buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1, 5))
        depth = Gauge(f"{ns}_queue_depth", "Requests waiting for the scoring thread", registry=self.registry)
        depth.set_function(lambda: batcher.depth)
        alive = Gauge(f"{ns}_batcher_alive", "1 while the scoring thread runs", registry=self.registry)
        alive.set_function(lambda: float(batcher.alive))
        for name, help_text, attr in (("cancelled_requests", "Queued requests skipped: their caller gave up", "cancelled"),
                                      ("failed_batches", "Micro-batches whose scoring raised", "failed_batches"),
                                      ("nonfinite_responses", "Requests that got non-finite scores", "nonfinite")):
            gauge = Gauge(f"{ns}_{name}", help_text, registry=self.registry)
            gauge.set_function(lambda attr=attr: float(getattr(batcher, attr)))
        info = Info(f"{ns}_model", "The served model and workflow (sha256 of their manifest.json)",
                    registry=self.registry)
        info.info({
            "model_dir": str(predictor.model_dir),
            "model_manifest_sha256": manifest_fingerprint(predictor.model_dir) or "",
            "workflow_dir": str(Path(predictor.etl_dir) / "workflow"),
            "workflow_manifest_sha256": manifest_fingerprint(Path(predictor.etl_dir) / "workflow") or "",
            "target": str(predictor.target),
            "feature_cache": str(predictor.cache is not None).lower(),
        })

    def observe_batch(self, requests: int, rows: int, seconds: float) -> None:
        self.batch_requests.observe(requests)
        self.batch_rows.observe(rows)
        self.batch_seconds.observe(seconds)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# --------------------------------------------------------------------------------------------
# ASGI guard: body limit, metrics, access log
# --------------------------------------------------------------------------------------------


class _BodyTooLarge(Exception):
    pass


class RequestGuard:
    """Pure ASGI middleware around the app: the body-size limit, request metrics and the access log.

    A body is refused with 413 before the app parses anything: at once when ``Content-Length``
    exceeds ``max_body_bytes``, else as soon as the streamed bytes do (chunked uploads), so the
    server never holds more than the limit. The 413 closes the connection (the client may still be
    sending). Each request is logged as one JSON line and counted by endpoint and status.
    """

    def __init__(self, app, *, max_body_bytes: int, metrics: ServiceMetrics | None, access_log: bool = True):
        self.app = app
        self.max_body_bytes = int(max_body_bytes)
        self.metrics = metrics
        self.access_log = access_log

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        limit = self.max_body_bytes
        state = {"status": 0, "received": 0, "sent": 0, "refused": False}
        declared = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = None
                break

        async def send_wrapper(message) -> None:
            if state["refused"]:
                return  # the 413 went out already: drop the app's own answer to the cut-off body
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
            elif message["type"] == "http.response.body":
                state["sent"] += len(message.get("body", b""))
            await send(message)

        async def refuse() -> None:
            body = json.dumps({"error": f"request body larger than {limit} bytes"}).encode()
            await send_wrapper({"type": "http.response.start", "status": 413,
                                "headers": [(b"content-type", b"application/json"),
                                            (b"content-length", str(len(body)).encode()),
                                            (b"connection", b"close")]})
            await send_wrapper({"type": "http.response.body", "body": body})
            state["refused"] = True

        async def receive_wrapper():
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > limit:
                    if not state["status"]:
                        await refuse()
                    raise _BodyTooLarge
            return message

        try:
            if declared is not None and declared > limit:
                await refuse()
            else:
                await self.app(scope, receive_wrapper, send_wrapper)
        except _BodyTooLarge:
            pass
        except Exception:
            state["status"] = state["status"] or 500
            raise
        finally:
            self._record(scope, state, time.perf_counter() - start)

    def _record(self, scope, state: dict, seconds: float) -> None:
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"  # bounded label values
        status = state["status"] or 499  # 499: the client went away before any answer
        if self.metrics is not None:
            self.metrics.requests.labels(endpoint, scope["method"], str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(seconds)
        if self.access_log and access_logger.isEnabledFor(logging.INFO):
            client = scope.get("client")
            access_logger.info(json.dumps({
                "ts": round(time.time(), 6), "method": scope["method"], "path": path,
                "query": scope.get("query_string", b"").decode("latin-1"), "status": status,
                "ms": round(seconds * 1e3, 3), "bytes_in": state["received"], "bytes_out": state["sent"],
                "client": f"{client[0]}:{client[1]}" if client else None,
            }, separators=(",", ":")))


# --------------------------------------------------------------------------------------------
# the app
# --------------------------------------------------------------------------------------------


def create_app(predictor: "Predictor", *, max_batch_rows: int = 65_536, max_delay: float = 0.0,
               request_timeout: float = 10.0, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               access_log: bool = True, raw_graph: bool = True, retriever: "Retriever | None" = None,
               candidates: int = 200, popularity_weight: float | str = 0.0,
               retrieval_weight: float | str = 0.0) -> "FastAPI":
    """The FastAPI application serving ``predictor`` (the batcher runs for the app's lifetime).

    ``retriever`` (a two-tower ``pipeline.retrieval.Retriever``): ``/recommend`` answers two-stage by default,
    ``candidates`` movies retrieved over the whole catalog and ranked by ``predictor``'s model; without it (or with
    ``path=rank-all``) the model scores every movie. ``popularity_weight`` ``w``, ``retrieval_weight`` ``v``:
    two-stage ranks by ``log(score) + w * log(1 + training ratings) + v * two-tower score``
    (``pipeline.retrieval.popularity``; ``"auto"``: picked on held-out training positives).

    ``raw_graph``: score micro-batches with ``raw_scorer`` (checked against the predictor at startup)
    instead of ``predictor.predict``.
    ``request_timeout``: seconds a request may wait for its scores before a 504.
    ``max_body_bytes``: larger request bodies get a 413 before they are parsed.
    """
    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    batcher = MicroBatcher(predictor, max_rows=max_batch_rows, max_delay=max_delay,
                           score=raw_scorer(predictor) if raw_graph else None)
    metrics = ServiceMetrics(predictor, batcher)
    batcher.on_batch = metrics.observe_batch
    two_stage = None
    if retriever is not None:
        from pipeline.retrieval import TwoStageRecommender
        from pipeline.retrieval.popularity import set_two_stage_weights

        # the ranking call compiled once for `candidates` rows (TwoStageRecommender's docstring)
        two_stage = TwoStageRecommender(retriever, predictor, candidates)
        set_two_stage_weights(two_stage, popularity_weight, retrieval_weight)
    # /recommend's work (one index search + one model call, or the model over every movie) runs here: as many
    # threads as this machine's 2 cores, not anyio's 40-thread pool (more threads only queue for the cores)
    recommend_pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="recommend")
    status = {"ready": False, "stopping": False}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        # Everything loaded so far (TensorFlow, the workflow, the cache) lives for the whole
        # process: move it out of the garbage collector's sight, so that collections triggered
        # by requests do not walk it (they otherwise show up as 10+ ms spikes in the p99).
        gc.collect()
        gc.freeze()
        batcher.start()
        try:  # the first model call builds its graph: pay for it before the first request does
            await asyncio.wait_for(asyncio.wrap_future(batcher.submit(_warmup_frame(predictor))), 120)
        except Exception:  # e.g. non-finite scores: the server still starts, and /healthz says what is wrong
            logger.exception("the warm-up request failed")
        if retriever is not None:
            try:  # the ranker's first call at the candidate batch size traces its graph
                await asyncio.to_thread(two_stage.recommend, int(retriever.users[0]), 10, True)
            except Exception:
                logger.exception("the two-stage warm-up request failed")
        status["ready"] = True
        try:
            yield
        finally:
            # uvicorn has stopped accepting and waited for the requests in flight; score what is left.
            status["stopping"], status["ready"] = True, False
            await asyncio.to_thread(batcher.stop)
            recommend_pool.shutdown(wait=False)

    app = FastAPI(title="MovieLens recommender", lifespan=lifespan)
    app.add_middleware(RequestGuard, max_body_bytes=max_body_bytes, metrics=metrics, access_log=access_log)
    app.state.batcher = batcher
    app.state.predictor = predictor
    app.state.metrics = metrics
    app.state.status = status

    def error(code: int, message: str, **extra) -> JSONResponse:
        return JSONResponse(status_code=code, content={"error": message, **extra})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        messages = [_describe(err) for err in exc.errors()]
        return error(422, "; ".join(messages), detail=messages)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):  # 404, 405, ...
        return JSONResponse(status_code=exc.status_code, content={"error": str(exc.detail)}, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):  # reached through starlette's ServerErrorMiddleware
        logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return error(500, f"internal error: {type(exc).__name__}: {exc}")

    # The HTTP status of each error a route raises (the most specific class listed wins, as starlette looks a
    # handler up along the exception's MRO); anything else is a crash, answered 500 by _crash above.
    statuses = {DataError: 422, PipelineError: 500, ServiceUnavailable: 503, NonFiniteScores: 500,
                _Failed: 500, _Timeout: 504}

    async def _answer(request: Request, exc: Exception):
        return error(next(code for kind, code in statuses.items() if isinstance(exc, kind)), str(exc))

    for kind in statuses:
        app.add_exception_handler(kind, _answer)

    async def within_timeout(awaitable, what: str):
        """Await ``awaitable`` at most ``request_timeout`` s; every failure becomes an answerable exception."""
        try:
            return await asyncio.wait_for(awaitable, request_timeout)
        except asyncio.TimeoutError:
            raise _Timeout(f"{what} did not finish within {request_timeout:g} s") from None
        except tuple(statuses):
            raise
        except Exception as err:  # answered here: an unhandled one would also make uvicorn drop the connection
            logger.error("%s failed", what, exc_info=err)
            raise _Failed(f"{what} failed: {type(err).__name__}: {err}") from err

    @app.post("/predict", response_class=Response, responses={200: {"description": '{"scores": [...]}'}})
    async def predict(body: PredictRequest) -> Response:
        n = len(body.pairs)
        frame = {  # plain arrays: the batcher builds one DataFrame per batch, not one per request
            "userId": np.fromiter((p.userId for p in body.pairs), dtype=np.int64, count=n),
            "movieId": np.fromiter((p.movieId for p in body.pairs), dtype=np.int64, count=n),
        }
        # On a timeout wait_for cancels the wrapped future, which cancels ours if it is still
        # queued: the batcher then skips it.
        scores = await within_timeout(asyncio.wrap_future(batcher.submit(frame)), "scoring")
        # Written directly: FastAPI's response validation of a list of floats costs more than the scoring.
        return Response(json.dumps({"scores": scores.tolist()}), media_type="application/json")

    @app.get("/recommend", response_class=Response,
             responses={200: {"description": '{"userId": .., "path": .., "items": [{"movieId": .., "score": ..}]}'}})
    async def recommend(
        userId: int = Query(..., ge=0, le=MAX_ID, description="raw MovieLens userId"),
        k: int = Query(10, ge=1, le=10_000, description="how many movies"),
        exclude_rated: bool = Query(False, description="drop movies the user rated in the training data"),
        path: str | None = Query(None, pattern="^(two-stage|rank-all)$",
                                 description="two-stage (retrieval, then ranking; the default with --retrieval) or "
                                             "rank-all (the model scores every movie; the default without)"),
    ) -> Response:
        if not batcher.alive:
            raise ServiceUnavailable("the scoring thread is not running")
        path = path or ("two-stage" if retriever is not None else "rank-all")
        if path == "two-stage" and retriever is None:
            raise DataError("path=two-stage needs a retrieval model: start the service with --retrieval MODEL_DIR")
        work = two_stage.recommend if path == "two-stage" else predictor.recommend
        loop = asyncio.get_running_loop()
        items = await within_timeout(loop.run_in_executor(recommend_pool, work, userId, k, exclude_rated), "recommend")
        if not all(np.isfinite(s) for _, s in items):
            batcher.nonfinite += 1
            raise NonFiniteScores(f"the model returned non-finite scores for userId {userId}")
        answer = {"userId": userId, "path": path, "items": [{"movieId": m, "score": s} for m, s in items]}
        if path == "two-stage":
            answer["candidates"] = candidates
        return Response(json.dumps(answer), media_type="application/json")  # as /predict: no response validation

    def health() -> str | None:
        """Why the service is not healthy, or None."""
        if not batcher.alive:
            return "the scoring thread is not running"
        if batcher.nonfinite:
            return f"the model returned non-finite scores for {batcher.nonfinite} request(s)"
        return None

    @app.get("/healthz")
    async def healthz():
        problem = health()
        return error(503, problem, status="unhealthy") if problem else {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        problem = health() or ("shutting down" if status["stopping"] else None) or (
            None if status["ready"] else "warming up")
        return error(503, problem, status="not ready") if problem else {"status": "ready"}

    @app.get("/metadata")
    async def metadata() -> dict[str, Any]:
        return {
            **predictor.metadata,
            "server": {"max_batch_rows": batcher.max_rows, "max_delay": batcher.max_delay,
                       "request_timeout": request_timeout, "max_body_bytes": max_body_bytes,
                       "batches": batcher.batches, "requests": batcher.requests, "cancelled": batcher.cancelled,
                       "failed_batches": batcher.failed_batches, "nonfinite": batcher.nonfinite,
                       "scorer": "raw-request graph" if batcher.score is not None else "Predictor.predict"},
            "retrieval": None if retriever is None else {
                "model_dir": str(retriever.predictor.model_dir), "index": type(retriever.index).__name__,
                "movies": len(retriever.index), "dims": retriever.index.dim, "candidates": candidates,
                "popularity_weight": two_stage.popularity_weight, "retrieval_weight": two_stage.retrieval_weight},
        }

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return app


class _Timeout(Exception):
    pass


class _Failed(Exception):
    pass


def _warmup_frame(predictor: "Predictor") -> pd.DataFrame:
    """One known pair (from the feature cache when there is one) to score before the first request."""
    import pandas as pd

    cache = getattr(predictor, "cache", None)
    if cache is not None:
        return pd.DataFrame({k: v[:1] for k, v in cache.keys.items()})[list(predictor.request_columns)]
    return pd.DataFrame({c: np.ones(1, dtype=np.int64) for c in predictor.request_columns})


def _describe(error: dict) -> str:
    """One pydantic error as ``'pairs[3].movieId: Input should be a valid integer'``."""
    parts = [p for p in error.get("loc", ()) if p not in ("body", "query")]
    where = ""
    for part in parts:
        where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
    message = error.get("msg", "invalid")
    if error.get("type") == "extra_forbidden":
        message = "unexpected field"
    return f"{where or 'body'}: {message}"


# --------------------------------------------------------------------------------------------
# the server
# --------------------------------------------------------------------------------------------


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket listening on ``(host, port)``, or ``PipelineError`` naming the port.

    Called before the model loads, so a port in use is reported at once. It listens at once too:
    two sockets with SO_REUSEADDR may both bind a port nobody listens on yet, and the loser would
    only find out after loading. Connections made while the model loads wait in the backlog.
    """
    if not 0 <= port <= 65535:
        raise PipelineError(f"--port {port} is out of range (0-65535)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise PipelineError(f"cannot listen on {host}:{port}: unknown host ({err.strerror})") from None
    family, kind, proto, _, address = infos[0]
    # proto must say TCP: asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP, and
    # without it h11's separate header and body writes wait out the peer's delayed ACK (~40 ms each).
    sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: rebind over TIME_WAIT
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepted connections
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as err:
        sock.close()
        reason = "the port is in use" if err.errno == errno.EADDRINUSE else err.strerror
        raise PipelineError(f"cannot listen on {host}:{port}: {reason}") from None
    return sock


def _read_timeout_protocol(seconds: float):
    """uvicorn's h11 protocol plus a deadline for each request to arrive in full.

    uvicorn times out a kept-alive connection only after a response; a connection that opens and
    sends nothing, or half a request, would otherwise be held forever. The deadline starts when the
    connection opens (or at the first byte of a later request) and is cleared once the request,
    body included, has arrived. Time the server itself is the one not reading does not count: while
    uvicorn's flow control has paused reading (the app has not consumed the body yet) or bytes the
    client sent wait unread in the kernel (the event loop is busy), the deadline starts again
    instead of the connection being closed, which would reset it under the client's finished request.

    On shutdown, uvicorn closes every connection with no request in progress; one whose request has
    arrived but not been parsed yet (its bytes still in h11's buffer or the kernel's) is kept open
    instead, answered, then closed.
    """
    import fcntl
    import termios

    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class ReadTimeoutH11Protocol(H11Protocol):
        read_timeout = seconds
        _deadline: asyncio.TimerHandle | None = None
        _draining = False

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._draining and self.cycle is not None:
                self.cycle.keep_alive = False
            if self.conn.their_state is h11.DONE or self.transport.is_closing():
                self._disarm()
            elif self._deadline is None:
                self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def shutdown(self) -> None:
            arrived = self.conn.trailing_data[0] or self._unread_in_kernel()
            if self.cycle is None and arrived and not self.transport.is_closing():
                self._draining = True  # the next response closes the connection (see data_received)
                return
            super().shutdown()

        def _unread_in_kernel(self) -> int:
            """Bytes the client has sent that wait in the kernel's receive buffer, unread by the event loop."""
            sock = self.transport.get_extra_info("socket")
            try:
                return int.from_bytes(fcntl.ioctl(sock.fileno(), termios.FIONREAD, bytes(4)), sys.byteorder)
            except (AttributeError, OSError):  # no socket, or it is closed already
                return 0

        def _arm(self) -> None:
            self._deadline = self.loop.call_later(self.read_timeout, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self) -> None:
            self._deadline = None
            if self.conn.their_state is h11.DONE or self.transport.is_closing():
                return
            if self.flow.read_paused or self._unread_in_kernel():
                self._arm()  # the server is the one behind, not the client
            else:
                logger.info("closing %s: no complete request within %g s", self.client, self.read_timeout)
                self.transport.close()

    return ReadTimeoutH11Protocol


def _uvicorn_server(app, *, read_timeout: float, keep_alive: float, shutdown_timeout: float):
    """A ``uvicorn.Server`` for ``app`` whose signal handling returns normally (exit status 0)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn re-raises a captured SIGTERM after its graceful shutdown, so the process would
            # die by the signal; here the shutdown is the answer to it and main() returns 0.
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in originals.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(app, http=_read_timeout_protocol(read_timeout), lifespan="on", log_level="warning",
                            access_log=False, timeout_keep_alive=keep_alive,
                            timeout_graceful_shutdown=shutdown_timeout)
    return Server(config)


@dataclass
class RunningServer:
    """A uvicorn server started by ``serve_in_background``: ``url`` is ``http://host:port``."""

    url: str
    host: str
    port: int
    app: Any
    server: Any = None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def serve_in_subprocess(*flags: str, host: str = "127.0.0.1", startup_timeout: float = 180.0, stdout=None,
                        cwd: str | Path | None = None) -> Iterator[tuple[subprocess.Popen, str]]:
    """``python -m pipeline serve FLAGS --host HOST --port P`` in its own process, as a user starts it, until the
    ``with`` block ends (then SIGTERM, and SIGKILL after 60 s).

    Yields ``(process, url)`` once ``/readyz`` answers 200. ``stdout``: where the server's output (stderr too)
    goes; default a pipe, readable as ``process.stdout`` (text) after the process has ended. Raises
    ``RuntimeError`` with the output when the server exits or does not become ready within ``startup_timeout`` s.
    """
    import httpx

    port = free_port(host)
    command = [sys.executable, "-m", "pipeline", "serve", *flags, "--host", host, "--port", str(port)]
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE if stdout is None else stdout,
                               stderr=subprocess.STDOUT, text=True)
    url = f"http://{host}:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            try:
                if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                output = process.communicate()[0] if process.stdout else ""
                raise RuntimeError(f"the server did not become ready: {' '.join(command)}\n{output or ''}")
            time.sleep(0.5)
        yield process, url
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextlib.contextmanager
def serve_in_background(predictor: "Predictor", *, host: str = "127.0.0.1", port: int = 0,
                        read_timeout: float = 10.0, keep_alive: float = 5.0, shutdown_timeout: float = 30.0,
                        **app_options) -> Iterator[RunningServer]:
    """Run the API with uvicorn in a thread of this process until the ``with`` block ends.

    ``port=0`` lets the OS pick a free port (no race). ``app_options`` go to ``create_app``.
    """
    sock = bind_socket(host, port)
    port = int(sock.getsockname()[1])
    app = create_app(predictor, **app_options)
    server = _uvicorn_server(app, read_timeout=read_timeout, keep_alive=keep_alive, shutdown_timeout=shutdown_timeout)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.01)
    try:
        yield RunningServer(url=f"http://{host}:{port}", host=host, port=port, app=app, server=server)
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()


# --------------------------------------------------------------------------------------------
# a bounded load generator (tests and benchmarks)
# --------------------------------------------------------------------------------------------


class _Connection:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams: cheap enough that the client does
    not eat the core the server needs (httpx costs several times more CPU per request)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def send(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        await self.open()
        head = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        if method == "POST":
            head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        await self.writer.drain()

    async def response(self) -> tuple[int, bytes]:
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        body = await self.reader.readexactly(int(headers.get("content-length", 0)))
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, body

    async def request(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None):
        await self.send(method, path, body, headers)
        return await self.response()


@dataclass
class LoadReport:
    """What ``mixed_load`` saw. ``lost``: valid requests without an answer; ``wrong``: answers that
    are not the single-request scores of their own pairs (mixed up); ``max_ulps_seen``: the largest
    difference of a valid answer to its single-request score, in float32 units in the last place."""

    seconds: float
    sent: dict[str, int]
    outcomes: dict[str, dict[str, int]]
    valid_latencies: list[float]
    lost: list[str]
    wrong: list[str]
    silent_closed_after: list[float]
    healthy_after: bool
    metrics_after: dict[str, float]
    max_ulps_seen: float = 0.0

    @property
    def answered_per_second(self) -> float:
        answered = sum(sum(v.values()) for k, v in self.outcomes.items() if k != "silent")
        return answered / self.seconds if self.seconds else 0.0

    def summary(self) -> dict[str, Any]:
        ms = np.asarray(self.valid_latencies) * 1e3
        return {
            "seconds": round(self.seconds, 3), "sent": self.sent, "outcomes": self.outcomes,
            "answered_per_second": round(self.answered_per_second, 1),
            "valid_per_second": round(len(ms) / self.seconds, 1) if self.seconds else 0.0,
            "valid_p50_ms": round(float(np.percentile(ms, 50)), 3) if len(ms) else None,
            "valid_p99_ms": round(float(np.percentile(ms, 99)), 3) if len(ms) else None,
            "lost": len(self.lost), "wrong": len(self.wrong), "max_ulps_from_single_request": self.max_ulps_seen,
            "silent_connections_closed_by_server_after_s": (
                [round(min(self.silent_closed_after), 2), round(max(self.silent_closed_after), 2)]
                if self.silent_closed_after else None),
            "healthy_after": self.healthy_after, "metrics_after": self.metrics_after,
        }


_INVALID_BODIES = (
    b"{not json",
    b'{"pairs": [{"userId": -1, "movieId": 2}]}',
    b'{"pairs": [{"userId": 1}]}',
    b'{"pairs": [{"userId": 1, "movieId": 2, "rating": 5}]}',
    b'{"pairs": []}',
)


def mixed_load(url: str, pairs: pd.DataFrame, *, clients: int = 20, requests_per_client: int = 100,
               mix: dict[str, float] | None = None, silent_clients: int = 4, max_pairs: int = 3,
               max_ulps: float = 16, timeout: float = 60.0, seed: int = 0) -> LoadReport:
    """Drive the API at ``url`` with ``clients`` concurrent keep-alive clients; stops by itself.

    Each client sends ``requests_per_client`` requests, each drawn from ``mix`` (weights of
    ``valid``: 1 to ``max_pairs`` pairs from ``pairs``; ``invalid``: bad JSON or bad fields, expects 422;
    ``oversize``: a ``Content-Length`` over the server's limit, expects 413; ``disconnect``: a valid
    request whose connection is closed before the answer). ``silent_clients`` more connections send
    half a request head and nothing else; the server must close them. Every pair's reference score
    is first fetched with a one-pair request, and each valid answer must equal it within ``max_ulps``
    float32 units in the last place: the model's matrix kernels round differently for other batch
    sizes (up to 7 ulps seen; 16 ulps is 1e-6 at 0.5), while a mixed-up answer is off by ~1e5 ulps. Returns a ``LoadReport``; raises nothing for server misbehaviour (the report holds it).
    """
    import httpx

    mix = mix or {"valid": 0.8, "invalid": 0.1, "oversize": 0.04, "disconnect": 0.06}
    kinds, weights = list(mix), np.asarray(list(mix.values()), dtype=float)
    weights /= weights.sum()
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    port = int(port)
    ids = pairs[["userId", "movieId"]].to_numpy(dtype=np.int64)

    with httpx.Client(base_url=url, timeout=timeout) as http:
        limit = int(http.get("/metadata").json()["server"]["max_body_bytes"])
        reference = []
        for u, m in ids:  # the single-request score of every pair, one request each
            r = http.post("/predict", json={"pairs": [{"userId": int(u), "movieId": int(m)}]})
            r.raise_for_status()
            reference.append(np.float32(r.json()["scores"][0]))
    reference = np.asarray(reference, dtype=np.float32)

    sent: Counter = Counter()
    outcomes: dict[str, Counter] = {k: Counter() for k in [*kinds, "silent"]}
    latencies: list[float] = []
    lost: list[str] = []
    wrong: list[str] = []
    silent_after: list[float] = []
    worst_ulps = [0.0]

    async def client(c: int) -> None:
        rng = np.random.default_rng([seed, c])
        conn = _Connection(host, port)
        for i in range(requests_per_client):
            kind = kinds[int(rng.choice(len(kinds), p=weights))]
            sent[kind] += 1
            tag = f"client {c} request {i} ({kind})"
            try:
                if kind == "valid":
                    rows = rng.integers(0, len(ids), size=int(rng.integers(1, max_pairs + 1)))
                    body = json.dumps({"pairs": [{"userId": int(ids[r, 0]), "movieId": int(ids[r, 1])}
                                                 for r in rows]}).encode()
                    start = time.perf_counter()
                    status, payload = await asyncio.wait_for(conn.request("POST", "/predict", body), timeout)
                    latencies.append(time.perf_counter() - start)
                    outcomes[kind][str(status)] += 1
                    if status != 200:
                        lost.append(f"{tag}: HTTP {status} {payload[:200]!r}")
                        continue
                    got = np.asarray(json.loads(payload)["scores"], dtype=np.float32)
                    ulps = (np.abs(got - reference[rows]) / np.spacing(reference[rows])
                            if got.shape == rows.shape else np.asarray([np.inf]))
                    worst_ulps[0] = max(worst_ulps[0], float(ulps.max()))
                    if not (ulps <= max_ulps).all():
                        wrong.append(f"{tag}: pairs {ids[rows].tolist()} got {got.tolist()} "
                                     f"expected {reference[rows].tolist()}")
                elif kind == "invalid":
                    body = _INVALID_BODIES[int(rng.integers(len(_INVALID_BODIES)))]
                    status, payload = await asyncio.wait_for(conn.request("POST", "/predict", body), timeout)
                    ok = status == 422 and "error" in json.loads(payload)
                    outcomes[kind][str(status) if ok else f"unexpected {status}"] += 1
                elif kind == "oversize":
                    # headers only: the server must refuse on Content-Length without reading a byte
                    await conn.open()
                    conn.writer.write(f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                                      f"Content-Length: {limit + 1}\r\n\r\n".encode())
                    await conn.writer.drain()
                    status, payload = await asyncio.wait_for(conn.response(), timeout)
                    outcomes[kind][str(status)] += 1
                    conn.close()
                elif kind == "disconnect":
                    row = int(rng.integers(len(ids)))
                    body = json.dumps({"pairs": [{"userId": int(ids[row, 0]), "movieId": int(ids[row, 1])}]}).encode()
                    await conn.send("POST", "/predict", body)
                    conn.close()
                    outcomes[kind]["closed"] += 1
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as err:
                conn.close()
                outcomes[kind][f"error {type(err).__name__}"] += 1
                if kind == "valid":
                    lost.append(f"{tag}: {err!r}")
        conn.close()

    async def silent(c: int) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"POST /predict HTTP/1.1\r\nHost: x\r\n")  # half a head, then silence
        await writer.drain()
        start = time.perf_counter()
        try:
            data = await asyncio.wait_for(reader.read(), timeout)
            outcomes["silent"]["closed by server" if data == b"" else "answered"] += 1
            silent_after.append(time.perf_counter() - start)
        except asyncio.TimeoutError:
            outcomes["silent"]["still open"] += 1
        except OSError as err:
            outcomes["silent"][f"error {type(err).__name__}"] += 1
        finally:
            writer.close()

    async def run() -> float:
        waiting = [asyncio.ensure_future(silent(c)) for c in range(silent_clients)]
        start = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        seconds = time.perf_counter() - start  # the load's own time, not the silent clients' wait
        await asyncio.gather(*waiting)
        return seconds

    seconds = asyncio.run(run())
    sent["silent"] = silent_clients
    with httpx.Client(base_url=url, timeout=timeout) as http:
        healthy = http.get("/healthz").status_code == 200 and http.get("/readyz").status_code == 200
        metrics = {}
        for line in http.get("/metrics").text.splitlines():
            if line.startswith(("movielens_queue_depth", "movielens_batcher_alive", "movielens_cancelled_requests",
                                "movielens_failed_batches", "movielens_nonfinite_responses")):
                name, value = line.rsplit(" ", 1)
                metrics[name] = float(value)
    return LoadReport(seconds=seconds, sent=dict(sent), outcomes={k: dict(v) for k, v in outcomes.items()},
                      valid_latencies=latencies, lost=lost, wrong=wrong, silent_closed_after=silent_after,
                      healthy_after=healthy, metrics_after=metrics, max_ulps_seen=worst_ulps[0])


# --------------------------------------------------------------------------------------------
# CLI: python -m pipeline serve
# --------------------------------------------------------------------------------------------


@documented
@dataclass(frozen=True)
class ServeConfig:
    """The settings of the HTTP service (``python -m pipeline serve --help`` shows them with their defaults).

    Example:
        >>> ServeConfig(port=9000).request_timeout_s
        10.0
    """

    host: str = setting("127.0.0.1", "address to listen on")
    port: int = setting(8000, "port")
    max_batch_rows: int = setting(65_536, "rows merged into one model call by the micro-batcher")
    feature_cache: bool = setting(True, "look known ids' features up in the feature cache (--no-feature-cache: "
                                        "run every request through the serving graph)")
    max_delay_ms: float = setting(0.0, "how long the micro-batcher waits for more requests (0: merge what is queued)")
    request_timeout_s: float = setting(10.0, "a request still unscored after this long gets a 504")
    max_body_bytes: int = setting(DEFAULT_MAX_BODY_BYTES, "larger request bodies get a 413 before parsing")
    read_timeout_s: float = setting(10.0, "close a connection whose request has not fully arrived after this long")
    keep_alive_s: float = setting(5.0, "close an idle kept-alive connection after this long")
    shutdown_timeout_s: float = setting(30.0, "on SIGTERM, wait at most this long for requests in flight")
    access_log: bool = setting(True, "log one JSON line per request (--no-access-log: don't)")
    raw_graph: bool = setting(True, "score /predict with the raw-request graph (--no-raw-graph: with "
                                    "Predictor.predict; same scores)")
    tf_threads: int = setting(1, "TensorFlow intra- and inter-op threads (1: micro-batches are small, and the "
                                 "other core serves HTTP; 0: TensorFlow's default)")

    def check(self) -> None:
        """``UsageError`` naming the flag of the first setting that cannot serve."""
        for name in ("max_batch_rows", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("request_timeout_s", "read_timeout_s", "keep_alive_s", "shutdown_timeout_s"):
            if not getattr(self, name) > 0:
                raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")


def _load_retriever(args: argparse.Namespace, *, feature_cache: bool):
    """``--retrieval``'s two-tower ``Retriever`` over the workflow of ``--data``, or None."""
    if args.candidates < 1:
        raise UsageError(f"--candidates must be positive, got {args.candidates}")
    if args.retrieval is None:
        return None
    from pipeline.retrieval import Retriever
    from pipeline.retrieval.index import limit_blas_threads

    limit_blas_threads(1)  # one query per request: one core is fastest, the other serves HTTP (see its docstring)
    return Retriever.load(args.data, args.retrieval, feature_cache=feature_cache)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipeline.retrieval.popularity import weight_arg

    parser.add_argument("--data", required=True, help="ETL output dir (holds workflow/ and train/)")
    parser.add_argument("--retrieval", default=None, metavar="MODEL_DIR",
                        help="a two-tower model dir: /recommend retrieves --candidates movies with it and ranks them "
                             "with the --model-dir model (two-stage); path=rank-all still scores every movie")
    parser.add_argument("--candidates", type=int, default=200,
                        help="two-stage /recommend: movies retrieved for the ranking model (default 200)")
    parser.add_argument("--popularity-weight", type=weight_arg, default=0.0,
                        help="two-stage /recommend: rank by log(score) + W * log(1 + training ratings) + V * two-tower "
                             "score; 'auto' picks W on held-out training positives at start-up (default 0)")
    parser.add_argument("--retrieval-weight", type=weight_arg, default=0.0,
                        help="two-stage /recommend: V above, or 'auto' (default 0; both 0: the ranking model's score)")
    add_renamed(parser, "--model-dir", ("--model",), required=True, help="model dir written by `train`")
    add_config_arguments(parser, ServeConfig, group="service settings")


def main(args: argparse.Namespace) -> int:
    config = from_args(ServeConfig, args)
    config.check()
    sock = bind_socket(config.host, config.port)  # before the slow model load: a taken port fails at once
    if config.tf_threads > 0:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(config.tf_threads)
        tf.config.threading.set_inter_op_parallelism_threads(config.tf_threads)
    from pipeline.inference import Predictor

    # Access lines are JSON documents on their own: no timestamp / level prefix around them.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    access_logger.addHandler(handler)
    access_logger.propagate = False
    access_logger.setLevel(logging.INFO if config.access_log else logging.WARNING)

    predictor = Predictor.load(args.data, args.model_dir, feature_cache=config.feature_cache)
    retriever = _load_retriever(args, feature_cache=config.feature_cache)
    app = create_app(predictor, max_batch_rows=config.max_batch_rows, max_delay=config.max_delay_ms / 1000,
                     request_timeout=config.request_timeout_s, max_body_bytes=config.max_body_bytes,
                     access_log=config.access_log, raw_graph=config.raw_graph,
                     retriever=retriever, candidates=args.candidates, popularity_weight=args.popularity_weight,
                     retrieval_weight=args.retrieval_weight)
    server = _uvicorn_server(app, read_timeout=config.read_timeout_s, keep_alive=config.keep_alive_s,
                             shutdown_timeout=config.shutdown_timeout_s)
    logger.info("serving %s with the workflow of %s on http://%s:%s", args.model_dir, args.data, config.host, config.port)
    server.run(sockets=[sock])
    logger.info("server stopped")
    return 0

"""HTTP JSON API over a ``Predictor``: FastAPI app, a micro-batcher, and the ``serve`` CLI stage.

Endpoints:

- ``POST /predict`` ``{"pairs": [{"userId": 1, "movieId": 31}, ...]}`` -> ``{"scores": [...]}`` in request order;
- ``GET /recommend?userId=..&k=10&exclude_rated=false`` -> ``{"userId": .., "items": [{"movieId": .., "score": ..}]}``,
  every known movie scored for the user in one batch;
- ``GET /healthz`` -> ``{"status": "ok"}``;
- ``GET /metadata`` -> model, workflow, schema, versions, metrics and server settings.

Bad bodies or parameters get a 422 whose ``error`` names the field (e.g. ``pairs[3].movieId``).

Concurrent ``/predict`` requests are merged by ``MicroBatcher``: one worker thread takes the
first pending request, drains the queue of whatever else is waiting (up to ``max_rows``, waiting
at most ``max_delay`` seconds for more), scores everything with one workflow transform and one
model call, and hands each request its own slice of the scores.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import gc
import logging
import queue
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from pipeline.errors import DataError, PipelineError

if TYPE_CHECKING:
    from fastapi import FastAPI

    from pipeline.inference import Predictor

logger = logging.getLogger(__name__)

MAX_PAIRS_PER_REQUEST = 100_000
MAX_ID = 2**63 - 1  # ids travel as int64


# --------------------------------------------------------------------------------------------
# micro-batcher
# --------------------------------------------------------------------------------------------


@dataclass
class _Job:
    frame: pd.DataFrame
    future: concurrent.futures.Future


class MicroBatcher:
    """Merges concurrently submitted request frames into one ``Predictor.predict`` call.

    Args:
        predictor: the loaded predictor.
        max_rows: stop merging once a batch holds this many rows.
        max_delay: seconds to wait for more requests after the first one (0: take only what is
            already queued; under load requests queue up while a batch is scored, so they still merge).

    ``submit(frame)`` returns a ``Future`` of float32 scores, one per row of ``frame``.
    """

    def __init__(self, predictor: "Predictor", *, max_rows: int = 65_536, max_delay: float = 0.0):
        self.predictor = predictor
        self.max_rows = int(max_rows)
        self.max_delay = float(max_delay)
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.batches = 0
        self.requests = 0

    def start(self) -> "MicroBatcher":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="micro-batcher", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def submit(self, frame: pd.DataFrame) -> concurrent.futures.Future:
        """Queue ``frame`` (validated request rows) for scoring; the future resolves to its scores."""
        if self._thread is None:
            raise RuntimeError("MicroBatcher.submit before start()")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put(_Job(frame, future))
        return future

    def _collect(self, first: _Job) -> tuple[list[_Job], bool]:
        jobs, rows, stop = [first], len(first.frame), False
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
            rows += len(job.frame)
        return jobs, stop

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            jobs, stop = self._collect(first)
            self._score(jobs)
        # fail whatever is left so no caller waits forever
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.future.set_exception(RuntimeError("the server is shutting down"))

    def _score(self, jobs: list[_Job]) -> None:
        self.batches += 1
        self.requests += len(jobs)
        try:
            frame = jobs[0].frame if len(jobs) == 1 else pd.concat([j.frame for j in jobs], ignore_index=True)
            scores = self.predictor.predict(frame)
        except Exception:  # one bad request must not fail the others: score them one by one
            if len(jobs) == 1:
                self._resolve_alone(jobs[0])
                return
            for job in jobs:
                self._resolve_alone(job)
            return
        start = 0
        for job in jobs:
            end = start + len(job.frame)
            job.future.set_result(scores[start:end])
            start = end

    def _resolve_alone(self, job: _Job) -> None:
        try:
            job.future.set_result(self.predictor.predict(job.frame))
        except Exception as err:  # delivered to the caller, who turns it into an HTTP error
            job.future.set_exception(err)


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
# the app
# --------------------------------------------------------------------------------------------


def create_app(predictor: "Predictor", *, max_batch_rows: int = 65_536, max_delay: float = 0.0) -> "FastAPI":
    """The FastAPI application serving ``predictor`` (the batcher runs for the app's lifetime)."""
    from fastapi import FastAPI, Query, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    batcher = MicroBatcher(predictor, max_rows=max_batch_rows, max_delay=max_delay)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        # Everything loaded so far (TensorFlow, the workflow, the cache) lives for the whole
        # process: move it out of the garbage collector's sight, so that collections triggered
        # by requests do not walk it (they otherwise show up as 10+ ms spikes in the p99).
        gc.collect()
        gc.freeze()
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()

    app = FastAPI(title="MovieLens recommender", lifespan=lifespan)
    app.state.batcher = batcher
    app.state.predictor = predictor

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        messages = [_describe(err) for err in exc.errors()]
        return JSONResponse(status_code=422, content={"error": "; ".join(messages), "detail": messages})

    @app.exception_handler(PipelineError)
    async def _pipeline_error(request: Request, exc: PipelineError):
        status = 422 if isinstance(exc, DataError) else 500
        return JSONResponse(status_code=status, content={"error": str(exc)})

    @app.post("/predict")
    async def predict(body: PredictRequest) -> dict[str, list[float]]:
        frame = pd.DataFrame(
            {
                "userId": np.fromiter((p.userId for p in body.pairs), dtype=np.int64, count=len(body.pairs)),
                "movieId": np.fromiter((p.movieId for p in body.pairs), dtype=np.int64, count=len(body.pairs)),
            }
        )
        scores = await asyncio.wrap_future(batcher.submit(frame))
        return {"scores": scores.tolist()}

    @app.get("/recommend")
    async def recommend(
        userId: int = Query(..., ge=0, le=MAX_ID, description="raw MovieLens userId"),
        k: int = Query(10, ge=1, le=10_000, description="how many movies"),
        exclude_rated: bool = Query(False, description="drop movies the user rated in the training data"),
    ) -> dict[str, Any]:
        items = await run_in_threadpool(predictor.recommend, userId, k, exclude_rated)
        return {"userId": userId, "items": [{"movieId": m, "score": s} for m, s in items]}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metadata")
    async def metadata() -> dict[str, Any]:
        return {
            **predictor.metadata,
            "server": {"max_batch_rows": batcher.max_rows, "max_delay": batcher.max_delay,
                       "batches": batcher.batches, "requests": batcher.requests},
        }

    return app


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
# running a server
# --------------------------------------------------------------------------------------------


@dataclass
class RunningServer:
    """A uvicorn server started by ``serve_in_background``: ``url`` is ``http://host:port``."""

    url: str
    host: str
    port: int
    app: Any


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def serve_in_background(predictor: "Predictor", *, host: str = "127.0.0.1", port: int | None = None,
                        **app_options) -> Iterator[RunningServer]:
    """Run the API with uvicorn in a thread of this process until the ``with`` block ends."""
    import uvicorn

    port = port or free_port(host)
    app = create_app(predictor, **app_options)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.01)
    try:
        yield RunningServer(url=f"http://{host}:{port}", host=host, port=port, app=app)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


# --------------------------------------------------------------------------------------------
# CLI: python -m pipeline serve
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="ETL output dir (holds workflow/ and train/)")
    parser.add_argument("--model", required=True, help="model dir written by `train`")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--max-batch-rows", type=int, default=65_536,
                        help="rows merged into one model call by the micro-batcher (default 65536)")
    parser.add_argument("--no-feature-cache", action="store_true",
                        help="run every request through the serving graph instead of the feature cache")
    parser.add_argument("--max-delay-ms", type=float, default=0.0,
                        help="how long the micro-batcher waits for more requests (default 0: merge what is queued)")


def main(args: argparse.Namespace) -> int:
    import uvicorn

    from pipeline.inference import Predictor

    predictor = Predictor.load(args.data, args.model, feature_cache=not args.no_feature_cache)
    app = create_app(predictor, max_batch_rows=args.max_batch_rows, max_delay=args.max_delay_ms / 1000)
    print(f"serving {args.model} with the workflow of {args.data} on http://{args.host}:{args.port}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0

"""ETL stage: raw MovieLens -> train/valid split -> NVTabular workflow -> parquet + schema.pbtxt + saved workflow.

``python -m pipeline etl --dataset {ml-100k,ml-1m,ml-25m,synthetic} --out DIR`` writes::

    DIR/train/part_*.parquet + schema.pbtxt    training split, target encodings out-of-fold
    DIR/valid/part_*.parquet + schema.pbtxt    validation split, full-train target encodings
    DIR/workflow/                             nvt.Workflow.save of the fitted workflow (+ manifest.json)
    DIR/etl.json                              rows, columns, cardinalities, seconds per phase

The output is built in a hidden temporary sibling of DIR and renamed into place at the end, so a failed
run leaves DIR as it was and no temporary directory behind. The workflow itself lives in
``workflows/movielens.py``; the split in :func:`split_ratings`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import add_arguments as add_config_arguments
from pipeline.config import documented, from_args, setting
from pipeline.errors import DataError, DeviceError, UsageError
from pipeline.registry import DATASETS, DEVICES, SPLITS

logger = logging.getLogger(__name__)

DATA_DIR = Path("data")
PHASES = ("read", "split", "fit", "transform_train", "transform_valid", "save")
# Default partition size. NVTabular's fit transforms the whole first partition once more just to
# sample output dtypes, so smaller partitions waste less; too small ones add per-partition overhead.
# CPU seconds for 1M ratings: 1 partition 17.1, 400k rows 14.8, 200k rows 11.1, 100k rows 13.2.
ROWS_PER_PARTITION = 200_000
# Tiny partitions make a run whose per-partition overhead never ends (--part-size 1B was still fitting
# 1M ratings after 300 s): --part-size has a floor, and a run at most MAX_PARTITIONS partitions.
MIN_PART_SIZE = 64 << 10
MAX_PARTITIONS = 10_000
# The files whose bytes identify an ETL run: same data and encodings, same id (paths and times excluded).
RUN_FILES = ("train/*.parquet", "valid/*.parquet", "workflow/categories/**/*")


def is_etl_output(path: Path) -> bool:
    """Whether ``path`` holds a previous output of this stage (which a new run may replace)."""
    path = Path(path)
    return path.is_dir() and (path / "etl.json").is_file() and (path / "workflow" / "manifest.json").is_file()


def etl_run_id(etl_dir: Path) -> str:
    """The identity of the ETL run in ``etl_dir``: a hash of its parquet splits and category tables.

    Recorded in ``workflow/manifest.json`` (``run_id``) by the ETL, by the train stage in the model's
    config.json, and compared by the predictor, so a model is only served with the data it was trained on.
    """
    from pipeline.manifest import content_id

    return content_id(etl_dir, RUN_FILES)


def split_ratings(
    ratings: pd.DataFrame, method: str, valid_fraction: float, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split ratings into (train, valid), deterministically for a given ``seed``.

    Args:
        ratings: userId, movieId, rating, timestamp (one row per rating).
        method: ``"random"``: a seeded random ``valid_fraction`` of all ratings is valid.
            ``"temporal"``: per user, the latest ``floor(n_user * valid_fraction)`` ratings by timestamp
            (ties broken by movieId) are valid, so every user keeps their earlier history in train.
            (ml-100k's ``official`` split is read from its ua.base / ua.test files, not computed here.)
        valid_fraction: in (0, 1).
        seed: the random split's draw and the order of training rows (shuffled, so that the loader's
            batches mix users even before its own shuffling).

    Returns:
        ``(train, valid)`` with a fresh RangeIndex; every input row is in exactly one of them.
    """
    if not 0.0 < valid_fraction < 1.0:
        raise DataError(f"--valid-fraction must be between 0 and 1 (exclusive), got {valid_fraction}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5E11]))
    n = len(ratings)
    if method == "random":
        order = rng.permutation(n)
        n_valid = int(round(n * valid_fraction))
        valid_rows, train_rows = np.sort(order[:n_valid]), order[n_valid:]
    elif method == "temporal":
        by_time = ratings.sort_values(["userId", "timestamp", "movieId"], kind="stable")
        position = by_time.groupby("userId", sort=False).cumcount().to_numpy()
        count = by_time.groupby("userId", sort=False)["userId"].transform("size").to_numpy()
        is_valid = position >= count - np.floor(count * valid_fraction)
        index = by_time.index.to_numpy()
        valid_rows = np.sort(ratings.index.get_indexer(index[is_valid]))
        train_rows = rng.permutation(np.sort(ratings.index.get_indexer(index[~is_valid])))
    else:
        raise DataError(f"split method must be 'random' or 'temporal' here (got {method!r}); "
                        "'official' comes from ml-100k's ua.base / ua.test")
    train = ratings.iloc[train_rows].reset_index(drop=True)
    valid = ratings.iloc[valid_rows].reset_index(drop=True)
    if train.empty or valid.empty:
        raise DataError(
            f"the {method} split with valid fraction {valid_fraction} leaves an empty "
            f"{'train' if train.empty else 'valid'} set ({n} ratings)"
        )
    return train, valid


def locate_raw(dataset: str, raw: Path | None, **synthetic_size) -> Path:
    """The raw folder or zip for ``dataset``: ``raw`` if given, else under ``data/raw/`` (generating or
    downloading it when missing). ``synthetic_size``: n_users / n_movies / n_ratings / seed / selection_by_taste
    for the generator."""
    if dataset == "synthetic":
        from pipeline.datasets import generate_synthetic, read_synthetic_params

        if raw is not None and not synthetic_size and read_synthetic_params(raw) is not None:
            return Path(raw)  # an existing synthetic dir, whatever its size
        return generate_synthetic(raw or DATA_DIR / "raw" / "synthetic", fmt="ml-1m", **synthetic_size)
    if synthetic_size:
        raise UsageError(f"generator options {sorted(synthetic_size)} only apply to --dataset synthetic")
    if raw is not None:
        return Path(raw)
    for candidate in (DATA_DIR / "raw" / dataset, DATA_DIR / "raw" / f"{dataset}.zip"):
        if candidate.exists():
            return candidate
    from pipeline.datasets import download_movielens

    logger.info("no %s under %s: downloading it", dataset, DATA_DIR / "raw")
    try:
        return Path(download_movielens(dataset, DATA_DIR / "raw"))
    except DataError as err:  # its message says how to provide the files by hand
        raise DataError(f"no raw {dataset} files at {DATA_DIR / 'raw' / dataset} (or pass --raw PATH); {err}") from None


@documented
@dataclass(frozen=True)
class EtlConfig:
    """Every setting of the ETL stage: ``run_etl``'s keywords and the CLI's flags (etl.json records them).

    Example:
        >>> EtlConfig(split="temporal").valid_fraction
        0.2
    """

    seed: int = setting(0, "seed of the split and the target-encoding folds")
    valid_fraction: float = setting(0.2, "share of the ratings in valid (random and temporal splits)")
    split: str = setting("random", "random (seeded), temporal (per user, the latest ratings are valid), "
                                   "official (ml-100k's ua files)", choices=SPLITS)
    device: str = setting("auto", "dataframe device (auto: cudf on a GPU when there is one)", choices=DEVICES)
    workers: int | None = setting(None, "run on a local Dask cluster with N worker processes", metavar="N")
    dask_scheduler: str | None = setting(None, "run on an existing Dask cluster (not with --workers)",
                                         metavar="ADDRESS")
    part_size: str | None = setting(None, "in-memory partition size, e.g. 64MB (one parquet file each)",
                                    metavar="SIZE")
    n_users: int | None = setting(None, "synthetic data: users (default: ML-1M's)")
    n_movies: int | None = setting(None, "synthetic data: movies (default: ML-1M's)")
    n_ratings: int | None = setting(None, "synthetic data: ratings (default: ML-1M's)")
    data_seed: int | None = setting(None, "synthetic data: the generator's seed (default 0)")
    selection_by_taste: float | None = setting(
        None, "synthetic data: how much the planted taste decides which movies a user rates, besides popularity "
              "(default 0: popularity alone)", metavar="LAMBDA")

    def check(self) -> None:
        """``UsageError`` naming the flag of the first setting that cannot run."""
        if self.split not in SPLITS:
            raise UsageError(f"unknown split {self.split!r}; expected one of {', '.join(SPLITS)}")
        if not 0.0 < self.valid_fraction < 1.0:
            raise UsageError(f"--valid-fraction must be between 0 and 1 (exclusive), got {self.valid_fraction}")
        if self.workers is not None and self.dask_scheduler is not None:
            raise UsageError("--workers and --dask-scheduler exclude each other: pick a local or an existing cluster")

    @property
    def synthetic_size(self) -> dict:
        """The generator's settings that were given (``generate_synthetic``'s names)."""
        given = dict(n_users=self.n_users, n_movies=self.n_movies, n_ratings=self.n_ratings, seed=self.data_seed,
                     selection_by_taste=self.selection_by_taste)
        return {k: v for k, v in given.items() if v is not None}


def run_etl(
    dataset: str,
    out: Path,
    config: EtlConfig | None = None,
    *,
    raw: Path | None = None,
    overwrite: bool = False,
    **settings,
) -> dict:
    """Run the whole ETL for ``dataset`` into ``out`` and return the summary also written to ``out/etl.json``.

    ``config`` (default ``EtlConfig()``) with ``settings`` (any ``EtlConfig`` field by name) replaced.

    ``dataset``: ml-100k, ml-1m, ml-25m or synthetic (generated in ml-1m format into ``raw`` or
    data/raw/synthetic, reused when its synthetic.json matches; sized by n_users, n_movies, n_ratings,
    data_seed; selection_by_taste: how much taste picks the rated movies). ``split``: random | temporal | official (ml-100k only). ``device``: auto | cpu |
    gpu. ``workers`` / ``dask_scheduler``: run on a local / existing Dask cluster. ``part_size``: target
    in-memory size of a partition (e.g. "64MB"); each partition becomes one parquet file.
    ``out`` may hold a previous ETL output (it is replaced); any other existing path is refused unless
    ``overwrite``, and ``out`` may never be, contain or sit inside the raw data.
    """
    from pipeline.atomic import check_output
    from pipeline.device import dask_cluster, resolve_device

    config = replace(config or EtlConfig(), **settings)
    if dataset not in DATASETS:
        raise UsageError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    config.check()
    seed, valid_fraction, split, device = config.seed, config.valid_fraction, config.split, config.device
    workers, dask_scheduler, part_size = config.workers, config.dask_scheduler, config.part_size
    synthetic_size = config.synthetic_size
    out = Path(out)
    raw_candidates = [("--raw", raw)] if raw is not None else [
        ("the raw data", DATA_DIR / "raw" / dataset), ("the raw data", DATA_DIR / "raw" / f"{dataset}.zip")]
    check_output(out, stage="etl", flag="--out", is_previous_output=is_etl_output, inputs=raw_candidates,
                 overwrite=overwrite)
    n_part_bytes = _part_bytes(part_size)
    device = resolve_device(device)
    variant = "ml-1m" if dataset == "synthetic" else dataset
    seconds: dict[str, float] = {}
    with _progress() as progress:
        with _phase("read", seconds, progress):
            raw_path = locate_raw(dataset, Path(raw) if raw is not None else None, **synthetic_size)
            check_output(out, stage="etl", flag="--out", is_previous_output=is_etl_output,
                         inputs=[("the raw data", raw_path)], overwrite=overwrite)
            from pipeline.datasets import read_movielens

            movielens = read_movielens(variant, raw_path)

        with _phase("split", seconds, progress):
            if split == "official":
                if movielens.official_split is None:
                    raise DataError(
                        f"--split official needs ml-100k's ua.base / ua.test; {dataset} has no official split"
                    )
                train, valid = (frame.reset_index(drop=True) for frame in movielens.official_split)
            else:
                train, valid = split_ratings(movielens.ratings, split, valid_fraction, seed)
            _check_split(train, valid)

        import nvtabular  # noqa: F401  (imported before the workflow module, outside the timed phases)

        from pipeline.atomic import atomic_dir
        from pipeline.manifest import write_manifest
        from pipeline.ops import out_of_fold
        from workflows.movielens import movielens_workflow

        n_parts = _partitions(train, n_part_bytes)
        cpu = device == "cpu"
        with _cluster_failures(out, dask_scheduler or (workers and "the local cluster")), atomic_dir(out) as tmp, \
                dask_cluster(device, workers=workers, scheduler=dask_scheduler):
            fit_dir = tmp / ".fit"
            from pipeline.cluster import cluster_dataset  # on a cluster: partitions sent to the workers once

            train_set = cluster_dataset(train, n_parts, cpu=cpu)
            valid_set = cluster_dataset(valid, _partitions(valid, n_part_bytes), cpu=cpu)

            with _phase("fit", seconds, progress):  # building the workflow encodes the side tables: part of fit
                workflow = movielens_workflow(variant, movielens.movies, movielens.users, out_path=fit_dir, seed=seed)
                with out_of_fold(workflow):
                    workflow.fit(train_set)
            schema = _relocate_paths(workflow.output_schema, fit_dir, out.resolve() / "workflow")
            with _phase("transform_train", seconds, progress), out_of_fold(workflow):
                _write(workflow.transform(train_set), tmp / "train", schema)
            with _phase("transform_valid", seconds, progress):
                _write(workflow.transform(valid_set), tmp / "valid", schema)
            with _phase("save", seconds, progress):
                workflow.save(str(tmp / "workflow"))
                shutil.rmtree(fit_dir, ignore_errors=True)
                for split_name in ("train", "valid"):
                    _relocate_file_list(tmp / split_name, tmp, out.resolve())
                run_id = etl_run_id(tmp)
                # inference refuses to unpickle an unverified workflow, and a model of another run
                write_manifest(tmp / "workflow", stage="etl", run_id=run_id)

            summary = {
                "dataset": dataset,
                "variant": variant,
                "raw": str(raw_path),
                "out": str(out),
                "seed": seed,
                "split": split,
                "valid_fraction": round(len(valid) / (len(train) + len(valid)), 6),
                "device": device,
                "workers": workers,
                "dask_scheduler": dask_scheduler,
                "partitions": n_parts,
                "run_id": run_id,
                "rows": {"train": len(train), "valid": len(valid)},
                # repeated (userId, movieId) ratings the reader dropped (the latest one is kept)
                "duplicates_dropped": int(movielens.official_split_duplicates_dropped if split == "official"
                                          else movielens.duplicates_dropped),
                "columns": {
                    col.name: {"dtype": str(col.dtype.to_numpy), "is_list": bool(col.is_list),
                               "tags": sorted(str(t.value) for t in col.tags)}
                    for col in schema
                },
                "cardinalities": {
                    col.name: int(col.properties["embedding_sizes"]["cardinality"])
                    for col in schema
                    if "embedding_sizes" in col.properties
                },
                "seconds": {name: round(value, 3) for name, value in seconds.items()},
            }
            summary["seconds"]["total"] = round(sum(seconds.values()), 3)
            (tmp / "etl.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("ETL of %s written to %s in %.1f s", dataset, out, summary["seconds"]["total"])
    return summary


# -- helpers --------------------------------------------------------------------------------------


@contextmanager
def _cluster_failures(out: Path, cluster: str | None):
    """A Dask cluster that lost a worker or its connection mid-run: one ``DeviceError`` naming it (the
    temporary output is already gone and ``out`` is as it was), not distributed's internals."""
    if not cluster:
        yield
        return
    from distributed import KilledWorker
    from distributed.client import FutureCancelledError  # a lost worker held partitions nothing can recompute
    from distributed.comm.core import CommClosedError

    try:
        yield
    except Exception as err:
        lost = isinstance(err, (KilledWorker, CommClosedError, FutureCancelledError)) or (
            # distributed re-raises a scheduler-side error it cannot rebuild as a bare Exception; seen when a
            # worker holding scattered partitions dies mid-fit: "AssertionError(<TaskState '...' processing>)"
            type(err) is Exception and "TaskState" in str(err))
        if not lost:
            raise
        raise DeviceError(
            f"the Dask cluster ({cluster}) lost a worker or its connection during the ETL "
            f"({type(err).__name__}: {str(err)[:200]}); {out} was left as it was: re-run when the cluster is healthy"
        ) from err


def _progress():
    from tqdm.auto import tqdm

    return tqdm(total=len(PHASES), desc="etl", unit="phase", leave=False, disable=None)


@contextmanager
def _phase(name: str, seconds: dict, progress):
    """Time one phase into ``seconds[name]``, log it and advance the progress bar."""
    progress.set_postfix_str(name)
    start = time.perf_counter()
    yield
    seconds[name] = time.perf_counter() - start
    progress.update(1)
    logger.info("etl %-16s %6.2f s", name, seconds[name])


def _check_split(train: pd.DataFrame, valid: pd.DataFrame) -> None:
    if train.empty or valid.empty:
        raise DataError(f"empty {'train' if train.empty else 'valid'} split")
    if train["rating"].isna().any():
        raise DataError("training ratings contain missing values")


def _part_bytes(part_size: str | None) -> int | None:
    """``--part-size`` in bytes (None: the default rows per partition); ``UsageError`` below ``MIN_PART_SIZE``."""
    if part_size is None:
        return None
    from dask.utils import format_bytes, parse_bytes

    try:
        size = parse_bytes(part_size)
    except (ValueError, TypeError) as err:
        raise UsageError(f"--part-size {part_size!r} is not a size such as 64MB ({err})") from None
    if size < MIN_PART_SIZE:
        raise UsageError(f"--part-size {part_size!r} is below the minimum of {format_bytes(MIN_PART_SIZE)}")
    return int(size)


def _partitions(frame: pd.DataFrame, part_bytes: int | None) -> int:
    """Partitions for an in-memory frame: ``part_bytes`` each, by default ``ROWS_PER_PARTITION`` rows."""
    if part_bytes is None:
        return max(1, math.ceil(len(frame) / ROWS_PER_PARTITION))
    n = max(1, math.ceil(frame.memory_usage(deep=True).sum() / part_bytes))
    if n > MAX_PARTITIONS:
        from dask.utils import format_bytes

        raise UsageError(f"--part-size {format_bytes(part_bytes)} makes {n:,} partitions of {len(frame):,} ratings "
                         f"(at most {MAX_PARTITIONS:,}): choose a larger size")
    return n


def _relocate_file_list(split_dir: Path, tmp: Path, final: Path) -> None:
    """merlin's ``_file_list.txt`` names the files under the temporary build dir: point it at the final one."""
    path = split_dir / "_file_list.txt"
    if path.is_file():
        path.write_text(path.read_text().replace(str(tmp.resolve()), str(final)).replace(str(tmp), str(final)))


def _relocate_paths(schema, old: Path, new: Path):
    """``schema`` with Categorify's ``cat_path`` properties pointing at the final output, not the temp dir."""
    from merlin.schema import Schema

    old_prefix, new_prefix = str(old), str(new)
    columns = []
    for col in schema:
        path = col.properties.get("cat_path")
        if isinstance(path, str) and path.startswith(old_prefix):
            col = col.with_properties({**col.properties, "cat_path": new_prefix + path[len(old_prefix):]})
        columns.append(col)
    return Schema(columns)


def _write(dataset, path: Path, schema) -> None:
    """``dataset`` as part_*.parquet + schema.pbtxt under ``path`` (with ``schema``'s properties)."""
    dataset.schema = schema
    dataset.to_parquet(str(path), output_files=dataset.npartitions, write_hugectr_keyset=False)


def _skip_tensorflow_import() -> None:
    """Make ``import tensorflow`` fail in this process unless it already happened.

    merlin-core imports TensorFlow when it is installed (dtype mappings, TF tensor columns), which
    costs ~15 s on this machine and nothing in the ETL uses it. Only the CLI entry point calls this:
    a process that also trains must not.
    """
    sys.modules.setdefault("tensorflow", None)


# -- CLI ------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, choices=DATASETS, help="which MovieLens (or the synthetic set)")
    parser.add_argument("--out", required=True, type=Path,
                        help="output directory; a previous ETL output there is replaced atomically")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out even if it is not a previous ETL output (never the raw data)")
    parser.add_argument("--raw", type=Path, help="raw folder or original zip (default: data/raw/<dataset>)")
    add_config_arguments(parser, EtlConfig, group="ETL settings")


def main(args: argparse.Namespace) -> dict:
    _skip_tensorflow_import()
    import pipeline  # noqa: F401  (dask configuration before nvtabular)

    summary = run_etl(args.dataset, args.out, from_args(EtlConfig, args), raw=args.raw, overwrite=args.overwrite)
    rows = summary["rows"]
    message = (f"wrote {args.out}: train {rows['train']:,} rows, valid {rows['valid']:,} rows, "
               f"{len(summary['columns'])} columns; {summary['seconds']['total']:.1f} s "
               f"({', '.join(f'{k} {v:.1f}' for k, v in summary['seconds'].items() if k != 'total')})")
    return {"out": str(args.out), "summary": message, **summary}


if __name__ == "__main__":  # pragma: no cover - the CLI is `python -m pipeline etl`
    raise SystemExit("run `python -m pipeline etl ...`")

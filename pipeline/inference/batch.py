"""Batch prediction: ``python -m pipeline predict`` scores a csv / parquet file of raw rows.

The file streams through a ``Predictor`` in batches; the output parquet (``input columns + score``, in input
order) is written to a temporary sibling and moved into place only when complete, and marked in its metadata
as a predict output so a later run may replace it.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd

from pipeline.config import add_arguments as add_config_arguments
from pipeline.config import add_renamed, documented, from_args, setting, spelling
from pipeline.errors import ArtifactError, DataError, UsageError
from pipeline.inference.artifacts import REQUEST_DTYPE
from pipeline.inference.predictor import Predictor


def iter_input_batches(path: Path, columns: list[str], batch_size: int) -> Iterator[pd.DataFrame]:
    """Frames of at most ``batch_size`` rows from a csv or parquet file, read incrementally (pyarrow)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    suffix = path.suffix.lower()
    if not path.is_file():
        raise DataError(f"input file {path} does not exist")
    if suffix in (".parquet", ".pq"):
        try:
            reader = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(f"{path} is not a readable parquet file ({err})") from err
        _check_input_columns(path, reader.schema_arrow.names, columns)
        for batch in reader.iter_batches(batch_size=batch_size):
            yield batch.to_pandas()
    elif suffix in (".csv", ".tsv", ".txt"):
        delimiter = "\t" if suffix == ".tsv" else ","
        try:
            reader = pacsv.open_csv(
                path,
                read_options=pacsv.ReadOptions(block_size=1 << 22),
                parse_options=pacsv.ParseOptions(delimiter=delimiter),
                convert_options=pacsv.ConvertOptions(column_types={c: pa.int64() for c in columns}),
            )
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(f"{path}: cannot read as csv ({err})") from err
        _check_input_columns(path, reader.schema.names, columns)
        pending: list[pd.DataFrame] = []
        size = 0
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                break
            except pa.ArrowInvalid as err:
                # pyarrow names the offending row and value (e.g. "In CSV column #0: ... 'abc'")
                raise DataError(f"{path}: {err}") from err
            pending.append(batch.to_pandas())
            size += batch.num_rows
            while size >= batch_size:
                frame = pd.concat(pending, ignore_index=True)
                yield frame.iloc[:batch_size].reset_index(drop=True)
                rest = frame.iloc[batch_size:].reset_index(drop=True)
                pending, size = [rest], len(rest)
        if size:
            yield pd.concat(pending, ignore_index=True)
    else:
        raise DataError(f"input file {path}: unsupported extension {path.suffix!r} (use .csv or .parquet)")


def _check_input_columns(path: Path, names: list[str], columns: list[str]) -> None:
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataError(f"{path} has no column(s) {missing} (it has {names}); predict needs {columns}")


PREDICTIONS_KEY = b"pipeline.stage"  # parquet metadata that marks a file as a predict output


def is_predictions_file(path: Path) -> bool:
    """Whether ``path`` is a parquet file written by ``predict_file`` (which a new run may replace)."""
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_schema(path).metadata or {}
    except Exception:  # not parquet at all
        return False
    return metadata.get(PREDICTIONS_KEY) == b"predict"


def check_predict_paths(input_path: Path, output_path: Path, etl_dir: Path | None = None,
                        model_dir: Path | None = None, overwrite: bool = False, *, out_flag: str = "--out",
                        model_flag: str = "--model-dir") -> None:
    """``UsageError`` unless ``output_path`` can be written without destroying anything (see
    ``pipeline.atomic.check_output``): not the input, not inside the ETL or model dir, not a directory, and
    an existing file only if it is a previous predict output (or ``overwrite``)."""
    from pipeline.atomic import check_output

    check_output(output_path, stage="predict", flag=out_flag, is_previous_output=is_predictions_file,
                 inputs=[("--input", input_path), ("--data", etl_dir), (model_flag, model_dir)],
                 overwrite=overwrite, kind="file")


def predict_file(predictor: Predictor, input_path: str | Path, output_path: str | Path, *,
                 batch_size: int = 65_536, progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Score every row of ``input_path`` (csv / parquet with the request columns) into ``output_path``.

    The output parquet holds the input columns plus ``score``, in input order. It is written to a
    temporary sibling and renamed into place only when complete; an existing ``output_path`` is replaced
    only if it is a previous predict output (or with ``overwrite``). Non-finite scores stop the run with
    ``ArtifactError`` naming the rows. Returns a summary dict.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    from pipeline.atomic import atomic_file

    input_path, output_path = Path(input_path), Path(output_path)
    check_predict_paths(input_path, output_path, predictor.etl_dir, predictor.model_dir, overwrite)
    total = _count_rows(input_path)
    start = time.perf_counter()
    rows = 0
    writer = None
    with atomic_file(output_path) as tmp, tqdm(total=total, unit="rows", disable=not progress,
                                                desc="predict") as bar:
        try:
            for frame in iter_input_batches(input_path, predictor.request_columns, batch_size):
                try:
                    scores = predictor.predict(frame[predictor.request_columns])
                except DataError as err:
                    raise DataError(f"{input_path}, rows {rows}-{rows + len(frame) - 1}: {err}") from err
                bad = np.flatnonzero(~np.isfinite(scores))
                if len(bad):
                    raise ArtifactError(f"the model in {predictor.model_dir} gave non-finite scores ({scores[bad[0]]}) "
                                        f"to {len(bad)} rows of {input_path}, first row {rows + int(bad[0])}; "
                                        "nothing was written")
                frame = frame.assign(score=scores)
                table = _mark(pa.Table.from_pandas(frame, preserve_index=False))
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table)
                rows += len(frame)
                bar.update(len(frame))
            if writer is None:  # empty input: still an (empty) output with the right columns
                empty = pd.DataFrame({c: pd.Series([], dtype=REQUEST_DTYPE) for c in predictor.request_columns})
                pq.write_table(_mark(pa.Table.from_pandas(empty.assign(score=np.zeros(0, np.float32)),
                                                          preserve_index=False)), tmp)
        finally:
            if writer is not None:
                writer.close()
    seconds = time.perf_counter() - start
    return {"input": str(input_path), "output": str(output_path), "rows": rows, "seconds": round(seconds, 3),
            "rows_per_second": round(rows / seconds, 1) if seconds > 0 else None}


def _mark(table):
    """``table`` with the metadata that tells a later run this file is a predict output."""
    return table.replace_schema_metadata({**(table.schema.metadata or {}), PREDICTIONS_KEY: b"predict"})


def _count_rows(path: Path) -> int | None:
    if path.suffix.lower() in (".parquet", ".pq") and path.is_file():
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows
        except Exception:  # reported properly by iter_input_batches
            return None
    return None


@documented
@dataclass(frozen=True)
class PredictConfig:
    """The settings of the predict stage (``python -m pipeline predict --help`` shows them with their defaults).

    Example:
        >>> PredictConfig().batch_size
        65536
    """

    batch_size: int = setting(65_536, "rows scored per batch")
    feature_cache: bool = setting(True, "look known users' and movies' features up in the feature cache "
                                        "(--no-feature-cache: run every row through the serving graph)")

    def check(self) -> None:
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be positive, got {self.batch_size}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path, help="ETL output dir (holds workflow/ and train/)")
    add_renamed(parser, "--model-dir", ("--model",), required=True, type=Path, help="model dir written by `train`")
    parser.add_argument("--input", required=True, type=Path, help="csv or parquet with raw userId, movieId")
    add_renamed(parser, "--out", ("--output",), required=True, type=Path,
                help="parquet: input columns + score; a previous predict output there is replaced")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out even if it is not a previous predict output (never --input)")
    add_config_arguments(parser, PredictConfig, group="predict settings")


def main(args: argparse.Namespace) -> dict[str, Any]:
    config = from_args(PredictConfig, args)
    config.check()
    # before the slow load: a bad --output is known at once
    check_predict_paths(args.input, args.out, args.data, args.model_dir, args.overwrite,
                        out_flag=spelling(args, "out", "--out"), model_flag=spelling(args, "model_dir", "--model-dir"))
    predictor = Predictor.load(args.data, args.model_dir, feature_cache=config.feature_cache)
    summary = predict_file(predictor, args.input, args.out, batch_size=config.batch_size, overwrite=args.overwrite)
    if summary["rows"] <= 20:  # a handful of example requests: show their scores
        summary["scores"] = pd.read_parquet(args.out).to_dict(orient="records")
    return summary

"""``get_movielens``: the counterpart of ``merlin.datasets.entertainment.get_movielens``.

Merlin's tutorials start with ``train, valid = get_movielens(variant="ml-1m", path=DATA_FOLDER)``; this
one returns the same pair of ``merlin.io.Dataset`` objects, made by this project's ETL stage (the same
workflow, split and seed defaults as ``python -m pipeline etl``) and reused when it already ran.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pipeline.errors import UsageError

logger = logging.getLogger(__name__)


def get_movielens(variant: str = "ml-1m", path: str | Path | None = None, *, seed: int = 0, split: str = "random",
                  valid_fraction: float = 0.2):
    """``(train, valid)`` ``merlin.io.Dataset``s of MovieLens ``variant`` processed by the ETL stage.

    Args:
        variant: "ml-100k", "ml-1m", "ml-25m" or "synthetic" (generated, ML-1M format, works offline).
        path: the data folder. Raw files are looked for in ``path/<variant>/`` (a folder, as the
            GroupLens zip unpacks) or ``path/<variant>.zip``, then where the etl stage looks
            (``data/raw/``, else the official download). The ETL output goes to ``path/<variant>-etl/``
            and is reused when it holds a run with the same ``seed``, ``split`` and ``valid_fraction``.
            Default: ``data/``.
        seed, split, valid_fraction: as ``python -m pipeline etl``.

    Returns ``(train, valid)``, each a ``merlin.io.Dataset`` over the parquet files, with the schema.

    Example:
        >>> train, valid = get_movielens(variant="ml-1m", path="data")
        >>> model = DLRMModel(train.schema, embedding_dim=64)
    """
    from merlin.io import Dataset

    from pipeline.etl import DATA_DIR, DATASETS, is_etl_output, run_etl

    if variant not in DATASETS:
        raise UsageError(f"variant {variant!r} is not one of {', '.join(DATASETS)}")
    path = Path(path) if path is not None else DATA_DIR
    out = path / f"{variant}-etl"
    raw = next((c for c in (path / variant, path / f"{variant}.zip") if c.exists()), None)
    wanted = {"seed": seed, "split": split}
    if is_etl_output(out) and _matches(out, wanted, valid_fraction):
        logger.info("get_movielens: reusing the ETL output in %s", out)
    else:
        if raw is None and variant == "synthetic":
            raw = path / variant  # generated there
        run_etl(variant, out, raw=raw, seed=seed, split=split, valid_fraction=valid_fraction)
    return (Dataset(str(out / "train"), engine="parquet"), Dataset(str(out / "valid"), engine="parquet"))


def _matches(out: Path, wanted: dict, valid_fraction: float) -> bool:
    try:
        summary = json.loads((out / "etl.json").read_text())
    except (OSError, ValueError):
        return False
    if any(summary.get(k) != v for k, v in wanted.items()):
        return False
    # etl.json records the achieved fraction of rows (rounded), official splits their own
    return summary.get("split") == "official" or abs(summary.get("valid_fraction", -1) - valid_fraction) < 1e-3

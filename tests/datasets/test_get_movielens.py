"""get_movielens: Merlin's tutorial entry point, on the ETL stage."""

from __future__ import annotations

import json
import shutil

import pandas as pd

import pipeline  # noqa: F401


def test_get_movielens_runs_the_etl_once_and_reuses_it(synthetic_raw, etl_dir, tmp_path):
    from pipeline.datasets import get_movielens

    shutil.copytree(synthetic_raw, tmp_path / "ml-1m")  # ml-1m's format, as the zip unpacks
    train, valid = get_movielens(variant="ml-1m", path=tmp_path)
    summary = (tmp_path / "ml-1m-etl" / "etl.json").read_text()
    rows = json.loads(summary)["rows"]
    assert train.num_rows == rows["train"] and valid.num_rows == rows["valid"]
    # the same workflow, split and seed defaults as `python -m pipeline etl`: the session's ETL output
    for split, dataset in (("train", train), ("valid", valid)):
        ours = dataset.to_ddf().compute().reset_index(drop=True)
        theirs = pd.concat([pd.read_parquet(p) for p in sorted((etl_dir / split).glob("part_*.parquet"))],
                           ignore_index=True)
        pd.testing.assert_frame_equal(ours[theirs.columns], theirs, check_dtype=False)
    assert "userId" in train.schema.column_names and train.schema["genres"].is_list

    get_movielens(variant="ml-1m", path=tmp_path)  # reused: not run again
    assert (tmp_path / "ml-1m-etl" / "etl.json").read_text() == summary
    get_movielens(variant="ml-1m", path=tmp_path, seed=1)  # another seed: a new run
    assert json.loads((tmp_path / "ml-1m-etl" / "etl.json").read_text())["seed"] == 1

"""Shared fixtures: one small synthetic ml-1m raw set, its ETL output and a model trained on it.

Session-scoped so the whole suite pays for ETL and training once. Stage owners may change the
body of the fixture that calls their stage, never its name or what it returns.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import pipeline  # noqa: F401  (configures dask before nvtabular/merlin are imported)

SMALL = dict(n_users=400, n_movies=300, n_ratings=40_000)


@pytest.fixture(scope="session")
def synthetic_raw(tmp_path_factory) -> Path:
    """A small synthetic raw dir in the ml-1m format (ratings.dat, users.dat, movies.dat, oracle)."""
    from pipeline.datasets import generate_synthetic

    return generate_synthetic(tmp_path_factory.mktemp("raw") / "synthetic", fmt="ml-1m", seed=0, **SMALL)


@pytest.fixture(scope="session")
def etl_dir(synthetic_raw, tmp_path_factory) -> Path:
    """ETL output of ``synthetic_raw``: train/, valid/ (parquet + schema.pbtxt), workflow/, etl.json."""
    from pipeline.etl import run_etl

    out = tmp_path_factory.mktemp("etl") / "out"
    run_etl("ml-1m", out, raw=synthetic_raw, seed=0)
    return out


@pytest.fixture(scope="session")
def model_dir(etl_dir, tmp_path_factory) -> Path:
    """A DLRM trained with the train stage's defaults (early stopping on held-out train rows) on ``etl_dir``: the saved Keras model,
    metrics.json, schema, config."""
    from pipeline.train import train_model

    out = tmp_path_factory.mktemp("models") / "dlrm"
    train_model(etl_dir, out, seed=0)
    return out


@pytest.fixture(scope="session")
def two_tower_dir(etl_dir, tmp_path_factory) -> Path:
    """A two-tower retrieval model trained briefly on ``etl_dir``'s positives (pipeline.retrieval.fit_two_tower),
    with its ranking metrics on the valid split in metrics.json."""
    from pipeline.retrieval import fit_two_tower

    out = tmp_path_factory.mktemp("models") / "two_tower"
    fit_two_tower(etl_dir, out, epochs=4, batch_size=512, seed=0, verbose=0)
    return out

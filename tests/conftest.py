"""Shared fixtures: one small synthetic ml-1m raw set, its ETL output and a model trained on it; a tiny
in-memory schema and batch shaped like the ETL output (``tiny_schema``, ``tiny_batch``) for block tests.

Session-scoped so the whole suite pays for ETL, training and loading the predictor once. Stage owners may change the
body of the fixture that calls their stage, never its name or what it returns.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import pipeline  # noqa: F401  (configures dask before nvtabular/merlin are imported)

# isort: split
from merlin.schema import ColumnSchema, Schema, Tags  # noqa: E402

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
    """A DLRM trained with the train stage's defaults (early stopping on held-out train rows) on ``etl_dir``:
    the saved Keras model, metrics.json, schema, config."""
    from pipeline.train import train_model

    out = tmp_path_factory.mktemp("models") / "dlrm"
    train_model(etl_dir, out, seed=0)
    return out


@pytest.fixture(scope="session")
def predictor(etl_dir, model_dir):
    """``Predictor.load(etl_dir, model_dir)`` with its feature cache, shared by the inference, serve and export
    tests (a test that changes it does so through ``monkeypatch``, which puts it back)."""
    from pipeline.inference import Predictor

    return Predictor.load(etl_dir, model_dir)


@pytest.fixture(scope="session")
def two_tower_dir(etl_dir, tmp_path_factory) -> Path:
    """A two-tower retrieval model trained briefly on ``etl_dir``'s positives (pipeline.retrieval.fit_two_tower),
    with its ranking metrics on the valid split in metrics.json."""
    from pipeline.retrieval import fit_two_tower

    out = tmp_path_factory.mktemp("models") / "two_tower"
    fit_two_tower(etl_dir, out, epochs=4, batch_size=512, seed=0, verbose=0)
    return out


# name: (cardinality incl. the reserved pad/null/OOV rows, the schema's suggested embedding width)
CATEGORICAL = {"userId": (41, 8), "movieId": (31, 8), "title": (31, 8), "genres": (7, 4), "gender": (4, 2),
               "age": (9, 3), "occupation": (23, 4), "zipcode": (21, 4)}
CONTINUOUS = ["TE_userId_rating", "TE_movieId_rating", "TE_gender_rating", "TE_age_rating", "TE_occupation_rating",
              "TE_zipcode_rating"]
ROWS = 5


def _categorical(name: str) -> ColumnSchema:
    cardinality, dim = CATEGORICAL[name]
    tags = [Tags.CATEGORICAL]
    tags += {"userId": [Tags.USER_ID, Tags.USER, Tags.ID], "movieId": [Tags.ITEM_ID, Tags.ITEM, Tags.ID]}.get(name, [])
    return ColumnSchema(name, tags=tags, dtype="int64", is_list=name == "genres", is_ragged=False,
                        properties={"embedding_sizes": {"cardinality": cardinality, "dimension": dim},
                                    "domain": {"min": 0, "max": cardinality - 1}})


@pytest.fixture(scope="session")
def tiny_schema() -> Schema:
    """The ETL output's columns and tags (8 categorical incl. the ``genres`` list, 6 target encodings, the
    binary and the regression target), with small cardinalities."""
    return Schema(
        [_categorical(name) for name in CATEGORICAL]
        + [ColumnSchema(name, tags=[Tags.CONTINUOUS], dtype="float32") for name in CONTINUOUS]
        + [ColumnSchema("rating_binary", tags=[Tags.TARGET, Tags.BINARY_CLASSIFICATION], dtype="int64"),
           ColumnSchema("rating", tags=[Tags.TARGET, Tags.REGRESSION], dtype="float32")]
    )


@pytest.fixture(scope="session")
def tiny_batch() -> dict[str, np.ndarray]:
    """5 rows of ``tiny_schema``'s features: ids ``(5, 1)`` (never 0, the padding row), ``genres`` ``(5, 3)``
    padded with 0 (one row has none), target encodings ``(5, 1)``."""
    rng = np.random.default_rng(0)
    batch = {name: rng.integers(1, card, size=(ROWS, 1)) for name, (card, _) in CATEGORICAL.items() if name != "genres"}
    batch["genres"] = np.array([[1, 3, 0], [2, 0, 0], [4, 5, 6], [0, 0, 0], [6, 1, 0]])
    batch.update({name: rng.normal(size=(ROWS, 1)).astype("float32") for name in CONTINUOUS})
    return batch

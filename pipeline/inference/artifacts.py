"""Loading a saved workflow + model pair, and every check that they may be trusted and belong together.

Loading a workflow runs pickle, so it is loaded only if its files match the sha256 manifest the ETL recorded
(``pipeline.manifest``), and the model only if its directory matches the manifest the train stage recorded.
The model must have been trained on this very ETL run, with finite valid metrics, on the schema the serving
graph produces. Every failed check is an ``ArtifactError`` naming the file or feature.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.errors import ArtifactError
from pipeline.inference.graph import serving_workflow
from pipeline.manifest import MANIFEST_NAME, verify_manifest
from pipeline.schema import SUMMARY_FIELDS, read_schema, schema_fingerprint, schema_summary

logger = logging.getLogger(__name__)

REQUEST_DTYPE = np.int64  # raw ids in requests, side tables and vocabularies


@dataclass
class Artifacts:
    """A verified workflow + model pair, as ``load_artifacts`` returns it.

    Args:
        etl_dir: the ETL output the workflow came from (holds ``workflow/`` and ``train/``).
        model_dir: the train stage's output the model came from.
        workflow: the saved ``nvt.Workflow``, exactly as saved.
        serving: ``serving_workflow(workflow, targets)``: the graph requests go through.
        targets: the workflow's TARGET output columns (removed from the serving graph).
        trained_schema: the merlin ``Schema`` the model was trained on (``model_dir/schema.pbtxt``).
        model: the loaded Keras model.
        config: ``model_dir/config.json``.
        metrics: ``model_dir/metrics.json`` (``{}`` if absent).

    Example:
        >>> artifacts = load_artifacts("data/synthetic/etl", "data/synthetic/models/dlrm")  # doctest: +SKIP
        >>> artifacts.serving.input_schema.column_names  # doctest: +SKIP
        ['userId', 'movieId']
    """

    etl_dir: Path
    model_dir: Path
    workflow: Any
    serving: Any
    targets: list[str]
    trained_schema: Any
    model: Any
    config: dict
    metrics: dict

    @property
    def workflow_dir(self) -> Path:
        return self.etl_dir / "workflow"


def load_artifacts(etl_dir: str | Path, model_dir: str | Path) -> Artifacts:
    """Verify and load ``etl_dir/workflow`` and ``model_dir/model.keras``; ``ArtifactError`` on any mismatch."""
    import nvtabular as nvt
    from merlin.schema import Tags

    import pipeline  # noqa: F401  (dask settings before nvtabular)

    etl_dir, model_dir = Path(etl_dir), Path(model_dir)
    workflow_dir, model_file = etl_dir / "workflow", model_dir / "model.keras"
    for path in (workflow_dir, model_file):
        if not path.exists():
            raise ArtifactError(f"{path} is missing")
    verify_manifest(workflow_dir, required=("workflow.pkl",))
    verify_manifest(model_dir, required=("model.keras", "config.json"))
    config = read_json(model_dir / "config.json")
    check_run(etl_dir, model_dir, config)
    metrics = read_json(model_dir / "metrics.json")
    check_metrics(model_dir, metrics)

    workflow = nvt.Workflow.load(str(workflow_dir))
    targets = workflow.output_schema.select_by_tag(Tags.TARGET).column_names
    serving = serving_workflow(workflow, targets)

    schema_file = model_dir / "schema.pbtxt"
    if not schema_file.is_file():
        raise ArtifactError(f"{schema_file} is missing (the schema the model was trained on)")
    trained_schema = read_schema(schema_file)
    check_schema(serving.output_schema, trained_schema, config, model_dir)

    from pipeline.models import load_model  # registers our layers with Keras

    try:
        model = load_model(str(model_file))
    except Exception as err:  # keras raises many types for a bad file
        raise ArtifactError(f"cannot load the model {model_file}: {err}") from err
    return Artifacts(etl_dir=etl_dir, model_dir=model_dir, workflow=workflow, serving=serving, targets=targets,
                     trained_schema=trained_schema, model=model, config=config, metrics=metrics)


def read_json(path: Path) -> dict:
    """The JSON object in ``path``; ``{}`` if there is no such file, ``ArtifactError`` if it does not parse."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ArtifactError(f"{path} is not valid JSON ({err})") from err


def versions() -> dict[str, str]:
    """Installed versions of the packages a prediction depends on (for /metadata and logs)."""
    import importlib.metadata as md

    out = {}
    for name in ("movielens-pipeline", "nvtabular", "merlin-core", "tensorflow-cpu", "keras", "pandas", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return out


def check_run(etl_dir: Path, model_dir: Path, config: dict) -> None:
    """``ArtifactError`` unless the model was trained on this very ETL run (``pipeline.etl.etl_run_id``).

    Two ETL runs of the same raw data with other seeds have the same schema but other splits and
    encodings; a model scores wrongly with the other's workflow. Models of earlier releases record
    no run and are checked by schema only.
    """
    trained_on = config.get("etl_run_id")
    if trained_on is None:
        logger.warning("%s records no ETL run: cannot check it belongs with %s", model_dir, etl_dir)
        return
    run = (read_json(etl_dir / "workflow" / MANIFEST_NAME)).get("run_id")
    if run != trained_on:
        raise ArtifactError(
            f"the model in {model_dir} was trained on ETL run {trained_on[:12]} ({config.get('data_dir')}), "
            f"but {etl_dir} is ETL run {str(run)[:12] if run else '(unrecorded)'}: serve a model with the ETL "
            "output it was trained on, or retrain it on this one"
        )


def check_metrics(model_dir: Path, metrics: dict) -> None:
    """``ArtifactError`` if the model's recorded valid metrics are not finite (a diverged run)."""
    valid = metrics.get("valid", {})
    bad = sorted(k for k, v in valid.items() if isinstance(v, (int, float)) and not np.isfinite(v))
    if bad:
        raise ArtifactError(f"the model in {model_dir} has non-finite valid metrics ({', '.join(bad)}): "
                            "it diverged in training; refusing to score with it")


def check_schema(serving_schema, trained_schema, config: dict, model_dir: Path) -> None:
    """``ArtifactError`` unless the serving graph produces the features the model was trained on.

    Compares ``schema_fingerprint`` of the serving graph's output with the one the train stage recorded
    in config.json, then (also for models without a recorded fingerprint) every feature of the training
    schema by its ``column_summary``, to name the first that differs.
    """
    from merlin.schema import Tags

    recorded = config.get("schema_fingerprint")
    if recorded is not None:
        actual = schema_fingerprint(serving_schema)
        if actual != recorded:
            raise ArtifactError(
                f"the workflow's output schema (fingerprint {actual[:12]}) is not the schema the model in {model_dir} "
                f"was trained on (fingerprint {recorded[:12]}): the workflow and model do not belong together"
            )
    have = schema_summary(serving_schema)
    for name, want in schema_summary(trained_schema.excluding_by_tag(Tags.TARGET)).items():
        if name not in have:
            raise ArtifactError(f"the model in {model_dir} needs feature {name!r}, which the workflow does not produce")
        if have[name] != want:
            raise ArtifactError(
                f"feature {name!r}: the workflow produces {SUMMARY_FIELDS} {have[name]} but the model "
                f"in {model_dir} was trained on {want}: the workflow and model do not belong together"
            )


def known_ids(workflow, key: str) -> np.ndarray:
    """Sorted raw ids of ``key`` the workflow knows: its side tables joined on ``key``, else Categorify's vocabulary."""
    from merlin.dag import Graph, iter_nodes
    from nvtabular import ops

    nodes = list(iter_nodes([workflow.output_node]))
    ids = []
    for node in Graph.get_nodes_by_op_type(nodes, ops.JoinExternal):
        on = node.op.on if isinstance(node.op.on, list) else [node.op.on]
        if on == [key]:
            ids.append(np.asarray(node.op._ext[key]))
    if not ids:
        for node in Graph.get_nodes_by_op_type(nodes, ops.Categorify):
            path = node.op.categories.get(key)
            if path:
                vocab = pd.read_parquet(path)[key].dropna()
                ids.append(vocab.to_numpy())
    if not ids:
        raise ArtifactError(f"the workflow has neither a side table nor a vocabulary for {key!r}")
    return np.unique(np.concatenate(ids).astype(REQUEST_DTYPE))


def rated_by_user(train_dir: Path) -> dict[int, np.ndarray]:
    """Encoded userId -> encoded movieIds rated in the processed train split."""
    import pyarrow.parquet as pq

    files = sorted(train_dir.glob("*.parquet"))
    if not files:
        raise ArtifactError(f"no parquet files in {train_dir}: cannot tell which movies a user rated")
    table = pd.concat([pq.read_table(f, columns=["userId", "movieId"]).to_pandas() for f in files])
    users, movies = table["userId"].to_numpy(), table["movieId"].to_numpy()
    order = np.argsort(users, kind="stable")
    users, movies = users[order], movies[order]
    keys, starts = np.unique(users, return_index=True)
    return {int(u): m for u, m in zip(keys, np.split(movies, starts[1:]))}

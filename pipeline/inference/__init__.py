"""Inference: raw ``(userId, movieId)`` rows through the saved NVTabular workflow and the saved model.

One module a concept:

- ``artifacts``: ``load_artifacts`` verifies and loads a workflow + model pair (manifests, ETL run, metrics,
  schema) and the catalog helpers ``known_ids`` / ``rated_by_user``;
- ``graph``: ``serving_workflow``, the saved workflow without its target inputs;
- ``features``: ``FeatureAssembler`` (transformed rows -> model inputs, as the training loader lays them out),
  ``model_inputs``, ``request_ids`` (the id rule of every stage);
- ``cache``: ``FeatureCache``, per-user and per-movie outputs looked up instead of recomputed;
- ``predictor``: ``Predictor``, which puts them together (``predict``, ``recommend``);
- ``batch``: ``predict_file`` and the ``predict`` CLI stage.
"""

from pipeline.inference.artifacts import REQUEST_DTYPE, Artifacts, known_ids, load_artifacts, rated_by_user
from pipeline.inference.batch import (
    PredictConfig,
    check_predict_paths,
    is_predictions_file,
    iter_input_batches,
    predict_file,
)
from pipeline.inference.cache import FeatureCache
from pipeline.inference.features import FeatureAssembler, ModelInput, model_inputs, request_ids
from pipeline.inference.graph import serving_workflow
from pipeline.inference.predictor import Predictor
from pipeline.manifest import MANIFEST_NAME

__all__ = [
    "MANIFEST_NAME", "REQUEST_DTYPE", "Artifacts", "FeatureAssembler", "FeatureCache", "ModelInput", "PredictConfig",
    "Predictor",
    "check_predict_paths", "is_predictions_file", "iter_input_batches", "known_ids", "load_artifacts",
    "model_inputs", "predict_file", "rated_by_user", "request_ids", "serving_workflow",
]

"""The raw-request export: one TF SavedModel, raw ids in, scores out, loadable with no pipeline code."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import pipeline  # noqa: F401  (dask settings before nvtabular)

# Runs in a fresh interpreter, from a directory outside the repository, where importing our code or
# NVTabular / merlin fails: only TensorFlow and the SavedModel.
LOAD_WITHOUT_PIPELINE = """
import json, sys
for name in ("pipeline", "nvtabular", "merlin", "keras_rs"):
    sys.modules[name] = None  # `import pipeline` now raises ImportError
import tensorflow as tf

model = tf.saved_model.load(sys.argv[1])
serve = model.signatures["serving_default"]
pairs = json.loads(sys.stdin.read())
out = serve(userId=tf.constant(pairs["userId"], tf.int64), movieId=tf.constant(pairs["movieId"], tf.int64))
try:
    serve(userId=tf.constant([-1], tf.int64), movieId=tf.constant([1], tf.int64))
    negative = "accepted"
except tf.errors.InvalidArgumentError as err:
    negative = "userId must be a non-negative id" in err.message
print(json.dumps({"score": out["score"].numpy().tolist(), "negative_rejected": negative}))
"""


@pytest.fixture(scope="module")
def exported(etl_dir, model_dir, tmp_path_factory):
    """A copy of the session's model dir, exported in place by the CLI stage: ``(model copy, export dir)``."""
    from pipeline.cli import main

    copy = tmp_path_factory.mktemp("export") / "model"
    shutil.copytree(model_dir, copy)
    assert main(["export", "--data", str(etl_dir), "--model", str(copy)]) == 0
    return copy, copy / "serving_raw"


def test_the_export_scores_raw_ids_with_no_pipeline_code(exported, predictor, tmp_path):
    _, out = exported
    rng = np.random.default_rng(0)
    pairs = pd.DataFrame({
        "userId": np.concatenate([rng.choice(predictor.cache.keys["userId"], 200), [10**7, 10**7 + 1, 10**12, 1]]),
        "movieId": np.concatenate([rng.choice(predictor.candidate_items, 200), [1, 10**8, 10**9, 10**9]]),
    })  # known pairs, then unseen users, unseen movies, both unseen, a known user with an unseen movie
    result = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_PIPELINE, str(out)], cwd=tmp_path,
                            input=json.dumps({c: pairs[c].tolist() for c in pairs}), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(answer["score"], predictor.predict(pairs), rtol=0, atol=1e-6)
    assert answer["negative_rejected"] is True


def test_the_model_dir_still_loads_after_an_export_into_it(exported, etl_dir):
    """The export re-writes the model dir's manifest, so the predictor's checksum check still passes."""
    from pipeline.inference import Predictor
    from pipeline.manifest import read_manifest, verify_manifest

    copy, out = exported
    files = verify_manifest(copy)
    assert read_manifest(copy)["stage"] == "train"  # the train stage's own fields are kept
    assert "serving_raw/saved_model.pb" in files and "serving_raw/export.json" in files
    info = json.loads((out / "export.json").read_text())
    assert info["max_abs_difference_to_predictor"] <= 1e-6 and info["inputs"] == {"userId": "int64 [None]",
                                                                                  "movieId": "int64 [None]"}
    Predictor.load(etl_dir, copy, feature_cache=False)


def test_an_export_never_replaces_what_is_not_an_earlier_export(predictor, tmp_path):
    from pipeline.errors import UsageError
    from pipeline.export import export_raw_model

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(UsageError, match="not a previous `export` output"):
        export_raw_model(predictor, precious)
    with pytest.raises(UsageError, match="model directory"):
        export_raw_model(predictor, predictor.model_dir)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_an_export_into_a_modified_model_dir_is_refused(exported, etl_dir, predictor, tmp_path, monkeypatch):
    from pipeline.errors import ArtifactError
    from pipeline.export import export_raw_model

    copy = tmp_path / "model"
    shutil.copytree(exported[0], copy)
    (copy / "metrics.json").write_text("{}")  # changed after training: the manifest no longer matches
    monkeypatch.setattr(predictor, "model_dir", copy)
    with pytest.raises(ArtifactError, match="metrics.json"):
        export_raw_model(predictor)

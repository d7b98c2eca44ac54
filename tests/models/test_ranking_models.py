"""Every prebuilt ranking model, built from the schema alone, trained by the train stage, reloaded in a
fresh process with identical predictions. (The blocks themselves: tests/models/test_<module>.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import pipeline  # noqa: F401

ARCHITECTURES = ["dcn", "deepfm", "wide-deep", "mlp"]  # dlrm: tests/test_train.py


@pytest.fixture(scope="module")
def trained(etl_dir, tmp_path_factory):
    """``{architecture: model_dir}``, each trained for two epochs by ``train_model(model=...)``."""
    from pipeline.train import train_model

    root = tmp_path_factory.mktemp("architectures")
    return {name: (train_model(etl_dir, root / name, model=name, epochs=2, batch_size=512, seed=0, verbose=0),
                   root / name) for name in ARCHITECTURES}


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_each_architecture_trains_from_the_schema_and_learns(trained, name):
    metrics, model_dir = trained[name]
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model"] == name and config["targets"] == ["rating_binary", "rating"]
    assert metrics["valid"]["auc"] > 0.55, metrics["valid"]  # a model that learns nothing scores 0.5
    assert np.isfinite(metrics["valid"]["rating_rmse"])


def test_models_reload_in_a_fresh_process_with_identical_predictions(trained, etl_dir, tmp_path):
    import keras
    from merlin.io import Dataset

    import pipeline.models as mm

    valid = Dataset(str(etl_dir / "valid"), engine="parquet")
    before = {}
    for name in ARCHITECTURES:
        model = mm.load_model(str(trained[name][1] / "model.keras"))
        before[name] = model.predict(valid, batch_size=4096, verbose=0)["rating_binary"]
    script = textwrap.dedent(
        f"""
        import numpy as np
        import pipeline.models as mm
        from merlin.io import Dataset
        valid = Dataset({str(etl_dir / "valid")!r}, engine="parquet")
        dirs = {{{", ".join(f"{n!r}: {str(trained[n][1])!r}" for n in ARCHITECTURES)}}}
        out = {{n: mm.load_model(d + "/model.keras").predict(valid, batch_size=4096, verbose=0)["rating_binary"]
               for n, d in dirs.items()}}
        np.savez({str(tmp_path / "after.npz")!r}, **{{n.replace("-", "_"): v for n, v in out.items()}})
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    after = np.load(tmp_path / "after.npz")
    for name in ARCHITECTURES:
        np.testing.assert_array_equal(after[name.replace("-", "_")], before[name])
    assert keras.saving.get_registered_object("pipeline>WideBlock") is mm.WideBlock

"""Every prebuilt ranking model, built from the schema alone, trained by the train stage, reloaded in a
fresh process with identical predictions."""

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


def test_the_blocks_do_what_their_docstrings_say():
    from keras import ops

    import pipeline.models as mm

    a, b, c = np.array([[1.0, 2.0]]), np.array([[3.0, -1.0]]), np.array([[0.5, 0.5]])
    pairs = a @ b.T + a @ c.T + b @ c.T
    np.testing.assert_allclose(ops.convert_to_numpy(mm.FMBlock()({"a": a, "b": b, "c": c})), pairs, rtol=1e-6)

    wide = mm.WideBlock({"user": {"cardinality": 5}, "genres": {"cardinality": 4, "is_list": True}},
                        crosses=[("user", "user")], cross_buckets=7, continuous=["te"])
    batch = {"user": np.array([[1], [2]]), "genres": np.array([[1, 3, 0], [0, 0, 0]]), "te": np.array([[0.5], [2.0]])}
    assert ops.convert_to_numpy(wide(batch)).tolist() == [[0.0], [0.0]]  # zero-initialised: no prior
    wide.id_weights["user"].embeddings.assign(np.arange(5, dtype="float32")[:, None])
    wide.id_weights["genres"].embeddings.assign(np.array([[9.0], [1.0], [10.0], [100.0]], dtype="float32"))
    wide.cross_weights[0].embeddings.assign(np.arange(7, dtype="float32")[:, None] * 1000)
    wide.linear.kernel.assign([[10.0]])
    # user weight + genre weights of the non-padding ids + cross (u * 5 + u) % 7 * 1000 + 10 * te
    assert ops.convert_to_numpy(wide(batch)).tolist() == [[1 + 101 + 6000 + 5], [2 + 0 + 5000 + 20]]


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

"""pipeline/models/model.py: sample_batch, the heads a Model needs, and saving: a saved model reloads in a
fresh Python process, with no custom_objects, and predicts the same scores."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

import pipeline  # noqa: F401
import pipeline.models as mm


def test_sample_batch_has_one_column_per_feature_and_targets_apart(tiny_schema, tiny_batch):
    from merlin.io import Dataset

    schema = tiny_schema.excluding_by_name(["genres"])
    rng = np.random.default_rng(1)
    frame = pd.DataFrame({name: tiny_batch[name][:, 0] for name in schema.column_names if name in tiny_batch})
    frame = pd.concat([frame] * 4, ignore_index=True).assign(rating_binary=rng.integers(0, 2, 20),
                                                             rating=rng.integers(1, 6, 20).astype("float32"))
    train = Dataset(frame, schema=schema)
    first = frame.iloc[:5]
    batch = mm.sample_batch(train, batch_size=5, shuffle=False)[0]
    assert batch["userId"].shape == (5, 1)
    np.testing.assert_array_equal(np.asarray(batch["userId"])[:, 0], first["userId"].to_numpy())
    assert "rating_binary" not in batch
    features, targets = mm.sample_batch(train, batch_size=5)
    np.testing.assert_array_equal(np.asarray(targets["rating_binary"])[:, 0], first["rating_binary"].to_numpy())


def test_a_model_needs_one_head_per_target():
    body = mm.MLPBlock([4])
    with pytest.raises(ValueError, match="at least one output head"):
        mm.Model(body)
    with pytest.raises(ValueError, match="two output heads predict the same target"):
        mm.Model(body, mm.BinaryOutput("y"), mm.BinaryOutput("y"))


@pytest.fixture(scope="module")
def saved(etl_dir, tmp_path_factory):
    """Both saved models of this module's round-trip tests (a multi-task model fitted for one epoch, saved to a
    ``.keras`` file; an MLPModel saved twice to a path without extension), their scores before saving, and the
    scores one fresh Python process computed from the saved files (one process for both: each costs an import
    of TensorFlow and merlin)."""
    import keras
    from merlin.io import Dataset

    tmp_path = tmp_path_factory.mktemp("saved")
    train = Dataset(str(etl_dir / "train"), engine="parquet")
    valid = Dataset(str(etl_dir / "valid"), engine="parquet")
    out = {"valid_rows": valid.num_rows, "dir": tmp_path}

    # a .keras file, loaded by plain keras.saving.load_model after `import pipeline.models`
    keras.utils.set_random_seed(0)
    body = mm.InputBlock(train.schema, 16, continuous_block=mm.MLPBlock([16])).connect(
        mm.CrossBlock(depth=2), mm.MLPBlock([32, 16], dropout=0.1, normalization="batch_norm")
    )
    model = mm.Model(body, mm.BinaryOutput("rating_binary", pre=mm.LogitsTemperatureScaler(2.0)),
                     mm.RegressionOutput("rating"))
    model.compile(optimizer="adam")
    out["history"] = model.fit(train, batch_size=2048, epochs=1, verbose=0).history
    out["file_before"] = model.predict(valid, batch_size=1024, verbose=0)
    model.save(tmp_path / "model.keras")

    # the tutorial's model.save(os.path.join(DATA_FOLDER, "custom_dlrm")), loaded by pipeline.models.load_model
    keras.utils.set_random_seed(1)
    model = mm.MLPModel(valid.schema, mm.MLPBlock([8]), mm.BinaryOutput("rating_binary"), embedding_dim=4)
    out["dir_model"] = model
    out["dir_before"] = model.predict(valid, batch_size=4096, verbose=0)
    model.save(tmp_path / "custom_dlrm")
    out["dir_listing"] = {p.name for p in (tmp_path / "custom_dlrm").iterdir()}
    model.save(tmp_path / "custom_dlrm")  # its own earlier save is replaced

    script = textwrap.dedent(
        f"""
        import numpy as np, keras
        import pipeline.models  # registers the layers; no custom_objects passed to keras.saving.load_model
        from merlin.io import Dataset
        valid = Dataset({str(etl_dir / "valid")!r}, engine="parquet")
        model = keras.saving.load_model({str(tmp_path / "model.keras")!r})
        np.savez({str(tmp_path / "after.npz")!r}, **model.predict(valid, batch_size=1024, verbose=0))
        from pipeline.models import load_model  # registers the layers itself
        model = load_model({str(tmp_path / "custom_dlrm")!r})
        np.save({str(tmp_path / "after.npy")!r}, model.predict(valid, batch_size=4096, verbose=0))
        """
    )
    out["process"] = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    return out


def test_multi_task_model_round_trips_through_a_keras_file_in_a_fresh_process(saved):
    assert {"rating_binary_auc", "rating_rmse"} <= set(saved["history"])
    before = saved["file_before"]
    assert set(before) == {"rating_binary", "rating"} and before["rating"].shape == (saved["valid_rows"], 1)
    done = saved["process"]
    assert done.returncode == 0, done.stderr[-3000:]
    after = np.load(saved["dir"] / "after.npz")
    for target in ("rating_binary", "rating"):
        np.testing.assert_array_equal(after[target], before[target])


def test_a_path_without_extension_saves_a_directory_that_load_model_reads_in_a_fresh_process(saved, tmp_path):
    """The tutorial's ``model.save(os.path.join(DATA_FOLDER, "custom_dlrm"))``: Keras 3 alone refuses it."""
    from pipeline.errors import UsageError

    assert saved["dir_listing"] == {"model.keras", "saved_model"}
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(UsageError, match="not a model directory written by Model.save"):
        saved["dir_model"].save(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"

    done = saved["process"]
    assert done.returncode == 0, done.stderr[-3000:]
    np.testing.assert_array_equal(np.load(saved["dir"] / "after.npy"), saved["dir_before"])

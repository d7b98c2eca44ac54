"""A saved model reloads in a fresh Python process, with no custom_objects, and predicts the same scores."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np

import pipeline  # noqa: F401


def test_multi_task_model_round_trips_through_a_keras_file_in_a_fresh_process(etl_dir, tmp_path):
    import keras
    from merlin.io import Dataset

    import pipeline.models as mm

    train = Dataset(str(etl_dir / "train"), engine="parquet")
    valid = Dataset(str(etl_dir / "valid"), engine="parquet")
    keras.utils.set_random_seed(0)
    body = mm.InputBlock(train.schema, 16, continuous_block=mm.MLPBlock([16])).connect(
        mm.CrossBlock(depth=2), mm.MLPBlock([32, 16], dropout=0.1, normalization="batch_norm")
    )
    model = mm.Model(body, mm.BinaryOutput("rating_binary", pre=mm.LogitsTemperatureScaler(2.0)), mm.RegressionOutput("rating"))
    model.compile(optimizer="adam")
    history = model.fit(train, batch_size=2048, epochs=1, verbose=0)
    assert {"rating_binary_auc", "rating_rmse"} <= set(history.history)
    before = model.predict(valid, batch_size=1024, verbose=0)
    assert set(before) == {"rating_binary", "rating"} and before["rating"].shape == (valid.num_rows, 1)
    model.save(tmp_path / "model.keras")

    script = textwrap.dedent(
        f"""
        import numpy as np, keras
        import pipeline.models  # registers the layers; no custom_objects passed below
        from merlin.io import Dataset
        model = keras.saving.load_model({str(tmp_path / "model.keras")!r})
        scores = model.predict(Dataset({str(etl_dir / "valid")!r}, engine="parquet"), batch_size=1024, verbose=0)
        np.savez({str(tmp_path / "after.npz")!r}, **scores)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    after = np.load(tmp_path / "after.npz")
    for target in ("rating_binary", "rating"):
        np.testing.assert_array_equal(after[target], before[target])


def test_a_path_without_extension_saves_a_directory_that_load_model_reads_in_a_fresh_process(etl_dir, tmp_path):
    """The tutorial's ``model.save(os.path.join(DATA_FOLDER, "custom_dlrm"))``: Keras 3 alone refuses it."""
    import keras
    import pytest
    from merlin.io import Dataset

    import pipeline.models as mm
    from pipeline.errors import UsageError

    valid = Dataset(str(etl_dir / "valid"), engine="parquet")
    keras.utils.set_random_seed(1)
    model = mm.MLPModel(valid.schema, mm.MLPBlock([8]), mm.BinaryOutput("rating_binary"), embedding_dim=4)
    before = model.predict(valid, batch_size=4096, verbose=0)
    model.save(tmp_path / "custom_dlrm")
    assert {p.name for p in (tmp_path / "custom_dlrm").iterdir()} == {"model.keras", "saved_model"}
    model.save(tmp_path / "custom_dlrm")  # its own earlier save is replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(UsageError, match="not a model directory written by Model.save"):
        model.save(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"

    script = textwrap.dedent(
        f"""
        import numpy as np
        from merlin.io import Dataset
        from pipeline.models import load_model  # registers the layers itself
        model = load_model({str(tmp_path / "custom_dlrm")!r})
        np.save({str(tmp_path / "after.npy")!r}, model.predict(Dataset({str(etl_dir / "valid")!r}, engine="parquet"),
                                                       batch_size=4096, verbose=0))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "after.npy"), before)

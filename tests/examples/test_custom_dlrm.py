"""examples/custom_dlrm.py (the Merlin Models tutorial on our API) runs and prints the tutorial's shapes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "custom_dlrm.py"


def test_custom_dlrm_example_prints_the_tutorial_shapes(synthetic_raw, tmp_path):
    # The tutorial's DATA_FOLDER with raw files in ml-1m's format (the small synthetic set) under ml-1m/.
    shutil.copytree(synthetic_raw, tmp_path / "ml-1m")
    env = dict(os.environ, DATA_FOLDER=str(tmp_path), PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "batch['userId']: (5, 1)" in out
    assert "continuous_block(batch): {'TE_zipcode_rating': (5, 1), 'TE_movieId_rating': (5, 1)}" in out
    assert "deep_continuous_block(batch).shape: (5, 64)" in out
    assert "embeddings: ['userId', 'movieId', 'title', 'gender'] (5, 64)" in out
    for name in ("userId", "movieId", "title", "gender", "deep_continuous"):
        assert f"\t{name} : (5, 64)" in out  # 5 x 64 per feature, as in the tutorial
    assert "dlrm_interaction(batch).shape: (5, 74)" in out  # 64 + 5 * 4 / 2 feature-pair dot products
    assert "deep_dlrm_interaction(batch).shape: (5, 512)" in out
    assert "metrics: {'auc':" in out
    assert "and reloaded: Model" in out
    # get_movielens ran the ETL once into DATA_FOLDER/ml-1m-etl; the tutorial's save wrote a directory
    assert (tmp_path / "ml-1m-etl" / "etl.json").is_file()
    assert (tmp_path / "custom_dlrm" / "model.keras").is_file()
    assert (tmp_path / "custom_dlrm" / "saved_model" / "saved_model.pb").is_file()

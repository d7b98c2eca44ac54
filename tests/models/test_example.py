"""examples/custom_dlrm.py (the Merlin Models tutorial on our API) runs and prints the tutorial's shapes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "custom_dlrm.py"


def test_custom_dlrm_example_prints_the_tutorial_shapes(etl_dir, tmp_path):
    saved = tmp_path / "custom_dlrm.keras"
    done = subprocess.run([sys.executable, str(EXAMPLE), str(etl_dir), "--save", str(saved)],
                          capture_output=True, text=True, timeout=600)
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
    assert saved.is_file()

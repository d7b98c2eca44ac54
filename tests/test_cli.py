"""The command line as a script sees it: JSON on stdout, logs on stderr, defaults in --help, renamed flags."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pandas as pd
import pytest

from pipeline.cli import build_parser, main

TINY = ["--n-users", "100", "--n-movies", "80", "--n-ratings", "3000"]


def run(*args: str, cwd) -> subprocess.CompletedProcess:
    # As from a user's shell: without the variables an in-process ``main`` of another test left in os.environ
    # (pipeline.console sets them for the processes a stage starts, and they would hide the noise counted here).
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "DASK_LOGGING__DISTRIBUTED")}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600, env=env)


@pytest.mark.parametrize("stage, shown", [("train", "(default: 50)"), ("etl", "(default: 0.2)"),
                                          ("predict", "(default: 65536)"), ("serve", "(default: 8000)")])
def test_help_shows_the_defaults(stage, shown, capsys):
    with pytest.raises(SystemExit):
        build_parser(stage).parse_args([stage, "--help"])
    assert shown in capsys.readouterr().out


def test_stdout_is_the_json_summary_and_third_party_noise_is_one_line(tmp_path):
    done = run("etl", "--dataset", "synthetic", "--raw", str(tmp_path / "raw"), *TINY, "--out", str(tmp_path / "etl"),
               cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)  # the whole of stdout
    assert summary["rows"]["train"] + summary["rows"]["valid"] == 3000
    assert "extremely limited support" not in done.stderr and "legacy Dask DataFrame" not in done.stderr
    assert done.stderr.count("--verbose shows them") == 1

    loud = run("--verbose", "etl", "--dataset", "synthetic", "--raw", str(tmp_path / "raw"), *TINY,
               "--out", str(tmp_path / "etl"), cwd=tmp_path)
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert "extremely limited support" in loud.stderr and "--verbose shows them" not in loud.stderr
    assert json.loads(loud.stdout)["rows"] == summary["rows"]


def test_predict_with_the_new_spellings_prints_its_scores_as_json(etl_dir, model_dir, tmp_path):
    requests = tmp_path / "requests.csv"
    pd.DataFrame({"userId": [1, 2, 3], "movieId": [10, 20, 30]}).to_csv(requests, index=False)
    out = tmp_path / "scores.parquet"
    done = run("predict", "--data", str(etl_dir), "--model-dir", str(model_dir), "--input", str(requests),
               "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    scores = pd.read_parquet(out)
    assert summary["rows"] == 3 and [r["score"] for r in summary["scores"]] == pytest.approx(scores["score"].tolist())
    assert "deprecated" not in done.stderr


def test_old_spellings_still_work_and_warn(etl_dir, model_dir, tmp_path, caplog):
    requests = tmp_path / "requests.csv"
    pd.DataFrame({"userId": [1], "movieId": [10]}).to_csv(requests, index=False)
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        assert main(["predict", "--data", str(etl_dir), "--model", str(model_dir), "--input", str(requests),
                     "--output", str(tmp_path / "old.parquet")]) == 0
    assert (tmp_path / "old.parquet").is_file()
    warned = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert warned == ["--model is deprecated, use --model-dir (the old spelling goes in the next release)",
                      "--output is deprecated, use --out (the old spelling goes in the next release)"]


def test_a_renamed_flag_is_still_required_under_one_of_its_names(capsys):
    with pytest.raises(SystemExit):
        build_parser("predict").parse_args(["predict", "--data", "d", "--input", "i", "--out", "o"])
    assert "--model-dir" in capsys.readouterr().err
    args = build_parser("train").parse_args(["train", "--data", "d", "--out", "o", "--model", "dcn"])
    assert args.model == "dcn" and args.deprecations == [
        "--model is deprecated, use --arch (the old spelling goes in the next release)"]

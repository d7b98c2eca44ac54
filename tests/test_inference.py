"""Inference through the saved workflow: parity with the processed data, OOV handling, bad requests,
checksums, workflow/model pairing, recommendations and the ``predict`` CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

import pipeline  # noqa: F401  (dask settings before nvtabular)
from pipeline.errors import ArtifactError, DataError

UNSEEN_USER = 10_000_000
UNSEEN_MOVIE = 20_000_000


@pytest.fixture(scope="module")
def graph_predictor(etl_dir, model_dir):
    """A predictor that runs every request through the serving graph (no feature cache)."""
    from pipeline.inference import Predictor

    return Predictor.load(etl_dir, model_dir, feature_cache=False)


@pytest.fixture(scope="module")
def raw_valid(synthetic_raw):
    """The raw valid rows exactly as the ETL split them (same split function, same seed)."""
    from pipeline.datasets import read_movielens
    from pipeline.etl import split_ratings

    ratings = read_movielens("ml-1m", synthetic_raw).ratings
    _, valid = split_ratings(ratings, "random", 0.2, 0)
    return valid


@pytest.mark.parametrize("path", ["feature cache", "serving graph"])
def test_raw_valid_rows_score_like_the_processed_parquet(predictor, graph_predictor, raw_valid, etl_dir, path):
    from merlin.io import Dataset

    scorer = predictor if path == "feature cache" else graph_predictor
    assert (scorer.cache is not None) == (path == "feature cache")
    processed = Dataset(str(etl_dir / "valid"), engine="parquet")
    expected = scorer.model.predict(processed, batch_size=1024, verbose=0)
    expected = np.asarray(expected[scorer.target] if isinstance(expected, dict) else expected).reshape(-1)

    scores = scorer.predict(raw_valid[["userId", "movieId"]])

    assert scores.shape == (len(raw_valid),) == expected.shape
    np.testing.assert_allclose(scores, expected, atol=1e-5, rtol=0)


def test_the_feature_cache_matches_the_serving_graph_on_known_and_unseen_ids(predictor, graph_predictor):
    rng = np.random.default_rng(3)
    users = np.concatenate([rng.integers(1, 400, 500), [UNSEEN_USER] * 5, rng.integers(1, 400, 5)])
    movies = np.concatenate([rng.choice(predictor.candidate_items, 500), rng.choice(predictor.candidate_items, 5),
                             [UNSEEN_MOVIE] * 5])
    pairs = pd.DataFrame({"userId": users, "movieId": movies})

    cached, graph = predictor.features(pairs), graph_predictor.features(pairs)
    assert cached.keys() == graph.keys()
    for name in cached:
        np.testing.assert_array_equal(cached[name], graph[name], err_msg=name)
    np.testing.assert_array_equal(predictor.predict(pairs), graph_predictor.predict(pairs))


def test_a_pair_scores_the_same_wherever_it_sits_in_a_batch(predictor, raw_valid):
    pairs = raw_valid[["userId", "movieId"]].iloc[:200].reset_index(drop=True)
    alone = predictor.predict(pairs.iloc[[37]])[0]
    reversed_batch = predictor.predict(pairs.iloc[::-1].reset_index(drop=True))
    mixed = pd.concat([pairs.iloc[100:], pairs.iloc[[37]], pairs.iloc[:100]], ignore_index=True)
    in_mixed = predictor.predict(mixed)

    assert reversed_batch[200 - 1 - 37] == pytest.approx(alone, abs=1e-6)
    assert in_mixed[100] == pytest.approx(alone, abs=1e-6)


def test_the_saved_workflow_is_not_modified(predictor, etl_dir):
    import nvtabular as nvt

    fresh = nvt.Workflow.load(str(etl_dir / "workflow"))
    assert predictor.workflow.input_schema.column_names == fresh.input_schema.column_names
    assert predictor.workflow.output_schema.column_names == fresh.output_schema.column_names
    assert "rating" in predictor.workflow.input_schema.column_names
    assert "rating" not in predictor.serving.input_schema.column_names
    assert sorted(predictor.request_columns) == ["movieId", "userId"]


def test_unseen_users_and_movies_land_on_the_oov_rows(predictor, raw_valid):
    known_user, known_movie = (int(v) for v in raw_valid[["userId", "movieId"]].iloc[0])
    requests = pd.DataFrame(
        {
            "userId": [UNSEEN_USER, UNSEEN_USER + 1, known_user, known_user],
            "movieId": [known_movie, known_movie, UNSEEN_MOVIE, UNSEEN_MOVIE + 7],
        }
    )
    features = predictor.transform(requests)
    scores = predictor.predict(requests)

    assert np.isfinite(scores).all() and ((scores > 0) & (scores < 1)).all()
    # two different unseen users are the same (out-of-vocabulary) user to the model
    assert features["userId"].iloc[0] == features["userId"].iloc[1] != features["userId"].iloc[2]
    assert scores[0] == pytest.approx(scores[1], abs=1e-6)
    assert features["movieId"].iloc[2] == features["movieId"].iloc[3]
    assert scores[2] == pytest.approx(scores[3], abs=1e-6)


@pytest.mark.parametrize(
    "frame, message",
    [
        (pd.DataFrame({"userId": [1]}), "missing field(s) ['movieId']"),
        (pd.DataFrame({"userId": [1], "movieId": [2], "rating": [5.0]}), "unexpected field(s) ['rating']"),
        (pd.DataFrame({"userId": [1, 2], "movieId": ["3", "x"]}), "field 'movieId' must hold integer ids"),
        (pd.DataFrame({"userId": [1.0, np.nan], "movieId": [3, 4]}), "field 'userId' has a missing value at row 1"),
        (pd.DataFrame({"userId": [1.0, 2.5], "movieId": [3, 4]}), "field 'userId' must hold integer ids (row 1: 2.5)"),
        (pd.DataFrame({"userId": [1, 2], "movieId": [3, -4]}), "field 'movieId': id -4 at row 1 is negative"),
    ],
)
def test_bad_request_frames_name_the_field(predictor, frame, message):
    with pytest.raises(DataError) as err:
        predictor.predict(frame)
    assert message in str(err.value)


def test_recommend_ranks_every_movie_and_can_exclude_rated_ones(predictor, raw_valid, etl_dir):
    user = int(raw_valid["userId"].iloc[0])
    top = predictor.recommend(user, k=10)
    movies = [m for m, _ in top]
    scores = np.array([s for _, s in top])

    every = predictor.predict(pd.DataFrame({"userId": user, "movieId": predictor.candidate_items}))
    assert len(top) == 10 and len(set(movies)) == 10
    assert (np.diff(scores) <= 0).all()
    np.testing.assert_allclose(scores, np.sort(every)[::-1][:10], atol=1e-6)

    fresh = predictor.recommend(user, k=10, exclude_rated=True)
    rated = set(_rated_in_train(etl_dir, predictor, user))
    assert rated, "the test user should have training ratings"
    assert not rated & {m for m, _ in fresh}
    assert [m for m in movies if m not in rated] == [m for m, _ in fresh][: len([m for m in movies if m not in rated])]


def test_recommend_breaks_ties_by_movie_id_over_the_whole_catalog(predictor, raw_valid, monkeypatch):
    """Movies without training ratings share the OOV rows and tie; the top k must not depend on which
    members of a tie at the k boundary a partial sort happens to pick."""
    real_scores = predictor.score_inputs
    # scores coarsened to 0.1 steps: every k boundary falls inside a large tie
    monkeypatch.setattr(predictor, "score_inputs", lambda arrays: np.round(real_scores(arrays), 1))
    user = int(raw_valid["userId"].iloc[0])
    items = predictor.candidate_items
    every = np.round(real_scores(predictor.features(pd.DataFrame({"userId": user, "movieId": items}))), 1)
    expected = sorted(zip(items.tolist(), every.tolist()), key=lambda pair: (-pair[1], pair[0]))
    for k in (1, 7, 50, 123, len(items)):
        assert predictor.recommend(user, k=k) == [(m, pytest.approx(s)) for m, s in expected[:k]]


def test_recommend_refuses_to_answer_with_non_finite_scores(predictor, raw_valid, monkeypatch):
    real_scores = predictor.score_inputs

    def one_nan(arrays):
        scores = real_scores(arrays).copy()
        scores[3] = np.nan  # one movie: without the check, the top k silently shrinks or skips it
        return scores

    monkeypatch.setattr(predictor, "score_inputs", one_nan)
    with pytest.raises(ArtifactError, match=r"non-finite scores to 1 of \d+ movies"):
        predictor.recommend(int(raw_valid["userId"].iloc[0]), k=10)


def _rated_in_train(etl_dir, predictor, user) -> list[int]:
    """Raw movieIds the user rated in the processed train split, decoded through the workflow."""
    train = pd.concat(pd.read_parquet(f, columns=["userId", "movieId"])
                      for f in sorted((etl_dir / "train").glob("*.parquet")))
    candidates = pd.DataFrame({"userId": user, "movieId": predictor.candidate_items})
    encoded = predictor.transform(candidates)
    user_code = encoded["userId"].iloc[0]
    rated_codes = set(train.loc[train["userId"] == user_code, "movieId"])
    return [int(m) for m, code in zip(predictor.candidate_items, encoded["movieId"]) if code in rated_codes]


def test_load_refuses_artifacts_that_changed_or_have_no_checksums(predictor, etl_dir, model_dir, tmp_path):
    from pipeline.inference import MANIFEST_NAME, Predictor

    etl_copy = tmp_path / "etl"
    shutil.copytree(etl_dir / "workflow", etl_copy / "workflow")
    with open(etl_copy / "workflow" / "workflow.pkl", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match="workflow.pkl does not match its checksum"):
        Predictor.load(etl_copy, model_dir)

    (etl_copy / "workflow" / MANIFEST_NAME).unlink()
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        Predictor.load(etl_copy, model_dir)

    model_copy = tmp_path / "model"
    shutil.copytree(model_dir, model_copy)
    (model_copy / "schema.pbtxt").write_text((model_copy / "schema.pbtxt").read_text() + "\n")
    with pytest.raises(ArtifactError, match="schema.pbtxt does not match its checksum"):
        Predictor.load(etl_dir, model_copy)

    (model_copy / MANIFEST_NAME).unlink()
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        Predictor.load(etl_dir, model_copy)


def test_load_refuses_a_workflow_the_model_was_not_trained_on(predictor, model_dir, tmp_path):
    from pipeline.datasets import generate_synthetic
    from pipeline.etl import run_etl
    from pipeline.inference import Predictor

    raw = generate_synthetic(tmp_path / "raw", fmt="ml-1m", seed=1, n_users=60, n_movies=40, n_ratings=2_000)
    other = tmp_path / "other_etl"
    run_etl("ml-1m", other, raw=raw, seed=0)
    with pytest.raises(ArtifactError, match="do not belong together|was trained on"):
        Predictor.load(other, model_dir)


def test_predict_cli_streams_csv_and_parquet_in_input_order(predictor, raw_valid, etl_dir, model_dir, tmp_path):
    from pipeline.cli import main

    rows = raw_valid[["userId", "movieId"]].iloc[:50].reset_index(drop=True)
    rows.loc[len(rows)] = [UNSEEN_USER, UNSEEN_MOVIE]
    expected = predictor.predict(rows)

    csv = tmp_path / "pairs.csv"
    rows.assign(note="x").to_csv(csv, index=False)  # extra columns are carried through
    out_csv = tmp_path / "scores_from_csv.parquet"
    assert main(["predict", "--data", str(etl_dir), "--model", str(model_dir), "--input", str(csv),
                 "--output", str(out_csv), "--batch-size", "7"]) == 0
    got = pd.read_parquet(out_csv)
    assert list(got.columns) == ["userId", "movieId", "note", "score"]
    pd.testing.assert_frame_equal(got[["userId", "movieId"]], rows, check_dtype=False)
    np.testing.assert_allclose(got["score"].to_numpy(), expected, atol=1e-6)

    parquet = tmp_path / "pairs.parquet"
    rows.to_parquet(parquet, index=False)
    out_pq = tmp_path / "scores_from_parquet.parquet"
    assert main(["predict", "--data", str(etl_dir), "--model", str(model_dir), "--input", str(parquet),
                 "--output", str(out_pq), "--batch-size", "16"]) == 0
    np.testing.assert_allclose(pd.read_parquet(out_pq)["score"].to_numpy(), expected, atol=1e-6)


def test_predict_cli_reports_bad_input_and_leaves_no_output(predictor, etl_dir, model_dir, tmp_path, capsys):
    from pipeline.cli import main

    bad = tmp_path / "bad.csv"
    bad.write_text("userId,movieId\n1,2\n3,abc\n")
    out = tmp_path / "scores.parquet"
    assert main(["predict", "--data", str(etl_dir), "--model", str(model_dir), "--input", str(bad),
                 "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "bad.csv" in err and "abc" in err
    assert not out.exists() and not list(tmp_path.glob(".scores.parquet*"))

    wrong = tmp_path / "wrong.csv"
    wrong.write_text("user,movieId\n1,2\n")
    assert main(["predict", "--data", str(etl_dir), "--model", str(model_dir), "--input", str(wrong),
                 "--output", str(out)]) == 2
    assert "no column(s) ['userId']" in capsys.readouterr().err


def test_metadata_describes_the_artifacts(predictor):
    meta = predictor.metadata
    json.dumps(meta)  # serialisable as the service returns it
    assert meta["workflow"]["request_columns"] and meta["target"] == "rating_binary"
    assert set(meta["schema"]) == {i.name for i in predictor.inputs}
    assert meta["versions"]["nvtabular"] == "23.8.0"

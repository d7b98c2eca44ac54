"""The synthetic generator writes the original formats, deterministically, with a learnable signal."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest

from pipeline.datasets import generate_synthetic, read_movielens, read_oracle, read_synthetic_params
from pipeline.datasets.constants import ML1M_RATING_SHARES
from pipeline.errors import DataError
from pipeline.metrics import roc_auc

SMALL = dict(n_users=400, n_movies=300, n_ratings=40_000)


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_ml1m_files_read_back_with_the_real_codes(synthetic_raw):
    raw = read_movielens("ml-1m", synthetic_raw)
    assert sorted(p.name for p in synthetic_raw.iterdir()) == [
        "movies.dat",
        "oracle.parquet",
        "ratings.dat",
        "synthetic.json",
        "users.dat",
    ]
    assert len(raw.ratings) == 40_000 and len(raw.users) == 400 and len(raw.movies) == 300
    assert set(raw.users["age"]) <= {1, 18, 25, 35, 45, 50, 56} and len(set(raw.users["age"])) >= 6
    assert set(raw.users["occupation"]) <= set(range(21))
    assert set(raw.users["gender"]) == {"M", "F"}
    assert raw.users["zipcode"].str.fullmatch(r"\d{5}").all()
    assert "Misérables, Les (1995)" in set(raw.movies["title"])
    assert raw.movies["title"].str.fullmatch(r".+ \(\d{4}\)").all()
    assert raw.movies["title"].str.contains(": ").any()  # ':' inside titles, never '::'
    assert all(1 <= len(g) <= 4 for g in raw.movies["genres"])
    # Each (user, movie) pair once, every user with at least 20 ratings.
    assert not raw.ratings.duplicated(["userId", "movieId"]).any()
    assert raw.ratings.groupby("userId").size().min() >= 20


def test_ml1m_bytes_match_the_original_layout(synthetic_raw):
    first = (synthetic_raw / "ratings.dat").read_bytes().split(b"\n", 1)[0]
    assert first.count(b"::") == 3 and b"\r" not in first
    movies = (synthetic_raw / "movies.dat").read_bytes()
    assert "Misérables, Les (1995)".encode("latin-1") in movies  # latin-1, not utf-8
    user = (synthetic_raw / "users.dat").read_text().splitlines()[0].split("::")
    assert len(user) == 5 and user[1] in ("M", "F")


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    a = generate_synthetic(tmp_path / "a", seed=3, n_users=60, n_movies=50, n_ratings=2_000)
    b = generate_synthetic(tmp_path / "b", seed=3, n_users=60, n_movies=50, n_ratings=2_000)
    c = generate_synthetic(tmp_path / "c", seed=4, n_users=60, n_movies=50, n_ratings=2_000)
    assert _digest(a) == _digest(b)
    assert _digest(a)["ratings.dat"] != _digest(c)["ratings.dat"]


def test_histogram_close_to_ml1m_and_oracle_recorded(synthetic_raw):
    raw = read_movielens("ml-1m", synthetic_raw)
    shares = raw.ratings["rating"].value_counts(normalize=True).sort_index().to_numpy()
    np.testing.assert_allclose(shares, ML1M_RATING_SHARES, atol=0.02)
    oracle = read_oracle(synthetic_raw)
    assert list(oracle.columns) == ["userId", "movieId", "p_positive"]
    pd.testing.assert_frame_equal(oracle[["userId", "movieId"]], raw.ratings[["userId", "movieId"]])
    assert oracle["p_positive"].between(0, 1).all()
    recorded = json.loads((synthetic_raw / "synthetic.json").read_text())
    assert recorded["seed"] == 0 and recorded["n_ratings"] == 40_000 and recorded["fmt"] == "ml-1m"
    assert recorded["oracle_auc"] == pytest.approx(roc_auc(raw.ratings["rating"] > 3, oracle["p_positive"]), abs=1e-6)


def _bias_model_scores(train: pd.DataFrame, test: pd.DataFrame, reg: float = 5.0) -> np.ndarray:
    """A user + movie bias model fitted by alternating regularised means: the baseline the oracle must beat."""
    mean = train["rating"].mean()
    movie_bias = pd.Series(0.0, index=train["movieId"].unique())
    for _ in range(5):
        residual = train["rating"] - mean - movie_bias.reindex(train["movieId"]).to_numpy()
        grouped = residual.groupby(train["userId"].to_numpy())
        user_bias = grouped.sum() / (grouped.count() + reg)
        residual = train["rating"] - mean - user_bias.reindex(train["userId"]).to_numpy()
        grouped = residual.groupby(train["movieId"].to_numpy())
        movie_bias = grouped.sum() / (grouped.count() + reg)
    return (
        mean
        + user_bias.reindex(test["userId"]).fillna(0).to_numpy()
        + movie_bias.reindex(test["movieId"]).fillna(0).to_numpy()
    )


def test_oracle_is_informative_and_beats_a_bias_model(synthetic_raw):
    ratings = read_movielens("ml-1m", synthetic_raw).ratings
    oracle = read_oracle(synthetic_raw)["p_positive"].to_numpy()
    held_out = np.random.default_rng(0).random(len(ratings)) < 0.2
    labels = ratings["rating"].to_numpy()[held_out] > 3
    oracle_auc = roc_auc(labels, oracle[held_out])
    bias_auc = roc_auc(labels, _bias_model_scores(ratings[~held_out], ratings[held_out]))
    assert oracle_auc > 0.8
    assert oracle_auc > bias_auc + 0.04
    assert bias_auc > 0.6  # the biases are part of the signal too


def test_existing_dir_is_reused_or_protected(tmp_path, caplog):
    out = generate_synthetic(tmp_path / "s", n_users=30, n_movies=40, n_ratings=900)
    stamp = (out / "ratings.dat").stat().st_mtime_ns
    assert generate_synthetic(out, n_users=30, n_movies=40, n_ratings=900) == out
    assert (out / "ratings.dat").stat().st_mtime_ns == stamp
    (out / "users.dat").unlink()  # an incomplete dir is regenerated, not reused
    generate_synthetic(out, n_users=30, n_movies=40, n_ratings=900)
    assert (out / "users.dat").is_file()
    generate_synthetic(out, n_users=30, n_movies=40, n_ratings=901)
    assert read_synthetic_params(out)["n_ratings"] == 901
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no temporary sibling left behind

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a synthetic raw dir"):
        generate_synthetic(mine, n_users=30, n_movies=40, n_ratings=900)
    assert (mine / "notes.txt").read_text() == "keep me"


def test_impossible_sizes_are_refused(tmp_path):
    with pytest.raises(DataError, match="n_ratings=100 is impossible"):
        generate_synthetic(tmp_path / "s", n_users=10, n_movies=50, n_ratings=100)
    assert not (tmp_path / "s").exists()


def test_ml100k_files_have_the_original_layout(tmp_path):
    out = generate_synthetic(tmp_path / "ml-100k", fmt="ml-100k", n_users=50, n_movies=70, n_ratings=2_500, seed=5)
    splits = [f"{s}.{part}" for s in ("ua", "ub", "u1", "u2", "u3", "u4", "u5") for part in ("base", "test")]
    expected = {
        "u.data",
        "u.user",
        "u.item",
        "u.genre",
        "u.occupation",
        "u.info",
        *splits,
        "oracle.parquet",
        "synthetic.json",
    }
    assert {p.name for p in out.iterdir()} == expected
    assert (out / "u.info").read_text() == "50 users\n70 items\n2500 ratings\n"
    genre_lines = (out / "u.genre").read_text().split("\n")
    assert (
        genre_lines[:2] == ["unknown|0", "Action|1"]
        and genre_lines[18] == "Western|18"
        and genre_lines[-2:] == ["", ""]
    )
    assert (out / "u.occupation").read_text().split("\n")[:3] == ["administrator", "artist", "doctor"]
    data = (out / "u.data").read_text().splitlines()
    assert len(data) == 2_500 and all(len(line.split("\t")) == 4 for line in data)
    user = (out / "u.user").read_text().splitlines()[0].split("|")
    assert len(user) == 5 and 7 <= int(user[1]) <= 73 and user[2] in ("M", "F")
    items = (out / "u.item").read_bytes().decode("latin-1").splitlines()
    assert items[1].startswith("2|Misérables, Les (1995)|") and "title-exact?Mis%E9rables,%20Les%20(1995)" in items[1]
    assert all(len(line.split("|")) == 24 for line in items)
    # ua.test: 10 ratings per user, sorted by user then movie, as in the original.
    test = [tuple(map(int, line.split("\t")[:2])) for line in (out / "ua.test").read_text().splitlines()]
    assert len(test) == 500 and test == sorted(test)
    again = generate_synthetic(tmp_path / "again", fmt="ml-100k", n_users=50, n_movies=70, n_ratings=2_500, seed=5)
    assert _digest(again) == _digest(out)


def test_planted_parameters_rebuild_every_rating(synthetic_raw):
    from scipy.special import ndtr

    from pipeline.datasets.synthetic import sample_movielens

    sample = sample_movielens(read_synthetic_params(synthetic_raw))
    truth, ratings = sample.truth, sample.ratings
    user, movie = truth["user_idx"], truth["movie_idx"]
    assert (ratings["userId"].to_numpy() == user + 1).all()
    genres = sample.genre_flags[movie] / np.sqrt(truth["n_genres"][movie])[:, None]
    score = (truth["user_bias"][user] + truth["movie_bias"][movie]
             + np.einsum("nk,nk->n", truth["user_factors"][user], truth["movie_factors"][movie])
             + np.einsum("ng,ng->n", truth["taste"][user], genres))
    np.testing.assert_allclose(score, truth["score"], atol=1e-12)
    # The star is the latent cut at the thresholds; the oracle on disk is P(latent > the 3|4 threshold).
    stars = 1 + np.searchsorted(truth["thresholds"], truth["latent"], side="right")
    assert (stars == ratings["rating"].to_numpy()).all()
    np.testing.assert_allclose(read_oracle(synthetic_raw)["p_positive"], ndtr(score - truth["thresholds"][2]))


@pytest.mark.parametrize("fmt", ["ml-1m", "ml-100k"])
def test_the_generator_never_repeats_a_pair_nor_writes_a_negative_value(fmt, tmp_path):
    from pipeline.datasets import read_ml100k_split

    raw_dir = generate_synthetic(tmp_path / fmt, fmt=fmt, seed=3, **SMALL)
    raw = read_movielens(fmt, raw_dir)  # the reader refuses negative ids and timestamps, counts repeats
    assert raw.duplicates_dropped == 0 and raw.official_split_duplicates_dropped == 0
    if fmt == "ml-100k":
        for split in ("ub", "u1", "u2", "u3", "u4", "u5"):  # each split's files disjoint, none repeating
            base, test = read_ml100k_split(raw_dir, split)
            assert len(base) + len(test) == SMALL["n_ratings"]


@pytest.mark.parametrize("margin", [4.0, 0.0])  # 0: many rows fall short of k and take the every-key path
def test_picks_are_the_top_k_of_numpy_gumbel_keys(margin):
    """The pruned picks equal ranking every movie by log_weight + Generator.gumbel, block after block."""
    from pipeline.datasets.synthetic import _GumbelTopK

    log_weight = 1.1 * np.random.default_rng(0).standard_normal(500)
    counts = [np.array([20, 21, 300, 25, 60]), np.array([20, 499, 33]), np.full(7, 40)]
    picker = _GumbelTopK(log_weight, np.random.default_rng(7), margin=margin)
    reference = np.random.default_rng(7)
    for block in counts:
        keys = log_weight[None, :] + reference.gumbel(size=(len(block), 500))
        order = np.argsort(-keys, axis=1, kind="stable")
        expected = np.concatenate([order[r, :k] for r, k in enumerate(block)])
        np.testing.assert_array_equal(picker.pick(block), expected)
    if margin == 0.0:
        assert picker.full_rows > 0


def test_streamed_chunks_give_the_in_memory_draws(tmp_path):
    """Chunk boundaries change nothing: ratings.dat bytes and the oracle are those of one chunk."""
    from pipeline.datasets.synthetic import _Draw, _write_ml1m, sample_movielens, synthetic_params

    params = synthetic_params("ml-1m", seed=2, n_users=90, n_movies=80, n_ratings=4_000)
    whole = sample_movielens(params)
    for chunk_ratings, name in ((1 << 20, "one"), (300, "many")):
        (tmp_path / name).mkdir()
        auc = _write_ml1m(_Draw(params), tmp_path / name, chunk_ratings=chunk_ratings)
        assert auc == roc_auc(whole.ratings["rating"] > 3, whole.ratings["p_positive"])
    assert (tmp_path / "one" / "ratings.dat").read_bytes() == (tmp_path / "many" / "ratings.dat").read_bytes()
    pd.testing.assert_frame_equal(read_oracle(tmp_path / "many"), whole.ratings[["userId", "movieId", "p_positive"]])
    lines = (tmp_path / "many" / "ratings.dat").read_text().splitlines()
    first = whole.ratings[["userId", "movieId", "rating", "timestamp"]].to_numpy()[0]
    assert lines[0] == "{}::{}::{}::{}".format(*first.tolist())
    assert len(lines) == 4_000


def _content_digest(folder) -> str:
    """One sha256 over every raw file's bytes and the oracle's column values (not parquet's writer metadata)."""
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        digest.update(path.name.encode())
        if path.suffix == ".parquet":
            frame = pd.read_parquet(path)
            for column in frame.columns:
                digest.update(frame[column].to_numpy().tobytes())
        else:
            digest.update(path.read_bytes())
    return digest.hexdigest()


# What the generator wrote before selection_by_taste existed (commit fcbd885), for
# generate_synthetic(fmt=..., seed=5, n_users=120, n_movies=90, n_ratings=6000).
_BEFORE_SELECTION_BY_TASTE = {
    "ml-1m": "28459b5cd388e4ff602ecdb4c40f083fc7c7f9284f7db7dcecee822e12cde33d",
    "ml-100k": "ecd0676f4484490aea566f82f5a422fb2ea838374ec7313858159236fd8cc798",
}


@pytest.mark.parametrize("fmt", ["ml-1m", "ml-100k"])
def test_default_selection_writes_the_data_of_before(fmt, tmp_path):
    """selection_by_taste 0 (the default, or given) is the earlier generator byte for byte, synthetic.json too."""
    sizes = dict(fmt=fmt, seed=5, n_users=120, n_movies=90, n_ratings=6000)
    default = generate_synthetic(tmp_path / "default", **sizes)
    assert _content_digest(default) == _BEFORE_SELECTION_BY_TASTE[fmt]
    assert "selection_by_taste" not in json.loads((default / "synthetic.json").read_text())
    given = generate_synthetic(tmp_path / "given", selection_by_taste=0.0, **sizes)
    assert _digest(given) == _digest(default)


def _rated_vs_affinity_auc(sample) -> float:
    """Per user, the AUC of the planted affinity (p_u . q_i + demographic x genre, no biases) at telling the user's
    rated movies from the others, averaged over users."""
    truth = sample.truth
    genre_share = sample.genre_flags / np.sqrt(truth["n_genres"])[:, None]
    affinity = truth["user_factors"] @ truth["movie_factors"].T + truth["taste"] @ genre_share.T
    rated = np.zeros(affinity.shape, bool)
    rated[truth["user_idx"], truth["movie_idx"]] = True
    return float(np.mean([roc_auc(rated[u], affinity[u]) for u in range(len(rated))]))


def test_selection_by_taste_makes_users_rate_what_they_are_planted_to_like(tmp_path):
    from pipeline.datasets.synthetic import sample_movielens, synthetic_params

    sizes = dict(seed=1, n_users=300, n_movies=200, n_ratings=15_000)
    by_popularity = sample_movielens(synthetic_params("ml-1m", **sizes))
    by_taste = sample_movielens(synthetic_params("ml-1m", selection_by_taste=2.0, **sizes))
    # popularity alone: which movies are rated says nothing of the user's affinity; with taste it does
    assert abs(_rated_vs_affinity_auc(by_popularity) - 0.5) < 0.02
    assert _rated_vs_affinity_auc(by_taste) > 0.7
    # the same users, movies and parameters; the star histogram still ML-1M's (thresholds are latent quantiles)
    for key in ("user_bias", "movie_bias", "user_factors", "popularity"):
        np.testing.assert_array_equal(by_taste.truth[key], by_popularity.truth[key])
    shares = by_taste.ratings["rating"].value_counts(normalize=True).sort_index().to_numpy()
    np.testing.assert_allclose(shares, ML1M_RATING_SHARES, atol=0.02)
    assert not by_taste.ratings.duplicated(["userId", "movieId"]).any()
    assert (by_taste.ratings.groupby("userId").size().to_numpy() == np.bincount(by_popularity.truth["user_idx"])).all()
    # seeded: the same request gives the same bytes, recorded in synthetic.json, streamed chunk by chunk as ever
    a = generate_synthetic(tmp_path / "a", selection_by_taste=2.0, **sizes)
    b = generate_synthetic(tmp_path / "b", selection_by_taste=2.0, **sizes)
    assert _digest(a) == _digest(b)
    assert read_synthetic_params(a)["selection_by_taste"] == 2.0
    pd.testing.assert_frame_equal(read_oracle(a), by_taste.ratings[["userId", "movieId", "p_positive"]])
    assert generate_synthetic(a, selection_by_taste=2.0, **sizes) == a  # reused
    generate_synthetic(a, **sizes)  # another request: regenerated
    assert _digest(a) != _digest(b) and "selection_by_taste" not in read_synthetic_params(a)


def test_selection_by_taste_picks_are_the_top_k_of_their_gumbel_keys():
    """_TasteTopK: the top counts of (popularity + lambda * score less the user bias) + Generator.gumbel keys."""
    from pipeline.datasets.synthetic import _Draw, _TasteTopK, synthetic_params

    draw = _Draw(synthetic_params("ml-1m", seed=4, n_users=40, n_movies=60, n_ratings=1_500, selection_by_taste=1.5))
    counts = np.array([20, 59, 60, 33])
    picked = _TasteTopK(1.1 * draw.popularity, 1.5, draw, np.random.default_rng(3)).pick(counts, 5)
    score = np.stack([draw._score(np.full(60, u), np.arange(60)) for u in range(5, 9)]) - draw.user_bias[5:9, None]
    keys = 1.1 * draw.popularity + 1.5 * score + np.random.default_rng(3).gumbel(size=(4, 60))
    order = np.argsort(-keys, axis=1, kind="stable")
    np.testing.assert_array_equal(picked, np.concatenate([order[r, :k] for r, k in enumerate(counts)]))


def test_selection_by_taste_is_an_etl_generator_option(tmp_path):
    from pipeline.errors import UsageError
    from pipeline.etl import EtlConfig, locate_raw

    config = EtlConfig(n_users=60, n_movies=50, n_ratings=2_000, selection_by_taste=1.0)
    raw = locate_raw("synthetic", tmp_path / "raw", **config.synthetic_size)
    assert read_synthetic_params(raw)["selection_by_taste"] == 1.0
    with pytest.raises(UsageError, match="only apply to --dataset synthetic"):
        locate_raw("ml-1m", tmp_path / "x", **EtlConfig(selection_by_taste=1.0).synthetic_size)
    with pytest.raises(DataError, match="selection_by_taste must be"):
        generate_synthetic(tmp_path / "bad", n_users=60, n_movies=50, n_ratings=2_000, selection_by_taste=-1.0)

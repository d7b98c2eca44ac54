"""Synthetic MovieLens: the raw files of ml-1m or ml-100k, byte-for-byte in their format, with a planted signal.

Ratings follow an ordered-probit model. For user u and movie i the latent score is

    s_ui = b_u + b_i + <p_u, q_i> + d_ui,    y_ui = s_ui + e_ui,   e_ui ~ N(0, 1)

with user and movie biases b (movie bias correlated with popularity), low-rank affinity p_u . q_i (movie
factors partly driven by genres) and a demographic x genre effect d_ui (gender, age group and occupation
each shift the user's taste for every genre). The star rating is y cut at thresholds chosen so the histogram
matches ML-1M's. Heavy-tailed user activity with at least 20 ratings per user, each (user, movie) pair once.

Which movies a user rates: drawn without replacement (Gumbel top-k) with log weight

    log w_ui = sd_pop * popularity_i + selection_by_taste * (s_ui - b_u)

By default (``selection_by_taste`` 0) by Zipf-like (log-normal) popularity alone, independently of the rating
(the data every earlier figure was measured on, byte for byte). With ``selection_by_taste`` > 0 users also rate
what they are planted to like (movie bias, affinity and demographic x genre terms of the same score that decides
the rating; the user's own bias is the same for all of a user's movies and so does not move the picks), as real
users rate what they expect to like: then a ranker that knows a user's taste can find which movies get rated.

The ml-1m files are streamed: only 20 bytes per rating are held (movie index, score, latent) while
ratings.dat and the oracle are written in chunks of whole users, and each user's picks compute only
the Gumbel keys that can reach its top k (see ``_GumbelTopK``; with ``selection_by_taste`` > 0 every key
of a block of users, ``_TasteTopK``, never more than ~4M scores at once), so ML-25M's size (162,541 users,
59,047 movies, 25,000,095 ratings) takes minutes and ~1.5 GB, with the same bytes as drawing
everything at once (the default size is byte-for-byte what the all-in-memory generator wrote).

Beside the raw files the generator writes ``oracle.parquet`` (userId, movieId, p_positive = the true
P(rating > 3) = Phi(s_ui - t_3)) and ``synthetic.json`` (generator version, format, sizes, seed, oracle AUC).
"""

from __future__ import annotations

import json
import logging
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import ndtr

from pipeline.atomic import atomic_dir
from pipeline.datasets import ml1m, ml100k
from pipeline.datasets.constants import (
    AGE_RANGES,
    GENRES,
    ML1M_AGE_CODES,
    ML1M_RATING_SHARES,
    ML100K_GENRES,
    ML100K_OCCUPATIONS,
    SIZES,
)
from pipeline.errors import DataError
from pipeline.metrics import roc_auc

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
ORACLE_FILE = "oracle.parquet"
PARAMS_FILE = "synthetic.json"
FORMATS = ("ml-1m", "ml-100k")
# The raw files each format's generator writes (the reader's required files, plus ml-100k's extras).
_FILES = {
    "ml-1m": ml1m.FILES,
    "ml-100k": ml100k.FILES + ("u.info",) + tuple(f"{s}.{part}" for s in ml100k.SPLITS for part in ("base", "test")),
}

# Shares of ml-1m's age codes 1, 18, 25, 35, 45, 50, 56 and occupation codes 0-20 among its users.
_AGE_SHARES = np.array([222, 1103, 2096, 1193, 550, 496, 380], dtype=float)
_OCCUPATION_SHARES = np.array(
    [711, 528, 267, 173, 759, 112, 236, 679, 17, 92, 195, 129, 388, 142, 302, 144, 241, 502, 70, 72, 281], dtype=float
)
# How often each of the 18 genres is attached to a movie in ml-1m (GENRES order).
_GENRE_SHARES = np.array(
    [503, 283, 105, 251, 1200, 211, 127, 1603, 68, 44, 343, 114, 106, 471, 276, 492, 143, 68], dtype=float
)
_TIME_RANGE = {"ml-1m": (956_703_932, 1_046_454_590), "ml-100k": (874_724_710, 893_286_638)}
_MAX_YEAR = {"ml-1m": 2000, "ml-100k": 1998}
_MIN_RATINGS_PER_USER = 20

# Standard deviations of the score components (noise sd is 1); tuned so that the oracle AUC of
# rating > 3 is ~0.83 on default-size data while a user + movie bias model reaches clearly less.
_SD_USER_BIAS = 0.6
_SD_MOVIE_BIAS = 0.55
_SD_AFFINITY = 0.7
_SD_DEMOGRAPHIC = 0.3
_SD_POPULARITY = 1.1
_RANK = 8


def synthetic_params(
    fmt: str = "ml-1m",
    *,
    n_users: int | None = None,
    n_movies: int | None = None,
    n_ratings: int | None = None,
    seed: int = 0,
    selection_by_taste: float | None = None,
) -> dict:
    """The parameters recorded in ``synthetic.json`` for a request (``None`` sizes take fmt's real size).

    ``selection_by_taste`` (>= 0, default 0): how much the planted score decides which movies a user rates
    (the module docstring's ``log w_ui``). At 0 it is not recorded, so the default request and its files are
    the same as before the setting existed.
    """
    if fmt not in FORMATS:
        raise DataError(f"synthetic format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    taste = 0.0 if selection_by_taste is None else float(selection_by_taste)
    if not (np.isfinite(taste) and taste >= 0.0):
        raise DataError(f"selection_by_taste must be a finite number >= 0, got {selection_by_taste!r}")
    real_users, real_movies, real_ratings = SIZES[fmt]
    params = {
        "generator": "pipeline.datasets.synthetic",
        "version": GENERATOR_VERSION,
        "fmt": fmt,
        "n_users": int(real_users if n_users is None else n_users),
        "n_movies": int(real_movies if n_movies is None else n_movies),
        "n_ratings": int(real_ratings if n_ratings is None else n_ratings),
        "seed": int(seed),
    }
    if taste:
        params["selection_by_taste"] = taste
    return params


def read_synthetic_params(raw_dir: str | Path) -> dict | None:
    """The generator parameters of a synthetic raw dir (without derived figures), or None if it is not one."""
    path = Path(raw_dir) / PARAMS_FILE
    if not path.is_file():
        return None
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    keys = list(synthetic_params().keys()) + (["selection_by_taste"] if recorded.get("selection_by_taste") else [])
    return {key: recorded.get(key) for key in keys}


def read_oracle(raw_dir: str | Path) -> pd.DataFrame:
    """The true P(rating > 3) of every synthetic rating: DataFrame(userId int64, movieId int64, p_positive float64)."""
    path = Path(raw_dir) / ORACLE_FILE
    if not path.is_file():
        raise DataError(
            f"{path}: no oracle here; only synthetic raw dirs (pipeline.datasets.generate_synthetic) have one"
        )
    return pd.read_parquet(path)


def generate_synthetic(
    out_dir: str | Path,
    *,
    fmt: str = "ml-1m",
    n_users: int | None = None,
    n_movies: int | None = None,
    n_ratings: int | None = None,
    seed: int = 0,
    selection_by_taste: float | None = None,
) -> Path:
    """Write a synthetic raw MovieLens dir in ``fmt`` ("ml-1m" or "ml-100k") and return ``out_dir``.

    Sizes default to the real ones of ``fmt`` (ml-1m: 6,040 users, 3,706 movies, 1,000,209 ratings).
    ``selection_by_taste`` (default 0: popularity alone picks the rated movies): see the module docstring.
    The same arguments give identical bytes. If ``out_dir`` already holds exactly this request it is
    reused; another synthetic dir there is replaced; a non-synthetic, non-empty dir is never overwritten.
    The dir is built in a temporary sibling and renamed into place when complete.
    """
    params = synthetic_params(fmt, n_users=n_users, n_movies=n_movies, n_ratings=n_ratings, seed=seed,
                              selection_by_taste=selection_by_taste)
    out_dir = Path(out_dir)
    existing = read_synthetic_params(out_dir)
    complete = all((out_dir / name).is_file() for name in _FILES[fmt] + (ORACLE_FILE,))
    if existing == params and complete:
        logger.info("reusing synthetic %s data in %s", fmt, out_dir)
        return out_dir
    if existing is None and out_dir.exists() and any(out_dir.iterdir()):
        raise DataError(
            f"{out_dir}: exists and is not a synthetic raw dir ({PARAMS_FILE} missing); refusing to overwrite"
        )

    logger.info(
        "generating synthetic %s: %d users, %d movies, %d ratings (seed %d, selection by taste %g)",
        fmt,
        params["n_users"],
        params["n_movies"],
        params["n_ratings"],
        seed,
        params.get("selection_by_taste", 0.0),
    )
    with atomic_dir(out_dir) as tmp:
        if fmt == "ml-1m":  # streamed: ratings.dat and oracle.parquet are written chunk by chunk
            oracle_auc = _write_ml1m(_Draw(params), tmp)
        else:
            sample = sample_movielens(params)
            oracle_auc = roc_auc(sample.ratings["rating"].to_numpy() > 3, sample.ratings["p_positive"].to_numpy())
            _write_ml100k(sample, tmp, np.random.default_rng(np.random.SeedSequence([seed, 100])))
            sample.ratings[["userId", "movieId", "p_positive"]].to_parquet(tmp / ORACLE_FILE, index=False)
        recorded = dict(params, oracle_auc=round(oracle_auc, 6))
        (tmp / PARAMS_FILE).write_text(json.dumps(recorded, indent=2) + "\n")
    logger.info("synthetic data written to %s (oracle AUC %.4f)", out_dir, oracle_auc)
    return out_dir


@dataclass
class SyntheticSample:
    """What the generator draws before writing any file.

    users: userId, gender, age_group (0-6), occupation (0-20), zipcode.
    movies: movieId, title, year, genre_flags (n_movies, 18) bool in GENRES order.
    ratings: userId, movieId, rating (1-5), timestamp, p_positive; sorted by user, then time.
    truth: the planted parameters, for studying what is learnable (row i of ratings <-> user_idx[i],
        movie_idx[i]): user_bias (n_users,), user_factors (n_users, rank), movie_bias (n_movies,),
        movie_factors (n_movies, rank), genre_factors (18, rank), taste (n_users, 18) = the demographic x
        genre effects, n_genres (n_movies,), thresholds (4,) between star levels, score and latent (n_ratings,),
        popularity (n_movies,) the standard-normal popularity draw, selection_by_taste (float): each user's pick
        log weights are ``pick_log_weight * popularity + selection_by_taste * (score - user_bias)``
        (``pick_log_weight`` = the module's ``_SD_POPULARITY``).
    """

    users: pd.DataFrame
    movies: pd.DataFrame
    genre_flags: np.ndarray
    ratings: pd.DataFrame
    truth: dict | None = None


def sample_movielens(params: dict) -> SyntheticSample:
    """Draw users, movies and ratings for ``params`` (see :func:`synthetic_params`), all in memory.

    The same draws as :func:`generate_synthetic`'s streamed files (both read :class:`_Draw`'s chunks).
    """
    draw = _Draw(params)
    chunks = list(draw.rating_chunks())
    ratings = pd.concat([c.ratings for c in chunks], ignore_index=True)
    cat = {key: np.concatenate([getattr(c, key) for c in chunks])
           for key in ("user_idx", "movie_idx", "score", "latent")}
    truth = dict(
        user_bias=draw.user_bias, user_factors=draw.user_factors, movie_bias=draw.movie_bias,
        movie_factors=draw.movie_factors, genre_factors=draw.genre_factors, taste=draw.taste,
        n_genres=draw.n_genres, thresholds=draw.thresholds, popularity=draw.popularity,
        selection_by_taste=draw.selection_by_taste, pick_log_weight=_SD_POPULARITY, **cat,
    )
    return SyntheticSample(users=draw.users, movies=draw.movies, genre_flags=draw.genre_flags, ratings=ratings,
                           truth=truth)


# Ratings per chunk of whole users in the streamed output (pyarrow's default row group size, so data
# up to this size gets a one-row-group oracle.parquet, as the in-memory writer made before).
CHUNK_RATINGS = 1 << 20


@dataclass
class _RatingChunk:
    """The ratings of consecutive users, sorted by user, time, movie: ``ratings`` as in SyntheticSample,
    plus the planted ``user_idx``, ``movie_idx``, ``score``, ``latent`` (n,) of the same rows."""

    ratings: pd.DataFrame
    user_idx: np.ndarray
    movie_idx: np.ndarray
    score: np.ndarray
    latent: np.ndarray


class _Draw:
    """The generator's draws, made once per request and streamed out by :meth:`rating_chunks`.

    ``__init__`` draws users, movies, the signal, who rates what, each rating's score and noisy latent
    (the only per-rating arrays held: movie index int32, score and latent float64, 20 bytes a rating)
    and the star thresholds (quantiles of every latent). ``rating_chunks`` then adds timestamps, stars
    and the oracle chunk by chunk. Every random stream is consumed in user order, so the output does
    not depend on the chunking.
    """

    def __init__(self, params: dict):
        fmt, n_users, n_movies, n_ratings = params["fmt"], params["n_users"], params["n_movies"], params["n_ratings"]
        if n_users < 1 or n_movies < _MIN_RATINGS_PER_USER:
            raise DataError(f"synthetic data needs n_users >= 1 and n_movies >= {_MIN_RATINGS_PER_USER}")
        cap = max(int(np.ceil(0.62 * n_movies)), -(-n_ratings // n_users))
        cap = min(cap, n_movies)
        if not _MIN_RATINGS_PER_USER * n_users <= n_ratings <= cap * n_users:
            raise DataError(
                f"n_ratings={n_ratings} is impossible for {n_users} users and {n_movies} movies: every user rates "
                f"{_MIN_RATINGS_PER_USER} to {cap} distinct movies"
            )
        self.fmt, self.n_ratings = fmt, n_ratings
        streams = np.random.SeedSequence([params["seed"], GENERATOR_VERSION]).spawn(8)
        rng_users, rng_movies, rng_signal, rng_counts, rng_pick, rng_noise, rng_time, rng_titles = (
            np.random.default_rng(s) for s in streams
        )
        self._rng_time = rng_time

        # Users: demographics drawn with ml-1m's shares.
        gender = np.where(rng_users.random(n_users) < 0.2829, "F", "M")
        age_group = rng_users.choice(len(_AGE_SHARES), size=n_users, p=_AGE_SHARES / _AGE_SHARES.sum())
        occupation = rng_users.choice(
            len(_OCCUPATION_SHARES), size=n_users, p=_OCCUPATION_SHARES / _OCCUPATION_SHARES.sum()
        )
        zip_pool = rng_users.integers(1000, 100_000, size=max(1, int(0.57 * n_users)))
        zipcode = np.char.zfill(zip_pool[rng_users.integers(0, zip_pool.size, size=n_users)].astype(str), 5)
        self.users = pd.DataFrame(
            {
                "userId": np.arange(1, n_users + 1, dtype=np.int64),
                "gender": gender.astype(object),
                "age_group": age_group,
                "occupation": occupation.astype(np.int64),
                "zipcode": zipcode.astype(object),
            }
        )

        # Movies: ml-1m ids have gaps (3,706 rated movies among ids up to 3,952); ml-100k ids are 1..n.
        if fmt == "ml-1m":
            max_id = int(np.ceil(n_movies * 1.0664))
            movie_ids = np.sort(rng_movies.choice(max_id, size=n_movies, replace=False) + 1).astype(np.int64)
        else:
            movie_ids = np.arange(1, n_movies + 1, dtype=np.int64)
        self.movie_ids = movie_ids
        n_genres = rng_movies.choice(4, size=n_movies, p=[0.55, 0.32, 0.11, 0.02]) + 1
        # Gumbel top-k: each movie gets n_genres distinct genres, weighted by ml-1m's genre frequencies.
        genre_keys = np.log(_GENRE_SHARES)[None, :] + rng_movies.gumbel(size=(n_movies, len(GENRES)))
        genre_rank = np.argsort(np.argsort(-genre_keys, axis=1), axis=1)
        genre_flags = genre_rank < n_genres[:, None]
        titles, years = _titles(n_movies, _MAX_YEAR[fmt], rng_titles)
        self.movies = pd.DataFrame({"movieId": movie_ids, "title": titles, "year": years})
        self.genre_flags, self.n_genres = genre_flags, n_genres

        # Signal: biases, low-rank affinity with genre-driven movie factors, demographic x genre effects.
        popularity = rng_signal.standard_normal(n_movies)
        self.popularity = popularity
        self.selection_by_taste = float(params.get("selection_by_taste") or 0.0)
        self.user_bias = _SD_USER_BIAS * rng_signal.standard_normal(n_users)
        self.movie_bias = _SD_MOVIE_BIAS * (
            0.45 * popularity + np.sqrt(1 - 0.45**2) * rng_signal.standard_normal(n_movies))
        self.genre_factors = rng_signal.standard_normal((len(GENRES), _RANK))
        movie_factors = genre_flags @ self.genre_factors / np.sqrt(n_genres)[:, None] + rng_signal.standard_normal(
            (n_movies, _RANK)
        )
        movie_factors /= np.sqrt(2.0 * _RANK)
        self.movie_factors = movie_factors
        self.user_factors = _SD_AFFINITY * rng_signal.standard_normal((n_users, _RANK))
        self.taste = (
            rng_signal.standard_normal((len(_AGE_SHARES), len(GENRES)))[age_group]
            + rng_signal.standard_normal((2, len(GENRES)))[(gender == "F").astype(int)]
            + rng_signal.standard_normal((len(_OCCUPATION_SHARES), len(GENRES)))[occupation]
        ) * (_SD_DEMOGRAPHIC / np.sqrt(3.0))

        # Who rates what: heavy-tailed counts per user, picks without replacement weighted by popularity (and,
        # with selection_by_taste, by the planted score); then each rating's score and latent, block by block.
        self.counts = _ratings_per_user(n_users, n_ratings, cap, rng_counts)
        self.starts = np.r_[0, np.cumsum(self.counts)]
        self.movie_idx = np.empty(n_ratings, dtype=np.int32 if n_movies < 2**31 else np.int64)
        self.score = np.empty(n_ratings)
        self.latent = np.empty(n_ratings)
        if self.selection_by_taste:
            picker = _TasteTopK(_SD_POPULARITY * popularity, self.selection_by_taste, self, rng_pick)
        else:  # popularity alone: the draws of every earlier version
            picker = _GumbelTopK(_SD_POPULARITY * popularity, rng_pick)
        block = max(1, 4_000_000 // n_movies)  # bounds a block's (users x movies) draws to ~32 MB
        for lo in range(0, n_users, block):
            hi = min(n_users, lo + block)
            a, b = self.starts[lo], self.starts[hi]
            movie_idx = (picker.pick(self.counts[lo:hi], lo) if self.selection_by_taste
                         else picker.pick(self.counts[lo:hi]))
            user_idx = np.repeat(np.arange(lo, hi), self.counts[lo:hi])
            self.movie_idx[a:b] = movie_idx
            self.score[a:b] = self._score(user_idx, movie_idx)
            self.latent[a:b] = self.score[a:b] + rng_noise.standard_normal(b - a)
        self.thresholds = np.quantile(self.latent, np.cumsum(ML1M_RATING_SHARES)[:-1])
        logger.debug("synthetic draws: %d of %d pick rows needed every key", picker.full_rows, n_users)

        t_lo, t_hi = _TIME_RANGE[fmt]
        self._first = t_lo + (t_hi - t_lo) * rng_time.beta(1.0, 4.0, size=n_users)
        self._span = rng_time.exponential(30 * 86_400, size=n_users)

    def _score(self, user_idx: np.ndarray, movie_idx: np.ndarray) -> np.ndarray:
        """The planted score (n,) of (user, movie) index pairs: biases + affinity + demographic x genre."""
        return (
            self.user_bias[user_idx]
            + self.movie_bias[movie_idx]
            + np.einsum("nk,nk->n", self.user_factors[user_idx], self.movie_factors[movie_idx])
            + np.einsum("ng,ng->n", self.taste[user_idx], self.genre_flags[movie_idx])
            / np.sqrt(self.n_genres[movie_idx])
        )

    def score_rows(self, lo: int, hi: int) -> np.ndarray:
        """The planted score (hi - lo, n_movies) of users ``lo:hi`` for every movie, less each user's bias."""
        genre_share = self.genre_flags / np.sqrt(self.n_genres)[:, None]
        return (self.movie_bias[None, :] + self.user_factors[lo:hi] @ self.movie_factors.T
                + self.taste[lo:hi] @ genre_share.T)

    def rating_chunks(self, chunk_ratings: int = CHUNK_RATINGS):
        """Yield :class:`_RatingChunk` of whole users (about ``chunk_ratings`` ratings each), in user order."""
        t_hi = _TIME_RANGE[self.fmt][1]
        n_users = len(self.counts)
        lo = 0
        while lo < n_users:
            # whole users, at least one, up to chunk_ratings ratings
            hi = max(lo + 1, int(np.searchsorted(self.starts, self.starts[lo] + chunk_ratings, side="right")) - 1)
            hi = min(hi, n_users)
            a, b = self.starts[lo], self.starts[hi]
            user_idx = np.repeat(np.arange(lo, hi), self.counts[lo:hi])
            movie_idx = self.movie_idx[a:b].astype(np.int64)
            score, latent = self.score[a:b], self.latent[a:b]
            rating = 1 + np.searchsorted(self.thresholds, latent, side="right")
            p_positive = ndtr(score - self.thresholds[2])  # P(latent > threshold between 3 and 4 stars)
            timestamp = np.minimum(
                self._first[user_idx] + self._span[user_idx] * self._rng_time.random(b - a), t_hi
            ).astype(np.int64)
            movie_id = self.movie_ids[movie_idx]
            order = np.lexsort((movie_id, timestamp, user_idx))  # = sort by user, time, movie
            ratings = pd.DataFrame(
                {
                    "userId": self.users["userId"].to_numpy()[user_idx[order]],
                    "movieId": movie_id[order],
                    "rating": rating[order].astype(np.int64),
                    "timestamp": timestamp[order],
                    "p_positive": p_positive[order],
                }
            )
            yield _RatingChunk(ratings, user_idx[order], movie_idx[order], score[order], latent[order])
            lo = hi


class _GumbelTopK:
    """Per user, ``k`` distinct movies drawn with probability proportional to ``exp(log_weight)``,
    without replacement: the top ``k`` of ``log_weight + Gumbel`` keys (in key order).

    The keys are numpy's own ``Generator.gumbel`` draws (``-log(-log(1 - u))`` of one uniform ``u``
    each), but only those that can reach a user's top ``k`` are computed: for a threshold ``t`` whose
    expected count of keys above it is a little over ``k``, a key can exceed ``t`` only if
    ``u < w_i exp(-t)`` (``w = exp(log_weight)``; ``1 - exp(-x) <= x``), a comparison of uniforms. A row
    whose ``k``-th key is not above ``t`` (rare) gets every key computed, so the picks are exactly those
    of computing all keys, at the cost of uniforms instead of logarithms for most of the users x movies.
    """

    def __init__(self, log_weight: np.ndarray, rng: np.random.Generator, *, margin: float = 4.0):
        self.log_weight, self.rng, self.margin = log_weight, rng, margin
        self.weight = np.exp(log_weight)
        # E[# keys above t] = sum_i 1 - exp(-w_i s), s = exp(-t), on a grid of log s, inverted by interpolation
        self._log_s = np.linspace(np.log(1e-3 / self.weight.sum()), np.log(50.0 / self.weight.min()), 400)
        self._expected = np.array([-np.expm1(-self.weight * np.exp(x)).sum() for x in self._log_s])
        self.full_rows = 0
        self._buffers = None

    def pick(self, counts: np.ndarray) -> np.ndarray:
        """Movie indices (sum(counts),): row r's ``counts[r]`` picks, best key first, rows in order."""
        n_rows, n_movies = len(counts), len(self.weight)
        if self._buffers is None or self._buffers[0].shape[0] < n_rows:  # reused: no page faults per block
            self._buffers = (np.empty((n_rows, n_movies)), np.empty((n_rows, n_movies)),
                             np.empty((n_rows, n_movies), dtype=bool))
        u, bound, candidate = (b[:n_rows] for b in self._buffers)
        state = self.rng.bit_generator.state
        self.rng.random(out=u)
        # a margin of standard deviations (and a few keys): a row rarely falls short of its k
        wanted = counts + self.margin * (np.sqrt(counts) + 4.0)
        log_s = np.interp(wanted, self._expected, self._log_s, right=np.inf)
        s = np.exp(log_s)
        np.multiply(self.weight[None, :], s[:, None], out=bound)
        np.less(u, bound, out=candidate)
        rows, cols = np.nonzero(candidate)
        u_candidate = u[rows, cols]
        if not u_candidate.all():  # a uniform of exactly 0 (always a candidate): numpy's gumbel redraws it
            self.rng.bit_generator.state = state
            keys = self.log_weight[None, :] + self.rng.gumbel(size=(n_rows, n_movies))
            order = np.argsort(-keys, axis=1, kind="stable")
            self.full_rows += n_rows
            return order[np.arange(n_movies)[None, :] < counts[:, None]]
        keys = self.log_weight[cols] - np.log(-np.log(1.0 - u_candidate))
        order = np.lexsort((cols, -keys, rows))  # by row, best key first, ties by movie index (stable argsort)
        rows, cols, keys = rows[order], cols[order], keys[order]
        row_start = np.searchsorted(rows, np.arange(n_rows))
        position = np.arange(rows.size) - row_start[rows]
        take = position < counts[rows]
        have = np.bincount(rows[take], minlength=n_rows)
        kth = np.full(n_rows, -np.inf)
        last = take & (position == counts[rows] - 1)
        kth[rows[last]] = keys[last]
        # every key left out is <= t = -log s; a row is exact when its k-th key is clearly above t
        short = np.flatnonzero((have < counts) | ~(kth > -log_s + 1e-9) & np.isfinite(log_s))
        if not short.size:
            return cols[take]
        picked = np.split(cols[take], np.cumsum(have)[:-1])
        for r in short:
            full = self.log_weight - np.log(-np.log(1.0 - u[r]))
            picked[r] = np.argsort(-full, kind="stable")[: counts[r]]
        self.full_rows += short.size
        return np.concatenate(picked)


class _TasteTopK:
    """Per user, ``k`` distinct movies drawn with probability proportional to ``exp(log_weight_ui)``, without
    replacement, where ``log_weight_ui = popularity_log_weight_i + selection_by_taste * (s_ui - b_u)`` (the
    planted score less the user's bias, :meth:`_Draw.score_rows`): the top ``k`` of ``log_weight + Gumbel``
    keys, every key of a block of users computed (the weights differ per user, so ``_GumbelTopK``'s shared
    threshold does not apply). Memory: a few (block users x movies) float64 arrays, never users x movies.
    """

    def __init__(self, popularity_log_weight: np.ndarray, selection_by_taste: float, draw: _Draw,
                 rng: np.random.Generator):
        self.popularity_log_weight, self.selection_by_taste = popularity_log_weight, selection_by_taste
        self.draw, self.rng = draw, rng
        self.full_rows = 0

    def pick(self, counts: np.ndarray, first_user: int) -> np.ndarray:
        """Movie indices (sum(counts),) of users ``first_user ...`` (one row of ``counts`` each), best key
        first, rows in order."""
        n_rows, n_movies = len(counts), len(self.popularity_log_weight)
        keys = self.draw.score_rows(first_user, first_user + n_rows)
        keys *= self.selection_by_taste
        keys += self.popularity_log_weight[None, :]
        keys += self.rng.gumbel(size=(n_rows, n_movies))
        k_max = int(counts.max())
        keys *= -1.0
        top = np.argpartition(keys, k_max - 1, axis=1)[:, :k_max] if k_max < n_movies else (
            np.broadcast_to(np.arange(n_movies), (n_rows, n_movies)))
        top_keys = np.take_along_axis(keys, top, axis=1)
        order = np.lexsort((top, top_keys), axis=1)  # best key first, ties by movie index
        top = np.take_along_axis(top, order, axis=1)
        self.full_rows += n_rows
        return top[np.arange(k_max)[None, :] < counts[:, None]]


def _ratings_per_user(n_users: int, n_ratings: int, cap: int, rng: np.random.Generator) -> np.ndarray:
    """Integer counts (n_users,) in [20, cap] summing to n_ratings, log-normal (heavy-tailed) above the minimum."""
    extra_total = n_ratings - _MIN_RATINGS_PER_USER * n_users
    room = cap - _MIN_RATINGS_PER_USER
    weight = rng.lognormal(0.0, 1.15, size=n_users)
    extra = weight / weight.sum() * extra_total
    for _ in range(100):  # pour what exceeds the cap back onto the users below it
        over = extra > room
        if not over.any():
            break
        spill = (extra[over] - room).sum()
        extra[over] = room
        below = extra < room
        extra[below] += spill * weight[below] / weight[below].sum()
    whole = np.floor(extra).astype(np.int64)
    short = extra_total - int(whole.sum())
    if short:
        # Largest remainders first among users with room left (stable, so deterministic).
        eligible = np.flatnonzero(whole < room)
        top = eligible[np.argsort(-(extra - whole)[eligible], kind="stable")[:short]]
        whole[top] += 1
    return whole + _MIN_RATINGS_PER_USER


_WORDS = (
    "Love Night Day City Man Woman Girl Boy King Queen Dark Blue Red Black White Last First Lost Secret Dead "
    "Heart Road River Island House Street Dream Time Life Death War Star Moon Sun Fire Ice Storm Wind Shadow "
    "Angel Devil Ghost Hunter Killer Stranger Family Father Mother Brother Sister Son Daughter Friend Kiss "
    "Game Money Gold Diamond Heaven Hell Paradise Wild Crazy Little Big Great Golden Silent Broken Perfect "
    "Summer Winter Spring Autumn Home Journey Escape Return Revenge Power Glory Honor Truth Lies Fear Rain "
    "Snow Sea Mountain Desert Forest Garden Empire Kingdom Legend Story Tale Song Dance Music Blood Bullet "
    "Wedding Party School Train Ship Bridge Tower Castle Hotel Diner Window Door Mirror Clock Echo Zero "
    "Sky Thunder Tiger Wolf Dragon Horse Eagle Snake Fox Bear Rose Lily Cowboy Detective Doctor Pilot Soldier "
    "Spy Thief Saint Sinner Beauty Beast Hero Villain Rebel Outlaw Prince Princess Joker Wizard Robot Alien"
).split()
_NAMES = "Jack Sally Harry Annie Max Lucy Frankie Billy Rosie Charlie Nell Eddie Marty Dolores Sam".split()
# Latin-1 words, as in ml-1m's foreign titles ("Misérables, Les", "Cité des enfants perdus, La").
_LATIN1_WORDS = (
    "Misérables Amélie Être Niño Señor Mädchen Garçon Côte Noël Fräulein Café Déjà Müde Élan Fiancée Ça "
    "Hôtel Sueño Corazón Père Fête Rêve Crème Brûlée Château Dôme Öl Über Jalousie Señorita"
).split()
_ARTICLES = (("The", 0.10), ("A", 0.03), ("Les", 0.01), ("La", 0.01), ("Le", 0.01), ("Das", 0.004), ("El", 0.004))


def _titles(n: int, max_year: int, rng: np.random.Generator) -> tuple[list[str], np.ndarray]:
    """n MovieLens-style titles ("Name, The (1995)", latin-1 words, subtitles, aka titles) and their years."""
    years = np.clip(max_year - np.floor(rng.exponential(9.0, size=n)).astype(np.int64), 1919, max_year)
    titles = []
    for i in range(n):
        words = list(rng.choice(_WORDS, size=int(rng.integers(1, 4))))
        if rng.random() < 0.12:
            words[int(rng.integers(len(words)))] = str(rng.choice(_LATIN1_WORDS))
        if rng.random() < 0.08:
            words.insert(0, str(rng.choice(_NAMES)) + "'s")
        name = " ".join(words)
        if rng.random() < 0.06:
            name += ": " + " ".join(rng.choice(_WORDS, size=int(rng.integers(1, 3))))
        elif rng.random() < 0.04:
            name += f" {int(rng.integers(2, 5))}"
        u = rng.random()
        for article, share in _ARTICLES:
            if u < share:
                name = f"{name}, {article}"
                break
            u -= share
        if rng.random() < 0.03:
            name += f" ({' '.join(rng.choice(_WORDS, size=2))})"
        titles.append(f"{name} ({years[i]})")
    if n >= 2:
        # Plant the famous latin-1 title so every synthetic set exercises the encoding.
        titles[1], years[1] = "Misérables, Les (1995)", 1995
    return titles, years


def _lines(*columns) -> list:
    return [np.asarray(c).tolist() for c in columns]


def _write_ml1m(draw: _Draw, out: Path, chunk_ratings: int = CHUNK_RATINGS) -> float:
    """ratings.dat, users.dat, movies.dat ('::'-separated, '\\n' line ends, latin-1 titles) and
    oracle.parquet, the ratings streamed chunk by chunk; returns the oracle's AUC of rating > 3."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    u, m = draw.users, draw.movies
    ages = np.asarray(ML1M_AGE_CODES)[u["age_group"].to_numpy()]
    with open(out / "users.dat", "w", encoding="ascii", newline="\n") as f:
        f.writelines(
            map("{}::{}::{}::{}::{}\n".format, *_lines(u["userId"], u["gender"], ages, u["occupation"], u["zipcode"]))
        )
    genres = ["|".join(g for g, on in zip(GENRES, flags) if on) for flags in draw.genre_flags]
    with open(out / "movies.dat", "w", encoding="latin-1", newline="\n") as f:
        f.writelines(map("{}::{}::{}\n".format, *_lines(m["movieId"], m["title"]), genres))

    positive = np.empty(draw.n_ratings, dtype=bool)
    p_positive = np.empty(draw.n_ratings)
    done, writer = 0, None
    progress = tqdm(total=draw.n_ratings, desc="synthetic ratings", unit="rating", unit_scale=True, leave=False,
                    disable=None)
    try:
        with open(out / "ratings.dat", "w", encoding="ascii", newline="\n") as f:
            for chunk in draw.rating_chunks(chunk_ratings):
                r = chunk.ratings
                for lo in range(0, len(r), 250_000):  # bounds the Python strings held at once
                    part = r.iloc[lo : lo + 250_000]
                    f.writelines(map("{}::{}::{}::{}\n".format,
                                     *_lines(part["userId"], part["movieId"], part["rating"], part["timestamp"])))
                table = pa.Table.from_pandas(r[["userId", "movieId", "p_positive"]], preserve_index=False)
                if writer is None:  # what DataFrame.to_parquet(index=False) writes, one row group per chunk
                    writer = pq.ParquetWriter(out / ORACLE_FILE, table.schema, compression="snappy")
                writer.write_table(table, row_group_size=len(r))
                positive[done : done + len(r)] = r["rating"].to_numpy() > 3
                p_positive[done : done + len(r)] = r["p_positive"].to_numpy()
                done += len(r)
                progress.update(len(r))
    finally:
        progress.close()
        if writer is not None:
            writer.close()
    del draw.score, draw.latent, draw.movie_idx  # the per-rating draws are written: free them for the AUC
    return roc_auc(positive, p_positive)


_MONTHS = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()


def _write_ml100k(sample: SyntheticSample, out: Path, rng: np.random.Generator) -> None:
    """u.data, u.user, u.item, u.genre, u.occupation, u.info and the ua/ub/u1-u5 .base/.test splits."""
    r, u, m = sample.ratings, sample.users, sample.movies
    n = len(r)
    # u.data is in no particular order in the original; the split files are sorted by user, then movie.
    shuffled = rng.permutation(n)
    _write_udata(out / "u.data", r.iloc[shuffled])

    lo_hi = np.asarray(AGE_RANGES)[u["age_group"].to_numpy()]
    ages = rng.integers(lo_hi[:, 0], lo_hi[:, 1] + 1)
    occupations = np.asarray(ML100K_OCCUPATIONS)[u["occupation"].to_numpy()]
    with open(out / "u.user", "w", encoding="ascii", newline="\n") as f:
        f.writelines(map("{}|{}|{}|{}|{}\n".format, *_lines(u["userId"], ages, u["gender"], occupations, u["zipcode"])))

    # ml-100k flags "unknown" for a movie with no genre; ours always have one, so that flag stays 0.
    flags = np.concatenate([np.zeros((len(m), 1), dtype=int), sample.genre_flags.astype(int)], axis=1)
    days = rng.integers(1, 29, size=len(m))
    months = rng.integers(0, 12, size=len(m))
    with open(out / "u.item", "w", encoding="latin-1", newline="\n") as f:
        for movie_id, title, year, day, month, row in zip(
            m["movieId"].tolist(),
            m["title"].tolist(),
            m["year"].tolist(),
            days.tolist(),
            months.tolist(),
            flags.tolist(),
        ):
            url = "http://us.imdb.com/M/title-exact?" + urllib.parse.quote(title, safe="(),'!&:", encoding="latin-1")
            release = f"{day:02d}-{_MONTHS[month]}-{year}"
            f.write(f"{movie_id}|{title}|{release}||{url}|" + "|".join(map(str, row)) + "\n")

    with open(out / "u.genre", "w", encoding="ascii", newline="\n") as f:
        f.writelines(f"{name}|{i}\n" for i, name in enumerate(ML100K_GENRES))
        f.write("\n")  # the original ends with an empty line
    with open(out / "u.occupation", "w", encoding="ascii", newline="\n") as f:
        f.writelines(f"{name}\n" for name in ML100K_OCCUPATIONS)
    with open(out / "u.info", "w", encoding="ascii", newline="\n") as f:
        f.write(f"{len(u)} users\n{len(m)} items\n{n} ratings\n")

    # ua / ub: 10 ratings per user in the test file (disjoint between ua and ub); u1-u5: 5 disjoint folds.
    position = np.empty(n, dtype=np.int64)
    user_codes = r["userId"].to_numpy()
    order = np.lexsort((rng.random(n), user_codes))  # users together, random order inside each user
    starts = np.r_[0, np.flatnonzero(np.diff(user_codes[order])) + 1]
    counts = np.diff(np.r_[starts, n])
    position[order] = np.arange(n) - np.repeat(starts, counts)
    by_user_movie = np.lexsort((r["movieId"].to_numpy(), user_codes))
    for name, test in (("ua", position < 10), ("ub", (position >= 10) & (position < 20))):
        _write_udata(out / f"{name}.base", r.iloc[by_user_movie[~test[by_user_movie]]])
        _write_udata(out / f"{name}.test", r.iloc[by_user_movie[test[by_user_movie]]])
    fold = rng.permutation(n) % 5
    for k in range(5):
        test = fold == k
        _write_udata(out / f"u{k + 1}.base", r.iloc[by_user_movie[~test[by_user_movie]]])
        _write_udata(out / f"u{k + 1}.test", r.iloc[by_user_movie[test[by_user_movie]]])


def _write_udata(path: Path, ratings: pd.DataFrame) -> None:
    with open(path, "w", encoding="ascii", newline="\n") as f:
        f.writelines(
            map(
                "{}\t{}\t{}\t{}\n".format,
                *_lines(ratings["userId"], ratings["movieId"], ratings["rating"], ratings["timestamp"]),
            )
        )

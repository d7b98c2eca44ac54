"""Facts about the MovieLens releases: variants, genre names, demographic codes, value ranges.

Shared by the readers (which validate against them) and the synthetic generator (which writes them).
"""

from __future__ import annotations

from pipeline.registry import VARIANTS  # noqa: F401  (re-exported: the readers validate against it)

# The 18 genres of ml-1m / ml-25m, in ml-100k's u.genre order (ml-100k adds "unknown" at index 0).
GENRES = (
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
ML100K_GENRES = ("unknown",) + GENRES

# ml-1m's age codes ("1: Under 18", "18: 18-24", ... "56: 56+") and the ages each code covers.
ML1M_AGE_CODES = (1, 18, 25, 35, 45, 50, 56)
AGE_RANGES = ((7, 17), (18, 24), (25, 34), (35, 44), (45, 49), (50, 55), (56, 73))

# ml-1m occupation codes 0-20, by code.
ML1M_OCCUPATIONS = (
    "other or not specified",
    "academic/educator",
    "artist",
    "clerical/admin",
    "college/grad student",
    "customer service",
    "doctor/health care",
    "executive/managerial",
    "farmer",
    "homemaker",
    "K-12 student",
    "lawyer",
    "programmer",
    "retired",
    "sales/marketing",
    "scientist",
    "self-employed",
    "technician/engineer",
    "tradesman/craftsman",
    "unemployed",
    "writer",
)

# ml-100k's u.occupation, in file order; a reader maps each name to its 0-based position.
ML100K_OCCUPATIONS = (
    "administrator",
    "artist",
    "doctor",
    "educator",
    "engineer",
    "entertainment",
    "executive",
    "healthcare",
    "homemaker",
    "lawyer",
    "librarian",
    "marketing",
    "none",
    "other",
    "programmer",
    "retired",
    "salesman",
    "scientist",
    "student",
    "technician",
    "writer",
)

GENDERS = ("M", "F")

# The one rule for userId / movieId wherever they come from (raw files, predict input, serve requests):
# non-negative int64 integers. Raw timestamps are non-negative too (seconds since 1970).
ID_RULE = "ids are non-negative integers"

# (lowest rating, highest rating, step) per variant: whole stars, or half stars for ml-25m.
RATING_SCALE = {"ml-100k": (1.0, 5.0, 1.0), "ml-1m": (1.0, 5.0, 1.0), "ml-25m": (0.5, 5.0, 0.5)}

# ML-1M's rating histogram (share of 1..5 stars), which the synthetic generator reproduces.
ML1M_RATING_SHARES = (0.0562, 0.1075, 0.2613, 0.3489, 0.2261)

# Real sizes (users, movies that have ratings, ratings).
SIZES = {"ml-100k": (943, 1682, 100_000), "ml-1m": (6040, 3706, 1_000_209), "ml-25m": (162_541, 59_047, 25_000_095)}

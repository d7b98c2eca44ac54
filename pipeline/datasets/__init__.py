"""Raw MovieLens data: readers for ml-100k / ml-1m / ml-25m, the synthetic generator, the download helper.

- :func:`read_movielens` (variant, folder or zip) -> :class:`RawMovieLens` (pandas frames).
- :func:`generate_synthetic` writes ml-1m- or ml-100k-format files with a planted signal and an oracle
  (:func:`read_oracle`), so tests and the default run need no MovieLens download.
- :func:`download_movielens` fetches the official GroupLens zip (MD5-checked) for a user with a network.
- :func:`get_movielens` (Merlin's tutorial entry point) -> ``(train, valid)`` merlin Datasets made by the ETL.
"""

from pipeline.datasets.download import download_movielens
from pipeline.datasets.entertainment import get_movielens
from pipeline.datasets.ml100k import read_ml100k_split
from pipeline.datasets.raw import RawMovieLens
from pipeline.datasets.readers import read_movielens
from pipeline.datasets.synthetic import generate_synthetic, read_oracle, read_synthetic_params

__all__ = [
    "RawMovieLens",
    "download_movielens",
    "generate_synthetic",
    "get_movielens",
    "read_ml100k_split",
    "read_movielens",
    "read_oracle",
    "read_synthetic_params",
]

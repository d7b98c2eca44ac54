"""MovieLens recommender pipeline: NVTabular ETL, schema-built models, inference through the saved workflow.

Importing this package configures dask before anything imports ``dask.dataframe``: merlin-core 23.8
needs dask's legacy DataFrame (``query-planning: False``), and ``convert-string: False`` keeps list
columns as lists instead of silently turning them into strings. Import ``pipeline`` (or ``workflows``)
before ``nvtabular`` or ``merlin``.
"""

import os as _os

_os.environ.setdefault("DASK_DATAFRAME__QUERY_PLANNING", "False")
_os.environ.setdefault("DASK_DATAFRAME__CONVERT_STRING", "False")
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import dask as _dask  # noqa: E402

_dask.config.set({"dataframe.query-planning": False, "dataframe.convert-string": False})

__version__ = "0.1.0"

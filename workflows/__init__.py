"""NVTabular workflow definitions, one module per dataset family (``workflows.movielens``)."""

import pipeline  # noqa: F401  (configures dask before nvtabular is imported)

"""Top-k over a catalog of item vectors: the interface an approximate (ANN) index implements, and brute force.

An index holds one vector per item (``(n_items, dim)`` float32, rows in the order of ``ids``) and answers
``search(queries (q, dim), k, exclude=...)`` with the ``k`` items of highest inner product per query
(cosine for the two-tower's unit vectors), best first. ``exclude`` lists, per query, row positions that
must not be returned (the movies the user rated in training).
"""

from __future__ import annotations

import abc
import threading
from typing import Sequence

import numpy as np


class ItemIndex(abc.ABC):
    """Maximum-inner-product search over a fixed set of item vectors.

    Args:
        ids: ``(n_items,)`` the item id of each row (returned by ``search``).
        vectors: ``(n_items, dim)`` the item vectors.

    Example (a subclass implements ``search_rows``; an ANN index, e.g. HNSW, would too):
        >>> index = BruteForceIndex(np.array([10, 20, 30]), np.eye(3, dtype="float32"))
        >>> index.search(np.array([[0.0, 1.0, 0.5]]), 2)[0].tolist()
        [[20, 30]]
    """

    def __init__(self, ids: np.ndarray, vectors: np.ndarray):
        ids, vectors = np.asarray(ids), np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(ids) != len(vectors):
            raise ValueError(f"an index needs (n, dim) vectors for n ids, got {vectors.shape} for {len(ids)} ids")
        self.ids = ids
        self.vectors = vectors

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @abc.abstractmethod
    def search_rows(self, queries: np.ndarray, k: int,
                    exclude: Sequence[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, scores)``, each ``(q, k')`` with ``k' = min(k, n_items)``: the row positions of the best
        items per query, best first, and their scores; excluded rows are never returned (a query with
        fewer than ``k'`` allowed items is padded with row -1, score -inf)."""

    def search(self, queries: np.ndarray, k: int,
               exclude: Sequence[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, scores)`` of ``search_rows`` (padding rows keep id -1)."""
        rows, scores = self.search_rows(queries, k, exclude)
        ids = np.where(rows >= 0, self.ids[np.maximum(rows, 0)], -1)
        return ids, scores


class BruteForceIndex(ItemIndex):
    """Exact search: every item scored with one matrix product per batch of queries (numpy, float32).

    At ML-1M's 3,706 movies x 64 dims a query costs ~0.1 ms, at ML-25M's 59k ~1-2 ms on one core: exact
    search is the right choice up to a few hundred thousand items. Ties are broken by row position (the
    lower row first), so results are deterministic.

    Args:
        ids: ``(n_items,)`` the item id of each row.
        vectors: ``(n_items, dim)`` the item vectors.

    Example:
        >>> index = BruteForceIndex(np.array([10, 20, 30]), np.eye(3, dtype="float32"))
        >>> ids, scores = index.search(np.array([[1.0, 1.0, 0.0]]), 3, exclude=[np.array([0])])
        >>> ids.tolist(), scores.tolist()
        ([[20, 30, -1]], [[1.0, 0.0, -inf]])
    """

    def __init__(self, ids: np.ndarray, vectors: np.ndarray):
        super().__init__(ids, vectors)
        self._buffers = threading.local()  # one preallocated score row per serving thread

    def _scores(self, queries: np.ndarray) -> np.ndarray:
        """``(q, n)`` inner products; a single query reuses its thread's buffer (no 59k-float allocation)."""
        if len(queries) != 1:
            return queries @ self.vectors.T
        out = getattr(self._buffers, "row", None)
        if out is None:
            out = self._buffers.row = np.empty((1, len(self)), dtype=np.float32)
        return np.matmul(queries, self.vectors.T, out=out)

    def search_rows(self, queries, k, exclude=None):
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if queries.shape[1] != self.dim:
            raise ValueError(f"queries have {queries.shape[1]} dims, the index {self.dim}")
        if exclude is not None and len(exclude) != len(queries):
            raise ValueError(f"exclude has {len(exclude)} entries for {len(queries)} queries")
        k = max(0, min(int(k), len(self)))
        if k == 0:
            return np.zeros((len(queries), 0), np.int64), np.zeros((len(queries), 0), np.float32)
        scores = self._scores(queries)  # (q, n)
        if exclude is not None:
            for row, excluded in enumerate(exclude):
                if len(excluded):
                    scores[row, np.asarray(excluded, dtype=np.int64)] = -np.inf
        rows = np.empty((len(queries), k), dtype=np.int64)
        top = np.empty((len(queries), k), dtype=np.float32)
        last = len(self) - k
        for q, s in enumerate(scores):
            # every row at least as good as the k-th best, in row order, stably sorted by score: argpartition
            # alone would pick arbitrary members of a tie at the boundary
            kth = s[np.argpartition(s, last)[last]]
            candidates = np.flatnonzero(s >= kth)
            best = candidates[np.argsort(-s[candidates], kind="stable")[:k]]
            rows[q], top[q] = best, s[best]
        rows[~np.isfinite(top)] = -1
        return rows, top


def limit_blas_threads(threads: int = 1) -> bool:
    """Cap numpy's OpenBLAS at ``threads`` threads for the rest of the process; returns whether it could.

    A one-query search is a matrix-vector product that one core does in ~1 ms at 59k x 64; OpenBLAS' default
    of one thread per core made it 16 ms p50 on the shared 2-core machine (its threads wait for each other and
    for the cores the HTTP server and TensorFlow use). numpy's wheels bundle scipy-openblas, whose setter is
    reached with ctypes (no threadpoolctl in the stack); other builds are left as they are (logged).
    """
    import ctypes
    import glob
    import logging
    import os

    libs = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs")
    for path in glob.glob(os.path.join(libs, "*openblas*")):
        lib = ctypes.CDLL(path)
        for name in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads", "openblas_set_num_threads"):
            if hasattr(lib, name):
                getattr(lib, name)(int(threads))
                return True
    logging.getLogger(__name__).info("numpy's BLAS thread count not changed (no bundled OpenBLAS found)")
    return False

"""``FeatureCache``: the serving graph's outputs for every known user and movie, looked up instead of recomputed."""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import pandas as pd

from pipeline.errors import ArtifactError
from pipeline.inference.features import FeatureAssembler

logger = logging.getLogger(__name__)


class FeatureCache:
    """Ready model-input arrays per known id of each request column.

    Every feature of the MovieLens workflow is a function of one request column: the user's (userId code,
    demographics, their encodings) or the movie's (movieId code, title, genres, its encoding). ``build`` runs
    the serving graph once over all known ids, finds which request column each output follows (it must not
    change when the other ids change, checked against several reference ids), and verifies the lookup against
    the graph on random pairs: any difference, or an output that follows no single column, and no cache is
    used. Ids outside the tables (unseen users / movies) always go through the graph. A request costs a
    ``searchsorted`` and a gather per feature.

    Args:
        keys: request column -> its sorted known raw ids.
        tables: request column -> ``{output name: array with one row per known id}``.

    Example:
        >>> import numpy as np, pandas as pd
        >>> cache = FeatureCache({"userId": np.array([3, 5])}, {"userId": {"age": np.array([[20.0], [30.0]])}})
        >>> arrays, found = cache.lookup(pd.DataFrame({"userId": [5, 9]}))
        >>> arrays["age"][0].tolist(), found.tolist()
        ([30.0], [True, False])
    """

    def __init__(self, keys: dict[str, np.ndarray], tables: dict[str, dict[str, np.ndarray]]):
        self.keys = keys
        self.tables = tables

    @classmethod
    def build(cls, transform: Callable[[pd.DataFrame], pd.DataFrame], assembler: FeatureAssembler,
              ids: dict[str, np.ndarray], outputs: list[str], *, references: int = 4, checks: int = 1024,
              seed: int = 0) -> "FeatureCache | None":
        """The cache of ``outputs``, or ``None`` (logged) if they do not split by request column.

        Args:
            transform: raw request frame (columns ``ids``' keys, in order) -> the serving graph's output.
            assembler: formats the transformed rows as model inputs.
            ids: request column -> sorted known raw ids (e.g. ``pipeline.inference.known_ids``).
            outputs: the names to cache (model inputs and encoded request columns).
            references: how many other ids each column's outputs are computed against.
            checks: random known pairs on which the lookup must equal the graph.
            seed: seeds the reference ids and the check pairs.
        """
        rng = np.random.default_rng(seed)
        columns = list(ids)
        owner: dict[str, str] = {}
        tables: dict[str, dict[str, np.ndarray]] = {}
        for key in columns:
            others = {k: rng.choice(ids[k], size=min(references, len(ids[k])), replace=False)
                      for k in columns if k != key}
            n_refs = max((len(v) for v in others.values()), default=1)
            frame = pd.DataFrame({key: np.tile(ids[key], n_refs),
                                  **{k: np.repeat(v[np.arange(n_refs) % len(v)], len(ids[key]))
                                     for k, v in others.items()}})
            arrays = assembler.arrays(transform(frame[columns]), outputs)
            tables[key] = {}
            for name, array in arrays.items():
                parts = np.split(array, n_refs)
                if all(np.array_equal(parts[0], p) for p in parts[1:]):
                    owner.setdefault(name, key)
                    if owner[name] == key:
                        tables[key][name] = parts[0]
        free = [n for n in outputs if n not in owner]
        if free:
            logger.warning("no feature cache: %s depend on more than one request column", free)
            return None
        for key, table in tables.items():
            for name, values in table.items():
                if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
                    # the model may turn a NaN input into a finite score: catch it where it is made
                    raise ArtifactError(f"the workflow computes non-finite {name!r} for some known {key} values: "
                                        "re-run the ETL (its statistics are broken)")
        cache = cls(ids, tables)
        sample = pd.DataFrame({k: rng.choice(ids[k], size=checks) for k in columns})
        expected = assembler.arrays(transform(sample), outputs)
        got, found = cache.lookup(sample)
        bad = [n for n in outputs if not np.array_equal(expected[n], got[n])]
        if not found.all() or bad:
            logger.warning("no feature cache: looked-up features %s differ from the workflow's", bad)
            return None
        logger.info("feature cache: %s", {k: len(v) for k, v in ids.items()})
        return cache

    def lookup(self, df: pd.DataFrame) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """``(arrays, found)``: cached outputs for the rows of ``df`` whose ids are all known (``found``,
        bool ``(rows,)``); the other rows hold arbitrary values and must be computed by the graph."""
        found = np.ones(len(df), dtype=bool)
        positions = {}
        for key, ids in self.keys.items():
            values = df[key].to_numpy()
            pos = np.searchsorted(ids, values)
            pos[pos >= len(ids)] = 0
            found &= ids[pos] == values
            positions[key] = pos
        arrays = {}
        for key, table in self.tables.items():
            for name, values in table.items():
                arrays[name] = values[positions[key]]
        return arrays, found

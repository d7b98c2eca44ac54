"""``FillUnknown``: fill the nulls that a left join leaves for unseen keys, keeping each column's dtype.

A request for a user (or movie) that was not in the side table joins to nulls: pandas then turns
``age`` from int64 into float64 with NaN, ``genres`` into NaN instead of a list, and NVTabular's
``Categorify`` fails ("Failed to categorical encode column ..."). This operator replaces each null
with a value that never occurs in MovieLens (``-1`` for numbers, ``UNKNOWN`` for strings, ``[UNKNOWN]``
for lists) and casts the column back to the dtype it had when the workflow was built, so
``Categorify`` maps it to its out-of-vocabulary row and ``KFoldTargetEncoding`` to the global mean.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from merlin.dag import ColumnSelector
from merlin.dag.operator import Operator
from merlin.schema import Schema

UNKNOWN = "<unknown>"
UNKNOWN_NUMBER = -1


class FillUnknown(Operator):
    """Replace nulls with an out-of-vocabulary sentinel and restore the column's original dtype.

    The dtypes come from the input schema when the workflow graph is built (e.g. the side table's
    dtypes behind ``JoinExternal``) and are saved with the workflow. Rows without nulls pass unchanged.

    Args:
        None: the columns it fills are the ones selected (``columns >> FillUnknown()``).

    Example:
        >>> import nvtabular as nvt
        >>> frame = pd.DataFrame({"userId": [1.0, None]})  # an unseen user after JoinExternal
        >>> workflow = nvt.Workflow(["userId"] >> FillUnknown())
        >>> _ = workflow.fit(nvt.Dataset(frame))
        >>> workflow.transform(nvt.Dataset(frame)).to_ddf().compute()["userId"].tolist()  # -1: no real id
        [1.0, -1.0]
    """

    def __init__(self):
        super().__init__()
        self.column_kinds: dict[str, tuple[str, bool]] = {}  # column -> (numpy dtype, is_list)

    def compute_output_schema(
        self, input_schema: Schema, col_selector: ColumnSelector, prev_output_schema: Schema | None = None
    ) -> Schema:
        # Remember each input column's dtype and list-ness: transform only sees data whose dtype
        # the nulls may already have changed (int64 -> float64).
        for col in input_schema:
            self.column_kinds[col.name] = (_numpy_dtype(col.dtype), bool(col.is_list))
        return super().compute_output_schema(input_schema, col_selector, prev_output_schema)

    def transform(self, col_selector: ColumnSelector, df):
        for name in col_selector.names:
            dtype, is_list = self.column_kinds.get(name, (str(df[name].dtype), False))
            if not df[name].isna().any():
                continue
            df[name] = _fill(df[name], dtype, is_list)
        return df

    transform.__doc__ = Operator.transform.__doc__


def _numpy_dtype(dtype) -> str:
    """The numpy name of a merlin dtype; "object" when merlin could not infer it (e.g. a list column
    whose sampled first row is empty)."""
    try:
        return str(dtype.to_numpy)
    except ValueError:
        return "object"


def _sentinel(dtype: str):
    return UNKNOWN_NUMBER if np.dtype(dtype).kind in "iuf" else UNKNOWN


def _fill(series, dtype: str, is_list: bool):
    """``series`` with its nulls replaced by the sentinel for ``dtype``; pandas or cudf."""
    if not is_list:
        return series.fillna(_sentinel(dtype)).astype(dtype)
    # Only requests with unseen movies reach this line (training rows have no nulls).
    return fill_list_nulls(series, [_sentinel(dtype)])  # a list column's schema dtype is its element dtype


def fill_list_nulls(series, value):
    """``series``, a list column (pandas or cudf), with each null (any entry that is not a list) set to ``value``.

    Neither pandas nor cudf fill a null with a list value, so the column is rebuilt on the host.
    """
    host = series.to_pandas() if hasattr(series, "to_pandas") else series
    filled = pd.Series([v if _is_list_value(v) else value for v in host], index=host.index, name=host.name)
    return filled if host is series else type(series).from_pandas(filled)


def _is_list_value(value) -> bool:
    return isinstance(value, (list, tuple, np.ndarray))


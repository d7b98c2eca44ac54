"""``EncodedColumns``: side-table columns that ``Categorify`` already encoded on the side table itself.

A movie's title and genres (a user's gender, age, occupation, zipcode) are the same on every rating row
of that movie (user). Encoding them on the side table (one row per movie or user, see
``workflows.movielens.encode_side_table``) and joining the integer codes costs a few integer columns
per rating row; joining the strings and lists first and encoding them per rating row was most of the
ETL's time at ML-25M size (string merges, a Python list per row for genres, object columns that Dask
cannot size on a worker).

After the join, an id missing from the side table (an unseen user or movie) leaves nulls: this operator
turns them into Categorify's out-of-vocabulary index (``[OOV]`` for a list column), restores int32 and
gives each column the schema the side table's ``Categorify`` wrote (cardinality, embedding sizes,
domain, ``cat_path``, list lengths, the categorical tag), so the model sees exactly what a
``Categorify`` in the graph would have produced. It is a ``StatOperator`` with nothing to fit only so
that ``Workflow.save`` / ``Workflow.load`` move its vocabularies with the workflow, as Categorify's.
"""

from __future__ import annotations

import os
import shutil

import dask
import numpy as np
import pandas as pd
from merlin.dag import ColumnSelector
from merlin.dag.operator import Operator
from merlin.dag.ops.stat_operator import StatOperator
from merlin.schema import Schema

from pipeline.ops.fill_unknown import fill_list_nulls

# Categorify's reserved indices: 0 padding, 1 null, 2 out-of-vocabulary (nvtabular >= 23.08).
OUT_OF_VOCABULARY = 2


class EncodedColumns(StatOperator):
    """Fill the nulls of already-encoded columns with the out-of-vocabulary index; give them ``schema``.

    Args:
        schema: the output schema of the side table's ``Categorify`` for these columns (int32 codes,
            ``embedding_sizes`` etc.); the selected columns must all be in it.
        out_path: that Categorify's ``out_path``: the vocabularies named by ``cat_path`` lie under it.

    Example:
        >>> import nvtabular as nvt
        >>> from merlin.schema import ColumnSchema, Schema, Tags
        >>> schema = Schema([ColumnSchema("age", dtype="int32", tags=[Tags.CATEGORICAL],
        ...                               properties={"embedding_sizes": {"cardinality": 5, "dimension": 4}})])
        >>> frame = pd.DataFrame({"age": [3.0, None]})  # an unseen user after a left join
        >>> workflow = nvt.Workflow(["age"] >> EncodedColumns(schema, out_path="."))
        >>> _ = workflow.fit(nvt.Dataset(frame))
        >>> workflow.transform(nvt.Dataset(frame)).to_ddf().compute()["age"].tolist()
        [3, 2]
    """

    def __init__(self, schema: Schema, out_path: str = "./"):
        super().__init__()
        self.schema = schema
        self.out_path = str(out_path)

    # Nothing to fit: the side table was encoded before the workflow was built. A delayed value, not
    # None: merlin's distributed fit drops None results and would pair the others with the wrong ops.
    def fit(self, col_selector: ColumnSelector, ddf):
        return dask.delayed(dict)()

    def fit_finalize(self, stats) -> None:
        pass

    def clear(self) -> None:
        pass

    def set_storage_path(self, new_path, copy: bool = False) -> None:
        """Point (and with ``copy``, copy) the vocabularies from ``out_path`` to ``new_path``, as Categorify does."""
        old, new = self.out_path, str(new_path)
        columns = []
        for column in self.schema:
            path = column.properties.get("cat_path")
            if isinstance(path, str) and path.startswith(old):
                moved = new + path[len(old):]
                if copy and moved != path:
                    os.makedirs(os.path.dirname(moved), exist_ok=True)
                    shutil.copyfile(path, moved)
                column = column.with_properties({**column.properties, "cat_path": moved})
            columns.append(column)
        self.schema, self.out_path = Schema(columns), new

    def transform(self, col_selector: ColumnSelector, df):
        for name in col_selector.names:
            column = self.schema[name]
            if column.is_list:
                if isinstance(df[name].dtype, pd.ArrowDtype) or df[name].isna().any():
                    df[name] = _fill_list(df[name])
            elif df[name].isna().any() or df[name].dtype != np.int32:
                df[name] = df[name].fillna(OUT_OF_VOCABULARY).astype("int32")
        return df

    def compute_output_schema(
        self, input_schema: Schema, col_selector: ColumnSelector, prev_output_schema: Schema | None = None
    ) -> Schema:
        missing = [name for name in col_selector.names if name not in self.schema.column_names]
        if missing:
            raise ValueError(f"EncodedColumns has no side-table schema for {missing}")
        return Schema([self.schema[name] for name in col_selector.names])

    transform.__doc__ = Operator.transform.__doc__


def _fill_list(series):
    """A list column as Categorify writes it (an object column of int32 arrays), each null as ``[OOV]``.

    Accepts the arrow-backed ``list<int32>`` column of an encoded side table (``encode_side_table``), an
    object column of arrays, or a cudf list column (nulls filled on the host).
    """
    oov = np.array([OUT_OF_VOCABULARY], dtype=np.int32)
    if isinstance(series.dtype, pd.ArrowDtype):
        arrow = series.array.__arrow_array__()
        values = arrow.to_numpy(zero_copy_only=False)  # one int32 array per row, None for a null
        for row in np.flatnonzero(arrow.is_null().to_numpy(zero_copy_only=False)):
            values[row] = oov
        return pd.Series(values, index=series.index, name=series.name)
    return fill_list_nulls(series, oov)

"""Our NVTabular operators. They are pickled by reference into saved workflows, so keep names stable.

- ``KFoldTargetEncoding``: target encoding with deterministic out-of-fold values for training rows and
  full-train statistics (no target column needed) for everything else.
- ``ColumnTags``: per-column schema tags in one node (keeps the graph a chain: merlin re-runs branches).
- ``ListValueCount``: ``ValueCount`` whose fit is part of the workflow's fit graph instead of extra passes.
- ``EncodedColumns``: side-table columns Categorify encoded on the side table itself, joined as codes: nulls
  (an unseen user/movie) become the out-of-vocabulary index, the schema is the side Categorify's.
- Importing this package gives merlin graph nodes cheap dask tokens (``dask_tokens``).
- ``FillUnknown``: puts a sentinel into the nulls an unseen user/movie leaves after ``JoinExternal`` (raw
  side columns), so ``Categorify`` maps them to its out-of-vocabulary row and target encoding to the mean.
"""

from pipeline.ops.column_tags import ColumnTags
from pipeline.ops.dask_tokens import register_node_tokens
from pipeline.ops.encoded_columns import OUT_OF_VOCABULARY, EncodedColumns
from pipeline.ops.fill_unknown import UNKNOWN, FillUnknown
from pipeline.ops.list_value_count import ListValueCount
from pipeline.ops.target_encoding import KFoldTargetEncoding, out_of_fold

register_node_tokens()

__all__ = [
    "UNKNOWN", "OUT_OF_VOCABULARY", "ColumnTags", "EncodedColumns", "FillUnknown", "ListValueCount",
    "KFoldTargetEncoding", "out_of_fold",
]

"""Our NVTabular operators. They are pickled by reference into saved workflows, so keep names stable.

- ``KFoldTargetEncoding``: target encoding with deterministic out-of-fold values for training rows and
  full-train statistics (no target column needed) for everything else.
- ``ColumnTags``: per-column schema tags in one node (keeps the graph a chain: merlin re-runs branches).
- ``ListValueCount``: ``ValueCount`` whose fit is part of the workflow's fit graph instead of extra passes.
- ``FillUnknown``: puts a sentinel into the nulls an unseen user/movie leaves after ``JoinExternal``,
  so ``Categorify`` maps them to the out-of-vocabulary row instead of failing.
"""

from pipeline.ops.column_tags import ColumnTags
from pipeline.ops.fill_unknown import UNKNOWN, FillUnknown
from pipeline.ops.list_value_count import ListValueCount
from pipeline.ops.target_encoding import KFoldTargetEncoding, out_of_fold

__all__ = ["UNKNOWN", "ColumnTags", "FillUnknown", "ListValueCount", "KFoldTargetEncoding", "out_of_fold"]

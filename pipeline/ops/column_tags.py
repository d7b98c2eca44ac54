"""``ColumnTags``: per-column tags in one graph node.

NVTabular's ``AddMetadata`` gives every selected column the same tags, so tagging userId, movieId and
the side features differently takes one branch per tag set, and merlin's executor re-runs every
branch's upstream operators (no memoisation): five ``Categorify`` passes instead of one. One
``ColumnTags`` node after a single ``Categorify`` keeps the graph a chain.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from merlin.dag import ColumnSelector
from merlin.dag.operator import Operator
from merlin.schema import Tags


class ColumnTags(Operator):
    """Pass columns through unchanged, adding ``tags[column]`` to each column's schema tags.

    Args:
        tags: column name -> tags to add (``merlin.schema.Tags`` or strings); unlisted columns keep theirs.

    Example:
        >>> import nvtabular as nvt
        >>> from merlin.schema import Tags
        >>> workflow = nvt.Workflow(["userId"] >> ColumnTags({"userId": [Tags.USER_ID]}))
        >>> _ = workflow.fit(nvt.Dataset(pd.DataFrame({"userId": [1, 2]})))
        >>> sorted(str(t.value) for t in workflow.output_schema["userId"].tags)
        ['id', 'user']
    """

    def __init__(self, tags: Mapping[str, Sequence[Tags | str]]):
        super().__init__()
        self.tags = {name: list(column_tags) for name, column_tags in tags.items()}

    def transform(self, col_selector: ColumnSelector, df):
        return df

    def _compute_tags(self, col_schema, input_schema):
        col_schema = super()._compute_tags(col_schema, input_schema)
        return col_schema.with_tags(self.tags.get(col_schema.name, []))

    transform.__doc__ = Operator.transform.__doc__

"""What a model is built from, column by column, and the checks both stages make with it.

The train stage records ``schema_fingerprint`` of the data it trained on; inference compares it with the
saved workflow's output, and compares ``column_summary`` feature by feature to name what differs. Both go
through the one summary below, so "the same schema" means one thing everywhere.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def column_summary(col) -> tuple:
    """``(kind, is_list, tags, cardinality)`` of one merlin ``ColumnSchema``: what a model is built from.

    ``kind`` is the element type without its bit width (``"int"``, ``"float"``, ``"string"``);
    ``cardinality`` comes from the ``embedding_sizes`` property Categorify writes, else from the int domain of
    a categorical column, else ``None``. Storage details (bit width, category-table paths) are left out:
    they do not change what the model computes.
    """
    from merlin.schema import Tags

    sizes = col.properties.get("embedding_sizes") or {}
    card = sizes.get("cardinality")
    if card is None and col.int_domain is not None and Tags.CATEGORICAL in col.tags:
        card = None if col.int_domain.max is None else col.int_domain.max + 1
    return (
        col.dtype.element_type.value if col.dtype is not None else None,
        bool(col.is_list),
        tuple(sorted(str(getattr(t, "value", t)) for t in col.tags)),
        None if card is None else int(card),
    )


SUMMARY_FIELDS = "(kind, is_list, tags, cardinality)"  # how error messages name a column_summary


def schema_summary(schema) -> dict[str, tuple]:
    """``{column name: column_summary(column)}`` for every column of a merlin ``Schema``."""
    return {col.name: column_summary(col) for col in schema}


def schema_fingerprint(schema) -> str:
    """sha256 (hex) of the ``column_summary`` of every non-target column of ``schema``, sorted by name.

    Two schemas with the same fingerprint feed a model identically. The train stage writes it to
    config.json; inference refuses a workflow whose output schema has another.
    """
    from merlin.schema import Tags

    rows = [[name, kind, is_list, list(tags), card]
            for name, (kind, is_list, tags, card) in schema_summary(schema.excluding_by_tag(Tags.TARGET)).items()]
    rows.sort(key=lambda r: r[0])
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


def read_schema(path: Path):
    """The merlin ``Schema`` in a ``schema.pbtxt`` file (``FileNotFoundError`` naming it if absent)."""
    from merlin.schema.io.tensorflow_metadata import TensorflowMetadata

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, "No such file (the schema)", str(path))
    return TensorflowMetadata.from_proto_text_file(str(path.parent), file_name=path.name).to_merlin_schema()

"""Feature assembly: request rows -> the serving graph's output -> the model's input arrays.

``FeatureAssembler`` formats transformed rows exactly as ``pipeline.loader.Loader`` formats training batches
(scalars as ``(rows, 1)``, list columns padded with ``PAD_ID`` to the width the model was built on);
``model_inputs`` reads those names, dtypes and widths from the model; ``request_ids`` is the id rule of every
stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import ArtifactError, DataError
from pipeline.inference.artifacts import REQUEST_DTYPE


@dataclass(frozen=True)
class ModelInput:
    """One input of the model.

    Args:
        name: the feature (a column of the serving graph's output).
        dtype: the numpy dtype the model takes.
        width: for a list column, the padded width the model was built on (``None`` for scalars).

    Example:
        >>> import numpy as np
        >>> ModelInput("genres", np.dtype("int64"), width=6)
        ModelInput(name='genres', dtype=dtype('int64'), width=6)
    """

    name: str
    dtype: np.dtype
    width: int | None = None


class FeatureAssembler:
    """Transformed rows -> model input arrays, in the layout the training loader feeds.

    Args:
        inputs: the model's inputs (``model_inputs``).

    Example:
        >>> import numpy as np, pandas as pd
        >>> assembler = FeatureAssembler([ModelInput("userId", np.dtype("int64")),
        ...                               ModelInput("genres", np.dtype("int64"), width=3)])
        >>> frame = pd.DataFrame({"userId": [4, 7], "genres": [[1, 2], [3]]})
        >>> {k: v.shape for k, v in assembler.arrays(frame, ["userId", "genres"]).items()}
        {'userId': (2, 1), 'genres': (2, 3)}
    """

    def __init__(self, inputs: list[ModelInput]):
        self.inputs = list(inputs)
        self._specs = {i.name: i for i in self.inputs}

    @property
    def names(self) -> list[str]:
        return [i.name for i in self.inputs]

    def arrays(self, transformed: pd.DataFrame, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """``{name: array}`` for ``names`` (default: every model input) of ``transformed``.

        A model input is ``(rows, 1)`` of its dtype, or ``(rows, width)`` for a list column; any other
        column (e.g. an encoded request id) is returned as produced, ``(rows,)``.
        """
        arrays = {}
        for name in self.names if names is None else names:
            if name not in transformed.columns:
                raise ArtifactError(f"the serving workflow does not produce model input {name!r}")
            column = transformed[name]
            spec = self._specs.get(name)
            if spec is None:
                arrays[name] = column.to_numpy()
            elif column.dtype == object:  # list column (whatever the schema says; the data decides)
                arrays[name] = pad_lists(column, spec.width or _longest(column), spec.dtype)
            else:
                arrays[name] = column.to_numpy(dtype=spec.dtype).reshape(-1, 1)
        return arrays


def pad_lists(column: pd.Series, width: int, dtype) -> np.ndarray:
    """A list column as a ``(rows, width)`` array, padded with ``PAD_ID`` and cut at ``width``.

    The same layout ``pipeline.loader.Loader`` builds from ``__values`` / ``__offsets``.
    """
    from pipeline.loader import PAD_ID

    lengths = np.fromiter((len(v) for v in column), dtype=np.int64, count=len(column))
    out = np.full((len(column), width), PAD_ID, dtype=dtype)
    if lengths.sum():
        values = np.concatenate([np.asarray(v, dtype=dtype) for v in column if len(v)])
        rows = np.repeat(np.arange(len(column)), lengths)
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        cols = np.arange(len(values)) - starts
        inside = cols < width
        out[rows[inside], cols[inside]] = values[inside]
    return out


def model_inputs(model, trained_schema, etl_dir: Path) -> list[ModelInput]:
    """Name, dtype and list width of every model input, from the model's own input record.

    ``pipeline.models.Model`` records the shapes it was built on (``input_signature``), which for a
    list column is the padded width the training loader used. Other Keras models fall back to the
    training schema and the loader's width rule on the train split.
    """
    from merlin.schema import Tags

    try:
        signature = model.input_signature()
    except (AttributeError, ValueError, TypeError):
        signature = None
    if signature:
        out = []
        for name, spec in signature.items():
            shape = list(spec.shape)
            width = int(shape[1]) if len(shape) > 1 and shape[1] is not None else None
            out.append(ModelInput(name, np.dtype(spec.dtype.as_numpy_dtype), width))
        return out
    features = trained_schema.excluding_by_tag(Tags.TARGET)
    list_names = [c.name for c in features if c.is_list]
    widths = _list_widths(etl_dir, list_names) if list_names else {}
    return [ModelInput(c.name, np.dtype(c.dtype.to_numpy), widths.get(c.name)) for c in features]


def _longest(column: pd.Series) -> int:
    return max(1, max((len(v) for v in column), default=1))


def _list_widths(etl_dir: Path, names: list[str]) -> dict[str, int]:
    """Fixed list widths exactly as the training loader computes them from the train split."""
    from merlin.io import Dataset

    from pipeline.loader import list_max_lengths

    train = etl_dir / "train"
    if not train.is_dir():
        raise ArtifactError(f"{train} is missing (needed for the list-column widths the model was trained with)")
    return list_max_lengths(Dataset(str(train), engine="parquet"), names)


def request_ids(col: pd.Series, name: str) -> np.ndarray:
    """One request column as int64 ids; ``DataError`` naming the first missing, non-integer or negative row.

    The id rule of every stage (the ETL's readers, ``predict``, ``serve``): ids are integers in
    ``[0, 2**63)``. Integer-valued floats (a csv column with a missing value is read as floats) pass.
    """
    if pd.api.types.is_bool_dtype(col.dtype):
        raise DataError(f"field {name!r} must hold integer ids, got dtype {col.dtype}")
    if pd.api.types.is_integer_dtype(col.dtype):
        if col.hasnans:  # nullable integer dtypes
            raise DataError(f"field {name!r} has a missing value at row {int(np.flatnonzero(col.isna())[0])}")
        values = col.to_numpy(dtype=REQUEST_DTYPE)
    elif pd.api.types.is_float_dtype(col.dtype):
        raw = col.to_numpy(dtype=np.float64)
        missing = np.flatnonzero(np.isnan(raw))
        if len(missing):
            raise DataError(f"field {name!r} has a missing value at row {int(missing[0])}")
        fractional = np.flatnonzero((raw != np.round(raw)) | (np.abs(raw) >= 2.0**63))
        if len(fractional):
            row = int(fractional[0])
            raise DataError(f"field {name!r} must hold integer ids (row {row}: {float(raw[row])!r})")
        values = raw.astype(REQUEST_DTYPE)
    elif col.dtype == object:  # python ints (e.g. from JSON)
        for i, value in enumerate(col):
            if value is None or (isinstance(value, float) and np.isnan(value)):
                raise DataError(f"field {name!r} has a missing value at row {i}")
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                raise DataError(f"field {name!r} must hold integer ids, got dtype object (row {i}: {value!r})")
            if not -(2**63) <= value < 2**63:
                raise DataError(f"field {name!r}: id {value} at row {i} does not fit in int64")
        values = col.to_numpy(dtype=REQUEST_DTYPE)
    else:
        raise DataError(f"field {name!r} must hold integer ids, got dtype {col.dtype}")
    negative = np.flatnonzero(values < 0)
    if len(negative):
        row = int(negative[0])
        raise DataError(f"field {name!r}: id {int(values[row])} at row {row} is negative (ids are >= 0)")
    return values

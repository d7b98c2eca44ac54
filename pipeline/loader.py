"""Keras 3 adapter over merlin's TensorFlow dataloader.

``merlin.dataloader.tensorflow.Loader`` streams parquet partitions through a background thread
(cudf + cupy on a GPU, pandas + numpy on CPU) and hands out dicts of TF tensors, but it subclasses
the old ``keras.utils.Sequence`` and skips ``PyDataset.__init__``, so Keras 3's ``fit`` rejects it.
``Loader`` wraps it (composition, so the GPU path stays merlin's own code) as a
``keras.utils.PyDataset`` and finishes each batch with TF ops that run on either device:

- scalar features become ``(batch, 1)`` tensors (the layout of Merlin Models' ``sample_batch``);
- list columns, which merlin emits as ``<name>__values`` / ``<name>__offsets``, become a
  fixed-width ``(batch, max_len)`` int tensor padded with 0, Categorify's padding id;
- targets (tag TARGET, or the names given) are split off: one target -> a ``(batch, 1)`` tensor,
  several -> a dict keyed by name.

Shuffling reshuffles partitions and rows every epoch from ``seed`` and the epoch number, so two runs
with the same seed see the same batches. Each pass reads the parquet partitions in a fresh order, and
the rows of each chunk are shuffled before merlin cuts it into whole batches, so the rows left over for
the next chunk (and the final partial batch) are a random draw too, not a chunk's last rows in file order.
Epochs are counted by complete passes over the data, not by ``on_epoch_end``: Keras asks for the next
epoch's first batch from its prefetch thread while it may still be calling ``on_epoch_end`` for the last
one, so counting calls would make the shuffle depend on thread timing.
"""

from __future__ import annotations

import copy
import logging
from typing import Iterable, Sequence

import keras
import numpy as np
import tensorflow as tf
from merlin.io import Dataset
from merlin.schema import Schema, Tags
from merlin.schema.tags import TagSet

from pipeline.errors import DataError

logger = logging.getLogger(__name__)

# Categorify maps padding to 0, so 0 is the natural fill value for padded list columns.
PAD_ID = 0
# Batches kept from the start of a pass: Keras' PyDataset adapter reads 2 to infer tensor specs.
_HEAD = 2


def list_columns(dataset: Dataset) -> set[str]:
    """Columns that hold lists in the data itself.

    Read from the first parquet file's arrow schema (no data read), because a schema.pbtxt can
    call a scalar column a list (a ``value_count`` property on it turns ``is_list`` on); falls
    back to the schema for non-parquet datasets.
    """
    path0 = getattr(dataset.engine, "_path0", None)
    if path0:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            arrow_schema = pq.read_schema(path0, filesystem=getattr(dataset.engine, "fs", None))
            return {f.name for f in arrow_schema if pa.types.is_list(f.type) or pa.types.is_large_list(f.type)}
        except (OSError, TypeError, ValueError):
            pass
    return {col.name for col in dataset.schema if col.is_list}


def list_max_lengths(dataset: Dataset, names: Iterable[str]) -> dict[str, int]:
    """Fixed width of each list column: the schema's ``value_count.max``, else the data's longest list."""
    widths = {}
    for name in names:
        col = dataset.schema[name]
        max_count = (col.properties.get("value_count") or {}).get("max")
        if not max_count and col.shape.dims is not None and len(col.shape.dims) > 1:
            max_count = col.shape.dims[1].max
        if not max_count:
            # The ETL normally records it; otherwise scan the column once (lazy, per partition).
            ddf = dataset.to_ddf(columns=[name])
            lengths = ddf[name].map_partitions(_list_lengths, meta=(name, "i8"))
            max_count = int(lengths.max().compute())
        widths[name] = max(int(max_count), 1)
    return widths


def _list_lengths(series):
    # cudf list columns have a .list accessor; pandas holds python lists / arrays.
    return series.list.len() if hasattr(series, "list") else series.map(len)


class Loader(keras.utils.PyDataset):
    """Batches of a ``merlin.io.Dataset`` as ``(features, targets)`` for Keras 3.

    Args:
        dataset: the parquet dataset (its schema.pbtxt gives tags, dtypes and list widths).
        batch_size: rows per batch (the last batch may be smaller unless ``drop_last``).
        shuffle: reshuffle partitions and rows every epoch.
        seed: base seed of the per-epoch shuffle.
        features: feature columns to load (default: every non-target column of the schema).
        targets: target columns (default: the columns tagged TARGET); ``[]`` for none.
        include_targets: ``False`` yields features only (for ``predict``).
        drop_last: drop the final partial batch.
        parts_per_chunk: partitions concatenated (and shuffled together) per chunk.
        first_epoch: the epoch number of the first pass (a resumed run continues the shuffles of
            an uninterrupted one).

    Each item is ``(features, targets)`` (or ``features``): features maps a column name to a
    ``(batch, 1)`` tensor, or ``(batch, max_len)`` for list columns.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        features: Sequence[str] | None = None,
        targets: Sequence[str] | None = None,
        include_targets: bool = True,
        drop_last: bool = False,
        parts_per_chunk: int = 1,
        first_epoch: int = 0,
    ):
        super().__init__(workers=1, use_multiprocessing=False)
        from merlin.dataloader.tensorflow import Loader as MerlinLoader

        if batch_size < 1:
            raise DataError(f"batch size must be positive, got {batch_size}")
        schema = dataset.schema
        if schema is None or not len(schema):
            raise DataError("the dataset has no schema (schema.pbtxt next to the parquet files)")
        if targets is None:
            targets = schema.select_by_tag(Tags.TARGET).column_names
        targets = list(targets) if include_targets else []
        if features is None:
            features = schema.excluding_by_tag(Tags.TARGET).column_names
        features = [f for f in features if f not in targets]
        missing = [n for n in [*features, *targets] if n not in schema.column_names]
        if missing:
            raise DataError(
                f"column(s) {missing} missing from the dataset (it has {schema.column_names})"
            )
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.feature_names = list(features)
        self.target_names = list(targets)
        self.schema: Schema = schema.select_by_name([*self.feature_names, *self.target_names])
        lists = list_columns(dataset)
        self.list_widths = list_max_lengths(dataset, [n for n in self.feature_names if n in lists])
        self._epoch = int(first_epoch)

        # The merlin loader reads only schema columns and treats TARGET-tagged ones as labels:
        # give it a copy of the dataset whose schema is exactly what we load, tagged accordingly.
        loader_schema = Schema(
            [
                col._replace(tags=TagSet([t for t in col.tags if t != Tags.TARGET] + ([Tags.TARGET] if col.name in self.target_names else [])))
                for col in self.schema
            ]
        )
        dataset = copy.copy(dataset)
        dataset.schema = loader_schema
        self.num_rows = int(dataset.num_rows)  # from parquet footers: no data read
        if self.num_rows == 0:
            raise DataError(f"the dataset is empty (0 rows in {_paths(dataset)})")
        # merlin shuffles with numpy's global generator, from its reader thread: any other draw from
        # that generator meanwhile (another loader, another library) changes the order. We keep its
        # reading, chunking and tensor building but shuffle with a generator of our own per pass.
        self._merlin = MerlinLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=False,
            parts_per_chunk=parts_per_chunk,
            drop_last=drop_last,
        )
        # Partition order as a host array (merlin keeps a cupy one on GPU; it only slices and lists it).
        self._partitions = np.asarray(self._merlin.indices.tolist())
        self._rng = None  # this pass's generator, set by _restart
        self._num_batches = len(self._merlin)  # sizing builds merlin's ChunkQueue and its partition iterator
        # The ChunkQueue copied the partition order into its iterator just now and reads that copy on every
        # pass: assigning merlin's `indices` later (as its own shuffle does) never reaches it. _restart
        # hands each pass's order to the iterator itself.
        self._queue = self._merlin._buff
        if not isinstance(getattr(self._queue.itr, "indices", None), list):
            raise RuntimeError(
                "merlin.dataloader's ChunkQueue no longer reads a DataFrameIter with a list of partition indices; "
                "pipeline.loader.Loader needs updating for this merlin-dataloader version"
            )
        if shuffle:
            split = self._queue.get_batch_div_chunk

            def shuffled_split(frame, batch_size):
                # Called from merlin's reader thread with each chunk (the last chunk's leftover rows first),
                # before it is cut into whole batches + leftover: shuffle first, so the leftover is random rows.
                return split(frame.sample(frac=1.0, random_state=int(self._rng.integers(2**32))), batch_size)

            self._queue.get_batch_div_chunk = shuffled_split
        self._next_index = self._pulled = 0  # next batch index asked for / batches read in this pass
        self._head: list = []  # the first batches of this pass, kept for a replay

    @property
    def num_batches(self) -> int:
        return self._num_batches

    def __len__(self) -> int:
        return self._num_batches

    def __getitem__(self, index: int):
        # merlin's loader is an iterator: index 0 starts a pass, other indices must come in order.
        if index == 0:
            if self._pulled >= self._num_batches:  # the last pass was read to the end: next epoch
                self._epoch += 1
                self._restart()
            elif self._pulled == 0 or self._pulled > len(self._head):
                self._restart()  # the first pass, or one abandoned midway (same epoch, same order)
            # else: only the first batch(es) of this pass were read (Keras reads two to learn the
            # tensor specs before the epoch starts): replay them instead of re-reading the data.
        elif index != self._next_index:
            raise IndexError(
                f"Loader streams batches in order (asked for batch {index}, next is {self._next_index}): "
                "pass shuffle=False to keras fit(); the Loader shuffles rows itself (shuffle=True)"
            )
        if index < self._pulled:
            batch = self._head[index]
        else:
            batch = self._format(self._merlin.__next__())
            self._pulled += 1
            if len(self._head) < _HEAD:
                self._head.append(batch)
        self._next_index = index + 1
        return batch

    def __iter__(self):
        for index in range(self._num_batches):
            yield self[index]

    def _restart(self) -> None:
        self._merlin.stop()  # joins the reader thread: nothing else uses self._rng now
        if self.shuffle:
            # One generator per (seed, epoch): the partition order, then every chunk's shuffle in read order,
            # so epoch k is the same whether the run started at epoch 0 or resumed at k (first_epoch).
            self._rng = np.random.default_rng([self.seed, self._epoch])
            order = self._rng.permutation(len(self._partitions))
            self._merlin.indices = self._partitions[order]
            self._queue.itr.indices = self._merlin._indices_for_process()  # what the reader thread iterates
        self._merlin.__iter__()
        self._next_index = self._pulled = 0
        self._head = []

    def _format(self, batch):
        raw, labels = batch
        features = {}
        for name in self.feature_names:
            if name in self.list_widths:
                values, offsets = raw[f"{name}__values"], raw[f"{name}__offsets"]
                ragged = tf.RaggedTensor.from_row_splits(
                    tf.reshape(values, [-1]), tf.cast(tf.reshape(offsets, [-1]), tf.int64), validate=False
                )
                features[name] = ragged.to_tensor(default_value=PAD_ID, shape=[None, self.list_widths[name]])
            else:
                features[name] = tf.reshape(raw[name], [-1, 1])
            if features[name].dtype == tf.float64:
                # Keras computes in float32; TE / Normalize outputs may be stored as float64.
                features[name] = tf.cast(features[name], tf.float32)
        if not self.target_names:
            return features
        if len(self.target_names) == 1:
            return features, tf.reshape(tf.cast(labels, tf.float32), [-1, 1])
        return features, {k: tf.reshape(tf.cast(labels[k], tf.float32), [-1, 1]) for k in self.target_names}

    def stop(self) -> None:
        """Stop the background reader thread."""
        self._merlin.stop()


def _paths(dataset: Dataset) -> str:
    paths = getattr(dataset.engine, "paths", None) or []
    return ", ".join(map(str, paths[:3])) or "the dataset"

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

Three ways to the same batches. When the split fits comfortably in memory (its size from the parquet
footers against the memory available, see ``choose_mode``), the Loader reads it once, through merlin's
own partition iterator, into host arrays (list columns padded, continuous columns float32) and replays
merlin's chunking with numpy: the same part order, the same per-chunk ``DataFrame.sample`` draws
(``RandomState(draw).choice(n, n, replace=False)``, which is what pandas computes), the same leftover
carried to the next chunk and the same final partial batch. ``Model.fit`` / ``evaluate`` / ``predict``
then feed it as a ``tf.data`` pipeline that gathers each batch's rows in graph mode
(``Loader.tf_dataset``), with no per-batch Python. Larger-than-memory data on the CPU streams the same
way one chunk at a time (``"stream"``): each chunk's partitions are read through merlin's partition
iterator into host arrays when the pass reaches them, shuffled with the same draws and cut into the same
batches, so only a chunk (plus the leftover) is held; measured at ML-25M size (issue 15, benchmarks/
train_step.py) it delivers several times merlin.dataloader's rows/s, whose reader thread builds every
batch's tensors in Python. Data on a GPU (cudf) streams through merlin.dataloader (``"merlin"``), which
keeps it on the device. ``mode="memory" | "stream" | "merlin" | "auto"`` (or the environment variable
``PIPELINE_LOADER``) forces one; the choice is logged.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Callable, Iterable, Sequence

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
# How the Loader reads: "auto" (in memory when the split fits, else streamed), "memory", "stream" (host arrays
# one chunk at a time) or "merlin" (merlin.dataloader's reader thread and tensors; the GPU's streaming path).
MODES = ("auto", "memory", "stream", "merlin")
MODE_ENV = "PIPELINE_LOADER"  # overrides "auto"; an explicit mode= argument overrides it
# "auto" holds a split in memory when its arrays, with room for the read, take at most this share of
# the memory available now (MemAvailable): other processes and the model keep the rest.
MEMORY_FRACTION = 0.25
# ... and never above this size, whatever is free: past it the data streams (issue 15: 20M training rows
# needed 3.4 GiB, within a quarter of 21 GiB free, and would have held the train process above 4 GB).
MEMORY_MAX_BYTES = 2 << 30


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


def available_memory() -> int | None:
    """Bytes of memory available to new allocations now (Linux MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def parquet_uncompressed_bytes(dataset: Dataset, columns: Iterable[str]) -> int | None:
    """Uncompressed size of ``columns`` in the dataset's parquet files, from their footers (no data read)."""
    import pyarrow.parquet as pq

    if "parquet" not in type(dataset.engine).__name__.lower():
        return None
    fs = getattr(dataset.engine, "fs", None)
    wanted, total = set(columns), 0
    try:
        files = []
        for path in getattr(dataset.engine, "paths", None) or []:
            if fs is not None and fs.isdir(path):
                files += sorted(f for f in fs.find(path) if f.endswith(".parquet"))
            else:
                files.append(path)
        if not files:
            return None
        for path in files:
            if fs is not None:
                with fs.open(path, "rb") as f:
                    meta = pq.ParquetFile(f).metadata
            else:
                meta = pq.ParquetFile(path).metadata
            for g in range(meta.num_row_groups):
                group = meta.row_group(g)
                for c in range(group.num_columns):
                    chunk = group.column(c)
                    if chunk.path_in_schema.split(".")[0] in wanted:
                        total += chunk.total_uncompressed_size
    except (OSError, TypeError, ValueError):
        return None
    return total


def choose_mode(dataset: Dataset, mode: str | None, *, rows: int, row_bytes: int, columns: Iterable[str]) -> tuple[str, str]:
    """``("memory" | "stream", why)`` for a Loader over ``dataset``.

    ``mode`` (else ``$PIPELINE_LOADER``, else ``"auto"``): "memory", "stream" and "merlin" are obeyed; "auto"
    streams data that merlin reads on a GPU through merlin.dataloader, and otherwise holds the split in memory
    (else streams it chunk by chunk) when its host arrays
    (``rows * row_bytes``), twice over while they are built, plus the parquet data uncompressed (the
    read) take at most ``MEMORY_FRACTION`` of the memory available.
    """
    source = "mode="
    if mode is None:
        mode, source = os.environ.get(MODE_ENV) or "auto", f"${MODE_ENV}="
    mode = mode.strip().lower()
    if mode not in MODES:
        raise DataError(f"loader mode must be one of {', '.join(MODES)}, got {source}{mode!r}")
    if mode != "auto":
        return mode, f"{source}{mode}"
    if not getattr(dataset, "cpu", True):
        return "merlin", "the data is on the GPU (cudf): merlin.dataloader streams it"
    parquet = parquet_uncompressed_bytes(dataset, columns)
    if parquet is None:
        return "stream", "not a parquet dataset: its size is unknown"
    needed = 2 * rows * row_bytes + parquet
    available = available_memory()
    if available is None:
        return "stream", "the available memory is unknown"
    limit = min(MEMORY_FRACTION * available, MEMORY_MAX_BYTES)
    verdict = "memory" if needed <= limit else "stream"
    return verdict, (f"needs ~{needed / 2**20:,.0f} MiB, {MEMORY_FRACTION:.0%} of the {available / 2**20:,.0f} MiB "
                     f"available is {MEMORY_FRACTION * available / 2**20:,.0f} MiB, the cap "
                     f"{MEMORY_MAX_BYTES / 2**20:,.0f} MiB")


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
        mode: ``"memory"`` (read the split once into host arrays), ``"stream"`` (read each pass chunk by
            chunk into host arrays), ``"merlin"`` (merlin.dataloader reads parquet every pass) or ``"auto"``;
            default ``$PIPELINE_LOADER`` or ``"auto"`` (see ``choose_mode``). All give the same batches.

    Each item is ``(features, targets)`` (or ``features``): features maps a column name to a
    ``(batch, 1)`` tensor, or ``(batch, max_len)`` for list columns.

    Example:
        >>> from merlin.io import Dataset
        >>> loader = Loader(Dataset("data/synthetic/etl/train", engine="parquet"), 1024, shuffle=True)  # doctest: +SKIP
        >>> features, targets = loader[0]  # doctest: +SKIP
        >>> features["userId"].shape, targets["rating_binary"].shape  # doctest: +SKIP
        (TensorShape([1024, 1]), TensorShape([1024, 1]))
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
        mode: str | None = None,
    ):
        super().__init__(workers=1, use_multiprocessing=False)
        if batch_size < 1:
            raise DataError(f"batch size must be positive, got {batch_size}")
        if parts_per_chunk < 1:
            raise DataError(f"parts_per_chunk must be positive, got {parts_per_chunk}")
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
        self.drop_last = bool(drop_last)
        self.parts_per_chunk = int(parts_per_chunk)
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
        row_bytes = 4 * sum(self.list_widths.get(n, 1) for n in [*self.feature_names, *self.target_names])
        self.mode, why = choose_mode(dataset, mode, rows=self.num_rows, row_bytes=row_bytes,
                                     columns=loader_schema.column_names)
        logger.info("loader over %s (%s rows): %s (%s)", _paths(dataset), f"{self.num_rows:,}", {
            "memory": "in memory", "stream": "streamed chunk by chunk", "merlin": "streamed by merlin.dataloader"
        }[self.mode], why)
        self._merlin = None
        self._rng = None  # this pass's generator (merlin), set by _restart
        self._order = None  # this pass's row order (in memory), set by _restart
        self._batches = None  # this pass's batch iterator (stream), set by _restart
        self._stream_spec = None  # tf_dataset()'s element spec (stream), from the first partition
        if self.mode == "merlin":
            self._start_merlin(dataset)
        elif self.in_memory:
            self._read_arrays(dataset)
        else:
            self._dataset = dataset
            self._partitions = np.arange(dataset.to_ddf().npartitions)
            self._num_batches = self._count_batches()
        self._next_index = self._pulled = 0  # next batch index asked for / batches read in this pass
        self._head: list = []  # the first batches of this pass, kept for a replay
        self._tensors = None  # the arrays as TF tensors, made by the first tf_dataset()
        self._pass_epoch = None  # the epoch tf_dataset() iterators read (set by Model.fit every epoch)

    @property
    def in_memory(self) -> bool:
        return self.mode == "memory"

    # ----------------------------------------------------------------- streaming (merlin.dataloader)
    def _start_merlin(self, dataset: Dataset) -> None:
        from merlin.dataloader.tensorflow import Loader as MerlinLoader

        # merlin shuffles with numpy's global generator, from its reader thread: any other draw from
        # that generator meanwhile (another loader, another library) changes the order. We keep its
        # reading, chunking and tensor building but shuffle with a generator of our own per pass.
        self._merlin = MerlinLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=False,
            parts_per_chunk=self.parts_per_chunk,
            drop_last=self.drop_last,
        )
        # Partition order as a host array (merlin keeps a cupy one on GPU; it only slices and lists it).
        self._partitions = np.asarray(self._merlin.indices.tolist())
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
        if self.shuffle:
            split = self._queue.get_batch_div_chunk

            def shuffled_split(frame, batch_size):
                # Called from merlin's reader thread with each chunk (the last chunk's leftover rows first),
                # before it is cut into whole batches + leftover: shuffle first, so the leftover is random rows.
                return split(frame.sample(frac=1.0, random_state=int(self._rng.integers(2**32))), batch_size)

            self._queue.get_batch_div_chunk = shuffled_split

    # ----------------------------------------------------------------- in memory
    def _read_arrays(self, dataset: Dataset) -> None:
        """Read every partition once, through merlin's own partition iterator (so partitions are exactly
        the ones the streaming path reads), into one host array per column."""
        npart = dataset.to_ddf().npartitions
        self._partitions = np.arange(npart)
        self._arrays, lengths = self._read_parts(dataset, list(range(npart)))
        self._part_bounds = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        if int(self._part_bounds[-1]) != self.num_rows:
            raise DataError(f"read {int(self._part_bounds[-1])} rows from {_paths(dataset)}, its footers say {self.num_rows}")
        self._num_batches = self._count_batches()

    def _count_batches(self) -> int:
        # every batch is whole but the last: the leftover of each chunk is carried into the next one
        full, rest = divmod(self.num_rows, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def _read_parts(self, dataset: Dataset, parts: list[int]) -> tuple[dict[str, np.ndarray], list[int]]:
        """Partitions ``parts`` (in that order) as one host array per column, ``(rows, 1)`` or ``(rows, width)``
        for list columns, and each partition's row count."""
        columns: dict[str, list] = {name: [] for name in [*self.feature_names, *self.target_names]}
        lengths = []
        for frame in dataset.to_iter(columns=dataset.schema.column_names, indices=list(parts)):
            if hasattr(frame, "to_pandas"):  # cudf (mode="memory" forced on a GPU): the arrays live on the host
                frame = frame.to_pandas()
            lengths.append(len(frame))
            for name in self.feature_names:
                if name in self.list_widths:
                    columns[name].append(_padded(frame[name], self.list_widths[name]))
                else:
                    values = frame[name].to_numpy()
                    if values.dtype == np.float64:
                        values = values.astype(np.float32)
                    columns[name].append(values.reshape(-1, 1))
            for name in self.target_names:
                columns[name].append(frame[name].to_numpy().astype(np.float32).reshape(-1, 1))
        return {name: np.concatenate(arrays) for name, arrays in columns.items()}, lengths

    def _stream_batches(self, epoch: int):
        """One pass of ``epoch`` as batches of host arrays ``{column: array}`` (see ``_stream_chunks``)."""
        for chunk in self._stream_chunks(epoch):
            rows = len(next(iter(chunk.values())))
            for i in range(0, rows, self.batch_size):
                yield {name: array[i : i + self.batch_size] for name, array in chunk.items()}

    def _stream_chunks(self, epoch: int):
        """One pass of ``epoch``, reading one chunk of partitions at a time: each chunk's whole batches as host
        arrays ``{column: array}`` (rows a multiple of the batch size), then the final partial batch. The
        batches (and draws) of ``epoch_order``, which replays merlin's chunking."""
        bs = self.batch_size
        rng = np.random.default_rng([self.seed, int(epoch)]) if self.shuffle else None
        parts = self._partitions[rng.permutation(len(self._partitions))] if self.shuffle else self._partitions
        spill: dict[str, np.ndarray] | None = None
        for start in range(0, len(parts), self.parts_per_chunk):
            chunk, _ = self._read_parts(self._dataset, [int(p) for p in parts[start : start + self.parts_per_chunk]])
            if spill is not None:
                chunk = {name: np.concatenate([spill[name], array]) for name, array in chunk.items()}
            rows = len(next(iter(chunk.values())))
            if self.shuffle:  # pandas' DataFrame.sample(frac=1.0, random_state=draw) on the chunk
                order = np.random.RandomState(int(rng.integers(2**32))).choice(rows, rows, replace=False)
                chunk = {name: array[order] for name, array in chunk.items()}
            cut = rows // bs * bs
            if cut:
                yield {name: array[:cut] for name, array in chunk.items()}
            spill = {name: array[cut:] for name, array in chunk.items()}
        if spill is not None and len(next(iter(spill.values()))) and not self.drop_last:
            yield spill

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The row numbers (in partition order) of one pass, batch after batch: the order merlin's
        ChunkQueue emits them in, with our per-pass shuffle."""
        bs = self.batch_size
        if not self.shuffle:
            order = np.arange(self.num_rows, dtype=np.int64)
            return order[: len(order) // bs * bs] if self.drop_last else order
        rng = np.random.default_rng([self.seed, int(epoch)])
        parts = self._partitions[rng.permutation(len(self._partitions))]
        bounds = self._part_bounds
        out, spill = [], np.zeros(0, dtype=np.int64)
        for start in range(0, len(parts), self.parts_per_chunk):
            group = parts[start : start + self.parts_per_chunk]
            rows = np.concatenate([spill, *(np.arange(bounds[p], bounds[p + 1], dtype=np.int64) for p in group)])
            # pandas' DataFrame.sample(frac=1.0, random_state=draw) on the chunk
            rows = rows[np.random.RandomState(int(rng.integers(2**32))).choice(len(rows), len(rows), replace=False)]
            cut = len(rows) // bs * bs
            out.append(rows[:cut])
            spill = rows[cut:]
        if not self.drop_last:
            out.append(spill)
        return np.concatenate(out)

    def _gather_numpy(self, rows: np.ndarray):
        return self._pack({name: tf.convert_to_tensor(array[rows]) for name, array in self._arrays.items()})

    def _pack(self, columns: dict):
        features = {name: columns[name] for name in self.feature_names}
        if not self.target_names:
            return features
        if len(self.target_names) == 1:
            return features, columns[self.target_names[0]]
        return features, {name: columns[name] for name in self.target_names}

    @property
    def has_tf_dataset(self) -> bool:
        """True when ``tf_dataset()`` can feed this loader (modes "memory" and "stream")."""
        return self.mode in ("memory", "stream")

    def tf_dataset(self, epoch: Callable[[], int] | None = None) -> "tf.data.Dataset":
        """The batches as a ``tf.data.Dataset`` (one pass per iterator). In memory, the pass's row order comes
        from numpy once per iterator and each batch's rows are gathered in graph mode; streamed, each chunk's
        arrays come from numpy (read when the pass reaches them, in tf.data's thread) and are sliced into
        batches in graph mode.

        ``epoch()`` gives the epoch an iterator reads when it starts (default: the epoch the next pass of
        ``self[0]`` would read); ``Model.fit`` sets it from Keras' epoch number.
        """
        if not self.has_tf_dataset:
            raise ValueError("tf_dataset() needs the in-memory or streamed loader (mode='memory' or 'stream')")
        if self.mode == "stream":
            return self._stream_tf_dataset(epoch or self.next_epoch)
        if self._tensors is None:
            self._tensors = {name: tf.constant(array) for name, array in self._arrays.items()}
        tensors, bs, num_batches = self._tensors, self.batch_size, self._num_batches
        epoch = epoch or self.next_epoch

        def orders():
            yield self.epoch_order(epoch())

        def batches(order):
            return tf.data.Dataset.range(num_batches).map(lambda i: order[i * bs : (i + 1) * bs])

        def gather(rows):
            return self._pack({name: tf.gather(t, rows) for name, t in tensors.items()})

        ds = tf.data.Dataset.from_generator(orders, output_signature=tf.TensorSpec([None], tf.int64))
        ds = ds.flat_map(batches).map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.apply(tf.data.experimental.assert_cardinality(num_batches)).prefetch(tf.data.AUTOTUNE)

    def _stream_tf_dataset(self, epoch: Callable[[], int]) -> "tf.data.Dataset":
        if self._stream_spec is None:  # dtypes and widths, from the first partition
            first, _ = self._read_parts(self._dataset, [int(self._partitions[0])])
            self._stream_spec = {name: tf.TensorSpec((None, *a.shape[1:]), tf.as_dtype(a.dtype)) for name, a in first.items()}
        bs, num_batches = self.batch_size, self._num_batches

        def chunks():
            yield from self._stream_chunks(epoch())

        def batches(chunk):
            rows = tf.shape(next(iter(chunk.values())), out_type=tf.int64)[0]
            slices = tf.data.Dataset.range((rows + bs - 1) // bs)
            return slices.map(lambda i: self._pack({name: a[i * bs : (i + 1) * bs] for name, a in chunk.items()}))

        ds = tf.data.Dataset.from_generator(chunks, output_signature=self._stream_spec)
        ds = ds.prefetch(1).flat_map(batches)  # the next chunk is read while this one's batches train
        return ds.apply(tf.data.experimental.assert_cardinality(num_batches)).prefetch(tf.data.AUTOTUNE)

    def next_epoch(self) -> int:
        """The epoch a new pass reads: the next one after a complete pass, else the current one again."""
        return self._epoch + 1 if self._pulled >= self._num_batches else self._epoch

    def _passes_done(self, last_epoch: int) -> None:
        """Record that ``last_epoch`` was read to the end outside ``__getitem__`` (by a tf_dataset)."""
        self._epoch = int(last_epoch)
        self._pulled = self._next_index = self._num_batches
        self._head = []

    # ----------------------------------------------------------------- PyDataset
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
            if self.in_memory:
                batch = self._gather_numpy(self._order[index * self.batch_size : (index + 1) * self.batch_size])
            elif self.mode == "stream":
                batch = self._pack({name: tf.convert_to_tensor(array) for name, array in next(self._batches).items()})
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
        if self.in_memory:
            self._order = self.epoch_order(self._epoch)
        elif self.mode == "stream":
            self._batches = self._stream_batches(self._epoch)
        else:
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
        """Stop merlin.dataloader's background reader thread (nothing to stop in the other modes)."""
        if self._merlin is not None:
            self._merlin.stop()


def _padded(series, width: int) -> np.ndarray:
    """A list column as a ``(rows, width)`` array padded with ``PAD_ID`` (longer lists cut at ``width``)."""
    lengths = series.map(len).to_numpy().astype(np.int64) if len(series) else np.zeros(0, np.int64)
    values = np.concatenate([np.asarray(v) for v in series]) if len(series) and lengths.sum() else np.zeros(0, np.int32)
    dtype = values.dtype if values.size else np.dtype(np.int32)
    out = np.full((len(series), width), PAD_ID, dtype=dtype)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(series) else np.zeros(0, np.int64)
    row = np.repeat(np.arange(len(series)), lengths)
    position = np.arange(len(values)) - np.repeat(starts, lengths)
    keep = position < width
    out[row[keep], position[keep]] = values[keep]
    return out


def _paths(dataset: Dataset) -> str:
    paths = getattr(dataset.engine, "paths", None) or []
    return ", ".join(map(str, paths[:3])) or "the dataset"

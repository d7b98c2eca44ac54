"""The Keras 3 Loader (in memory, streamed chunk by chunk, or over merlin's dataloader) on the real ETL output
(parquet + schema.pbtxt)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import pipeline  # noqa: F401
from pipeline.errors import DataError


@pytest.fixture(scope="module")
def valid(etl_dir):
    from merlin.io import Dataset

    return Dataset(str(etl_dir / "valid"), engine="parquet")


@pytest.fixture(scope="module")
def valid_frame(etl_dir) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in sorted((etl_dir / "valid").glob("*.parquet"))], ignore_index=True)


def epoch_rows(loader, *columns) -> list[tuple]:
    """Every (column values...) row of one epoch, in the order the loader produced them."""
    rows = []
    for index in range(len(loader)):
        features, _ = loader[index]
        rows.extend(zip(*(features[c].numpy()[:, 0].tolist() for c in columns)))
    return rows


def test_one_epoch_yields_every_row_once_in_fixed_size_batches(valid, valid_frame):
    from pipeline.loader import Loader

    loader = Loader(valid, 1000, shuffle=True, seed=0)
    assert len(loader) == -(-len(valid_frame) // 1000)
    features, targets = loader[0]
    assert features["userId"].shape == (1000, 1)
    assert set(targets) == {"rating_binary", "rating"}  # both TARGET-tagged columns, by tag
    assert "rating" not in features and "rating_binary" not in features

    seen = sorted(epoch_rows(loader, "userId", "movieId"))
    expected = sorted(zip(valid_frame["userId"].tolist(), valid_frame["movieId"].tolist()))
    assert seen == expected


def test_reshuffles_every_epoch_and_the_seed_fixes_the_order(valid):
    from pipeline.loader import Loader

    loader = Loader(valid, 512, shuffle=True, seed=7)
    first = epoch_rows(loader, "userId", "movieId")
    second = epoch_rows(loader, "userId", "movieId")  # a complete pass: the next one is a new epoch
    assert first != second and sorted(first) == sorted(second)

    again = Loader(valid, 512, shuffle=True, seed=7)
    assert epoch_rows(again, "userId", "movieId") == first
    other_seed = Loader(valid, 512, shuffle=True, seed=8)
    assert epoch_rows(other_seed, "userId", "movieId") != first


# Five parquet parts of uneven sizes; 5,503 rows is 21 batches of 256 and a final batch of 127.
PART_ROWS = (1000, 1300, 900, 1100, 1203)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A dataset of several parquet parts: each row's number (0 .. 5,502, in file order) and its part."""
    from merlin.io import Dataset

    folder = tmp_path_factory.mktemp("parts")
    start = 0
    for part, rows in enumerate(PART_ROWS):
        frame = pd.DataFrame({"row": np.arange(start, start + rows), "part": np.full(rows, part)})
        frame.to_parquet(folder / f"part_{part}.parquet", index=False)
        start += rows
    return Dataset(str(folder), engine="parquet")


def epoch_batches(loader) -> list[list[int]]:
    """The row numbers of every batch of one pass, in the order the loader produced them."""
    return [loader[index]["row"].numpy()[:, 0].tolist() for index in range(len(loader))]


def part_order(batches) -> list[int]:
    """The order the pass read the parts in: each part's first appearance in the batch stream."""
    part_of = np.repeat(np.arange(len(PART_ROWS)), PART_ROWS)
    return list(dict.fromkeys(int(part_of[row]) for batch in batches for row in batch))


def test_every_epoch_reads_the_parts_in_a_new_order_and_ends_on_other_rows(parts):
    from pipeline.loader import Loader

    n_rows = sum(PART_ROWS)
    assert parts.npartitions == len(PART_ROWS) and n_rows % 256 == 127
    loader = Loader(parts, 256, shuffle=True, seed=0, targets=[])
    epochs = [epoch_batches(loader) for _ in range(3)]
    for batches in epochs:
        assert [len(batch) for batch in batches] == [256] * 21 + [127]
        assert sorted(row for batch in batches for row in batch) == list(range(n_rows))  # each row once
    orders = [part_order(batches) for batches in epochs]
    assert len({tuple(order) for order in orders}) == 3, orders  # a new part order every epoch
    assert len({frozenset(batches[-1]) for batches in epochs}) == 3  # and other rows in the last batch

    # Deterministic: the same seed gives the same batches, and a run resumed at epoch 2 gets epoch 2's.
    assert epoch_batches(Loader(parts, 256, shuffle=True, seed=0, targets=[])) == epochs[0]
    resumed = Loader(parts, 256, shuffle=True, seed=0, targets=[], first_epoch=2)
    assert epoch_batches(resumed) == epochs[2]
    assert epoch_batches(Loader(parts, 256, shuffle=True, seed=1, targets=[])) != epochs[0]


def test_unshuffled_parts_are_read_in_file_order(parts):
    from pipeline.loader import Loader

    loader = Loader(parts, 256, shuffle=False, targets=[])
    for _ in range(2):
        assert [row for batch in epoch_batches(loader) for row in batch] == list(range(sum(PART_ROWS)))


def test_unshuffled_order_is_the_file_order(valid, valid_frame):
    from pipeline.loader import Loader

    loader = Loader(valid, 999, shuffle=False)
    assert epoch_rows(loader, "userId", "movieId") == list(zip(valid_frame["userId"], valid_frame["movieId"]))


def test_list_column_is_padded_to_the_schema_width_with_zeros(valid, valid_frame):
    from pipeline.loader import Loader

    loader = Loader(valid, 256, shuffle=False, targets=["rating_binary"])
    width = loader.list_widths["genres"]
    assert width >= max(len(g) for g in valid_frame["genres"])
    features, target = loader[0]
    assert features["genres"].shape == (256, width)
    for row, genres in zip(features["genres"].numpy(), valid_frame["genres"][:256]):
        assert row.tolist() == list(genres) + [0] * (width - len(genres))
    # one named target -> a (batch, 1) float tensor with the column's values
    np.testing.assert_array_equal(target.numpy()[:, 0], valid_frame["rating_binary"][:256].to_numpy(np.float32))


def test_features_only_for_prediction(valid):
    from pipeline.loader import Loader

    loader = Loader(valid, 128, include_targets=False, features=["userId", "TE_movieId_rating"])
    batch = loader[0]
    assert set(batch) == {"userId", "TE_movieId_rating"}
    assert batch["TE_movieId_rating"].dtype.name == "float32"


def test_a_plain_keras_model_trains_on_the_loader(valid):
    import keras

    from pipeline.loader import Loader

    loader = Loader(valid, 1024, shuffle=True, features=["TE_movieId_rating", "TE_userId_rating"],
                    targets=["rating_binary"])
    inputs = {name: keras.Input((1,), name=name) for name in loader.feature_names}
    hidden = keras.layers.Concatenate()([inputs[n] for n in loader.feature_names])
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(hidden))
    model.compile("adam", "binary_crossentropy")
    # The loader shuffles itself; Keras must ask for batches in order.
    history = model.fit(loader, epochs=2, shuffle=False, verbose=0)
    assert len(history.history["loss"]) == 2
    assert history.history["loss"][1] < history.history["loss"][0]


def test_a_missing_column_is_named_in_the_error(valid):
    from pipeline.loader import Loader

    with pytest.raises(DataError, match="no_such_column"):
        Loader(valid, 16, features=["userId", "no_such_column"])


# ----------------------------------------------------------------- in memory vs streamed
def batch_arrays(batch) -> dict:
    """One batch as {name: (dtype, numpy array)} over features and targets."""
    features, targets = batch if isinstance(batch, tuple) else (batch, {})
    targets = targets if isinstance(targets, dict) else {"__target__": targets}
    return {name: (t.dtype, np.asarray(t)) for name, t in {**features, **targets}.items()}


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        x, y = batch_arrays(x), batch_arrays(y)
        assert x.keys() == y.keys(), i
        for name in x:
            assert x[name][0] == y[name][0], (i, name, x[name][0], y[name][0])
            np.testing.assert_array_equal(x[name][1], y[name][1], err_msg=f"batch {i}, column {name}")


@pytest.mark.parametrize("parts_per_chunk, drop_last", [(1, False), (2, False), (2, True)])
def test_in_memory_and_streamed_give_the_same_batches_every_epoch(parts, parts_per_chunk, drop_last):
    from pipeline.loader import Loader

    kwargs = dict(shuffle=True, seed=11, targets=[], parts_per_chunk=parts_per_chunk, drop_last=drop_last)
    stream = Loader(parts, 256, mode="stream", **kwargs)
    memory = Loader(parts, 256, mode="memory", **kwargs)
    merlin = Loader(parts, 256, mode="merlin", **kwargs)
    assert (stream.mode, memory.mode, merlin.mode) == ("stream", "memory", "merlin")
    assert len(stream) == len(memory) == len(merlin)
    for epoch in range(4):
        streamed = [stream[i] for i in range(len(stream))]
        in_memory = [memory[i] for i in range(len(memory))]
        assert_same_batches(streamed, in_memory)
        assert_same_batches([merlin[i] for i in range(len(merlin))], in_memory)
        # the tf.data pipelines Model.fit reads give that epoch's batches too
        assert_same_batches(streamed, list(memory.tf_dataset(lambda epoch=epoch: epoch)))
        assert_same_batches(streamed, list(stream.tf_dataset(lambda epoch=epoch: epoch)))
        rows = [row for batch in in_memory for row in batch["row"].numpy()[:, 0]]
        if not drop_last:
            assert sorted(rows) == list(range(sum(PART_ROWS)))  # every row once
    # resume-safe: a loader starting at epoch 3 reads epoch 3
    resumed = Loader(parts, 256, mode="memory", first_epoch=3, **kwargs)
    assert_same_batches([resumed[i] for i in range(len(resumed))], streamed)


def test_in_memory_matches_streamed_on_the_etl_output_with_lists_and_two_targets(etl_dir):
    from merlin.io import Dataset

    from pipeline.loader import Loader

    train = Dataset(str(etl_dir / "train"), engine="parquet")
    stream = Loader(train, 768, shuffle=True, seed=2, mode="stream")
    memory = Loader(train, 768, shuffle=True, seed=2, mode="memory")
    merlin = Loader(train, 768, shuffle=True, seed=2, mode="merlin")
    assert train.num_rows % 768 and "genres" in memory.list_widths
    for _ in range(2):
        in_memory = [memory[i] for i in range(len(memory))]
        assert_same_batches([stream[i] for i in range(len(stream))], in_memory)
        assert_same_batches([merlin[i] for i in range(len(merlin))], in_memory)
    unshuffled = [Loader(train, 999, mode=m, targets=["rating_binary"]) for m in ("stream", "memory", "merlin")]
    assert_same_batches(*[[lo[i] for i in range(len(lo))] for lo in unshuffled[:2]])
    assert_same_batches(*[[lo[i] for i in range(len(lo))] for lo in unshuffled[1:]])
    assert_same_batches([unshuffled[0][i] for i in range(len(unshuffled[0]))], list(unshuffled[1].tf_dataset()))


def test_the_mode_comes_from_the_argument_else_the_environment_else_the_size(parts, monkeypatch):
    from pipeline import loader as loader_module
    from pipeline.loader import Loader

    monkeypatch.setenv("PIPELINE_LOADER", "stream")
    assert Loader(parts, 256, targets=[]).mode == "stream"
    assert Loader(parts, 256, targets=[], mode="merlin").mode == "merlin"
    assert Loader(parts, 256, targets=[], mode="memory").mode == "memory"
    monkeypatch.setenv("PIPELINE_LOADER", "memory")
    assert Loader(parts, 256, targets=[]).mode == "memory"
    monkeypatch.delenv("PIPELINE_LOADER")
    assert Loader(parts, 256, targets=[]).mode == "memory"  # 5,503 small rows fit
    monkeypatch.setattr(loader_module, "available_memory", lambda: 100_000)  # 25 kB allowed: too small
    assert Loader(parts, 256, targets=[]).mode == "stream"
    monkeypatch.setenv("PIPELINE_LOADER", "fast")
    with pytest.raises(DataError, match="PIPELINE_LOADER"):
        Loader(parts, 256, targets=[])


def test_a_model_trains_to_the_same_weights_in_memory_and_streamed(etl_dir):
    """Model.fit feeds an in-memory or streamed Loader as tf.data, merlin's as a PyDataset; the batches, and so
    the weights, are the same."""
    import keras
    from merlin.io import Dataset

    import pipeline.models as mm

    train = Dataset(str(etl_dir / "train"), engine="parquet")
    valid = Dataset(str(etl_dir / "valid"), engine="parquet")
    results = {}
    for mode in ("stream", "memory", "merlin"):
        keras.utils.set_random_seed(0)
        model = mm.DLRMModel(train.schema, 8, prediction_tasks=mm.BinaryOutput("rating_binary"))
        model.compile("adam")
        loader = model.make_loader(train, 2048, shuffle=True, seed=4, mode=mode, first_epoch=1)
        history = model.fit(loader, epochs=3, initial_epoch=1, verbose=0,
                            validation_data=model.make_loader(valid, 4096, mode=mode))
        assert loader.next_epoch() == 3  # epochs 1 and 2 were read; the next pass is epoch 3
        scores = model.predict(model.make_loader(valid, 4096, include_targets=False, mode=mode), verbose=0)
        results[mode] = (history.history, [w.numpy() for w in model.weights], scores)
    for mode in ("stream", "merlin"):
        assert results[mode][0] == results["memory"][0]
        for a, b in zip(results[mode][1], results["memory"][1]):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(results[mode][2], results["memory"][2])

"""The Keras 3 Loader over merlin's dataloader, on the real ETL output (parquet + schema.pbtxt)."""

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

    loader = Loader(valid, 1024, shuffle=True, features=["TE_movieId_rating", "TE_userId_rating"], targets=["rating_binary"])
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

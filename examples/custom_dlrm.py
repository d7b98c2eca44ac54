"""Merlin Models' tutorial "Define your own architecture" (DLRM from blocks), line by line, on our API.

Usage::

    python examples/custom_dlrm.py ETL_DIR [--epochs 1] [--save custom_dlrm.keras]

ETL_DIR is the output of ``python -m pipeline etl`` (train/ and valid/ with schema.pbtxt), which has
the columns and tags of Merlin's ``get_movielens``. Each step prints what the tutorial's cell shows.

Differences from the tutorial, all deliberate:
- ``mm`` is ``pipeline.models`` (Keras 3) instead of ``merlin.models.tf`` (Keras 2).
- The prediction task is ``BinaryOutput`` (the tutorial's ``BinaryClassificationTask``), with the
  same ``LogitsTemperatureScaler(temperature=2)`` before the sigmoid.
- The interaction output is ``(5, 74)``: 64 (deep_continuous shortcut) + 10 dot products of the
  5 feature vectors, which is DLRM's interaction (keras_rs.layers.DotInteraction). The notebook's
  ``(5, 2080)`` came from an early Merlin Models interaction that took dot products across the
  embedding dimension (64 * 65 / 2) instead of across features.
- Keras 3 saves to a ``.keras`` file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pipeline  # noqa: F401  (dask settings before merlin)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("etl_dir", type=Path)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--save", type=Path, default=Path("custom_dlrm.keras"))
    args = parser.parse_args()

    import keras
    from merlin.io import Dataset
    from merlin.schema.tags import Tags

    import pipeline.models as mm

    keras.utils.set_random_seed(0)
    train = Dataset(str(args.etl_dir / "train"), engine="parquet")
    valid = Dataset(str(args.etl_dir / "valid"), engine="parquet")

    # The first five rows of the validation data as a batch of input tensors.
    batch = mm.sample_batch(valid, batch_size=5, shuffle=False)[0]
    print("batch['userId']:", tuple(batch["userId"].shape))

    # Inputs: a subset of the continuous and categorical features.
    sub_schema = train.schema.select_by_name(
        ["userId", "movieId", "title", "gender", "TE_zipcode_rating", "TE_movieId_rating", "rating_binary"]
    )
    continuous_block = mm.ContinuousFeatures.from_schema(sub_schema, tags=Tags.CONTINUOUS)
    print("continuous_block(batch):", {k: tuple(v.shape) for k, v in continuous_block(batch).items()})

    deep_continuous_block = continuous_block.connect(mm.MLPBlock([64]))
    print("deep_continuous_block(batch).shape:", tuple(deep_continuous_block(batch).shape))

    embedding_block = mm.EmbeddingFeatures.from_schema(sub_schema)
    embeddings = embedding_block(batch)
    print("embeddings:", list(embeddings.keys()), tuple(embeddings["userId"].shape))

    dlrm_input_block = mm.ParallelBlock({"embeddings": embedding_block, "deep_continuous": deep_continuous_block})
    print("Output shapes of DLRM input block:")
    for key, val in dlrm_input_block(batch).items():
        print("\t%s : %s" % (key, tuple(val.shape)))

    # The interaction: dot products between all feature vectors, next to the deep continuous vector.
    dlrm_interaction = dlrm_input_block.connect_with_shortcut(
        mm.DotProductInteractionBlock(), shortcut_filter=mm.Filter("deep_continuous"), aggregation="concat"
    )
    print("dlrm_interaction(batch).shape:", tuple(dlrm_interaction(batch).shape))

    deep_dlrm_interaction = dlrm_interaction.connect(mm.MLPBlock([64, 128, 512]))
    print("deep_dlrm_interaction(batch).shape:", tuple(deep_dlrm_interaction(batch).shape))

    # The prediction task, with the tutorial's temperature scaling of the logits.
    target_name = sub_schema.select_by_tag(Tags.TARGET).column_names[0]
    binary_task = mm.BinaryOutput(target_name, pre=mm.LogitsTemperatureScaler(temperature=2))

    model = mm.Model(deep_dlrm_interaction, binary_task)
    print("type(model):", type(model).__module__ + "." + type(model).__name__)

    model.compile(optimizer="adam", metrics=[keras.metrics.AUC(name="auc")])
    model.fit(train, batch_size=1024, epochs=args.epochs, verbose=2)

    metrics = model.evaluate(valid, batch_size=1024, return_dict=True, verbose=0)
    print("metrics:", {k: round(float(v), 4) for k, v in metrics.items()})

    model.save(args.save)
    print("saved:", args.save)


if __name__ == "__main__":
    main()

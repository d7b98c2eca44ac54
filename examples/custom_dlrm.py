"""Merlin Models' tutorial "Define your own architecture" (DLRM from blocks), line by line, on our API.

Usage::

    DATA_FOLDER=data python examples/custom_dlrm.py

As in the tutorial, ``get_movielens(variant="ml-1m", path=DATA_FOLDER)`` gives the train and valid
datasets: our ETL stage runs into ``DATA_FOLDER/ml-1m-etl`` on the raw files in ``DATA_FOLDER/ml-1m/``
(or ``ml-1m.zip``, else where ``python -m pipeline etl`` finds them), once; its output has the columns
and tags of Merlin's ``get_movielens``. Each step prints what the tutorial's cell shows, and the model
is saved as the tutorial saves it, to ``DATA_FOLDER/custom_dlrm`` (a directory: ``model.keras`` +
``saved_model/``, read back by ``pipeline.models.load_model``).

Differences from the tutorial, all deliberate:
- ``mm`` is ``pipeline.models`` (Keras 3) instead of ``merlin.models.tf`` (Keras 2), and
  ``get_movielens`` comes from ``pipeline.datasets`` instead of ``merlin.datasets.entertainment``.
- The prediction task is ``BinaryOutput`` (the tutorial's ``BinaryClassificationTask``), with the
  same ``LogitsTemperatureScaler(temperature=2)`` before the sigmoid.
- The interaction output is ``(5, 74)``: 64 (deep_continuous shortcut) + 10 dot products of the
  5 feature vectors, which is DLRM's interaction (keras_rs.layers.DotInteraction). The notebook's
  ``(5, 2080)`` came from an early Merlin Models interaction that took dot products across the
  embedding dimension (64 * 65 / 2) instead of across features.
"""

from __future__ import annotations

import os

import pipeline  # noqa: F401  (dask settings before merlin)


def main() -> None:
    import keras
    from merlin.schema.tags import Tags

    import pipeline.models as mm
    from pipeline.datasets import get_movielens

    DATA_FOLDER = os.environ.get("DATA_FOLDER", "data")
    keras.utils.set_random_seed(0)
    train, valid = get_movielens(variant="ml-1m", path=DATA_FOLDER)

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
    model.fit(train, batch_size=1024, epochs=1, verbose=2)

    metrics = model.evaluate(valid, batch_size=1024, return_dict=True, verbose=0)
    print("metrics:", {k: round(float(v), 4) for k, v in metrics.items()})

    model.save(os.path.join(DATA_FOLDER, "custom_dlrm"))
    reloaded = mm.load_model(os.path.join(DATA_FOLDER, "custom_dlrm"))
    print("saved:", os.path.join(DATA_FOLDER, "custom_dlrm"), "and reloaded:", type(reloaded).__name__)


if __name__ == "__main__":
    main()

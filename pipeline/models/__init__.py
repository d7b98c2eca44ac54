"""The block library: Merlin Models' "Define your own architecture" API on Keras 3.

Every layer is registered for Keras saving (package ``pipeline``), so a model saved with
``model.save("model.keras")`` loads with ``keras.saving.load_model`` and no custom_objects
(once ``pipeline.models`` is imported, which ``keras.saving`` does not do by itself: see
``pipeline.models.load_model``).
"""

import pipeline.optimizers  # noqa: F401  (registers RowSparseAdamW: a saved model's compile config names it)
from pipeline.models.aggregations import ConcatFeatures, CosineSimilarity, ElementwiseSum, StackFeatures
from pipeline.models.core import Block, Filter, Identity, ParallelBlock, ResidualBlock, SequentialBlock
from pipeline.models.dcn import DCNModel
from pipeline.models.deepfm import DeepFMModel
from pipeline.models.dlrm import DLRMModel
from pipeline.models.embedding import Embedding
from pipeline.models.features import (
    ContinuousFeatures,
    EmbeddingFeatures,
    InputBlock,
    SequenceEmbeddingFeatures,
)
from pipeline.models.interaction import CrossBlock, DotProductInteractionBlock, FMBlock
from pipeline.models.mlp import MLPBlock
from pipeline.models.mlp_model import MLPModel
from pipeline.models.model import Model, sample_batch
from pipeline.models.outputs import (
    BinaryOutput,
    CategoricalOutput,
    OutputBlock,
    RegressionOutput,
    heads_from,
    outputs_from_schema,
)
from pipeline.models.transforms import AsDenseFeatures, L2Norm, LogitsTemperatureScaler, ToDense
from pipeline.models.two_tower import InBatchAccidentalHits, TwoTower, TwoTowerModel
from pipeline.models.wide import WideBlock
from pipeline.models.wide_deep import WideAndDeepModel


def load_model(path):
    """Load a model saved with ``model.save(path)``: a ``.keras`` file, or the directory ``Model.save``
    writes for a path without an extension (its ``model.keras``). Importing this package registers every
    layer, so no custom_objects are needed; plain ``keras.saving.load_model`` needs ``import pipeline.models``
    first (Keras finds registered classes only in modules already imported)."""
    from pathlib import Path

    import keras

    from pipeline.models.model import SAVED_MODEL_FILE

    path = Path(path)
    return keras.saving.load_model(path / SAVED_MODEL_FILE if path.is_dir() else path)


__all__ = [
    "AsDenseFeatures", "BinaryOutput", "Block", "CategoricalOutput", "ConcatFeatures", "ContinuousFeatures",
    "CosineSimilarity", "CrossBlock", "DCNModel", "DLRMModel", "DeepFMModel", "DotProductInteractionBlock",
    "ElementwiseSum", "EmbeddingFeatures", "FMBlock", "Filter", "Identity", "Embedding", "InputBlock", "L2Norm",
    "LogitsTemperatureScaler", "MLPBlock", "MLPModel", "Model", "OutputBlock", "ParallelBlock", "RegressionOutput",
    "ResidualBlock", "SequenceEmbeddingFeatures", "SequentialBlock", "StackFeatures", "ToDense", "WideAndDeepModel",
    "WideBlock", "heads_from", "load_model", "outputs_from_schema", "sample_batch",
    "InBatchAccidentalHits", "TwoTower", "TwoTowerModel",
]

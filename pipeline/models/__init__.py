"""The block library: Merlin Models' "Define your own architecture" API on Keras 3.

Every layer is registered for Keras saving (package ``pipeline``), so a model saved with
``model.save("model.keras")`` loads with ``keras.saving.load_model`` and no custom_objects
(once ``pipeline.models`` is imported, which ``keras.saving`` does not do by itself: see
``pipeline.models.load_model``).
"""

from pipeline.models.aggregations import ConcatFeatures, CosineSimilarity, ElementwiseSum, StackFeatures
from pipeline.models.core import Block, Filter, Identity, ParallelBlock, ResidualBlock, SequentialBlock
from pipeline.models.dlrm import DLRMModel
from pipeline.models.features import (
    ContinuousFeatures,
    EmbeddingFeatures,
    InputBlock,
    SequenceEmbeddingFeatures,
)
from pipeline.models.interaction import CrossBlock, DotProductInteractionBlock
from pipeline.models.mlp import MLPBlock
from pipeline.models.model import Model, sample_batch
from pipeline.models.outputs import BinaryOutput, CategoricalOutput, OutputBlock, RegressionOutput, outputs_from_schema
from pipeline.models.transforms import AsDenseFeatures, L2Norm, LogitsTemperatureScaler, ToDense


def load_model(path):
    """Load a model saved with ``model.save(path)`` (a ``.keras`` file)."""
    import keras

    return keras.saving.load_model(path)


__all__ = [
    "AsDenseFeatures", "BinaryOutput", "Block", "CategoricalOutput", "ConcatFeatures", "ContinuousFeatures",
    "CosineSimilarity", "CrossBlock", "DLRMModel", "DotProductInteractionBlock", "ElementwiseSum",
    "EmbeddingFeatures", "Filter", "Identity", "InputBlock", "L2Norm", "LogitsTemperatureScaler", "MLPBlock",
    "Model", "OutputBlock", "ParallelBlock", "RegressionOutput", "ResidualBlock", "SequenceEmbeddingFeatures",
    "SequentialBlock", "StackFeatures", "ToDense", "load_model", "outputs_from_schema", "sample_batch",
]

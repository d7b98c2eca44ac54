"""An embedding table that reads the rows a batch asks for in place (issue 15).

``keras.layers.Embedding`` on the TensorFlow backend turns its table into a tensor before gathering
(``ops.take``). That is free until a sparse op touches the variable: from then on TensorFlow keeps the
variable in copy-on-read mode and every such read copies the whole table. ``pipeline.optimizers.RowSparseAdamW``
updates tables with sparse scatters, so with Keras' layer each step would copy every table (at ML-25M size
324k rows x 16, ~4 ms per large table per step on 2 cores, against ~0.3 ms for an in-place gather).

The class is named ``Embedding`` on purpose: Keras saves the layers of a container under their snake-cased
class name (``embedding``, ``embedding_1``, ...), so this name keeps the weights files of models saved with
``keras.layers.Embedding`` tables (every model before this layer) loadable.
"""

from __future__ import annotations

import keras
from keras import ops

from pipeline.models.core import register


@register
class Embedding(keras.layers.Embedding):
    """``keras.layers.Embedding`` (same arguments, weights and config) whose lookup is an in-place gather of
    the table's rows (``tf.Variable.sparse_read``) on the TensorFlow backend: ``ids (...)`` -> ``(..., dim)``.
    Other backends, LoRA and quantized tables take Keras' own lookup.

    Args:
        input_dim: rows of the table (the vocabulary, reserved ids included).
        output_dim: width of each row.
        **kwargs: any other ``keras.layers.Embedding`` argument (initializer, name, ...).

    Example:
        >>> layer = Embedding(10, 4)
        >>> tuple(layer(ops.convert_to_tensor([[1], [2]])).shape)
        (2, 1, 4)
    """

    def call(self, inputs):
        table = self.embeddings
        # a tf.Variable on TensorFlow; a tensor while Keras traces symbolically (stateless scope) or autocasts
        variable = table.value if isinstance(table, keras.Variable) and not self.quantization_mode else None
        if not hasattr(variable, "sparse_read"):
            return super().call(inputs)
        if inputs.dtype != "int32" and inputs.dtype != "int64":
            inputs = ops.cast(inputs, "int32")
        return ops.cast(variable.sparse_read(inputs), dtype=self.compute_dtype)

"""Two-tower retrieval (Yi et al. 2019, Merlin Models' ``TwoTowerModel``) built from a merlin Schema.

The query tower reads the USER-tagged columns (user id, demographics, their encodings), the candidate
tower the ITEM-tagged ones (movie id, title, genres as a list, the movie's encoding); each ends in an
L2 normalisation, so a user and a movie meet by cosine similarity. Training sees positive interactions
only and scores every query of a batch against every candidate of the batch (in-batch softmax), with
the logits divided by a temperature, corrected for how often each candidate is sampled as a negative
(logQ: frequent movies are in-batch negatives more often), and with accidental hits (the same movie
as the row's positive, at another position of the batch) masked out.

Popularity: with ``item_bias`` each movie has a learned bias added to its logits (the share of the score that
is the movie's alone, e.g. how often it is watched at all), and ``prior_weight`` blends the log of the movies'
training popularity into the retrieval score (picked on held-out training positives by
``pipeline.retrieval.fit_two_tower``). Both fold into one extra index dimension, so the catalog search stays
a dot product (``index_query_vectors`` / ``index_candidate_vectors``).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import keras
import numpy as np
from keras import ops
from merlin.schema import Schema, Tags

from pipeline.errors import DataError
from pipeline.models.core import Block, deserialize, input_feature_names, register, serialize
from pipeline.models.features import InputBlock, cardinality
from pipeline.models.mlp import MLPBlock
from pipeline.models.model import Model
from pipeline.models.transforms import L2Norm, LogitsTemperatureScaler

# The logit given to a masked accidental hit: exp() of it is 0 in float32, and it stays finite, so the
# softmax's gradient is never NaN.
MASKED_LOGIT = -1e9
# log P(movie) of a movie without training positives (the OOV code): below any movie with one, finite.
PRIOR_FLOOR = 1e-9


@register
class InBatchAccidentalHits(Block):
    """Masks accidental hits of an in-batch softmax: ``logits (batch, batch)``, ``ids (batch,)`` -> same logits
    with ``MASKED_LOGIT`` where column j's candidate is row i's positive (``ids[i] == ids[j]``) off the diagonal.

    keras_rs.layers.RemoveAccidentalHits (0.4.0) adds ``finfo.smallest_normal / 100`` (~1e-40) to those
    logits, which changes nothing in float32 (keras-team/keras-rs#206, open): the hits keep their full
    probability, so this layer does the masking.

    Args:
        logits: (call) ``(batch, batch)`` in-batch logits, row i's positive on the diagonal.
        ids: (call) ``(batch,)`` or ``(batch, 1)`` the candidate id of each column.

    Example:
        >>> out = InBatchAccidentalHits()(np.zeros((3, 3), "float32"), np.array([7, 7, 8]))
        >>> [float(x) for x in out[0]]
        [0.0, -1000000000.0, 0.0]
    """

    def call(self, logits, ids):
        ids = ops.reshape(ids, (-1,))
        same = ops.equal(ops.expand_dims(ids, 1), ops.expand_dims(ids, 0))
        hits = ops.logical_and(same, ops.logical_not(ops.cast(ops.eye(ops.shape(ids)[0]), "bool")))
        return ops.where(hits, ops.cast(MASKED_LOGIT, logits.dtype), logits)


@register
class TwoTower(Model):
    """A query tower and a candidate tower, each ``inputs -> (batch, dim)`` L2-normalised.

    ``model(inputs)`` scores the pairs of a batch, ``(batch, 1)`` (``predict`` / ``Predictor`` use it): the
    cosine similarity of the user's and the movie's vectors in [-1, 1]; with ``item_bias`` or a
    ``prior_weight``, the retrieval logit ``cosine / temperature + bias + prior_weight * log popularity``
    (what the item index ranks by). ``query_embeddings`` and
    ``candidate_embeddings`` give the vectors; ``fit`` minimises the in-batch softmax loss of
    ``in_batch_loss`` on batches of positive interactions (no targets: every row is a positive).

    Args:
        query_tower, candidate_tower: blocks ending in ``L2Norm`` (``TwoTowerModel`` builds them).
        item_id: the candidate id column (accidental hits, sampling probabilities).
        item_cardinality: rows of the id's embedding table (the sampling-probability table's size).
        temperature: the logits are ``cosine / temperature``.
        logq_correction: subtract ``log P(candidate in a batch)`` from the logits (``set_sampling_probabilities``).
        remove_accidental_hits: mask in-batch negatives that are the row's own positive movie.
        item_bias: learn a per-movie bias added to the logits (trained with the towers).
        prior_weight: the weight of ``log P(movie)`` (its share of the training positives) in the retrieval
            score; 0 leaves it out. Not trained: set after training (``fit_two_tower`` picks it).

    Example:
        >>> model = TwoTowerModel(schema, embedding_dim=8, tower_dims=[8])
        >>> tuple(model(batch).shape), tuple(model.in_batch_logits(batch).shape)
        ((5, 1), (5, 5))
    """

    def __init__(self, query_tower: keras.layers.Layer, candidate_tower: keras.layers.Layer, *, item_id: str,
                 item_cardinality: int, temperature: float = 0.05, logq_correction: bool = True,
                 remove_accidental_hits: bool = True, item_bias: bool = False, prior_weight: float = 0.0,
                 **kwargs):
        keras.Model.__init__(self, **kwargs)  # not Model.__init__: no prediction heads, the loss is in train_step
        self.heads = []
        self._input_spec_record = None
        self.query_tower = query_tower
        self.candidate_tower = candidate_tower
        self.item_id = item_id
        self.item_cardinality = int(item_cardinality)
        self.temperature = float(temperature)
        self.logq_correction = bool(logq_correction)
        self.remove_accidental_hits = bool(remove_accidental_hits)
        self.item_bias = bool(item_bias)
        self.prior_weight = float(prior_weight)
        self.scale = LogitsTemperatureScaler(self.temperature)
        self.hits = InBatchAccidentalHits()
        import keras_rs

        self.correction = keras_rs.layers.SamplingProbabilityCorrection()
        # P(a movie is a given in-batch candidate): its share of the training positives. A weight, so it is
        # saved with the model; uniform until set_sampling_probabilities.
        self.sampling_probability = self.add_weight(
            name="sampling_probability", shape=(self.item_cardinality,), trainable=False,
            initializer=keras.initializers.Constant(1.0 / self.item_cardinality))
        # per-movie logit bias (zero at the start: the towers alone, as without it)
        self.bias = self.add_weight(name="item_bias", shape=(self.item_cardinality,), initializer="zeros",
                                    trainable=True) if self.item_bias else None
        self.loss_tracker = keras.metrics.Mean(name="loss")

    # ----------------------------------------------------------------- structure
    @property
    def target_names(self) -> list[str]:
        return []  # trained on positives only: the loader yields features alone

    def input_feature_names(self) -> list[str]:
        return input_feature_names(self.query_tower) + [
            n for n in input_feature_names(self.candidate_tower) if n not in input_feature_names(self.query_tower)]

    def query_feature_names(self) -> list[str]:
        """The columns the query (user) tower reads."""
        return input_feature_names(self.query_tower)

    def candidate_feature_names(self) -> list[str]:
        """The columns the candidate (item) tower reads."""
        return input_feature_names(self.candidate_tower)

    def query_embeddings(self, inputs, training=None):
        """User vectors ``(batch, dim)``, unit norm."""
        return self.query_tower(inputs, training=training)

    def candidate_embeddings(self, inputs, training=None):
        """Movie vectors ``(batch, dim)``, unit norm."""
        return self.candidate_tower(inputs, training=training)

    def _record_inputs(self, inputs) -> None:
        # what get_build_config saves, so a reloaded model builds its weights (as Model.call does)
        if self._input_spec_record is None and isinstance(inputs, Mapping):
            self._input_spec_record = {
                name: ([None, *[int(d) for d in tensor.shape[1:]]], keras.backend.standardize_dtype(tensor.dtype))
                for name, tensor in inputs.items()
            }

    @property
    def extended(self) -> bool:
        """Whether the score has a per-movie term (bias or prior): the index vectors get one more dimension."""
        return self.item_bias or self.prior_weight != 0.0

    def log_prior(self, ids):
        """``log P(movie)`` ``(batch,)`` of encoded ids: their share of the training positives (the logQ table),
        floored at ``PRIOR_FLOOR`` for movies without positives."""
        probability = ops.take(self.sampling_probability, ops.reshape(ops.cast(ids, "int32"), (-1,)), axis=0)
        return ops.log(ops.maximum(probability, PRIOR_FLOOR))

    def item_term(self, ids):
        """The per-movie part of the retrieval score ``(batch,)``: bias + prior_weight * log prior."""
        ids = ops.reshape(ops.cast(ids, "int32"), (-1,))
        term = ops.zeros(ops.shape(ids), dtype="float32")
        if self.bias is not None:
            term = term + ops.take(self.bias, ids, axis=0)
        if self.prior_weight != 0.0:
            term = term + self.prior_weight * self.log_prior(ids)
        return term

    def index_query_vectors(self, inputs):
        """The query side of the item index ``(batch, dim [+ 1])``: ``[q / temperature, 1]`` when ``extended``,
        else ``q``; its dot product with ``index_candidate_vectors`` is the model's score."""
        query = self.query_embeddings(inputs)
        if not self.extended:
            return query
        return ops.concatenate([query / self.temperature, ops.ones((ops.shape(query)[0], 1), query.dtype)], axis=-1)

    def index_candidate_vectors(self, inputs):
        """The movie side of the item index ``(batch, dim [+ 1])``: ``[c, bias + prior_weight * log prior]``."""
        candidate = self.candidate_embeddings(inputs)
        if not self.extended:
            return candidate
        term = ops.expand_dims(ops.cast(self.item_term(inputs[self.item_id]), candidate.dtype), -1)
        return ops.concatenate([candidate, term], axis=-1)

    def call(self, inputs, training=None):
        self._record_inputs(inputs)
        query = self.query_embeddings(inputs, training=training)
        candidate = self.candidate_embeddings(inputs, training=training)
        cosine = ops.sum(query * candidate, axis=-1, keepdims=True)
        if not self.extended:
            return cosine
        return cosine / self.temperature + ops.expand_dims(ops.cast(self.item_term(inputs[self.item_id]), cosine.dtype), -1)

    # ----------------------------------------------------------------- the loss
    def set_sampling_probabilities(self, item_ids: np.ndarray) -> np.ndarray:
        """Set the logQ table from the item ids of every training positive (encoded ids, one per row).

        Returns the probabilities ``(item_cardinality,)``: each id's share of the rows (0 for ids never seen,
        which are then never in a batch either).
        """
        counts = np.bincount(np.asarray(item_ids, dtype=np.int64).ravel(), minlength=self.item_cardinality)
        if len(counts) > self.item_cardinality:
            raise DataError(f"item id {len(counts) - 1} is outside the {self.item_id!r} table "
                            f"({self.item_cardinality} rows)")
        probability = (counts / max(1, counts.sum())).astype("float32")
        self.sampling_probability.assign(probability)
        return probability

    def in_batch_logits(self, inputs, training=None):
        """``(batch, batch)`` logits: row i's query against every candidate of the batch (the diagonal holds
        the positives), scaled by the temperature, logQ-corrected and with accidental hits masked."""
        self._record_inputs(inputs)
        query = self.query_embeddings(inputs, training=training)
        candidate = self.candidate_embeddings(inputs, training=training)
        logits = self.scale(ops.matmul(query, ops.transpose(candidate)))
        ids = ops.reshape(ops.cast(inputs[self.item_id], "int32"), (-1,))
        if self.bias is not None:  # column j is candidate j: its bias on every row
            logits = logits + ops.expand_dims(ops.take(self.bias, ids, axis=0), 0)
        if self.logq_correction:
            probability = ops.take(self.sampling_probability, ids, axis=0)
            logits = self.correction(logits, ops.broadcast_to(ops.expand_dims(probability, 0), ops.shape(logits)))
        if self.remove_accidental_hits:
            logits = self.hits(logits, ids)
        return logits

    def in_batch_loss(self, inputs, training=None):
        """Mean softmax cross-entropy of each row's positive against the batch's other candidates."""
        logits = self.in_batch_logits(inputs, training=training)
        labels = ops.eye(ops.shape(logits)[0], dtype=logits.dtype)
        return ops.mean(keras.losses.categorical_crossentropy(labels, logits, from_logits=True))

    @staticmethod
    def _features(data):
        return data[0] if isinstance(data, (tuple, list)) else data

    def train_step(self, data):
        import tensorflow as tf

        x = self._features(data)
        with tf.GradientTape() as tape:
            loss = self.in_batch_loss(x, training=True)
            total = loss + ops.sum(self.losses) if self.losses else loss
        gradients = tape.gradient(total, self.trainable_weights)
        self.optimizer.apply(gradients, self.trainable_weights)
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result()}

    def test_step(self, data):
        self.loss_tracker.update_state(self.in_batch_loss(self._features(data), training=False))
        return {"loss": self.loss_tracker.result()}

    def fit(self, *args, **kwargs):
        """``Model.fit`` (a merlin Dataset or a ``Loader`` of positives); the model is built when it returns."""
        history = super().fit(*args, **kwargs)
        if not self.built and self._input_spec_record:
            # train_step calls the towers, never the model itself: one pair-scoring call builds it (for export)
            self.build_from_config({"input_spec": self._input_spec_record})
        return history

    @property
    def metrics(self):
        return [self.loss_tracker]

    def compile(self, optimizer="adam", **kwargs):
        """Keras ``compile`` with the in-batch loss of ``train_step`` (no loss or metrics to pass)."""
        from pipeline.models.model import STEPS_PER_EXECUTION

        kwargs.setdefault("steps_per_execution", STEPS_PER_EXECUTION)
        kwargs.pop("loss", None), kwargs.pop("metrics", None)
        return keras.Model.compile(self, optimizer=optimizer, **kwargs)

    # ----------------------------------------------------------------- saving
    def get_config(self) -> dict:
        return {
            "name": self.name,
            "query_tower": serialize(self.query_tower),
            "candidate_tower": serialize(self.candidate_tower),
            "item_id": self.item_id,
            "item_cardinality": self.item_cardinality,
            "temperature": self.temperature,
            "logq_correction": self.logq_correction,
            "remove_accidental_hits": self.remove_accidental_hits,
            "item_bias": self.item_bias,
            "prior_weight": self.prior_weight,
        }

    @classmethod
    def from_config(cls, config: dict):
        config = dict(config)
        query, candidate = deserialize(config.pop("query_tower")), deserialize(config.pop("candidate_tower"))
        return cls(query, candidate, **config)


def tower_schema(schema: Schema, tag) -> Schema:
    """The (non-target) input columns of ``schema`` tagged ``tag`` (``Tags.USER`` or ``Tags.ITEM``)."""
    return schema.select_by_tag(tag).excluding_by_tag(Tags.TARGET)


def TwoTowerModel(
    schema: Schema,
    query_tower: keras.layers.Layer | None = None,
    candidate_tower: keras.layers.Layer | None = None,
    *,
    embedding_dim: int = 64,
    tower_dims: Sequence[int] = (128, 64),
    temperature: float = 0.05,
    logq_correction: bool = True,
    remove_accidental_hits: bool = True,
    embeddings_l2: float = 0.0,
    item_bias: bool = False,
) -> TwoTower:
    """A two-tower retrieval model on ``schema``'s USER and ITEM columns.

    Each tower: the tagged columns' embeddings (``embedding_dim`` wide; list columns such as genres
    averaged) concatenated with their continuous columns -> ``query_tower`` / ``candidate_tower`` (default
    ``MLPBlock(tower_dims)``, last layer linear) -> ``L2Norm``. ``temperature``, ``logq_correction`` and
    ``remove_accidental_hits`` shape the in-batch softmax (see ``TwoTower``).

    Args:
        schema: a merlin Schema with USER, ITEM and ITEM_ID tags (the ETL's).
        query_tower, candidate_tower: the body of each tower after its inputs (default ``MLPBlock(tower_dims)``).
        embedding_dim: width of every embedding of both towers.
        tower_dims: the default towers' layer widths (the last is the vectors' width).
        temperature, logq_correction, remove_accidental_hits: the in-batch softmax (``TwoTower``).
        embeddings_l2: ``EmbeddingFeatures``' per-batch L2 penalty.
        item_bias: a learned per-movie logit bias (``TwoTower``).

    Returns a ``TwoTower`` (compile, then ``fit`` on positive interactions).

    Example:
        >>> model = TwoTowerModel(schema, embedding_dim=8, tower_dims=[16, 4])
        >>> model.compile(optimizer="adam")
        >>> tuple(model.query_embeddings(batch).shape), tuple(model.candidate_embeddings(batch).shape)
        ((5, 4), (5, 4))
    """
    user, item = tower_schema(schema, Tags.USER), tower_schema(schema, Tags.ITEM)
    ids = schema.select_by_tag(Tags.ITEM_ID).column_names
    if not user.column_names or not item.column_names:
        raise DataError(f"a two-tower model needs USER- and ITEM-tagged input columns (schema columns: "
                        f"{schema.column_names})")
    if not ids:
        raise DataError(f"a two-tower model needs an ITEM_ID-tagged column (schema columns: {schema.column_names})")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    def tower(columns: Schema, body, name: str):
        body = body if body is not None else MLPBlock(list(tower_dims), no_activation_last_layer=True)
        inputs = InputBlock(columns, embedding_dim, aggregation="concat", embeddings_l2=embeddings_l2)
        return inputs.connect(body, L2Norm(), name=name)

    return TwoTower(tower(user, query_tower, "query_tower"), tower(item, candidate_tower, "candidate_tower"),
                    item_id=ids[0], item_cardinality=cardinality(schema[ids[0]]), temperature=temperature,
                    logq_correction=logq_correction, remove_accidental_hits=remove_accidental_hits,
                    item_bias=item_bias, name="two_tower")

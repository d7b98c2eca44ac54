"""AdamW that updates only the embedding rows a batch gathers (issue 15: a step's cost grows with the vocabulary).

Keras 3's AdamW, its decoupled weight decay and its weight average (``use_ema``) update every row of every
table at every step, although a batch of 1024 ratings gathers a few thousand rows: at ML-25M size (324k table
rows of width 16) that dense work is ~75 % of a step. ``RowSparseAdamW`` applies a gradient that arrives as a
``tf.IndexedSlices`` (what ``tf.gather``, i.e. ``keras.layers.Embedding``, gives on the TensorFlow backend) to
the gathered rows only:

- the Adam moments of the gathered rows are updated; the other rows' moments and weights are left alone
  ("lazy" Adam: a row absent from a batch takes no momentum step, the one change to dense AdamW's semantics);
- the decoupled weight decay and the weight average of a row are brought up to date when the row is next
  gathered, exactly as the dense ones would have left a row that does not move in between: ``w *= prod(1 - lr_s
  * wd)`` over the steps it missed (a running sum of ``log(1 - lr_s * wd)`` holds every step's factor), and the
  average follows ``e_s = m e_{s-1} + (1 - m) w_s`` over those steps in closed form (exact for a constant
  learning rate, the geometric mean of the factors otherwise);
- ``sync_rows()`` brings every row up to date; ``RowSync`` (a callback, first in the list) calls it before
  weights are read (evaluation, prediction, the epoch-end swap of the average, the end of ``fit``).

Dense gradients (every other weight, and every weight on the other backends) take Keras' own AdamW step, and the
first step is dense for every variable (Keras starts the average at the first step's weights), so a model
whose every row is in every batch trains exactly as with ``keras.optimizers.AdamW``.
"""

from __future__ import annotations

import keras
import tensorflow as tf

# Below this gap between the average's momentum and a row's decay factor the closed form divides ~0 by ~0.
_CLOSE = 1e-12


@keras.saving.register_keras_serializable(package="pipeline")
class RowSparseAdamW(keras.optimizers.AdamW):
    """``keras.optimizers.AdamW`` (same arguments) with row-sparse updates of gathered tables.

    Args:
        *args, **kwargs: those of ``keras.optimizers.AdamW`` (``learning_rate``, ``weight_decay``, ``use_ema``,
            ``ema_momentum``, ...); ``gradient_accumulation_steps`` is refused.

    Per-row state for every variable of rank >= 2 with ``rows`` rows: the step it was last brought up to
    date (``(rows,)`` int64) and the running log decay factor at that step (``(rows,)`` float64); one float64
    scalar holds the running log decay factor of the steps taken.

    Example:
        >>> opt = RowSparseAdamW(learning_rate=2e-3, weight_decay=0.1, use_ema=True, ema_momentum=0.99)
        >>> opt.get_config()["weight_decay"]
        0.1
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.gradient_accumulation_steps:
            raise ValueError("RowSparseAdamW does not support gradient_accumulation_steps")

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._log_keep = self.add_variable((), initializer="zeros", dtype="float64", name="log_keep")
        self._synced_step, self._row_log_keep = [], []
        for var in var_list:
            if len(var.shape) >= 2:
                rows = int(var.shape[0])
                self._synced_step.append(self.add_variable((rows,), initializer="zeros", dtype="int64",
                                                           name=f"{_name(var)}_synced_step"))
                self._row_log_keep.append(self.add_variable((rows,), initializer="zeros", dtype="float64",
                                                            name=f"{_name(var)}_row_log_keep"))
            else:
                self._synced_step.append(None)
                self._row_log_keep.append(None)

    # ----------------------------------------------------------------- the step
    def _backend_apply_gradients(self, grads, trainable_variables):
        grads = self._clip_gradients(grads)
        first = tf.equal(self.iterations, 0)
        lr = tf.cast(self.learning_rate, tf.float64)
        keep = 1.0 - lr * tf.cast(self.weight_decay or 0.0, tf.float64)  # this step's decay factor
        dense_grads, dense_vars, sparse = [], [], []
        for grad, var in zip(grads, trainable_variables):
            if isinstance(grad, tf.IndexedSlices) and self._synced_step[self._get_variable_index(var)] is not None:
                sparse.append((grad, var))
            else:
                dense_grads.append(grad)
                dense_vars.append(var)
        self._apply_weight_decay(dense_vars)
        self._backend_update_step(dense_grads, dense_vars, self.learning_rate)
        for grad, var in sparse:
            self._sparse_step(grad, var, first, lr, keep)
        step = tf.cast(self.iterations + 1, tf.int64)
        for var in dense_vars:  # every row stepped: a row-tracked variable with a dense gradient is up to date
            index = self._get_variable_index(var)
            if self._synced_step[index] is not None:
                decayed = self.weight_decay and self._use_weight_decay(var)
                self._synced_step[index].assign(tf.fill(var.shape[:1], step))
                self._row_log_keep[index].assign(tf.fill(var.shape[:1], self._log_keep + tf.math.log(keep) if decayed
                                                         else tf.convert_to_tensor(self._log_keep)))
        if self.use_ema:
            dense_ids = {id(v) for v in dense_vars}
            self._update_model_variables_moving_average([v for v in self._trainable_variables if id(v) in dense_ids])
        self._log_keep.assign_add(tf.math.log(keep))

    def _update_model_variables_moving_average(self, trainable_variables):
        # Keras' EMA zips the variables with all averages: give each variable its own average.
        for var in trainable_variables:
            average = self._model_variables_moving_average[self._get_variable_index(var)]
            if average is not None:
                momentum = tf.cast(tf.not_equal(self.iterations, 0), var.dtype) * self.ema_momentum
                average.assign(momentum * average + (1 - momentum) * var)

    def _sparse_step(self, grad: tf.IndexedSlices, var, first, lr, keep) -> None:
        """One AdamW (+ average) step of the rows ``grad`` gathers (every row on the first step)."""
        index = self._get_variable_index(var)
        rows = int(var.shape[0])
        unique, position = tf.unique(tf.cast(grad.indices, tf.int64))
        summed = tf.math.unsorted_segment_sum(grad.values, position, tf.shape(unique)[0])
        ids, g = tf.cond(first,
                         lambda: (tf.range(rows, dtype=tf.int64), tf.convert_to_tensor(grad)),
                         lambda: (unique, summed))
        g = tf.cast(g, var.dtype)
        step = tf.cast(self.iterations + 1, tf.int64)
        log_keep = self._log_keep  # through the previous step
        w, e_new = self._caught_up(index, ids, step - 1, log_keep)
        dtype = var.dtype
        uses_decay = self.weight_decay and self._use_weight_decay(var)
        row_keep = keep if uses_decay else tf.constant(1.0, tf.float64)
        w = w * tf.cast(row_keep, dtype)
        m_var, v_var = self._momentums[index], self._velocities[index]
        m = self.beta_1 * _rows(m_var, ids) + (1 - self.beta_1) * g
        v = self.beta_2 * _rows(v_var, ids) + (1 - self.beta_2) * tf.square(g)
        t = tf.cast(step, dtype)
        lr_d = tf.cast(lr, dtype)
        alpha = lr_d * tf.sqrt(1 - tf.pow(tf.cast(self.beta_2, dtype), t)) / (1 - tf.pow(tf.cast(self.beta_1, dtype), t))
        w = w - alpha * m / (tf.sqrt(v) + self.epsilon)
        _scatter(m_var, m, ids)
        _scatter(v_var, v, ids)
        _scatter(var, w, ids)
        if self.use_ema:
            average = self._model_variables_moving_average[index]
            momentum = tf.cast(tf.logical_not(first), dtype) * self.ema_momentum
            _scatter(average, momentum * e_new + (1 - momentum) * w, ids)
        _scatter(self._synced_step[index], tf.fill(tf.shape(ids), step), ids)
        row_log = log_keep + (tf.math.log(row_keep) if uses_decay else tf.constant(0.0, tf.float64))
        _scatter(self._row_log_keep[index], tf.fill(tf.shape(ids), row_log), ids)

    def _caught_up(self, index: int, ids, step, log_keep):
        """Rows ``ids`` of variable ``index`` (and of its average) as the dense optimizer would have left them
        after ``step``, given that they did not move since their last update: ``(weights, average)``, each
        ``(len(ids), ...)`` (average ``None`` without EMA)."""
        var = self._trainable_variables[index]
        dtype = var.dtype
        w = _rows(var, ids)
        gap = step - _rows(self._synced_step[index], ids)  # (n,) steps missed
        log_k = log_keep - _rows(self._row_log_keep[index], ids)  # (n,) their summed log decay factors
        if not (self.weight_decay and self._use_weight_decay(var)):
            log_k = tf.zeros_like(log_k)
        shape = tf.concat([tf.shape(ids), tf.ones([tf.rank(w) - 1], tf.int32)], 0)
        w_now = w * tf.reshape(tf.cast(tf.exp(log_k), dtype), shape)
        if not self.use_ema:
            return w_now, None
        k = tf.cast(gap, tf.float64)
        mu = tf.constant(float(self.ema_momentum), tf.float64)
        r = tf.exp(log_k / tf.maximum(k, 1.0))  # per-step decay factor over the gap (exact if the rate was constant)
        mu_k, r_k = tf.pow(mu, k), tf.pow(r, k)
        diff = mu - r
        # sum_{j=1..k} mu^(k-j) r^j: the weight's share of the average after k steps of a geometric weight
        series = tf.where(tf.abs(diff) > _CLOSE, r * (mu_k - r_k) / tf.where(tf.abs(diff) > _CLOSE, diff, 1.0),
                          k * r_k)
        e = _rows(self._model_variables_moving_average[index], ids)
        e_now = (tf.reshape(tf.cast(mu_k, dtype), shape) * e
                 + tf.reshape(tf.cast((1 - mu) * series, dtype), shape) * w)
        return w_now, e_now

    # ----------------------------------------------------------------- reading the weights
    def sync_rows(self) -> None:
        """Bring every row of every row-tracked variable (and its average) up to the last step taken."""
        if not self.built:
            return
        step = tf.cast(self.iterations, tf.int64)
        for index, var in enumerate(self._trainable_variables):
            if self._synced_step[index] is None:
                continue
            ids = tf.range(int(var.shape[0]), dtype=tf.int64)
            w, e = self._caught_up(index, ids, step, self._log_keep)
            var.assign(w)
            if e is not None:
                self._model_variables_moving_average[index].assign(e)
            self._synced_step[index].assign(tf.fill(tf.shape(ids), step))
            self._row_log_keep[index].assign(tf.fill(tf.shape(ids), tf.convert_to_tensor(self._log_keep)))

    def finalize_variable_values(self, var_list):
        self.sync_rows()
        super().finalize_variable_values(var_list)


class RowSync(keras.callbacks.Callback):
    """Calls the model optimizer's ``sync_rows()`` (if it has one) before its weights are read: before every
    evaluation and prediction, at the end of every epoch and of training. Put it first among the callbacks
    (before ``keras.callbacks.SwapEMAWeights``, which swaps the averages in)."""

    def _sync(self) -> None:
        sync = getattr(getattr(self.model, "optimizer", None), "sync_rows", None)
        if sync is not None:
            sync()

    def on_test_begin(self, logs=None):
        self._sync()

    def on_predict_begin(self, logs=None):
        self._sync()

    def on_epoch_end(self, epoch, logs=None):
        self._sync()

    def on_train_end(self, logs=None):
        self._sync()


def _tf_variable(var) -> tf.Variable:
    return var.value if isinstance(var, keras.Variable) else var  # a Keras variable holds its tf.Variable


def _rows(var, ids) -> tf.Tensor:
    """``var[ids]`` read in place (ResourceGather). Converting the variable to a tensor first would copy all of
    it once a sparse op has touched it (TensorFlow's copy-on-read mode)."""
    return _tf_variable(var).sparse_read(ids)


def _scatter(var, values, ids) -> None:
    """``var[ids] = values`` in place."""
    _tf_variable(var).scatter_update(tf.IndexedSlices(values, ids))


def _name(var) -> str:
    return getattr(var, "path", var.name).replace("/", "_")

"""Per-variable gradient and weight statistics, computed in the TensorFlow graph.

Each function takes tensors and returns float32 scalars, so the train step can
reduce a gradient of any size to a handful of numbers without copying it to the
host. No full gradient is copied to the host.
"""

from __future__ import annotations

import tensorflow as tf

# Order of the per-variable statistics in a step record. The names double as
# the column names of `GradWatch.to_dataframe()` and the keys of the report.
VARIABLE_STATS = (
    "grad_norm",  # L2 norm of the gradient.
    "grad_max",  # max |g|; with NaN entries, NaN or the max of the others.
    "grad_nonfinite",  # count of NaN or Inf gradient entries.
    "grad_zero_fraction",  # fraction of gradient entries that are exactly 0.
    "weight_norm",  # L2 norm of the variable after the update.
    "update_norm",  # L2 norm of the update, ||w_after - w_before||.
    "has_gradient",  # 1 when the variable received a gradient, else 0.
)
STAT_INDEX = {name: i for i, name in enumerate(VARIABLE_STATS)}

# Order of the per-step scalars in a step record.
STEP_SCALARS = (
    "loss",  # batch loss as returned by `compute_loss`, NaN if not seen.
    "global_grad_norm",  # L2 norm over all gradients.
    "update_skipped",  # 1 when the optimizer update was skipped.
)
SCALAR_INDEX = {name: i for i, name in enumerate(STEP_SCALARS)}


def dense_gradient_stats(gradient: tf.Tensor) -> list[tf.Tensor]:
    """Return L2 norm, max |g|, non-finite count and zero fraction of a gradient."""
    values = tf.cast(gradient, tf.float32)
    size = tf.cast(tf.size(values), tf.float32)
    norm = tf.norm(tf.reshape(values, [-1]))
    max_abs = tf.reduce_max(tf.abs(values)) if values.shape.num_elements() != 0 else 0.0
    nonfinite = tf.reduce_sum(tf.cast(tf.logical_not(tf.math.is_finite(values)), tf.float32))
    zeros = tf.reduce_sum(tf.cast(tf.equal(values, 0.0), tf.float32))
    zero_fraction = tf.math.divide_no_nan(zeros, size)
    return [norm, tf.cast(max_abs, tf.float32), nonfinite, zero_fraction]


def sparse_gradient_stats(gradient: tf.IndexedSlices, dense_size: int) -> list[tf.Tensor]:
    """Return the statistics of the dense equivalent of an `IndexedSlices` gradient.

    Rows that appear several times in `gradient.indices` are summed first, as
    the dense gradient would sum them; the table itself is never densified.
    """
    values = tf.cast(gradient.values, tf.float32)
    unique_rows, row_position = tf.unique(gradient.indices)
    summed = tf.math.unsorted_segment_sum(values, row_position, tf.size(unique_rows))
    norm, max_abs, nonfinite, _ = dense_gradient_stats(summed)
    nonzero = tf.reduce_sum(tf.cast(tf.not_equal(summed, 0.0), tf.float32))
    zero_fraction = 1.0 - nonzero / float(max(dense_size, 1))
    return [norm, max_abs, nonfinite, zero_fraction]


def gradient_stats(gradient, dense_size: int) -> list[tf.Tensor]:
    """Return the four gradient statistics of a dense or sparse gradient."""
    if isinstance(gradient, tf.IndexedSlices):
        return sparse_gradient_stats(gradient, dense_size)
    return dense_gradient_stats(gradient)


def l2_norm(tensor: tf.Tensor) -> tf.Tensor:
    """Return the L2 norm of a tensor of any shape as a float32 scalar."""
    return tf.norm(tf.reshape(tf.cast(tensor, tf.float32), [-1]))


# The unsorted segment ops, unlike the sorted ones, have XLA kernels, so the
# same code runs under `jit_compile=True`.
def _segment_ids(sizes: list[int]) -> tf.Tensor:
    ids = [i for i, size in enumerate(sizes) for _ in range(size)]
    return tf.constant(ids, tf.int32)


def segment_gradient_stats(flat: tf.Tensor, sizes: list[int]) -> tf.Tensor:
    """Return the four gradient statistics of several dense gradients at once.

    `flat` is the concatenation of the flattened gradients, `sizes` their
    sizes in order. Returns a `(len(sizes), 4)` tensor with the columns of
    `dense_gradient_stats`: L2 norm, max |g|, non-finite count, zero fraction.
    """
    ids = _segment_ids(sizes)
    n = len(sizes)
    count = tf.constant(sizes, tf.float32)
    norm = tf.sqrt(tf.math.unsorted_segment_sum(tf.square(flat), ids, n))
    max_abs = tf.math.unsorted_segment_max(tf.abs(flat), ids, n)
    finite = tf.math.is_finite(flat)
    nonfinite = tf.math.unsorted_segment_sum(tf.cast(tf.logical_not(finite), tf.float32), ids, n)
    zeros = tf.math.unsorted_segment_sum(tf.cast(tf.equal(flat, 0.0), tf.float32), ids, n)
    return tf.stack([norm, max_abs, nonfinite, zeros / count], axis=1)


def segment_norms(columns: tf.Tensor, sizes: list[int]) -> tf.Tensor:
    """Return per-segment L2 norms of each column of a `(total, k)` tensor.

    The result has shape `(len(sizes), k)`.
    """
    sums = tf.math.unsorted_segment_sum(tf.square(columns), _segment_ids(sizes), len(sizes))
    return tf.sqrt(sums)

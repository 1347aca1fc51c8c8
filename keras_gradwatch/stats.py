"""Per-variable gradient and weight statistics, computed in the TensorFlow graph.

Each function takes tensors and returns float32 values, so the train step can
reduce a gradient of any size to a handful of numbers without copying it to
the host.

The statistics come in two sets, by cost:

- every step: the gradient L2 norm, in one pass over the gradient that
  writes nothing (a matrix product of the flattened gradient with itself).
  The count of non-finite entries follows from it: a finite sum of squares
  means every entry is finite, so the entries are counted only when a norm is
  not finite. Likewise max |g| (a max and a min) is computed when a norm is 0
  or not finite, where it tells an all-zero gradient from one whose squares
  underflow.
- measured steps only (see `GradWatch(weight_stats_freq=...)`): max |g|, the
  fraction of exactly-zero gradient entries, the weight norm after the update
  and the update norm. The update norm needs a copy of the weights taken
  before the optimizer writes them.
"""

from __future__ import annotations

import tensorflow as tf

# Order of the per-variable statistics in a step record. The names double as
# the column names of `GradWatch.to_dataframe()` and the keys of the report.
VARIABLE_STATS = (
    "grad_norm",  # L2 norm of the gradient.
    "grad_max",  # max |g| (see the module docstring for the steps that compute it).
    "grad_nonfinite",  # count of NaN or Inf gradient entries.
    "grad_zero_fraction",  # fraction of gradient entries that are exactly 0 (measured steps).
    "weight_norm",  # L2 norm of the variable after the update (measured steps).
    "update_norm",  # L2 norm of the update, ||w_after - w_before|| (measured steps).
    "has_gradient",  # 1 when the variable received a gradient, else 0.
)
STAT_INDEX = {name: i for i, name in enumerate(VARIABLE_STATS)}

# Order of the per-step scalars in a step record.
STEP_SCALARS = (
    "loss",  # batch loss as returned by `compute_loss`, NaN if not seen.
    "global_grad_norm",  # L2 norm over all gradients.
    "update_skipped",  # 1 when the optimizer update was skipped.
    "weights_measured",  # 1 when the measured-step statistics were computed.
)
SCALAR_INDEX = {name: i for i, name in enumerate(STEP_SCALARS)}


def flat32(tensor) -> tf.Tensor:
    """Return `tensor` as a 1-D float32 tensor (no copy when it already is one)."""
    tensor = tf.convert_to_tensor(tensor)
    if tensor.dtype != tf.float32:
        tensor = tf.cast(tensor, tf.float32)
    return tf.reshape(tensor, [-1])


def sum_of_squares(flat: tf.Tensor) -> tf.Tensor:
    """Return the sum of squares of a 1-D float32 tensor.

    A `(1, n) x (n, 1)` matrix product reads the tensor once and writes no
    intermediate, where `reduce_sum(square(x))` writes the squares first. On
    CPU it is also the faster of the two.
    """
    row = tf.reshape(flat, [1, -1])
    return tf.reshape(tf.matmul(row, row, transpose_b=True), [])


def max_abs(flat: tf.Tensor) -> tf.Tensor:
    """Return max |x| of a 1-D tensor, 0 for an empty one, without writing |x|."""
    largest = tf.maximum(tf.reduce_max(flat), -tf.reduce_min(flat))
    return tf.maximum(largest, 0.0)


def nonfinite_count(flat: tf.Tensor) -> tf.Tensor:
    """Return the number of NaN or Inf entries of a tensor, as float32."""
    return tf.reduce_sum(tf.cast(tf.logical_not(tf.math.is_finite(flat)), tf.float32))


def zero_count(flat: tf.Tensor) -> tf.Tensor:
    """Return the number of exactly-zero entries of a tensor, as float32."""
    return tf.reduce_sum(tf.cast(tf.equal(flat, 0.0), tf.float32))


def summed_rows(gradient: tf.IndexedSlices) -> tf.Tensor:
    """Return the distinct rows of an `IndexedSlices` gradient, repeats summed.

    Rows that appear several times in `gradient.indices` are added, as the
    dense gradient would add them; the table itself is never densified.
    """
    values = tf.cast(gradient.values, tf.float32)
    unique_rows, row_position = tf.unique(gradient.indices)
    return tf.math.unsorted_segment_sum(values, row_position, tf.size(unique_rows))


def l2_norm(tensor) -> tf.Tensor:
    """Return the L2 norm of a tensor of any shape as a float32 scalar."""
    return tf.sqrt(sum_of_squares(flat32(tensor)))


def zero_fraction(values: tf.Tensor, dense_size: int) -> tf.Tensor:
    """Return the fraction of exactly-zero entries of a gradient of `dense_size` entries.

    `values` are the gradient's entries, or for an `IndexedSlices` gradient
    the entries of its `summed_rows`; the rows it leaves out are zero.
    """
    absent = float(dense_size) - tf.cast(tf.size(values), tf.float32)
    return (zero_count(values) + absent) / float(max(dense_size, 1))


# The unsorted segment ops, unlike the sorted ones, have XLA kernels, so the
# same code runs under `jit_compile=True`.
def segment_ids(sizes: list[int]) -> tf.Tensor:
    """Return the segment id of each entry of a concatenation of `sizes` entries."""
    ids = [i for i, size in enumerate(sizes) for _ in range(size)]
    return tf.constant(ids, tf.int32)


def segment_l2_norm(flat: tf.Tensor, ids: tf.Tensor, n: int) -> tf.Tensor:
    """Return the L2 norm of each segment of `flat`."""
    return tf.sqrt(tf.math.unsorted_segment_sum(tf.square(flat), ids, n))


def segment_max_abs(flat: tf.Tensor, ids: tf.Tensor, n: int) -> tf.Tensor:
    """Return max |x| of each segment of `flat`."""
    largest = tf.maximum(
        tf.math.unsorted_segment_max(flat, ids, n), -tf.math.unsorted_segment_min(flat, ids, n)
    )
    return tf.maximum(largest, 0.0)


def segment_nonfinite_count(flat: tf.Tensor, ids: tf.Tensor, n: int) -> tf.Tensor:
    """Return the number of NaN or Inf entries of each segment of `flat`."""
    bad = tf.cast(tf.logical_not(tf.math.is_finite(flat)), tf.float32)
    return tf.math.unsorted_segment_sum(bad, ids, n)


def segment_zero_count(flat: tf.Tensor, ids: tf.Tensor, n: int) -> tf.Tensor:
    """Return the number of exactly-zero entries of each segment of `flat`."""
    return tf.math.unsorted_segment_sum(tf.cast(tf.equal(flat, 0.0), tf.float32), ids, n)


def segment_norms(columns: tf.Tensor, sizes: list[int]) -> tf.Tensor:
    """Return per-segment L2 norms of each column of a `(total, k)` tensor.

    The result has shape `(len(sizes), k)`.
    """
    sums = tf.math.unsorted_segment_sum(tf.square(columns), segment_ids(sizes), len(sizes))
    return tf.sqrt(sums)


HISTOGRAM_BUCKETS = 30


def histogram(tensor, xla: bool = False) -> tf.Tensor:
    """Return `(HISTOGRAM_BUCKETS, 3)` rows `[left edge, right edge, count]` of a tensor.

    Equal-width buckets between the tensor's min and max, as
    `tf.summary.histogram` makes them. `tf.histogram_fixed_width` does the
    bucketing in one op, but XLA cannot compile it. With `xla=True` the bucket
    index comes from plain arithmetic and the counts from an unsorted segment
    sum. That takes about twice as long and more temporary memory
    (`bench/reduction_cost.py`). The output shape is fixed, as XLA needs.
    A tensor whose values are all equal puts every entry in the first bucket
    and gets edges equal to that value (see `trim_histogram`).

    Values are bucketed in the tensor's own precision (float32 for float16
    and bfloat16); a float64 copy of a large tensor would double its memory.
    The edges are float64.
    """
    values = tf.reshape(tensor, [-1])
    if values.dtype not in (tf.float32, tf.float64):
        values = tf.cast(values, tf.float32)
    low = tf.reduce_min(values)
    high = tf.reduce_max(values)
    spread = high > low
    if xla:
        width = tf.where(spread, (high - low) / HISTOGRAM_BUCKETS, tf.ones_like(low))
        index = tf.cast(tf.floor((values - low) / width), tf.int32)
        index = tf.clip_by_value(index, 0, HISTOGRAM_BUCKETS - 1)
        counts = tf.math.unsorted_segment_sum(tf.ones_like(index), index, HISTOGRAM_BUCKETS)
    else:
        # Equal values all land in the first bucket of [low, low + 1].
        upper = tf.where(spread, high, low + 1)
        counts = tf.histogram_fixed_width(values, tf.stack([low, upper]), HISTOGRAM_BUCKETS)
    counts = tf.cast(counts, tf.float64)
    edges = tf.linspace(tf.cast(low, tf.float64), tf.cast(high, tf.float64), HISTOGRAM_BUCKETS + 1)
    return tf.stack([edges[:-1], edges[1:], counts], axis=1)


def trim_histogram(rows):
    """Return the rows of `histogram` as TensorBoard takes them (host side, numpy).

    A tensor whose values were all equal keeps one bucket `[value, value, count]`.
    """
    if rows[0, 0] == rows[0, 1]:
        return rows[:1]
    return rows

"""The in-graph statistics against numpy on hand-set gradients."""

import numpy as np
import pytest
import tensorflow as tf

from keras_gradwatch import stats


def test_dense_stats_match_numpy():
    gradient = np.array([[3.0, -4.0, 0.0], [0.0, 12.0, -1.0]], dtype=np.float32)
    values = stats.flat32(tf.constant(gradient))

    np.testing.assert_allclose(
        float(stats.l2_norm(values)), np.linalg.norm(gradient.ravel()), rtol=1e-6
    )
    assert float(stats.max_abs(values)) == 12.0
    assert float(stats.nonfinite_count(values)) == 0.0
    assert float(stats.zero_fraction(values, gradient.size)) == pytest.approx(2 / 6, rel=1e-6)


def test_dense_stats_count_nonfinite():
    gradient = np.array([1.0, np.nan, np.inf, -np.inf, 0.0], dtype=np.float32)
    values = tf.constant(gradient)

    assert float(stats.nonfinite_count(values)) == 3.0
    assert float(stats.zero_fraction(values, gradient.size)) == pytest.approx(1 / 5, rel=1e-6)
    # A non-finite entry makes the sum of squares non-finite, which is what
    # lets the train step count the entries only then.
    assert not np.isfinite(float(stats.sum_of_squares(values)))


def test_sparse_stats_equal_dense_equivalent():
    # Row 2 appears twice; the dense gradient sums the two slices.
    values = np.array([[1.0, 2.0], [3.0, -4.0], [0.5, 0.5]], dtype=np.float32)
    indices = np.array([2, 0, 2])
    dense = np.zeros((5, 2), dtype=np.float32)
    np.add.at(dense, indices, values)
    sparse = tf.IndexedSlices(tf.constant(values), tf.constant(indices), tf.constant([5, 2]))
    rows = stats.flat32(stats.summed_rows(sparse))

    np.testing.assert_allclose(float(stats.l2_norm(rows)), np.linalg.norm(dense.ravel()), rtol=1e-6)
    np.testing.assert_allclose(float(stats.max_abs(rows)), np.abs(dense).max(), rtol=1e-6)
    assert float(stats.nonfinite_count(rows)) == 0.0
    np.testing.assert_allclose(
        float(stats.zero_fraction(rows, dense.size)), np.mean(dense == 0.0), rtol=1e-6
    )


def test_l2_norm_of_any_shape():
    tensor = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    np.testing.assert_allclose(
        float(stats.l2_norm(tf.constant(tensor))), np.linalg.norm(tensor.ravel()), rtol=1e-6
    )


def test_max_abs_of_empty_tensor_is_zero():
    assert float(stats.max_abs(tf.zeros([0]))) == 0.0


def test_segment_stats_equal_per_gradient_stats():
    rng = np.random.default_rng(0)
    gradients = [
        rng.normal(size=(3, 4)).astype(np.float32),
        np.array([0.0, 0.0, 2.0], dtype=np.float32),
        np.array([[np.nan, 1.0], [np.inf, 0.0]], dtype=np.float32),
    ]
    sizes = [g.size for g in gradients]
    flat = tf.constant(np.concatenate([g.ravel() for g in gradients]))
    ids = stats.segment_ids(sizes)
    norms = stats.segment_l2_norm(flat, ids, len(sizes)).numpy()
    maxes = stats.segment_max_abs(flat, ids, len(sizes)).numpy()
    nonfinite = stats.segment_nonfinite_count(flat, ids, len(sizes)).numpy()
    zeros = stats.segment_zero_count(flat, ids, len(sizes)).numpy()

    for i, gradient in enumerate(gradients):
        values = tf.constant(gradient.ravel())
        np.testing.assert_allclose(norms[i], float(stats.l2_norm(values)), rtol=1e-6)
        assert nonfinite[i] == float(stats.nonfinite_count(values))
        assert zeros[i] / sizes[i] == pytest.approx(
            float(stats.zero_fraction(values, sizes[i])), rel=1e-6
        )
        if np.isfinite(gradient).all():
            np.testing.assert_allclose(maxes[i], float(stats.max_abs(values)), rtol=1e-6)
    # With NaN entries, max |g| is taken over the other entries (here inf).
    assert maxes[2] == np.inf


def test_segment_norms_match_numpy():
    columns = np.arange(12, dtype=np.float32).reshape(6, 2)
    norms = stats.segment_norms(tf.constant(columns), [2, 4]).numpy()
    np.testing.assert_allclose(norms[0], np.linalg.norm(columns[:2], axis=0), rtol=1e-6)
    np.testing.assert_allclose(norms[1], np.linalg.norm(columns[2:], axis=0), rtol=1e-6)


@pytest.mark.parametrize("xla", [False, True])
def test_histogram_matches_numpy(xla):
    values = np.random.default_rng(2).normal(size=1000).astype(np.float32)
    rows = stats.histogram(tf.constant(values), xla=xla).numpy()

    expected, edges = np.histogram(values, bins=stats.HISTOGRAM_BUCKETS)
    np.testing.assert_array_equal(rows[:, 2], expected)
    np.testing.assert_allclose(rows[:, 0], edges[:-1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rows[:, 1], edges[1:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("xla", [False, True])
def test_histogram_of_equal_values_has_one_bucket(xla):
    rows = stats.histogram(tf.fill([7], 2.5), xla=xla).numpy()

    np.testing.assert_array_equal(stats.trim_histogram(rows), [[2.5, 2.5, 7.0]])

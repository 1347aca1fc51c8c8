"""The in-graph statistics against numpy on hand-set gradients."""

import numpy as np
import pytest
import tensorflow as tf

from keras_gradwatch import stats


def test_dense_stats_match_numpy():
    gradient = np.array([[3.0, -4.0, 0.0], [0.0, 12.0, -1.0]], dtype=np.float32)
    norm, max_abs, nonfinite, zero_fraction = (
        float(t) for t in stats.dense_gradient_stats(tf.constant(gradient))
    )
    np.testing.assert_allclose(norm, np.linalg.norm(gradient.ravel()), rtol=1e-6)
    assert max_abs == 12.0
    assert nonfinite == 0.0
    assert zero_fraction == pytest.approx(2 / 6, rel=1e-6)


def test_dense_stats_count_nonfinite():
    gradient = np.array([1.0, np.nan, np.inf, -np.inf, 0.0], dtype=np.float32)
    _, _, nonfinite, zero_fraction = (
        float(t) for t in stats.dense_gradient_stats(tf.constant(gradient))
    )
    assert nonfinite == 3.0
    assert zero_fraction == pytest.approx(1 / 5, rel=1e-6)


def test_sparse_stats_equal_dense_equivalent():
    # Row 2 appears twice; the dense gradient sums the two slices.
    values = np.array([[1.0, 2.0], [3.0, -4.0], [0.5, 0.5]], dtype=np.float32)
    indices = np.array([2, 0, 2])
    dense = np.zeros((5, 2), dtype=np.float32)
    np.add.at(dense, indices, values)
    sparse = tf.IndexedSlices(tf.constant(values), tf.constant(indices), tf.constant([5, 2]))

    norm, max_abs, nonfinite, zero_fraction = (
        float(t) for t in stats.gradient_stats(sparse, dense.size)
    )
    np.testing.assert_allclose(norm, np.linalg.norm(dense.ravel()), rtol=1e-6)
    np.testing.assert_allclose(max_abs, np.abs(dense).max(), rtol=1e-6)
    assert nonfinite == 0.0
    np.testing.assert_allclose(zero_fraction, np.mean(dense == 0.0), rtol=1e-6)


def test_l2_norm_of_any_shape():
    tensor = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    np.testing.assert_allclose(
        float(stats.l2_norm(tf.constant(tensor))), np.linalg.norm(tensor.ravel()), rtol=1e-6
    )


def test_segment_stats_equal_per_gradient_stats():
    rng = np.random.default_rng(0)
    gradients = [
        rng.normal(size=(3, 4)).astype(np.float32),
        np.array([0.0, 0.0, 2.0], dtype=np.float32),
        np.array([[np.nan, 1.0], [np.inf, 0.0]], dtype=np.float32),
    ]
    flat = tf.constant(np.concatenate([g.ravel() for g in gradients]))
    table = stats.segment_gradient_stats(flat, [g.size for g in gradients]).numpy()

    for row, gradient in zip(table, gradients):
        expected = [float(t) for t in stats.dense_gradient_stats(tf.constant(gradient))]
        np.testing.assert_allclose(row[[0, 2, 3]], np.array(expected)[[0, 2, 3]], rtol=1e-6)
        if np.isfinite(gradient).all():
            np.testing.assert_allclose(row[1], expected[1], rtol=1e-6)
    # With NaN entries, max |g| is taken over the other entries (here inf).
    assert table[2, 1] == np.inf


def test_segment_norms_match_numpy():
    columns = np.arange(12, dtype=np.float32).reshape(6, 2)
    norms = stats.segment_norms(tf.constant(columns), [2, 4]).numpy()
    np.testing.assert_allclose(norms[0], np.linalg.norm(columns[:2], axis=0), rtol=1e-6)
    np.testing.assert_allclose(norms[1], np.linalg.norm(columns[2:], axis=0), rtol=1e-6)

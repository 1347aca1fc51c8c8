"""Statistics recorded inside the real train step, against independent computations."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import build_mlp

from keras_gradwatch import GradWatch, Thresholds, instrument
from keras_gradwatch.records import MEASURED_VARIABLE_COLUMNS, VARIABLE_COLUMNS

MEASURED = [VARIABLE_COLUMNS.index(c) for c in MEASURED_VARIABLE_COLUMNS]
EVERY_STEP = [i for i in range(len(VARIABLE_COLUMNS)) if i not in MEASURED]

# Variables up to `instrument.FUSE_LIMIT` entries share one flat vector; 0 puts
# every variable on the path that large variables take.
FUSE_LIMITS = [instrument.FUSE_LIMIT, 0]


def _column(name):
    return VARIABLE_COLUMNS.index(name)


@pytest.mark.parametrize("fuse_limit", FUSE_LIMITS)
def test_step_stats_equal_gradient_tape(regression_data, monkeypatch, fuse_limit):
    monkeypatch.setattr(instrument, "FUSE_LIMIT", fuse_limit)
    x, y = regression_data
    model = build_mlp(hidden=(8, 8), optimizer="adam")
    initial = [v.numpy() for v in model.trainable_variables]
    paths = [v.path for v in model.trainable_variables]

    # Independent reference: one GradientTape pass on the same batch and weights.
    reference = build_mlp(hidden=(8, 8), optimizer="adam", seed=1)
    reference.set_weights(model.get_weights())
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(reference(x, training=True) - y))
    gradients = [g.numpy() for g in tape.gradient(loss, reference.trainable_variables)]

    watch = GradWatch(verbose=0, update_freq="batch")
    model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, callbacks=[watch], verbose=0)

    (record,) = watch.recent_steps
    layout = watch.layout
    assert [v.path for v in layout.variables] == paths
    assert record.step == 0
    np.testing.assert_allclose(record.loss, float(loss), rtol=1e-5)
    final = [v.numpy() for v in model.trainable_variables]
    for i, gradient in enumerate(gradients):
        stats = record.variables[i]
        np.testing.assert_allclose(stats[_column("grad_norm")], np.linalg.norm(gradient), rtol=1e-5)
        np.testing.assert_allclose(stats[_column("grad_max")], np.abs(gradient).max(), rtol=1e-5)
        assert stats[_column("grad_nonfinite")] == 0
        np.testing.assert_allclose(
            stats[_column("grad_zero_fraction")], np.mean(gradient == 0), rtol=1e-5
        )
        np.testing.assert_allclose(
            stats[_column("weight_norm")], np.linalg.norm(final[i]), rtol=1e-5
        )
        update = np.linalg.norm(final[i] - initial[i])
        np.testing.assert_allclose(stats[_column("update_norm")], update, rtol=1e-4)
        np.testing.assert_allclose(
            stats[_column("update_ratio")], update / np.linalg.norm(final[i]), rtol=1e-4
        )
    global_norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in gradients))
    np.testing.assert_allclose(record.global_grad_norm, global_norm, rtol=1e-5)


def test_layer_norms_combine_variables(regression_data):
    x, y = regression_data
    model = build_mlp(hidden=(8,))
    watch = GradWatch(verbose=0, update_freq="batch")
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[watch], verbose=0)

    record = watch.recent_steps[-1]
    layout = watch.layout
    assert layout.layers == ["hidden_0", "out"]
    for layer_position, layer in enumerate(layout.layers):
        members = [i for i, v in enumerate(layout.variables) if v.layer == layer]
        expected = np.sqrt(sum(record.variables[i, _column("grad_norm")] ** 2 for i in members))
        np.testing.assert_allclose(record.layer("grad_norm")[layer_position], expected, rtol=1e-6)


def test_identical_weights_with_and_without_watch(regression_data):
    x, y = regression_data
    plain = build_mlp(hidden=(16, 8), seed=3)
    watched = build_mlp(hidden=(16, 8), seed=3)
    for a, b in zip(plain.get_weights(), watched.get_weights()):
        np.testing.assert_array_equal(a, b)

    plain_history = plain.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0)
    watched_history = watched.fit(
        x, y, batch_size=8, epochs=3, shuffle=False, verbose=0, callbacks=[GradWatch(verbose=0)]
    )

    for a, b in zip(plain.get_weights(), watched.get_weights()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(plain.optimizer.variables, watched.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert plain_history.history == watched_history.history


def test_every_step_recorded(regression_data):
    x, y = regression_data
    model = build_mlp()
    watch = GradWatch(verbose=0)
    model.fit(x, y, batch_size=8, epochs=3, callbacks=[watch], verbose=0)

    assert [s.steps for s in watch.epochs] == [8, 8, 8]
    assert [s.first_step for s in watch.epochs] == [0, 8, 16]
    assert [r.step for r in watch.recent_steps] == list(range(24))
    assert watch.report()["lost_steps"] == 0


def test_small_buffer_is_read_before_overwrite(regression_data):
    x, y = regression_data
    model = build_mlp()
    watch = GradWatch(verbose=0, buffer_steps=4)
    model.fit(x, y, batch_size=4, epochs=2, callbacks=[watch], verbose=0)

    assert [s.steps for s in watch.epochs] == [16, 16]
    assert watch.report()["lost_steps"] == 0
    assert [r.step for r in watch.recent_steps] == list(range(32))


def test_stock_train_function_restored(regression_data):
    x, y = regression_data
    model = build_mlp()
    watch = GradWatch(verbose=0)
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[watch], verbose=0)
    instrument = watch._instrument
    written = int(instrument.steps_written.numpy())

    model.fit(x, y, batch_size=16, epochs=2, verbose=0)

    assert int(instrument.steps_written.numpy()) == written
    assert "train_step" not in vars(model)
    assert "compute_loss" not in vars(model)
    assert "apply" not in vars(model.optimizer)


def test_second_fit_with_same_callback(regression_data):
    x, y = regression_data
    model = build_mlp()
    watch = GradWatch(verbose=0)
    model.fit(x, y, batch_size=16, epochs=2, callbacks=[watch], verbose=0)
    assert len(watch.epochs) == 2

    model.fit(x, y, batch_size=32, epochs=3, callbacks=[watch], verbose=0)

    assert len(watch.epochs) == 3
    assert [s.steps for s in watch.epochs] == [2, 2, 2]
    assert watch.report()["steps"] == 6


def test_log_grad_norm_adds_history_key(regression_data):
    x, y = regression_data
    model = build_mlp()
    watch = GradWatch(verbose=0, log_grad_norm=True, update_freq="batch")
    history = model.fit(x, y, batch_size=64, epochs=2, shuffle=False, callbacks=[watch], verbose=0)

    assert "grad_norm" in history.history
    np.testing.assert_allclose(
        history.history["grad_norm"][-1], watch.recent_steps[-1].global_grad_norm, rtol=1e-6
    )


def test_disconnected_variable_reported_without_gradient(regression_data):
    import keras

    x, y = regression_data
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    used = keras.layers.Dense(1, name="used")(inputs)
    unused = keras.layers.Dense(3, name="unused")(inputs)
    model = keras.Model(inputs, [used, unused])
    model.compile("sgd", loss=["mse", None])
    watch = GradWatch(verbose=0, update_freq="batch")
    model.fit(
        x,
        (y, np.zeros((len(x), 3), "float32")),
        epochs=1,
        batch_size=32,
        callbacks=[watch],
        verbose=0,
    )

    record = watch.recent_steps[-1]
    by_path = {v.path: i for i, v in enumerate(watch.layout.variables)}
    unused_index = by_path[next(p for p in by_path if "unused" in p)]
    used_index = by_path[next(p for p in by_path if "used/" in p and "unused" not in p)]
    assert not record.has_gradient[unused_index]
    assert np.isnan(record.variables[unused_index, _column("grad_norm")])
    assert record.has_gradient[used_index]
    assert record.variables[used_index, _column("grad_norm")] > 0


def test_repeated_fit_reuses_traced_step(regression_data):
    x, y = regression_data
    model = build_mlp()
    watch = GradWatch(verbose=0, update_freq="batch")
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[watch], verbose=0)
    first = watch._instrument

    model.fit(x, y, batch_size=16, epochs=1, callbacks=[watch], verbose=0)

    assert watch._instrument is first
    assert [r.step for r in watch.recent_steps] == [0, 1, 2, 3]
    assert watch.epochs[0].first_step == 0

    model.compile(optimizer="sgd", loss="mse")
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[watch], verbose=0)

    assert watch._instrument is not first
    assert [r.step for r in watch.recent_steps] == [0, 1, 2, 3]


def _fit_records(x, y, jit_compile=False, optimizer="adam", **watch_kwargs):
    model = build_mlp(hidden=(8, 8), optimizer=optimizer, jit_compile=jit_compile)
    watch = GradWatch(verbose=0, update_freq="batch", **watch_kwargs)
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, callbacks=[watch], verbose=0)
    return watch.recent_steps, [v.numpy() for v in model.weights]


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("fuse_limit", FUSE_LIMITS)
def test_weight_stats_on_measured_steps_only(regression_data, monkeypatch, fuse_limit, jit_compile):
    monkeypatch.setattr(instrument, "FUSE_LIMIT", fuse_limit)
    x, y = regression_data
    every, every_weights = _fit_records(x, y, jit_compile, weight_stats_freq=1)
    sampled, sampled_weights = _fit_records(x, y, jit_compile, weight_stats_freq=3)

    # 8 steps per epoch: every third optimizer iteration, plus each epoch's last step.
    measured = [r.step for r in sampled if r.weights_measured]
    assert measured == [2, 5, 7, 8, 11, 14, 15]
    assert all(r.weights_measured for r in every)
    for full, record in zip(every, sampled, strict=True):
        np.testing.assert_array_equal(
            record.variables[:, EVERY_STEP], full.variables[:, EVERY_STEP]
        )
        if record.weights_measured:
            np.testing.assert_array_equal(
                record.variables[:, MEASURED], full.variables[:, MEASURED]
            )
        else:
            assert np.all(np.isnan(record.variables[:, MEASURED]))
        assert record.loss == full.loss
    for a, b in zip(every_weights, sampled_weights, strict=True):
        np.testing.assert_array_equal(a, b)


def test_weight_stats_follow_gradient_accumulation(regression_data):
    x, y = regression_data
    optimizer = keras.optimizers.Adam(gradient_accumulation_steps=2)
    records, _ = _fit_records(x, y, optimizer=optimizer, weight_stats_freq=3)

    # 3 is rounded up to 4, a multiple of the 2 accumulation steps, so the
    # measured steps are the ones that update the weights.
    assert [r.step for r in records if r.weights_measured] == [3, 7, 11, 15]
    for record in records:
        if record.weights_measured:
            assert np.all(record.variable("update_norm") > 0)


def test_weight_stats_off(regression_data):
    x, y = regression_data
    model = build_mlp()
    watch = GradWatch(verbose=0, update_freq="batch", weight_stats_freq=0)
    model.fit(x, y, batch_size=16, epochs=2, callbacks=[watch], verbose=0)

    assert watch._instrument.snapshots == []
    for record in watch.recent_steps:
        assert not record.weights_measured
        assert np.all(np.isnan(record.variables[:, MEASURED]))
        assert np.all(np.isfinite(record.variables[:, EVERY_STEP]))
    assert watch.findings == []


def _scaled_model(scale):
    """An MLP whose first layer's output is multiplied by `scale`."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, name="first"),
            keras.layers.Lambda(lambda t: t * scale, name="scale"),
            keras.layers.Dense(8, activation="tanh", name="middle"),
            keras.layers.Dense(1, name="out"),
        ]
    )
    model.compile("adam", "mse")
    return model


@pytest.mark.parametrize("scale", [0.0, 1e-30])
def test_max_abs_computed_where_a_norm_is_zero(regression_data, scale):
    x, y = regression_data
    model = _scaled_model(scale)
    thresholds = Thresholds(dead_steps=5)
    watch = GradWatch(verbose=0, update_freq="batch", weight_stats_freq=3, thresholds=thresholds)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, callbacks=[watch], verbose=0)

    kernel = [v.path for v in watch.layout.variables].index(model.layers[0].kernel.path)
    for record in watch.recent_steps:
        # The kernel's entries are about 1e-30 or exactly 0, so the float32 sum
        # of squares is 0 either way; max |g| is computed on every step and
        # distinguishes the two.
        assert record.variable("grad_norm")[kernel] == 0.0
        assert np.all(np.isfinite(record.variable("grad_max")))
        assert (record.variable("grad_max")[kernel] > 0) == (scale > 0)
    dead = [f for f in watch.findings if f.kind == "dead_layer"]
    assert [f.layers for f in dead] == ([("first",)] if scale == 0 else [])


def test_max_abs_every_step_with_clipvalue(regression_data):
    x, y = regression_data
    optimizer = keras.optimizers.SGD(0.01, clipvalue=0.05)
    records, _ = _fit_records(x, y, optimizer=optimizer, weight_stats_freq=3)

    assert not all(r.weights_measured for r in records)
    assert all(np.all(np.isfinite(r.variable("grad_max"))) for r in records)

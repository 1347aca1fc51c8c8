"""Training setups beyond a plain fit: XLA, eager, steps_per_execution,
MirroredStrategy, mixed precision, embeddings, frozen and nested layers."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import build_mlp

import keras_gradwatch
from keras_gradwatch import GradWatch


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = (x @ np.array([[1.0], [-2.0], [0.5], [0.0]])).astype("float32")
    return x, y


def watched_fit(model, x, y, **fit_kwargs):
    watch = GradWatch(verbose=0, update_freq="batch", weight_stats_freq=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(
            x, y, batch_size=16, epochs=2, shuffle=False, callbacks=[watch], verbose=0, **fit_kwargs
        )
    return watch


def norms(watch):
    return np.array([r.global_grad_norm for r in watch.recent_steps])


@pytest.fixture
def reference_norms(data):
    x, y = data
    return norms(watched_fit(build_mlp(hidden=(8,)), x, y))


@pytest.mark.parametrize(
    "compile_kwargs",
    [{"jit_compile": True}, {"run_eagerly": True}, {"steps_per_execution": 3}],
    ids=["xla", "eager", "steps_per_execution"],
)
def test_compile_options_record_same_statistics(data, reference_norms, compile_kwargs):
    x, y = data
    watch = watched_fit(build_mlp(hidden=(8,), **compile_kwargs), x, y)

    assert [r.step for r in watch.recent_steps] == list(range(8))
    np.testing.assert_allclose(norms(watch), reference_norms, rtol=1e-5)


def test_mirrored_strategy_norms_equal_single_device(data, reference_norms):
    x, y = data
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = build_mlp(hidden=(8,))
    watch = watched_fit(model, x, y)

    # Each replica gets half of the global batch of 16. The statistics
    # describe the summed gradient that the optimizer applies.
    assert [r.step for r in watch.recent_steps] == list(range(8))
    np.testing.assert_allclose(norms(watch), reference_norms, rtol=1e-5)
    single = watched_fit(build_mlp(hidden=(8,)), x, y)
    np.testing.assert_allclose(
        [r.loss for r in watch.recent_steps], [r.loss for r in single.recent_steps], rtol=1e-5
    )


def test_mirrored_strategy_measures_weights_on_same_steps(data):
    x, y = data
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        mirrored_model = build_mlp(hidden=(8,))
    runs = []
    for model in (mirrored_model, build_mlp(hidden=(8,))):
        watch = GradWatch(verbose=0, update_freq="batch", weight_stats_freq=3)
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, callbacks=[watch], verbose=0)
        runs.append(watch.recent_steps)

    mirrored, single = runs
    assert [r.step for r in mirrored if r.weights_measured] == [2, 3, 5, 7]
    for a, b in zip(mirrored, single, strict=True):
        assert a.weights_measured == b.weights_measured
        np.testing.assert_allclose(a.layer("update_norm"), b.layer("update_norm"), rtol=1e-5)


def test_mixed_precision_reports_unscaled_gradients(data, reference_norms):
    x, y = data
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build_mlp(hidden=(8,))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    watch = watched_fit(model, x, y)

    # The loss scale starts at 2**15; scaled norms would be 32768 times larger.
    np.testing.assert_allclose(norms(watch)[0], reference_norms[0], rtol=1e-2)
    assert watch.findings == []


def test_embedding_norms_equal_dense_gradient():
    keras.utils.set_random_seed(0)
    tokens = np.array([[1, 3, 3, 7], [3, 3, 0, 1]], dtype="int32")  # repeated rows
    targets = np.array([[1.0], [0.0]], dtype="float32")
    model = keras.Sequential(
        [
            keras.Input((4,), dtype="int32"),
            keras.layers.Embedding(50, 6, name="embed"),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(1, name="out"),
        ]
    )
    model.compile("sgd", "mse")
    reference = keras.models.clone_model(model)
    reference.set_weights(model.get_weights())
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(reference(tokens, training=True) - targets))
    table_gradient = tape.gradient(loss, reference.trainable_variables[0])
    assert isinstance(table_gradient, tf.IndexedSlices)
    dense = tf.convert_to_tensor(table_gradient).numpy()

    watch = GradWatch(verbose=0, update_freq="batch")
    model.fit(tokens, targets, batch_size=2, epochs=1, callbacks=[watch], verbose=0)

    record = watch.recent_steps[0]
    index = [v.path for v in watch.layout.variables].index(model.trainable_variables[0].path)
    np.testing.assert_allclose(
        record.variable("grad_norm")[index], np.linalg.norm(dense), rtol=1e-5
    )
    np.testing.assert_allclose(
        record.variable("grad_zero_fraction")[index], np.mean(dense == 0), rtol=1e-6
    )


def test_frozen_nested_and_shared_layers_grouped(data):
    x, y = data
    keras.utils.set_random_seed(0)
    inner = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(4, name="inner_dense")], name="block"
    )
    frozen = keras.layers.Dense(4, name="frozen", trainable=False)
    shared = keras.layers.Dense(4, name="shared")
    inputs = keras.Input((4,))
    h = shared(inner(frozen(inputs)))
    h = shared(keras.layers.BatchNormalization(name="norm")(h))
    outputs = keras.layers.Dense(1, name="out")(h)
    model = keras.Model(inputs, outputs)
    model.compile("adam", "mse")
    watch = watched_fit(model, x, y)

    layout = watch.layout
    assert layout.layers == ["inner_dense", "shared", "norm", "out"]
    paths = [v.path for v in layout.variables]
    assert len(paths) == len(model.trainable_variables) == 8
    assert not any("frozen" in p or "moving" in p for p in paths)
    assert all(np.isfinite(watch.recent_steps[-1].layer("grad_norm")))


def test_nonfinite_localised_to_first_bad_layer(data):
    x, y = data
    x = x.copy()
    x[3 * 16 + 5] = 0.0  # an all-zero row in step 3
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(6, use_bias=False, name="first"),
            # sqrt is finite at 0 but its derivative is not: the zero row makes
            # the gradient of `first` non-finite while the later layers stay finite.
            keras.layers.Lambda(lambda t: tf.sqrt(tf.abs(t)), name="sqrt"),
            keras.layers.Dense(6, name="middle"),
            keras.layers.Dense(1, name="out"),
        ]
    )
    model.compile("adam", "mse")
    watch = GradWatch(verbose=0, update_freq="batch", on_nonfinite="stop")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, callbacks=[watch], verbose=0)

    (finding,) = watch.findings
    assert finding.kind == "nonfinite"
    assert finding.step == 3
    assert finding.layers == ("first",)
    record = watch.recent_steps[3]
    assert record.layer("grad_nonfinite")[0] > 0
    assert np.all(record.layer("grad_nonfinite")[1:] == 0)
    assert np.isfinite(record.loss)


class ManualLossModel(keras.Model):
    """A custom train step that computes its loss without `compute_loss`."""

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(self(x, training=True) - y))
        keras_gradwatch.record_loss(loss)
        gradients = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply_gradients(zip(gradients, self.trainable_variables))
        return {"loss": loss}


def test_custom_step_records_gradients_and_loss(data, reference_norms):
    x, y = data
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(8, activation="relu", name="hidden_0")(inputs)
    model = ManualLossModel(inputs, keras.layers.Dense(1, name="out")(hidden))
    model.compile("adam")
    model.set_weights(build_mlp(hidden=(8,)).get_weights())
    watch = watched_fit(model, x, y)

    np.testing.assert_allclose(norms(watch), reference_norms, rtol=1e-5)
    single = watched_fit(build_mlp(hidden=(8,)), x, y)
    np.testing.assert_allclose(
        [r.loss for r in watch.recent_steps], [r.loss for r in single.recent_steps], rtol=1e-5
    )
    assert watch.report()["steps"] == 8


def test_record_loss_outside_step_is_noop():
    loss = tf.constant(1.5)
    assert keras_gradwatch.record_loss(loss) is loss


@pytest.mark.parametrize(
    "option, value, acts",
    [
        ("clipnorm", 1.0, lambda r, v: np.nanmax(r.variable("grad_norm")) > v),
        ("global_clipnorm", 2.0, lambda r, v: r.global_grad_norm > v),
        ("clipvalue", 0.5, lambda r, v: np.nanmax(r.variable("grad_max")) > v),
    ],
)
def test_clipping_reports_raw_norms_and_count(data, reference_norms, option, value, acts):
    x, y = data
    model = build_mlp(hidden=(8,), optimizer=keras.optimizers.Adam(**{option: value}))
    watch = watched_fit(model, x, y)

    # Clipping happens inside the optimizer, after GradWatch has seen the
    # gradients, so the first step's raw norm equals the unclipped run's.
    np.testing.assert_allclose(norms(watch)[0], reference_norms[0], rtol=1e-5)
    clipping = watch.report()["clipping"]
    assert clipping["mode"] == option
    assert clipping["value"] == value
    expected = sum(bool(acts(r, value)) for r in watch.recent_steps)
    assert expected > 0
    assert clipping["clipped_steps"] == expected


def test_gradient_accumulation_is_not_small_update(data):
    x, y = data
    optimizer = keras.optimizers.Adam(gradient_accumulation_steps=2)
    model = build_mlp(hidden=(8,), optimizer=optimizer)
    watch = watched_fit(model, x, y)

    updates = [float(r.variable("update_norm")[0]) for r in watch.recent_steps]
    # The weights move on every second step only.
    assert [u > 0 for u in updates] == [False, True] * 4
    assert watch.findings == []


def test_sample_weight_statistics_equal_tape(data):
    x, y = data
    weights = np.linspace(0.1, 2.0, len(x)).astype("float32")
    model = build_mlp(hidden=(8,))
    reference = build_mlp(hidden=(8,), seed=9)
    reference.set_weights(model.get_weights())
    with tf.GradientTape() as tape:
        errors = tf.reduce_mean(tf.square(reference(x[:16], training=True) - y[:16]), axis=-1)
        loss = tf.reduce_mean(errors * weights[:16])
    expected = tape.gradient(loss, reference.trainable_variables)

    watch = GradWatch(verbose=0, update_freq="batch")
    model.fit(
        x,
        y,
        sample_weight=weights,
        batch_size=16,
        epochs=1,
        shuffle=False,
        callbacks=[watch],
        verbose=0,
    )

    record = watch.recent_steps[0]
    np.testing.assert_allclose(record.loss, float(loss), rtol=1e-5)
    for i, gradient in enumerate(expected):
        np.testing.assert_allclose(
            record.variable("grad_norm")[i], np.linalg.norm(gradient), rtol=1e-5
        )


def test_dataset_partial_last_batch(data):
    x, y = data
    x, y = np.concatenate([x, x[:6]]), np.concatenate([y, y[:6]])  # 70 rows: 4 x 16 + 6
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    model = build_mlp(hidden=(8,))
    snapshots = []

    class Snapshot(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            snapshots.append(self.model.get_weights())

    watch = GradWatch(verbose=0, update_freq="batch")
    model.fit(dataset, epochs=1, callbacks=[Snapshot(), watch], verbose=0)

    assert [r.step for r in watch.recent_steps] == [0, 1, 2, 3, 4]
    reference = build_mlp(hidden=(8,), seed=9)
    reference.set_weights(snapshots[4])
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(reference(x[64:], training=True) - y[64:]))
    expected = np.sqrt(
        sum(np.sum(g.numpy() ** 2) for g in tape.gradient(loss, reference.trainable_variables))
    )
    np.testing.assert_allclose(watch.recent_steps[4].global_grad_norm, expected, rtol=1e-5)
    np.testing.assert_allclose(watch.recent_steps[4].loss, float(loss), rtol=1e-5)


def test_two_outputs_total_loss_and_norms(data):
    x, y = data
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(8, activation="relu", name="hidden")(inputs)
    first = keras.layers.Dense(1, name="first")(hidden)
    second = keras.layers.Dense(1, name="second")(hidden)
    model = keras.Model(inputs, [first, second])
    model.compile("adam", loss=["mse", "mse"], loss_weights=[1.0, 0.5])
    reference = keras.models.clone_model(model)
    reference.set_weights(model.get_weights())
    with tf.GradientTape() as tape:
        out_first, out_second = reference(x[:16], training=True)
        loss = tf.reduce_mean(tf.square(out_first - y[:16])) + 0.5 * tf.reduce_mean(
            tf.square(out_second - 2 * y[:16])
        )
    gradients = tape.gradient(loss, reference.trainable_variables)
    expected = np.sqrt(sum(np.sum(g.numpy() ** 2) for g in gradients))

    watch = GradWatch(verbose=0, update_freq="batch")
    model.fit(x, (y, 2 * y), batch_size=16, epochs=1, shuffle=False, callbacks=[watch], verbose=0)

    record = watch.recent_steps[0]
    np.testing.assert_allclose(record.loss, float(loss), rtol=1e-5)
    np.testing.assert_allclose(record.global_grad_norm, expected, rtol=1e-5)
    assert watch.layout.layers == ["hidden", "first", "second"]


def test_loss_scale_overflow_counted_not_reported(data):
    x, y = data
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(8, activation="relu", name="hidden_0"),
                keras.layers.Dense(1, name="out", dtype="float32"),
            ]
        )
        # A huge initial scale overflows the float16 gradients until dynamic
        # loss scaling has halved it enough times.
        optimizer = keras.optimizers.LossScaleOptimizer(
            keras.optimizers.Adam(), initial_scale=2.0**40
        )
        model.compile(optimizer, "mse")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    watch = GradWatch(verbose=0, update_freq="batch", weight_stats_freq=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(x, y, batch_size=4, epochs=3, shuffle=False, callbacks=[watch], verbose=0)

    report = watch.report()
    skipped = [r for r in watch.recent_steps if r.update_skipped]
    assert report["loss_scale_skips"] > 0
    assert report["loss_scale_skips"] == len(skipped) == report["skipped_updates"]
    assert all(np.all(r.variable("update_norm") == 0) for r in skipped)
    assert [f for f in watch.findings if f.kind == "nonfinite"] == []
    assert not watch.recent_steps[-1].update_skipped


def test_class_weight_statistics_equal_tape():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4)).astype("float32")
    y = (x[:, :1] > 0).astype("float32")
    class_weight = {0: 0.25, 1: 3.0}
    model = build_mlp(hidden=(8,), output_activation="sigmoid", loss="binary_crossentropy")
    reference = build_mlp(
        hidden=(8,), seed=9, output_activation="sigmoid", loss="binary_crossentropy"
    )
    reference.set_weights(model.get_weights())
    weights = np.where(y[:16, 0] > 0, 3.0, 0.25).astype("float32")
    with tf.GradientTape() as tape:
        per_sample = keras.losses.binary_crossentropy(y[:16], reference(x[:16], training=True))
        loss = tf.reduce_mean(per_sample * weights)
    expected = tape.gradient(loss, reference.trainable_variables)

    watch = GradWatch(verbose=0, update_freq="batch")
    model.fit(
        x,
        y,
        class_weight=class_weight,
        batch_size=16,
        epochs=1,
        shuffle=False,
        callbacks=[watch],
        verbose=0,
    )

    record = watch.recent_steps[0]
    np.testing.assert_allclose(record.loss, float(loss), rtol=1e-5)
    for i, gradient in enumerate(expected):
        np.testing.assert_allclose(
            record.variable("grad_norm")[i], np.linalg.norm(gradient), rtol=1e-5
        )


def test_weight_decay_shows_in_update_not_gradient(data, reference_norms):
    x, y = data
    plain = watched_fit(build_mlp(hidden=(8,)), x, y)
    decayed = watched_fit(
        build_mlp(hidden=(8,), optimizer=keras.optimizers.AdamW(weight_decay=0.5)), x, y
    )

    # Weight decay acts inside the optimizer: the first gradient is the same,
    # the first update is larger.
    np.testing.assert_allclose(norms(decayed)[0], reference_norms[0], rtol=1e-5)
    kernel = 0  # hidden_0/kernel
    assert (
        decayed.recent_steps[0].variable("update_norm")[kernel]
        > plain.recent_steps[0].variable("update_norm")[kernel]
    )

"""GradWatch end to end: findings, warnings, policies, results and argument checks."""

import json
import warnings

import keras
import numpy as np
import pytest
from conftest import build_mlp

import keras_gradwatch as kg
from keras_gradwatch import GradWatch, Thresholds
from keras_gradwatch.callback import check_backend

DETECTED_KINDS = {
    "vanishing_gradient",
    "dead_layer",
    "small_update",
    "exploding_gradient",
    "nonfinite",
    "loss_stagnation",
    "loss_oscillation",
}


def sigmoid_stack_data(seed=0, rows=512):
    """Unscaled inputs in the hundreds of thousands, like raw incomes and day counts."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(1e5, 1e6, size=(rows, 8)).astype("float32")
    y = (rng.uniform(size=(rows, 1)) < 0.5).astype("float32")
    return x, y


def fit_quietly(model, x, y, watch, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, callbacks=[watch], verbose=0, **kwargs)
    return [w for w in caught if issubclass(w.category, kg.GradientWarning)]


def test_deep_sigmoid_on_raw_inputs_vanishes():
    x, y = sigmoid_stack_data()
    model = build_mlp(
        n_inputs=8,
        hidden=(10,) * 9,
        activation="sigmoid",
        output_activation="sigmoid",
        loss="binary_crossentropy",
    )
    watch = GradWatch(verbose=0)
    caught = fit_quietly(model, x, y, watch, batch_size=32, epochs=3)

    kinds = {f.kind for f in watch.findings}
    assert "dead_layer" in kinds
    assert "vanishing_gradient" in kinds
    dead = next(f for f in watch.findings if f.kind == "dead_layer")
    assert dead.layers == ("hidden_0",)
    assert dead.step == 0
    decay = next(f for f in watch.findings if f.kind == "vanishing_gradient")
    assert decay.layers[-1] == "out"
    assert decay.value < 1e-3
    # One warning per finding, however many steps the condition held.
    assert dead.count > 20
    assert len(caught) == len(watch.findings)
    dead_warnings = [w for w in caught if w.category is kg.DeadLayerWarning]
    assert len(dead_warnings) == 1
    message = str(dead_warnings[0].message)
    assert "hidden_0" in message
    assert "step 0" in message
    assert "threshold 20" in message
    assert "Remedy:" in message


def test_healthy_relu_network_has_no_findings(regression_data):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(512, 4)).astype("float32")
    y = (x @ np.array([[1.0], [-2.0], [0.5], [0.3]])).astype("float32")
    model = build_mlp(hidden=(32, 16), activation="relu")
    watch = GradWatch(verbose=0)
    caught = fit_quietly(model, x, y, watch, batch_size=32, epochs=5)

    assert watch.findings == []
    assert caught == []


def diverging_regression(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(scale=10.0, size=(256, 4)).astype("float32")
    y = x.sum(axis=1, keepdims=True).astype("float32")
    model = build_mlp(hidden=(8,), activation=None, optimizer=keras.optimizers.SGD(0.05), seed=seed)
    return model, x, y


def test_exploding_raise_policy_stops_fit():
    model, x, y = diverging_regression()
    watch = GradWatch(verbose=0, update_freq="batch", on_exploding="raise")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kg.GradientWarning)
        with pytest.raises(kg.ExplodingGradientError) as raised:
            model.fit(x, y, batch_size=16, epochs=5, callbacks=[watch], verbose=0)

    finding = raised.value.finding
    assert finding.kind == "exploding_gradient"
    assert finding.step == watch.findings[0].step or finding in watch.findings
    assert str(finding.step) in str(raised.value)
    # The stock train function is back even though fit did not finish.
    assert "apply" not in vars(model.optimizer)
    model.compile(optimizer="sgd", loss="mse")
    model.fit(x[:16] / 100, y[:16] / 100, epochs=1, verbose=0)


def test_exploding_warning_category_escalates_to_error():
    model, x, y = diverging_regression()
    watch = GradWatch(verbose=0, update_freq="batch")
    with warnings.catch_warnings():
        warnings.simplefilter("error", kg.ExplodingGradientWarning)
        warnings.simplefilter("ignore", kg.NonFiniteWarning)
        with pytest.raises(kg.ExplodingGradientWarning):
            model.fit(x, y, batch_size=16, epochs=5, callbacks=[watch], verbose=0)


def test_stop_policy_sets_stop_training():
    model, x, y = diverging_regression()
    watch = GradWatch(verbose=0, update_freq="batch", on_exploding="stop")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kg.GradientWarning)
        history = model.fit(x, y, batch_size=16, epochs=20, callbacks=[watch], verbose=0)

    first = min(f.step for f in watch.findings if f.kind == "exploding_gradient")
    assert len(history.history["loss"]) == first // 16 + 1
    assert watch.epochs[-1].last_step == first


class WeightSnapshots(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.after_batch = {}

    def on_train_batch_end(self, batch, logs=None):
        self.after_batch[batch] = [w.copy() for w in self.model.get_weights()]


def test_nonfinite_stop_keeps_last_finite_weights(regression_data):
    x, y = regression_data
    y = y.copy()
    # A NaN target in the sixth batch (step 5) of 8 rows makes that batch's loss
    # NaN, so the output layer, where backpropagation starts, goes bad first.
    y[5 * 8 + 3, 0] = np.nan
    model = build_mlp(hidden=(8,))
    snapshots = WeightSnapshots()
    watch = GradWatch(verbose=0, update_freq="batch", on_nonfinite="stop")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(
            x, y, batch_size=8, epochs=2, shuffle=False, callbacks=[snapshots, watch], verbose=0
        )

    (finding,) = watch.findings
    assert finding.kind == "nonfinite"
    assert finding.step == 5
    assert finding.layers == ("out",)
    assert "nan" in finding.message
    assert [w.category for w in caught if issubclass(w.category, kg.GradientWarning)] == [
        kg.NonFiniteWarning
    ]
    assert len(history.history["loss"]) == 1
    for kept, snapshot in zip(model.get_weights(), snapshots.after_batch[4]):
        np.testing.assert_array_equal(kept, snapshot)
    assert watch.report()["skipped_updates"] == 1


def test_nonfinite_warn_policy_keeps_training(regression_data):
    x, y = regression_data
    x = x.copy()
    x[3, 0] = np.inf
    model = build_mlp(hidden=(8,))
    watch = GradWatch(verbose=0)
    history = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kg.GradientWarning)
        history = model.fit(
            x, y, batch_size=8, epochs=2, shuffle=False, callbacks=[watch], verbose=0
        )

    assert len(history.history["loss"]) == 2
    nonfinite = [f for f in watch.findings if f.kind == "nonfinite"]
    assert nonfinite[0].step == 0
    assert nonfinite[0] is watch.findings[0]  # most severe first


def test_report_is_json_and_matches_findings(regression_data):
    x, y = sigmoid_stack_data()
    model = build_mlp(
        n_inputs=8,
        hidden=(10,) * 9,
        activation="sigmoid",
        output_activation="sigmoid",
        loss="binary_crossentropy",
    )
    watch = GradWatch(verbose=0)
    fit_quietly(model, x, y, watch, batch_size=64, epochs=3)

    report = json.loads(json.dumps(watch.report(), allow_nan=False))
    assert report["steps"] == 24
    assert report["epochs_completed"] == 3
    assert [layer["name"] for layer in report["layers"]] == watch.layout.layers
    assert [f["kind"] for f in report["findings"]] == [f.kind for f in watch.findings]
    assert set(report["findings"][0]) >= {
        "kind",
        "layers",
        "step",
        "epoch",
        "value",
        "threshold",
        "message",
        "remedy",
        "count",
        "last_step",
    }
    assert report["epochs"][0]["layers"]["hidden_0"]["grad_norm_max"] == 0.0
    assert {f.kind for f in watch.findings} <= DETECTED_KINDS
    restored = [kg.Finding.from_dict(f) for f in report["findings"]]
    assert [f.describe() for f in restored] == [f.describe() for f in watch.findings]


def test_dataframe_levels_agree(regression_data):
    x, y = regression_data
    model = build_mlp(hidden=(8,))
    watch = GradWatch(verbose=0)
    model.fit(x, y, batch_size=16, epochs=2, callbacks=[watch], verbose=0)

    variables = watch.to_dataframe()
    layers = watch.to_dataframe(level="layer")
    assert len(variables) == 2 * 4
    assert len(layers) == 2 * 2
    assert {"epoch", "layer", "depth", "variable", "grad_norm_median", "update_ratio_last"} <= set(
        variables.columns
    )
    last = (
        variables[variables.epoch == 1]
        .groupby("layer")
        .grad_norm_last.apply(lambda s: float(np.sqrt((s**2).sum())))
    )
    for _, row in layers[layers.epoch == 1].iterrows():
        assert row.grad_norm_last == pytest.approx(last[row.layer], rel=1e-9)
    with pytest.raises(ValueError, match="level"):
        watch.to_dataframe(level="model")


class CustomStepModel(keras.Model):
    def train_step(self, data):
        return super().train_step(data)


def test_custom_train_step_warns_and_still_records(regression_data):
    x, y = regression_data
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    model = CustomStepModel(inputs, keras.layers.Dense(1, name="out")(inputs))
    model.compile("adam", "mse")
    watch = GradWatch(verbose=0)
    with pytest.warns(RuntimeWarning, match="overrides `train_step`"):
        model.fit(x, y, batch_size=32, epochs=1, callbacks=[watch], verbose=0)
    assert watch.epochs[0].steps == 2
    assert np.isfinite(watch.recent_steps[-1].global_grad_norm)


def test_non_tensorflow_backend_rejected():
    with pytest.raises(RuntimeError, match="needs the TensorFlow backend") as raised:
        check_backend("jax")
    assert "'jax'" in str(raised.value)
    assert "KERAS_BACKEND=tensorflow" in str(raised.value)
    check_backend("tensorflow")


@pytest.mark.parametrize(
    "kwargs, error, fragment",
    [
        ({"update_freq": "step"}, ValueError, "update_freq='step'"),
        ({"update_freq": 0}, ValueError, "update_freq=0"),
        ({"update_freq": 1.5}, TypeError, "update_freq=1.5"),
        ({"update_freq": True}, TypeError, "update_freq=True"),
        ({"on_exploding": "ignore"}, ValueError, "on_exploding='ignore'"),
        ({"on_vanishing": None}, ValueError, "on_vanishing=None"),
        ({"on_nonfinite": "Stop"}, ValueError, "on_nonfinite='Stop'"),
        ({"on_loss": "raise!"}, ValueError, "on_loss='raise!'"),
        ({"thresholds": {"decay_ratio": 1e-4}}, TypeError, "thresholds="),
        ({"log_grad_norm": 1}, TypeError, "log_grad_norm=1"),
        ({"verbose": 3}, ValueError, "verbose=3"),
        ({"buffer_steps": 1}, ValueError, "buffer_steps=1"),
        ({"buffer_steps": "256"}, ValueError, "buffer_steps='256'"),
        ({"weight_stats_freq": -1}, ValueError, "weight_stats_freq=-1"),
        ({"weight_stats_freq": True}, ValueError, "weight_stats_freq=True"),
        ({"weight_stats_freq": 2.5}, ValueError, "weight_stats_freq=2.5"),
    ],
)
def test_invalid_arguments_rejected(kwargs, error, fragment):
    with pytest.raises(error) as raised:
        GradWatch(**kwargs)
    assert fragment in str(raised.value)


def test_thresholds_change_detection():
    x, y = sigmoid_stack_data()
    model = build_mlp(
        n_inputs=8,
        hidden=(10,) * 9,
        activation="sigmoid",
        output_activation="sigmoid",
        loss="binary_crossentropy",
    )
    watch = GradWatch(verbose=0, thresholds=Thresholds(dead_steps=10_000, decay_ratio=1e-12))
    fit_quietly(model, x, y, watch, batch_size=32, epochs=2)
    kinds = {f.kind for f in watch.findings}
    assert "dead_layer" not in kinds
    assert "vanishing_gradient" not in kinds
